"""Contacts: one at a time, in bulk, and by CSV import; and erasure.

Input arrives in the API shape and is judged by engine.contacts.validation whichever
route it took. Single-contact writes go through the ORM; bulk writes and import batches
go through the set-based engine.contacts.upsert.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import IO, Any

from sqlalchemy import Select, case, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from engine.contacts.csv_import import stage_upload
from engine.contacts.upsert import UpsertResult, upsert_contacts
from engine.contacts.validation import normalize_email, validate_contact
from engine.dispatch.planning import PLANNABLE
from engine.errors import Conflict, ValidationFailed
from engine.models import Campaign, CampaignChannel, Contact, ContactImport, Delivery
from engine.services.ownership import get_owned

MAX_BULK_CONTACTS = 10_000

_UNIQUE_KEYS = ("external_id", "email")


# -- one contact ----------------------------------------------------------------------


def get_contact(session: Session, user_id: uuid.UUID, contact_id: uuid.UUID | str) -> Contact:
    return get_owned(session, Contact, user_id, contact_id, what="contact")


def create_contact(session: Session, user_id: uuid.UUID, data: dict[str, Any]) -> Contact:
    """A new contact; consent not given is false. 409 naming the field when its
    external_id or email is already another contact's."""
    clean = _judge(data)
    _ensure_keys_free(session, user_id, clean, exclude_id=None)
    attributes = {k: v for k, v in clean.pop("attributes", {}).items() if v is not None}
    contact = Contact(user_id=user_id, attributes=attributes, **clean)
    session.add(contact)
    _flush_keys(session, user_id, clean)
    return contact


def update_contact(
    session: Session, user_id: uuid.UUID, contact_id: uuid.UUID | str, data: dict[str, Any]
) -> Contact:
    """PATCH: absent fields stay; `attributes` merges (null removes a key); consent
    keys not given stay; push_tokens replaces the list."""
    clean = _judge(data)
    contact = get_owned(session, Contact, user_id, contact_id, what="contact", for_update=True)
    _ensure_keys_free(session, user_id, clean, exclude_id=contact.id)
    patch = clean.pop("attributes", None)
    if patch is not None:
        merged = {**contact.attributes, **patch}
        contact.attributes = {k: v for k, v in merged.items() if v is not None}
    for column, value in clean.items():
        setattr(contact, column, value)
    _flush_keys(session, user_id, clean)
    return contact


def delete_contact(session: Session, user_id: uuid.UUID, contact_id: uuid.UUID | str) -> None:
    """Erase the contact (GDPR).

    Its deliveries stay, so campaign counters still equal their rows, but lose the link
    and the address, in one UPDATE; deliveries still queued are cancelled, as there is
    no one left to send them to (a planner at work is waited for first). The foreign
    keys then clear data_events.contact_id and remove its contact_sources links as the
    contact row goes.

    The rows are found through the owner's channels: a contact's deliveries can only be
    in its own user's campaigns, and (channel, contact) is the deliveries' unique key,
    so this is one index probe per channel. Deliveries keep no index on contact_id
    alone (migration 0010), which every planned and sent message would pay for.
    """
    contact = get_owned(session, Contact, user_id, contact_id, what="contact", for_update=True)
    _wait_for_planners(session, user_id)
    session.execute(
        update(Delivery)
        .where(
            Delivery.campaign_channel_id.in_(_channels_of(user_id)),
            Delivery.contact_id == contact.id,
        )
        .values(
            contact_id=None,
            address=None,
            status=case((Delivery.status == "queued", "cancelled"), else_=Delivery.status),
        )
        .execution_options(synchronize_session=False)
    )
    session.execute(
        delete(Contact)
        .where(Contact.id == contact.id, Contact.user_id == user_id)
        .execution_options(synchronize_session=False)
    )
    session.expunge(contact)


def _wait_for_planners(session: Session, user_id: uuid.UUID) -> None:
    """Keep planning from committing a delivery for the contact being erased.

    deliveries.contact_id has no foreign key (migration 0008), and a planner inserts
    from the contacts its statement saw, holding its channel's row lock until commit.
    Share-locking the user's channels that may be planned waits for any planner at
    work (its rows are then visible to the UPDATE that follows, which redacts them) and
    keeps new planners out until this erasure commits: they skip a locked channel, and
    reconciliation plans it again a few seconds later, without this contact.
    SQLite has one writer at a time and no row locks; there is nothing to wait for."""
    session.execute(
        _channels_of(user_id)
        .where(CampaignChannel.status.in_(PLANNABLE))
        .with_for_update(of=CampaignChannel, read=True)
    ).all()


def _channels_of(user_id: uuid.UUID) -> Select:
    """The ids of every channel of the user's campaigns."""
    return (
        select(CampaignChannel.id)
        .join(Campaign, Campaign.id == CampaignChannel.campaign_id)
        .where(Campaign.user_id == user_id)
    )


def contacts_query(
    user_id: uuid.UUID,
    *,
    email: str | None = None,
    external_id: str | None = None,
    attributes: Sequence[str] = (),
) -> Select:
    """The user's contacts, filtered; engine.pagination orders and pages it.

    `attributes` holds "key:value" filters, all of which must match: the attribute's
    value read as text equals `value`, so "plan:gold" matches "gold" and "age:42"
    matches both 42 and "42".
    """
    for name, values in (
        ("email", [email]),
        ("external_id", [external_id]),
        ("attribute", attributes),
    ):
        if any(value is not None and "\x00" in value for value in values):
            raise ValidationFailed(
                "NUL in a filter", fields={name: ["Must not contain NUL characters."]}
            )
    stmt = select(Contact).where(Contact.user_id == user_id)
    if email is not None:
        stmt = stmt.where(Contact.email == normalize_email(email))
    if external_id is not None:
        stmt = stmt.where(Contact.external_id == external_id.strip())
    for index, condition in enumerate(attributes):
        key, separator, value = condition.partition(":")
        if not separator or not key:
            raise ValidationFailed(
                "attribute filters are key:value",
                fields={f"attribute[{index}]": ["Expected key:value."]},
            )
        stmt = stmt.where(Contact.attributes[key].as_string() == value)
    return stmt


def _judge(data: dict[str, Any]) -> dict[str, Any]:
    clean, errors = validate_contact(data)
    if errors:
        raise ValidationFailed("contact rejected", fields=errors)
    return clean


def _ensure_keys_free(
    session: Session, user_id: uuid.UUID, clean: dict[str, Any], exclude_id: uuid.UUID | None
) -> None:
    """Name the field (and the contact holding it) when a unique key is taken."""
    wanted = {key: clean[key] for key in _UNIQUE_KEYS if clean.get(key) is not None}
    if not wanted:
        return
    stmt = select(Contact.id, Contact.external_id, Contact.email).where(
        Contact.user_id == user_id,
        or_(*(getattr(Contact, key) == value for key, value in wanted.items())),
    )
    if exclude_id is not None:
        stmt = stmt.where(Contact.id != exclude_id)
    fields: dict[str, list[str]] = {}
    for holder in session.execute(stmt):
        for key, value in wanted.items():
            if getattr(holder, key) == value:
                fields[key] = [f"in use by {holder.id}"]
    if fields:
        raise Conflict(
            "another contact has this " + " and ".join(fields), code="contact_exists", fields=fields
        )


def _flush_keys(session: Session, user_id: uuid.UUID, clean: dict[str, Any]) -> None:
    """Flush in a savepoint: a concurrent write that took the key after the check above
    still answers 409, and the request's transaction stays usable."""
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        constraint = getattr(getattr(exc.orig, "diag", None), "constraint_name", None) or ""
        field = next((key for key in _UNIQUE_KEYS if constraint.endswith(key)), "email")
        raise Conflict(
            f"another contact has this {field}",
            code="contact_exists",
            fields={field: ["in use by another contact"]},
        ) from exc


# -- many contacts --------------------------------------------------------------------


def bulk_upsert(session: Session, user_id: uuid.UUID, rows: Sequence[Any]) -> UpsertResult:
    """Validate every row, then write the good ones set-based (engine.contacts.upsert)."""
    if len(rows) > MAX_BULK_CONTACTS:
        raise ValidationFailed(
            "too many contacts",
            fields={"contacts": [f"At most {MAX_BULK_CONTACTS} contacts per request."]},
        )
    return upsert_contacts(session, user_id, [validate_contact(row) for row in rows])


def start_import(
    session: Session, user_id: uuid.UUID, filename: str | None, upload: IO[bytes]
) -> ContactImport:
    """Stage an uploaded CSV; the caller enqueues the worker after committing."""
    return stage_upload(session, user_id, filename, upload)


def get_import(session: Session, user_id: uuid.UUID, import_id: uuid.UUID | str) -> ContactImport:
    return get_owned(session, ContactImport, user_id, import_id, what="import")


def imports_query(user_id: uuid.UUID) -> Select:
    return select(ContactImport).where(ContactImport.user_id == user_id)

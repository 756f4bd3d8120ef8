"""Suppressions: addresses a user must never send to again on one channel.

Planning leaves them out and the sender re-checks them just before each call, so a
suppression written here (by the API, an unsubscribe link, a STOP, a hard bounce)
stops the next message, even mid-campaign. One row per (user, channel, address): every
writer inserts with ON CONFLICT DO NOTHING, so concurrent or repeated writes leave one.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Select, delete, select
from sqlalchemy.orm import Session

from engine.contacts.validation import validate_contact
from engine.errors import ValidationFailed
from engine.models import SoftBounce, Suppression
from engine.services.ownership import get_owned

_KEY = ["user_id", "channel", "address"]


def stored_address(channel: str, address: str) -> str:
    """How an address is stored and compared: email without case (suppressions match
    Ann@x and ann@x alike), phones as E.164, push as the contact id."""
    return address.strip().lower() if channel == "email" else address.strip()


def normalize_address(channel: str, raw: Any) -> str:
    """An address as the API accepts it, normalised like a contact's: email lower-cased,
    sms and whatsapp numbers in E.164, push a contact id. ValidationFailed naming
    `address` otherwise."""
    if channel == "push":
        try:
            return str(uuid.UUID(str(raw)))
        except ValueError:
            raise _bad_address("A push suppression's address is a contact id (a UUID).") from None
    field = "email" if channel == "email" else "phone"
    clean, errors = validate_contact({field: raw})
    if errors:
        raise _bad_address(*(message for messages in errors.values() for message in messages))
    if not clean.get(field):
        raise _bad_address("Must not be blank.")
    return stored_address(channel, clean[field])


def _bad_address(*messages: str) -> ValidationFailed:
    return ValidationFailed("request validation failed", fields={"address": list(messages)})


def suppress(session: Session, user_id: uuid.UUID, channel: str, address: str, reason: str) -> bool:
    """Suppress the address (as stored_address) unless it already is; True if added.
    An existing suppression keeps its reason."""
    row = {
        "id": uuid.uuid4(),
        "user_id": user_id,
        "channel": channel,
        "address": stored_address(channel, address),
        "reason": reason,
    }
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    table = Suppression.__table__
    # RETURNING, not rowcount: the driver reports -1 for INSERT … ON CONFLICT here.
    stmt = insert(table).values(row).on_conflict_do_nothing(index_elements=_KEY)
    return session.execute(stmt.returning(table.c.id)).first() is not None


def create_suppression(
    session: Session, user_id: uuid.UUID, channel: str, address: Any, reason: str = "manual"
) -> tuple[Suppression, bool]:
    """(the suppression, whether it is new). Idempotent: the same channel and address
    again returns the existing row, with its original reason."""
    address = normalize_address(channel, address)
    created = suppress(session, user_id, channel, address, reason)
    row = session.scalars(
        select(Suppression).where(
            Suppression.user_id == user_id,
            Suppression.channel == channel,
            Suppression.address == address,
        )
    ).one()
    return row, created


def suppressions_query(
    user_id: uuid.UUID, *, channel: str | None = None, reason: str | None = None
) -> Select:
    """The user's suppressions, for engine.pagination.paginate (newest first)."""
    stmt = select(Suppression).where(Suppression.user_id == user_id)
    if channel is not None:
        stmt = stmt.where(Suppression.channel == channel)
    if reason is not None:
        stmt = stmt.where(Suppression.reason == reason)
    return stmt


def get_suppression(
    session: Session, user_id: uuid.UUID, suppression_id: uuid.UUID | str
) -> Suppression:
    return get_owned(session, Suppression, user_id, suppression_id, what="suppression")


def delete_suppression(
    session: Session, user_id: uuid.UUID, suppression_id: uuid.UUID | str
) -> None:
    """Send to the address again. Its soft-bounce tally starts over too, so one more
    soft bounce does not suppress it straight back."""
    row = get_suppression(session, user_id, suppression_id)
    session.execute(
        delete(SoftBounce).where(
            SoftBounce.user_id == user_id,
            SoftBounce.channel == row.channel,
            SoftBounce.address == row.address,
        )
    )
    session.delete(row)
    session.flush()

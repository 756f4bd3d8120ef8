"""The set-based contact upsert behind POST /contacts/bulk and the CSV import worker.

A batch (up to 10,000 rows from the API, 5,000 per import step) is written with a fixed
number of statements whatever its size: one SELECT resolves every row's match, then one
UPDATE … FROM jsonb_to_recordset(…) and one INSERT … SELECT FROM jsonb_to_recordset(…)
write it. The rows travel as one JSON parameter, which keeps clear of PostgreSQL's 65,535
bind-parameter limit and lets the server type every column in a single pass.

Rules, applied in input order so the outcome is what writing the rows one by one would
give (except that a key a contact gives up in the batch stays its own until the batch
is written):

* A row is matched on `external_id`, else on `email`. A row needs one of the two; an
  upsert without a key could never be repeated safely.
* A row whose external_id matches contact A while its email belongs to contact B is
  rejected as {"email": ["in use by <B>"]}, as is a row with a new external_id whose
  email belongs to a contact that already has a different external_id.
* Later rows for the same contact (the same key twice in one batch) fold into it: they
  update what the earlier rows created or updated, and say "updated".
* Updates are PATCH-like: absent fields stay as they are; `attributes` merges key by key
  (a null value removes that key); `push_tokens` and `consent.<channel>` replace.
* A row with errors is rejected whole and writes nothing.

Because the SELECT reads before the writes, every batch for one user takes a
transaction-scoped advisory lock first: two batches of the same user run one after the
other (so neither decides on a state the other is changing, and two UPDATEs never lock
the same contacts in opposite orders), while other users' batches run in parallel. A
single-contact write racing a batch can still claim a key in between; the batch's
writes then fail as a whole inside a savepoint and it answers Conflict, to be retried.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from engine.contacts.validation import CONSENT_CHANNELS, CONTACT_COLUMNS
from engine.errors import Conflict, DomainError

CREATED, UPDATED, REJECTED = "created", "updated", "rejected"
KEY_REQUIRED = "An external_id or an email is required to match a contact."

# pg_advisory_xact_lock(class, object): the class keeps these locks apart from any other
# advisory lock Herald takes; the object is derived from the user id.
UPSERT_LOCK_CLASS = 0x48524C43  # "HRLC"

_SQL_TYPES = {
    "push_tokens": "jsonb",
    "attributes": "jsonb",
    **{f"consent_{channel}": "boolean" for channel in CONSENT_CHANNELS},
}


def _recordset_columns(columns: Sequence[str]) -> str:
    return ", ".join(f"{column} {_SQL_TYPES.get(column, 'text')}" for column in columns)


_LOCK_SQL = text("SELECT pg_advisory_xact_lock(:lock_class, :lock_object)")

# Both unique keys are indexed per user (uq_contacts_user_id_external_id, …_email), so
# this is two index scans OR-ed together, however large the batch.
_RESOLVE_SQL = text(
    "SELECT id, external_id, email FROM contacts"
    " WHERE user_id = :user_id"
    " AND (external_id = ANY(:external_ids) OR email = ANY(:emails))"
)

_INSERT_COLUMNS = ("id", *CONTACT_COLUMNS)
_INSERT_SQL = text(
    f"INSERT INTO contacts (user_id, {', '.join(_INSERT_COLUMNS)})"
    f" SELECT :user_id, {', '.join('r.' + c for c in _INSERT_COLUMNS)}"
    f" FROM jsonb_to_recordset(CAST(:rows AS jsonb))"
    f" AS r(id uuid, {_recordset_columns(CONTACT_COLUMNS)})"
)


def _set_clause(column: str) -> str:
    # r.present lists the fields the rows gave; any other column keeps its value.
    if column == "attributes":
        new_value = "(c.attributes - r.attributes_unset) || r.attributes_set"
    else:
        new_value = f"r.{column}"
    return f"{column} = CASE WHEN '{column}' = ANY(r.present) THEN {new_value} ELSE c.{column} END"


_UPDATE_RECORD_COLUMNS = [c for c in CONTACT_COLUMNS if c != "attributes"]
_UPDATE_SQL = text(
    "UPDATE contacts AS c SET "
    + ", ".join(_set_clause(column) for column in CONTACT_COLUMNS)
    + " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r("
    "id uuid, present text[], attributes_set jsonb, attributes_unset text[], "
    f"{_recordset_columns(_UPDATE_RECORD_COLUMNS)})"
    " WHERE c.id = r.id AND c.user_id = :user_id"
)

_NEW_CONTACT_DEFAULTS: dict[str, Any] = {
    **dict.fromkeys(CONTACT_COLUMNS),
    "push_tokens": [],
    "attributes": {},
    **{f"consent_{channel}": False for channel in CONSENT_CHANNELS},
}


@dataclass
class RowOutcome:
    index: int
    status: str
    contact_id: uuid.UUID | None = None
    errors: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class UpsertResult:
    outcomes: list[RowOutcome]

    def count(self, status: str) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status == status)

    @property
    def created(self) -> int:
        return self.count(CREATED)

    @property
    def updated(self) -> int:
        return self.count(UPDATED)

    @property
    def rejected(self) -> int:
        return self.count(REJECTED)


@dataclass(eq=False)
class _Target:
    """One contact the batch writes to: an existing one, or one it creates."""

    contact_id: uuid.UUID
    is_new: bool
    external_id: str | None
    email: str | None
    changes: dict[str, Any] = field(default_factory=dict)
    attribute_patch: dict[str, Any] | None = None
    written_by_rows: int = 0

    def fold(self, clean: dict[str, Any]) -> None:
        for column, value in clean.items():
            if column == "attributes":
                self.attribute_patch = {**(self.attribute_patch or {}), **value}
            else:
                self.changes[column] = value
        self.external_id = clean.get("external_id", self.external_id)
        self.email = clean.get("email", self.email)
        self.written_by_rows += 1


class _Claims:
    """Who holds each external_id and email during the batch: the contacts found in the
    database, then the targets earlier rows created or re-keyed."""

    def __init__(self, existing: list[Any]) -> None:
        self.by_external_id: dict[str, _Target] = {}
        self.by_email: dict[str, _Target] = {}
        for row in existing:
            target = _Target(row.id, False, row.external_id, row.email)
            if row.external_id is not None:
                self.by_external_id[row.external_id] = target
            if row.email is not None:
                self.by_email[row.email] = target

    def claim(self, target: _Target, external_id: str | None, email: str | None) -> None:
        if external_id is not None:
            self.by_external_id.setdefault(external_id, target)
        if email is not None:
            self.by_email.setdefault(email, target)


def upsert_contacts(
    session: Session,
    user_id: uuid.UUID,
    judged: Sequence[tuple[dict[str, Any], dict[str, list[str]]]],
) -> UpsertResult:
    """Write a batch of rows already judged by validate_contact, as (clean, errors)
    pairs in input order; returns one outcome per row, in the same order."""
    if session.get_bind().dialect.name != "postgresql":
        raise DomainError("bulk upserts and imports need PostgreSQL", code="postgresql_required")
    session.execute(
        _LOCK_SQL,
        {"lock_class": UPSERT_LOCK_CLASS, "lock_object": _lock_object(user_id)},
    )
    external_ids = {c["external_id"] for c, e in judged if not e and c.get("external_id")}
    emails = {c["email"] for c, e in judged if not e and c.get("email")}
    existing = []
    if external_ids or emails:
        existing = session.execute(
            _RESOLVE_SQL,
            {"user_id": user_id, "external_ids": list(external_ids), "emails": list(emails)},
        ).all()

    claims = _Claims(existing)
    targets: list[_Target] = []
    outcomes: list[RowOutcome] = []
    for index, (clean, errors) in enumerate(judged):
        if errors:
            outcomes.append(RowOutcome(index, REJECTED, errors=errors))
            continue
        target, problems = _resolve(claims, clean)
        if problems:
            outcomes.append(RowOutcome(index, REJECTED, errors=problems))
            continue
        if target is None:
            target = _Target(uuid.uuid4(), True, None, None)
        if target.written_by_rows == 0:
            targets.append(target)
        status = CREATED if target.is_new and target.written_by_rows == 0 else UPDATED
        target.fold(clean)
        claims.claim(target, target.external_id, target.email)
        outcomes.append(RowOutcome(index, status, target.contact_id))

    _write(session, user_id, targets)
    return UpsertResult(outcomes)


def _resolve(claims: _Claims, clean: dict[str, Any]) -> tuple[_Target | None, dict]:
    """The contact this row writes to (None: a new one), or the reasons it cannot."""
    external_id, email = clean.get("external_id"), clean.get("email")
    if external_id is None and email is None:
        return None, {"external_id": [KEY_REQUIRED], "email": [KEY_REQUIRED]}
    target = claims.by_external_id.get(external_id) if external_id is not None else None
    email_holder = claims.by_email.get(email) if email is not None else None
    if target is None and email_holder is not None:
        if external_id is not None and email_holder.external_id not in (None, external_id):
            # A new external_id with someone else's email: two people, one address.
            return None, {"email": [f"in use by {email_holder.contact_id}"]}
        target = email_holder
    if email_holder is not None and email_holder is not target:
        return None, {"email": [f"in use by {email_holder.contact_id}"]}
    return target, {}


def _write(session: Session, user_id: uuid.UUID, targets: list[_Target]) -> None:
    updates = [_update_record(t) for t in targets if not t.is_new]
    inserts = [_insert_record(t) for t in targets if t.is_new]
    try:
        with session.begin_nested():
            if updates:
                session.execute(_UPDATE_SQL, {"user_id": user_id, "rows": _json(updates)})
            if inserts:
                session.execute(_INSERT_SQL, {"user_id": user_id, "rows": _json(inserts)})
    except IntegrityError as exc:
        raise Conflict(
            "another write claimed an external_id or email of this batch while it was "
            "being applied; nothing was written, retry",
            code="concurrent_write",
        ) from exc


def _insert_record(target: _Target) -> dict[str, Any]:
    attributes = {k: v for k, v in (target.attribute_patch or {}).items() if v is not None}
    return {
        **_NEW_CONTACT_DEFAULTS,
        **target.changes,
        "id": str(target.contact_id),
        "attributes": attributes,
    }


def _update_record(target: _Target) -> dict[str, Any]:
    record: dict[str, Any] = {
        **target.changes,
        "id": str(target.contact_id),
        "present": list(target.changes),
    }
    if target.attribute_patch is not None:
        patch = target.attribute_patch
        record["present"].append("attributes")
        record["attributes_set"] = {k: v for k, v in patch.items() if v is not None}
        record["attributes_unset"] = [k for k, v in patch.items() if v is None]
    return record


def _lock_object(user_id: uuid.UUID) -> int:
    return int.from_bytes(user_id.bytes[:4], "big", signed=True)


def _json(records: list[dict[str, Any]]) -> str:
    return json.dumps(records, separators=(",", ":"), ensure_ascii=False)

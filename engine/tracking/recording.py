"""Exactly-once event recording: the one place tracking's hot SQL lives.

Every webhook (and later every pixel hit and click) ends here, often many at once for
the same delivery: providers retry, Meta and Twilio post duplicates, people click
twice. One event is one statement on PostgreSQL, so duplicates racing each other are
settled by the database alone, without a lock held across round trips.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.orm import Session

from engine.models import CampaignChannel, Delivery, DeliveryEvent
from engine.models.base import UTCDateTime
from engine.models.enums import DELIVERY_EVENT_KINDS

# Facts an event can establish about a delivery: deliveries.<fact>_at, written once.
FACTS = ("delivered", "opened", "clicked", "failed")
# The facts campaign_channels counts (failed has no counter: sent_count's rows that
# failed later are counted over the log).
COUNTED = ("delivered", "opened", "clicked")

ERROR_MAX = 500
KEY_MAX = 255


def facts_of(kind: str, machine: bool) -> tuple[str, ...]:
    """The facts an event establishes. A person opening implies the message arrived; a
    click implies both. A machine (privacy proxy, scanner) only proves it arrived."""
    if kind == "delivered":
        return ("delivered",)
    if kind == "opened":
        return ("delivered",) if machine else ("delivered", "opened")
    if kind == "clicked":
        return ("delivered",) if machine else ("delivered", "opened", "clicked")
    if kind == "failed":
        return ("failed",)
    return ()  # sent, complained: recorded, no fact


@dataclass(frozen=True)
class Event:
    kind: str
    source: str  # twilio, whatsapp, email, push, …
    occurred_at: datetime
    # Idempotency key within the source; None only for events that may repeat (opens).
    provider_event_id: str | None = None
    provider_message_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    machine: bool = False
    # failed: why, kept in deliveries.last_error; and what it says about the address
    # (hard, soft, opt_out or None), which engine.tracking.suppression acts on.
    error: str | None = None
    failure: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in DELIVERY_EVENT_KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}")

    @property
    def facts(self) -> tuple[str, ...]:
        return facts_of(self.kind, self.machine)


@dataclass(frozen=True)
class Recorded:
    stored: bool  # a new delivery_events row; False: a replay, or the delivery is gone
    new_facts: frozenset[str] = frozenset()


def record(session: Session, delivery_id: int, event: Event, now: datetime) -> Recorded:
    """Store the event for the delivery and establish its facts, each at most once.

    A replay of an event already stored (same source and provider_event_id) changes
    nothing at all. A delivery deleted meanwhile (its campaign was) records nothing."""
    if session.get_bind().dialect.name == "postgresql":
        return _record_postgresql(session, delivery_id, event, now)
    return _record_sqlite(session, delivery_id, event, now)


def record_orphan(session: Session, event: Event, now: datetime) -> bool:
    """Keep an event whose delivery is not known yet, by provider message id, for
    engine.tracking.orphans to adopt. Returns False for a replay."""
    row = _event_row(event, now, delivery_id=None, campaign_channel_id=None, orphan=True)
    return _insert_new(session, row)


def apply_facts(session: Session, delivery_id: int, event: Event) -> frozenset[str]:
    """Establish the event's facts for a delivery whose event row already exists (an
    adopted orphan). Same compare-and-set as record()."""
    if not event.facts:
        return frozenset()
    if session.get_bind().dialect.name == "postgresql":
        sql = _postgresql_statement(event.facts, with_event=False)
        row = session.execute(sql, _params(delivery_id, event, None)).one()
        return frozenset(f for f in event.facts if getattr(row, f"new_{f}"))
    return _facts_sqlite(session, delivery_id, event)


# -- PostgreSQL: one statement ------------------------------------------------------------
#
# event   INSERT … ON CONFLICT DO NOTHING: a replayed event (same key) inserts nothing,
#         and concurrent duplicates wait for the first inserter's transaction, then see
#         the conflict. The facts below are gated on this insert, so an event moves
#         facts once however often it is posted.
# target  locks the delivery row FOR NO KEY UPDATE, but only while one of the facts is
#         still NULL: once they are all set, duplicates take no lock at all. READ
#         COMMITTED re-reads a row that changed while we waited for its lock, so the
#         new_<fact> flags are the truth as of the lock, and stay true until we commit.
# marked  sets each fact that was NULL (COALESCE keeps the others). The UPDATE itself
#         cannot tell us which columns it changed (RETURNING only sees new values, and
#         two events may carry the same timestamp), hence the flags from `target`.
# bumped  adds to each counter exactly the facts that were new. Lock order is always
#         delivery row, then channel row, the same as the sender's recording statement.


@cache
def _postgresql_statement(facts: tuple[str, ...], *, with_event: bool):
    if not facts:
        return _bound(
            text(f"WITH event AS ({_EVENT_INSERT}) SELECT (SELECT count(*) FROM event) AS stored")
        )
    flags = ", ".join(f"{f}_at IS NULL AS new_{f}" for f in facts)
    any_null = " OR ".join(f"{f}_at IS NULL" for f in facts)
    gate = " AND EXISTS (SELECT 1 FROM event)" if with_event else ""
    sets = [f"{f}_at = COALESCE(d.{f}_at, :occurred_at)" for f in facts]
    if "failed" in facts:
        sets.append(
            "last_error = CASE WHEN t.new_failed THEN COALESCE(:error, d.last_error)"
            " ELSE d.last_error END"
        )
    returned = ", ".join(f"t.new_{f}" for f in facts)
    counted = [f for f in facts if f in COUNTED]
    bumped = ""
    if counted:
        bumps = ", ".join(
            f"{f}_count = c.{f}_count + CASE WHEN m.new_{f} THEN 1 ELSE 0 END" for f in counted
        )
        bumped = (
            f", bumped AS (UPDATE campaign_channels AS c SET {bumps}"
            " FROM marked AS m WHERE c.id = m.campaign_channel_id)"
        )
    outputs = ", ".join(f"COALESCE((SELECT new_{f} FROM marked), false) AS new_{f}" for f in facts)
    event = f"event AS ({_EVENT_INSERT}), " if with_event else ""
    stored = "(SELECT count(*) FROM event)" if with_event else "0"
    sql = (
        f"WITH {event}"
        f"target AS (SELECT id, campaign_channel_id, {flags} FROM deliveries"
        f" WHERE id = :delivery_id AND ({any_null}){gate} FOR NO KEY UPDATE),"
        f" marked AS (UPDATE deliveries AS d SET {', '.join(sets)} FROM target AS t"
        f" WHERE d.id = t.id RETURNING t.campaign_channel_id, {returned})"
        f"{bumped}"
        f" SELECT {stored} AS stored, {outputs}"
    )
    return _bound(text(sql))


_EVENT_INSERT = """
    INSERT INTO delivery_events (delivery_id, campaign_channel_id, kind, source, occurred_at,
        received_at, provider_message_id, provider_event_id, detail, machine)
    SELECT d.id, d.campaign_channel_id, :kind, :source, :occurred_at, :received_at,
        :provider_message_id, :provider_event_id, CAST(:detail AS jsonb), :machine
    FROM deliveries AS d WHERE d.id = :delivery_id
    ON CONFLICT (source, provider_event_id) DO NOTHING
    RETURNING id"""


def _bound(stmt):
    timestamps = [name for name in ("occurred_at", "received_at") if f":{name}" in stmt.text]
    return stmt.bindparams(*(bindparam(name, type_=UTCDateTime()) for name in timestamps))


def _params(delivery_id: int, event: Event, now: datetime | None) -> dict[str, Any]:
    return {
        "delivery_id": delivery_id,
        "kind": event.kind,
        "source": event.source,
        "occurred_at": event.occurred_at,
        "received_at": now or event.occurred_at,
        "provider_message_id": _key(event.provider_message_id),
        "provider_event_id": _key(event.provider_event_id),
        "detail": json.dumps(_stored_detail(event, orphan=False)),
        "machine": event.machine,
        "error": _error(event.error),
    }


def _record_postgresql(session: Session, delivery_id: int, event: Event, now: datetime) -> Recorded:
    sql = _postgresql_statement(event.facts, with_event=True)
    row = session.execute(sql, _params(delivery_id, event, now)).one()
    return Recorded(
        stored=bool(row.stored),
        new_facts=frozenset(f for f in event.facts if getattr(row, f"new_{f}")),
    )


# -- SQLite (the embedded default): one writer at a time ----------------------------------
# The transaction holds SQLite's write lock from its first write, so plain statements in
# sequence are just as exact: insert the event, then one compare-and-set per fact.


def _record_sqlite(session: Session, delivery_id: int, event: Event, now: datetime) -> Recorded:
    channel_id = session.scalar(
        select(Delivery.campaign_channel_id).where(Delivery.id == delivery_id)
    )
    if channel_id is None:
        return Recorded(stored=False)
    row = _event_row(event, now, delivery_id=delivery_id, campaign_channel_id=channel_id)
    if not _insert_new(session, row):
        return Recorded(stored=False)
    return Recorded(stored=True, new_facts=_facts_sqlite(session, delivery_id, event))


def _facts_sqlite(session: Session, delivery_id: int, event: Event) -> frozenset[str]:
    new: set[str] = set()
    for fact in event.facts:
        column = getattr(Delivery, f"{fact}_at")
        values: dict[str, Any] = {f"{fact}_at": event.occurred_at}
        if fact == "failed" and event.error:
            values["last_error"] = _error(event.error)
        channel_id = session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, column.is_(None))
            .values(**values)
            .returning(Delivery.campaign_channel_id)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if channel_id is None:
            continue
        new.add(fact)
        if fact in COUNTED:
            counter = getattr(CampaignChannel, f"{fact}_count")
            session.execute(
                update(CampaignChannel)
                .where(CampaignChannel.id == channel_id)
                .values({counter: counter + 1})
                .execution_options(synchronize_session=False)
            )
    return frozenset(new)


def _insert_new(session: Session, row: dict[str, Any]) -> bool:
    """Insert the event unless its key is taken; True if it was new. RETURNING tells,
    where rowcount would not: the driver reports -1 for INSERT … ON CONFLICT."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    table = DeliveryEvent.__table__
    stmt = (
        insert(table)
        .values(row)
        .on_conflict_do_nothing(index_elements=["source", "provider_event_id"])
    )
    return session.execute(stmt.returning(table.c.id)).first() is not None


def _stored_detail(event: Event, *, orphan: bool) -> dict[str, Any]:
    """The detail column: the provider's facts, what the failure means for the address,
    and for an orphan the error too, so its adoption can act exactly as record would."""
    detail = dict(event.detail)
    if event.failure:
        detail["failure"] = event.failure
    if orphan and event.error:
        detail["error"] = _error(event.error)
    return detail


def _event_row(
    event: Event,
    now: datetime,
    *,
    delivery_id: int | None,
    campaign_channel_id: Any,
    orphan: bool = False,
) -> dict[str, Any]:
    return {
        "delivery_id": delivery_id,
        "campaign_channel_id": campaign_channel_id,
        "kind": event.kind,
        "source": event.source,
        "occurred_at": event.occurred_at,
        "received_at": now,
        "provider_message_id": _key(event.provider_message_id),
        "provider_event_id": _key(event.provider_event_id),
        "detail": _stored_detail(event, orphan=orphan),
        "machine": event.machine,
    }


def safe_text(value: object, limit: int) -> str | None:
    """Provider text fit to store: a string, without NUL or lone surrogates (PostgreSQL
    refuses both, in text and in jsonb), at most `limit` characters."""
    if value is None or isinstance(value, bool):
        return None
    if not isinstance(value, str):
        value = str(value)
    value = value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    value = value.strip()
    return value[:limit] or None


def _key(value: str | None) -> str | None:
    return safe_text(value, KEY_MAX)


def _error(value: str | None) -> str | None:
    value = safe_text(value, 10 * ERROR_MAX)
    if not value:
        return None
    value = " ".join(value.split())
    return value if len(value) <= ERROR_MAX else value[: ERROR_MAX - 1] + "…"

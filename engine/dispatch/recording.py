"""A batch being sent, and how its outcomes are written.

Shared by the two ways a batch is sent (engine.dispatch.sending, one provider call per
message; engine.dispatch.batch_sending, a whole batch in one call) and by
reconciliation, which records what the acceptance journal says a dead batch had sent.
Every write here is a compare-and-set on (status = 'sending', the lease, the attempt
number), so an outcome lands once, on the claim that made it, and sent_count grows in
the same statement by exactly the rows that became sent.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.orm import Session

from engine.campaigns.config import DEFAULT_ERROR_THRESHOLD, DEFAULT_MAX_ATTEMPTS
from engine.campaigns.rendering import CompiledChannel
from engine.channels import SendResult
from engine.db import insert_ignoring_conflicts
from engine.dispatch.backoff import retry_delay
from engine.dispatch.journal import AcceptanceJournal
from engine.models import Campaign, CampaignChannel, Contact, Delivery, Suppression
from engine.models.base import UTCDateTime
from engine.services.suppressions import stored_address
from engine.settings import Settings
from engine.tracking.links import Tracking, ensure_links
from engine.tracking.suppression import reason_for_refusal

log = logging.getLogger("herald.dispatch.recording")


@dataclass(frozen=True)
class BatchReport:
    claimed: int = 0
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    suppressed: int = 0
    handed_back: int = 0
    # Why the batch stopped early: None, "not running", "campaign paused", "lease lost"…
    stopped: str | None = None


@dataclass(frozen=True)
class ClaimedRow:
    id: int
    contact_id: uuid.UUID | None
    address: str | None
    attempts: int


@dataclass
class BatchRun:
    """What one send_batch call knows and has done so far."""

    channel_id: uuid.UUID
    campaign_id: uuid.UUID
    user_id: uuid.UUID
    channel_type: str
    max_attempts: int
    error_threshold: dict[str, Any]
    buckets: list[tuple[str, float]]
    lease: datetime
    dialect: str
    counts: dict[str, int] = field(default_factory=dict)
    stopped: str | None = None

    def add(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


def load_batch_run(
    session: Session, channel_id: uuid.UUID, settings: Settings, lease: datetime
) -> tuple[BatchRun, CompiledChannel] | None:
    row = session.execute(
        select(CampaignChannel, Campaign)
        .join(Campaign, Campaign.id == CampaignChannel.campaign_id)
        .where(CampaignChannel.id == channel_id)
    ).one_or_none()
    if row is None or row.Campaign.status != "running":
        return None
    channel_row, campaign = row.CampaignChannel, row.Campaign
    config = campaign.config or {}
    channel_type = channel_row.channel_type
    batch = BatchRun(
        channel_id=channel_id,
        campaign_id=campaign.id,
        user_id=campaign.user_id,
        channel_type=channel_type,
        max_attempts=int(config.get("max_attempts") or DEFAULT_MAX_ATTEMPTS),
        error_threshold={**DEFAULT_ERROR_THRESHOLD, **(config.get("error_threshold") or {})},
        buckets=[
            (f"provider:{channel_type}", settings.rate_per_second.get(channel_type, 0.0)),
            (f"campaign:{campaign.id}", float(config.get("rate_per_second") or 0.0)),
        ],
        lease=lease,
        dialect=session.get_bind().dialect.name,
    )
    # The channel's links, written to campaign_links by its first batch and only read
    # by the others; the marked templates are compiled instead of the stored ones.
    links = ensure_links(session, settings, channel_id, channel_type, channel_row.config)
    tracking = Tracking(settings, channel_type, channel_row.config, links)
    return batch, CompiledChannel.compile(
        channel_type, channel_row.config, campaign, tracking=tracking
    )


def next_state(
    batch: BatchRun, row: ClaimedRow, result: SendResult, now: datetime, rng: Callable[[], float]
) -> dict[str, Any]:
    """The row's next state. Transient failures wait (backoff, or the provider's
    Retry-After when longer) while attempts remain; the reconciliation re-batches them
    once due, so no Celery countdown or ETA is ever used."""
    if result.outcome == "sent":
        return {"status": "sent", "provider_message_id": result.provider_message_id}
    if result.outcome == "transient" and row.attempts < batch.max_attempts:
        delay = retry_delay(row.attempts, result.retry_after, rng)
        return {
            "status": "queued",
            "last_error": result.error,
            "next_attempt_at": now + timedelta(seconds=delay),
        }
    return {"status": "failed", "last_error": result.error}


# How sent_count grows on PostgreSQL, the tail of every statement that records outcomes
# (a CTE `changed` returning each changed row's new status, :channel_id bound): by the
# rows `changed` made 'sent', counted in SQL in the same statement, so the counter and
# the deliveries cannot disagree. Returns (status, rows changed to it).
SENT_COUNT_FROM_CHANGED = """
bumped AS (
    UPDATE campaign_channels
    SET sent_count = sent_count + (SELECT count(*) FROM changed WHERE status = 'sent')
    WHERE id = :channel_id AND EXISTS (SELECT 1 FROM changed WHERE status = 'sent')
)
SELECT status, count(*) AS n FROM changed GROUP BY status
"""

# The hot recording statement, PostgreSQL form. The outcomes arrive as one JSON document
# (one bind parameter whatever the batch size, so one cached plan); the UPDATE applies
# them with a compare-and-set on status, lease and attempt number; the second CTE adds
# to sent_count exactly the rows the first one changed to 'sent' — counted in SQL, in
# the same statement, so the counter and the log cannot disagree.
_RECORD_POSTGRESQL = (
    """
WITH outcome AS (
    SELECT * FROM jsonb_to_recordset(CAST(:outcomes AS jsonb)) AS o(
        id bigint, attempts integer, status text, provider_message_id text,
        last_error text, next_attempt_at timestamp)
),
changed AS (
    UPDATE deliveries AS d SET {assignments}
    FROM outcome AS o
    WHERE {ours}
    RETURNING d.status
),
"""
    + SENT_COUNT_FROM_CHANGED
)

# SQLite (embedded, a single writer: the transaction holds the database's write lock),
# so counting RETURNING rows here and bumping the counter next is just as exact. Its
# RETURNING may only name the target's columns, unqualified.
_RECORD_SQLITE = """
UPDATE deliveries AS d SET {assignments}
FROM (
    SELECT json_extract(value, '$.id') AS id,
           json_extract(value, '$.attempts') AS attempts,
           json_extract(value, '$.status') AS status,
           json_extract(value, '$.provider_message_id') AS provider_message_id,
           json_extract(value, '$.last_error') AS last_error,
           json_extract(value, '$.next_attempt_at') AS next_attempt_at
    FROM json_each(:outcomes)
) AS o
WHERE {ours}
RETURNING status
"""
_ASSIGNMENTS = """
    status = o.status,
    provider_message_id = COALESCE(o.provider_message_id, d.provider_message_id),
    last_error = o.last_error,
    next_attempt_at = o.next_attempt_at,
    sent_at = CASE WHEN o.status = 'sent' THEN :now ELSE d.sent_at END,
    failed_at = CASE WHEN o.status = 'failed' THEN :now ELSE d.failed_at END,
    lease_expires_at = NULL"""
_OURS = """d.id = o.id AND d.attempts = o.attempts AND d.campaign_channel_id = :channel_id
      AND d.status = 'sending' AND d.lease_expires_at = :lease"""


def record_outcomes(
    session: Session,
    batch: BatchRun,
    results: list[tuple[ClaimedRow, SendResult]],
    now: datetime,
    rng: Callable[[], float],
) -> None:
    if not results:
        return
    outcomes = []
    for row, result in results:
        outcome = {
            "id": row.id,
            "attempts": row.attempts,
            **next_state(batch, row, result, now, rng),
        }
        if outcome.get("next_attempt_at") is not None:
            outcome["next_attempt_at"] = stored_timestamp(outcome["next_attempt_at"], batch)
        outcomes.append(outcome)
    changed = _apply_outcomes(session, batch.dialect, batch.channel_id, batch.lease, outcomes, now)
    for status, n in changed.items():
        batch.add(status, n)
    if sum(changed.values()) < len(results):
        log.warning(
            "%d outcome(s) not recorded: their lease was taken back",
            len(results) - sum(changed.values()),
        )
    drop_invalid_push_tokens(session, batch, results)
    _suppress_refused_addresses(session, batch, results)
    if any(result.outcome != "sent" for _, result in results):
        check_error_threshold(session, batch)


def _apply_outcomes(
    session: Session,
    dialect: str,
    channel_id: uuid.UUID,
    lease: datetime,
    outcomes: list[dict[str, Any]],
    now: datetime,
) -> dict[str, int]:
    """The hot statement over one channel's outcomes ({id, attempts, status, …} each,
    under one lease); returns how many rows changed to each status."""
    template = _RECORD_POSTGRESQL if dialect == "postgresql" else _RECORD_SQLITE
    stmt = text(template.format(assignments=_ASSIGNMENTS, ours=_OURS)).bindparams(
        bindparam("now", type_=UTCDateTime()),
        bindparam("lease", type_=UTCDateTime()),
        bindparam("channel_id", type_=CampaignChannel.__table__.c.id.type),
    )
    params = {
        "outcomes": json.dumps(outcomes),
        "now": now,
        "lease": lease,
        "channel_id": channel_id,
    }
    if dialect == "postgresql":
        return {status: n for status, n in session.execute(stmt, params)}
    changed: dict[str, int] = {}
    for (status,) in session.execute(stmt, params):
        changed[status] = changed.get(status, 0) + 1
    if changed.get("sent"):
        session.execute(
            update(CampaignChannel)
            .where(CampaignChannel.id == channel_id)
            .values(sent_count=CampaignChannel.sent_count + changed["sent"])
            .execution_options(synchronize_session=False)
        )
    return changed


def record_recovered_acceptances(
    session: Session,
    channel_id: uuid.UUID,
    lease: datetime,
    accepted: dict[tuple[int, int], str | None],
    now: datetime,
) -> int:
    """Record as sent the rows of one dead batch (one channel, one lease) that the
    acceptance journal says a provider accepted: {(delivery id, attempts): provider
    message id}. The same statement and compare-and-set as a live batch's checkpoint,
    so sent_count grows by exactly the rows that changed, and a row the worker did
    record after all is left alone. Returns how many became sent."""
    outcomes = [
        {"id": delivery_id, "attempts": attempts, "status": "sent", "provider_message_id": pmid}
        for (delivery_id, attempts), pmid in accepted.items()
    ]
    if not outcomes:
        return 0
    dialect = session.get_bind().dialect.name
    return _apply_outcomes(session, dialect, channel_id, lease, outcomes, now).get("sent", 0)


def stored_timestamp(value: datetime, batch: BatchRun) -> str:
    """A timestamp inside the JSON outcomes, as each database stores UTCDateTime."""
    naive = value.astimezone(UTC).replace(tzinfo=None)
    if batch.dialect == "postgresql":
        return naive.isoformat()
    return naive.strftime("%Y-%m-%d %H:%M:%S.%f")  # SQLAlchemy's SQLite DateTime format


def drop_invalid_push_tokens(
    session: Session, batch: BatchRun, results: list[tuple[ClaimedRow, SendResult]]
) -> None:
    dead = [
        (row.contact_id, token)
        for row, result in results
        if row.contact_id is not None
        for token in result.invalid_push_tokens
    ]
    if not dead:
        return
    if batch.dialect == "postgresql":
        # jsonb - text[] removes those strings from the array: one statement for all.
        session.execute(
            text(
                "UPDATE contacts AS c SET push_tokens = c.push_tokens - dead.tokens"
                " FROM (SELECT contact_id, array_agg(token) AS tokens"
                "       FROM unnest(CAST(:contact_ids AS uuid[]), CAST(:tokens AS text[]))"
                "            AS t(contact_id, token)"
                "       GROUP BY contact_id) AS dead"
                " WHERE c.id = dead.contact_id"
            ),
            {"contact_ids": [c for c, _ in dead], "tokens": [t for _, t in dead]},
        )
        return
    # SQLite (embedded): a few contacts per batch at most; rewrite their arrays.
    by_contact: dict[uuid.UUID, set[str]] = {}
    for contact_id, token in dead:
        by_contact.setdefault(contact_id, set()).add(token)
    current = session.execute(
        select(Contact.id, Contact.push_tokens).where(Contact.id.in_(by_contact))
    ).all()
    session.execute(
        update(Contact),
        [
            {"id": cid, "push_tokens": [t for t in tokens if t not in by_contact[cid]]}
            for cid, tokens in current
        ],
    )


def _suppress_refused_addresses(
    session: Session, batch: BatchRun, results: list[tuple[ClaimedRow, SendResult]]
) -> None:
    """A provider that refuses the address itself at send time (an invalid number, no
    such mailbox, the recipient's STOP) gets the same suppression its status callback
    would have caused: one INSERT for the checkpoint, idempotent."""
    refused = {
        stored_address(batch.channel_type, row.address): reason
        for row, result in results
        if result.outcome == "permanent"
        and row.address
        and (reason := reason_for_refusal(batch.channel_type, result.provider_code))
    }
    if refused:
        rows = [
            {"id": uuid.uuid4(), "user_id": batch.user_id, "channel": batch.channel_type,
             "address": address, "reason": reason}
            for address, reason in refused.items()
        ]  # fmt: skip
        insert_ignoring_conflicts(
            session, Suppression.__table__, rows, index_elements=["user_id", "channel", "address"]
        )


def check_error_threshold(session: Session, batch: BatchRun) -> None:
    """Pause the campaign when this channel's failures per attempt pass the threshold.

    attempts made = sum(deliveries.attempts) less one per row still 'sending' (that
    attempt has no answer yet); every answered attempt either made its row 'sent' or
    failed (transient or permanent), so failed attempts = attempts made - sent rows.
    Suppressed rows give their claim back, so they count as no attempt."""
    sending = func.count().filter(Delivery.status == "sending")
    sent = func.count().filter(Delivery.status == "sent")
    made, sent_rows = session.execute(
        select(func.coalesce(func.sum(Delivery.attempts), 0) - sending, sent).where(
            Delivery.campaign_channel_id == batch.channel_id
        )
    ).one()
    failed = made - sent_rows
    minimum = batch.error_threshold["min_attempts"]
    if made < minimum or failed <= batch.error_threshold["rate"] * made:
        return
    reason = (
        f"paused automatically: {round(100 * failed / made)}% of {made} attempts failed"
        f" on {batch.channel_type}"
    )
    paused = session.execute(
        update(Campaign)
        .where(Campaign.id == batch.campaign_id, Campaign.status == "running")
        .values(status="paused", status_reason=reason)
        .execution_options(synchronize_session=False)
    ).rowcount
    if paused:
        log.warning("campaign %s %s", batch.campaign_id, reason)


def forget_journaled(
    journal: AcceptanceJournal | None,
    batch: BatchRun,
    recorded: list[tuple[ClaimedRow, SendResult]],
) -> None:
    """Recorded in PostgreSQL: the journal entries have served their purpose."""
    if journal is None:
        return
    try:
        journal.forget(
            batch.channel_id,
            [(row.id, row.attempts) for row, result in recorded if result.outcome == "sent"],
        )
    except Exception:  # Redis down: a stale entry matches no later claim; it expires
        log.warning("could not clear %d journal entries", len(recorded), exc_info=True)

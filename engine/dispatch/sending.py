"""The sending step: one batch of a channel's deliveries, from queued to an outcome.

    claim ─commit─▶ render ▶ rate token ▶ provider call ─ … ─▶ checkpoint ─ … ─▶ done
                                         (every 50th call: record, re-check status,
                                          while that call is with the provider)

Unlike the rest of the engine this function owns its transactions (it takes a
sessionmaker), because a provider call must never happen inside an open transaction:

- The claim (queued → sending with a lease) is committed BEFORE the first provider
  call. It is the durable mark "these may have been sent": if the worker dies, the rows
  stay in 'sending' until the lease runs out and reconciliation hands them to another
  worker, instead of rolling back to 'queued' and being resent at once by anyone. It
  also keeps provider latency out of the database: no row locks, no idle-in-transaction
  connection held for the seconds a batch takes, nothing blocking pause or cancel.
- Outcomes are recorded in short transactions, one per checkpoint (during every
  CHECKPOINT_EVERY-th call, and at the end), each a handful of set-based statements.
  A checkpoint is written while its chunk's last call waits for the provider, so it
  adds no time of its own to a batch; that call is recorded by the next checkpoint.

Every write after the claim is a compare-and-set on (status = 'sending', our lease,
the attempt number we claimed), so a row that reconciliation took back after our lease
ran out (and someone else claimed again) is never recorded twice, and
campaign_channels.sent_count grows, in the same statement, by exactly the rows that
changed to 'sent'.

Each provider call is made in two halves (Channel.begin, then its answer): the next
message is rendered and built between them, i.e. while the provider works on this one,
instead of between two calls. The next call still starts only after this one's answer
is in the journal, so there is never more than one call in flight.

Between checkpoints, each acceptance is written to the Redis acceptance journal in the
same round trip that takes the next message's rate token (engine.dispatch.journal), so
it is durable before the next provider call. In flight, i.e. called but not recorded
anywhere, is then at most the one call awaiting its answer per worker process (the
whole batch for a provider that takes batches in one call, like `null`; a whole
checkpoint without Redis). A worker killed mid-batch can therefore cause at most that
many resends, each with the same idempotency key (d<delivery id>: the SMTP Message-ID,
the providers' idempotency headers): reconciliation records journaled acceptances as
sent before it takes the rest of an expired lease back.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ARRAY,
    Uuid,
    and_,
    any_,
    bindparam,
    exists,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from engine.campaigns.config import DEFAULT_ERROR_THRESHOLD, DEFAULT_MAX_ATTEMPTS
from engine.campaigns.rendering import CompiledChannel
from engine.campaigns.templates import TemplateRenderError
from engine.channels import Channel, OutboundMessage, SendResult
from engine.clock import Clock
from engine.db import insert_ignoring_conflicts, session_scope
from engine.dispatch.backoff import retry_delay
from engine.dispatch.journal import AcceptanceJournal, JournalEntry, acceptance
from engine.dispatch.messages import build_message
from engine.models import Campaign, CampaignChannel, Contact, Delivery, Suppression
from engine.models.base import UTCDateTime
from engine.ratelimit import RateLimiter, wait_seconds
from engine.services.suppressions import stored_address
from engine.settings import Settings
from engine.tracking.links import Tracking, ensure_links
from engine.tracking.suppression import reason_for_refusal
from engine.tracking.tokens import push_data
from engine.unsubscribe import unsubscribe_url

log = logging.getLogger("herald.dispatch.sending")

# Long enough for a checkpoint's worth of slow provider calls (50 of them, seconds each);
# renewed at every checkpoint, so a long, rate-limited batch keeps its rows.
LEASE_SECONDS = 300
# How often the sender records outcomes and re-checks the campaign (pause, cancel).
# Without the Redis journal (the embedded default), a killed worker can leave this many
# answered-but-unrecorded messages, plus the call in flight.
CHECKPOINT_EVERY = 50

deliveries = Delivery.__table__


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
class _Claimed:
    id: int
    contact_id: uuid.UUID | None
    address: str | None
    attempts: int


@dataclass
class _Batch:
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


def send_batch(
    session_factory: sessionmaker[Session],
    *,
    channel_id: uuid.UUID,
    first_id: int,
    last_id: int,
    settings: Settings,
    clock: Clock,
    rate_limiter: RateLimiter,
    channel: Channel,
    lease_seconds: float = LEASE_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
    journal: AcceptanceJournal | None = None,
) -> BatchReport:
    """Send the channel's due queued deliveries with first_id <= id <= last_id.

    Repeatable: a second call (a redelivered task) finds the rows no longer queued and
    sends nothing. Returns what happened, for the task's log."""
    if channel.accepts_batch:  # whole batch in one call: claim, send, record in one go
        from engine.dispatch.batch_sending import send_whole_batch

        report = send_whole_batch(
            session_factory, channel_id=channel_id, first_id=first_id, last_id=last_id,
            settings=settings, clock=clock, channel=channel, rng=rng,
        )  # fmt: skip
        if report is not None:
            return report
    now = clock.now()
    with session_scope(session_factory) as session:
        loaded = _load_batch(session, channel_id, settings, now + timedelta(seconds=lease_seconds))
        if loaded is None:
            return BatchReport(stopped="not running")
        batch, compiled = loaded
        claimed = _claim(session, batch, first_id, last_id, now)
        suppressed = _suppress(session, batch, claimed)
        claimed = [row for row in claimed if row.id not in suppressed]
        contacts = _contacts(session, batch, [row.contact_id for row in claimed if row.contact_id])
    # Committed: the claim is durable before any provider hears of these rows.
    batch.add("claimed", len(claimed) + len(suppressed))
    batch.add("suppressed", len(suppressed))
    if claimed:
        _send(
            session_factory, batch, compiled, claimed, contacts, settings, clock,
            rate_limiter, channel, lease_seconds, sleep, rng,
            journal if rate_limiter.durable else None,
        )  # fmt: skip
    c = batch.counts
    return BatchReport(
        claimed=c.get("claimed", 0),
        sent=c.get("sent", 0),
        retrying=c.get("queued", 0),
        failed=c.get("failed", 0),
        suppressed=c.get("suppressed", 0),
        handed_back=c.get("handed_back", 0),
        stopped=batch.stopped,
    )


# -- claiming ----------------------------------------------------------------------------


def _load_batch(
    session: Session, channel_id: uuid.UUID, settings: Settings, lease: datetime
) -> tuple[_Batch, CompiledChannel] | None:
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
    batch = _Batch(
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


def _claim(
    session: Session, batch: _Batch, first_id: int, last_id: int, now: datetime
) -> list[_Claimed]:
    # The hot claim. SKIP LOCKED lets two workers handed overlapping ranges (a batch
    # re-dispatched by reconciliation while the first copy still runs) split the rows
    # instead of queueing behind each other; status = 'queued' makes a redelivered task
    # claim nothing; the EXISTS re-checks the campaign in the same statement, so a
    # campaign paused or cancelled since the batch was enqueued claims nothing.
    # attempts counts claims: the CAS token of every later write, and the retry budget.
    # SQLite (embedded, one worker) has no FOR UPDATE; SQLAlchemy leaves it out there.
    running = exists().where(Campaign.id == batch.campaign_id, Campaign.status == "running")
    due = (
        select(Delivery.id)
        .where(
            Delivery.campaign_channel_id == batch.channel_id,
            Delivery.id.between(first_id, last_id),
            Delivery.status == "queued",
            or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
            running,
        )
        .with_for_update(skip_locked=True)
    )
    rows = session.execute(
        update(deliveries)
        .where(deliveries.c.id.in_(due.scalar_subquery()))
        .values(
            status="sending",
            lease_expires_at=batch.lease,
            attempts=deliveries.c.attempts + 1,
        )
        .returning(
            deliveries.c.id, deliveries.c.contact_id, deliveries.c.address, deliveries.c.attempts
        )
    ).all()
    return sorted((_Claimed(*row) for row in rows), key=lambda row: row.id)


def _suppress(session: Session, batch: _Batch, claimed: list[_Claimed]) -> set[int]:
    """Rows whose address was suppressed since planning: suppressed, never attempted."""
    if not claimed:
        return set()
    if batch.channel_type == "email":  # email suppressions match whatever the case
        same_address = func.lower(Suppression.address) == func.lower(deliveries.c.address)
    else:
        same_address = Suppression.address == deliveries.c.address
    suppressed = exists().where(
        Suppression.user_id == batch.user_id,
        Suppression.channel == batch.channel_type,
        same_address,
    )
    rows = session.execute(
        update(deliveries)
        .where(_ours(batch, claimed), suppressed)
        .values(status="suppressed", lease_expires_at=None, attempts=deliveries.c.attempts - 1)
        .returning(deliveries.c.id)
    ).all()
    return {row.id for row in rows}


# A batch names its rows (up to 500) in every statement. On PostgreSQL they travel as
# arrays: an IN list would be expanded by SQLAlchemy into one parameter per value and
# re-parsed by psycopg each time (a new statement text for every batch size), which
# cost more client CPU than the statements' work. SQLite has no arrays; it keeps IN.
_OURS_ARRAYS = text(
    "(deliveries.id, deliveries.attempts) IN "
    "(SELECT * FROM unnest(CAST(:ours_ids AS bigint[]), CAST(:ours_attempts AS integer[])))"
)


def _contacts(
    session: Session, batch: _Batch, contact_ids: list[uuid.UUID]
) -> dict[uuid.UUID, Any]:
    if not contact_ids:
        return {}
    if batch.dialect == "postgresql":
        wanted = Contact.id == any_(bindparam("ids", contact_ids, type_=ARRAY(Uuid)))
    else:
        wanted = Contact.id.in_(contact_ids)
    # Through the connection, not the Session: plain rows, without the ORM's loading
    # machinery (which cost more than the query, 500 contacts a batch).
    rows = session.connection().execute(select(*Contact.__table__.c).where(wanted))
    return {row.id: row for row in rows}


def _ours(batch: _Batch, rows: Sequence[_Claimed]):
    """The compare-and-set that makes a write touch only rows this call still owns."""
    if batch.dialect == "postgresql":
        named = _OURS_ARRAYS.bindparams(
            ours_ids=[r.id for r in rows], ours_attempts=[r.attempts for r in rows]
        )
    else:
        named = tuple_(deliveries.c.id, deliveries.c.attempts).in_(
            [(r.id, r.attempts) for r in rows]
        )
    return and_(
        named,
        deliveries.c.status == "sending",
        deliveries.c.lease_expires_at == batch.lease,
    )


# -- sending -----------------------------------------------------------------------------


def _send(
    session_factory: sessionmaker[Session],
    batch: _Batch,
    compiled: CompiledChannel,
    claimed: list[_Claimed],
    contacts: dict[uuid.UUID, Any],
    settings: Settings,
    clock: Clock,
    rate_limiter: RateLimiter,
    channel: Channel,
    lease_seconds: float,
    sleep: Callable[[float], None],
    rng: Callable[[], float],
    journal: AcceptanceJournal | None,
) -> None:
    remaining = list(claimed)  # claimed rows not yet recorded nor handed back
    pending: list[tuple[_Claimed, SendResult]] = []  # answered, not yet recorded
    unjournaled: JournalEntry | None = None  # the last acceptance, not yet in Redis
    rate_limited = any(rate > 0 for _, rate in batch.buckets)  # may a take have to wait?

    def take_token() -> None:
        # One round trip journals the previous call's acceptance and takes this call's
        # token: the acceptance is durable before the next provider call.
        nonlocal unjournaled
        entry, unjournaled = unjournaled, None
        while (wait := rate_limiter.take(batch.buckets, journal=entry)) > 0:
            entry = None  # the denied take wrote it already
            sleep(wait_seconds(wait))

    def prepare(row: _Claimed) -> OutboundMessage | None:
        message = _message(compiled, row, contacts, settings)
        if isinstance(message, SendResult):  # nothing sendable: fails without a call
            pending.append((row, message))
            return None
        return channel.prepare(message)

    def send_each(rows: list[_Claimed], rest: list[_Claimed]) -> list[_Claimed]:
        """One call per message; the next message is prepared between starting this
        call and reading its answer (Channel.begin), i.e. while the provider works.
        While the chunk's last call is answered, the checkpoint is written instead.
        Returns the rows to go on with after the checkpoint."""
        nonlocal unjournaled
        following = prepare(rows[0]) if rows else None
        for index, row in enumerate(rows):
            message, answer = following, None
            if message is not None:  # None: it failed in prepare and is pending already
                if rate_limited:  # a wait for a token must not hold a provider mid-call
                    take_token()
                    answer = channel.begin(message)
                else:  # the journal write alone: SMTP overlaps it with the envelope
                    answer = channel.begin(message, take_token)
            try:
                if index + 1 < len(rows):
                    following = prepare(rows[index + 1])
                else:
                    rest = checkpoint(row if answer is not None else None, rest)
            finally:
                if answer is not None:
                    # Even when preparing or the checkpoint raised: this call's answer
                    # is kept for the next record (and the journal), not lost.
                    result = answer()
                    pending.append((row, result))
                    if journal is not None and result.outcome == "sent":
                        unjournaled = acceptance(
                            batch.channel_id, row.id, row.attempts, result.provider_message_id
                        )
        return rest

    def checkpoint(in_flight: _Claimed | None, rest: list[_Claimed]) -> list[_Claimed]:
        """Record the answered calls and re-check the campaign, in one transaction,
        while `in_flight` (the chunk's last call) is with the provider: a checkpoint
        then costs the batch no time of its own. The call in flight is not recorded
        yet; it keeps its lease like the rows still to send, and its answer is
        journaled by the next take (or recorded by the final settle)."""
        nonlocal pending, remaining
        recorded, lease = pending, batch.lease
        try:
            with session_scope(session_factory) as session:
                _record(session, batch, recorded, clock.now(), rng)
                if rest:
                    rest = _checkpoint(session, batch, rest, in_flight, clock.now(), lease_seconds)
        except BaseException:
            batch.lease = lease  # rolled back: the rows still carry the old lease
            raise
        pending = []
        remaining = ([in_flight] if in_flight is not None else []) + rest
        forget(recorded)
        return rest

    def forget(recorded: list[tuple[_Claimed, SendResult]]) -> None:
        """Recorded in PostgreSQL: the journal entries have served their purpose."""
        nonlocal unjournaled
        unjournaled = None  # (it is one of `recorded`: a call in flight has no entry yet)
        if journal is None:
            return
        try:
            journal.forget(
                batch.channel_id,
                [(r.id, r.attempts) for r, res in recorded if res.outcome == "sent"],
            )
        except Exception:  # Redis down: a stale entry matches no later claim; it expires
            log.warning("could not clear %d journal entries", len(recorded), exc_info=True)

    def journal_leftover() -> None:
        """The last acceptance, which no next take will carry, when PostgreSQL cannot
        record it now: in the journal, reconciliation records it instead of resending."""
        nonlocal unjournaled
        entry, unjournaled = unjournaled, None
        if entry is None:
            return
        try:
            rate_limiter.take([], journal=entry)
        except Exception:  # Redis down too: that one call may be sent again
            log.warning("could not journal the batch's last acceptance", exc_info=True)

    try:
        if channel.accepts_batch:
            # One provider call for the whole batch, after taking all its tokens.
            messages = []
            for row in remaining:
                if (message := prepare(row)) is not None:
                    take_token()
                    messages.append(message)
            if messages:
                results = channel.send_many(messages)
                rows = {row.id: row for row in remaining}
                pending.extend((rows[result.delivery_id], result) for result in results)
            return
        to_send = list(remaining)
        while to_send:
            to_send = send_each(to_send[:CHECKPOINT_EVERY], to_send[CHECKPOINT_EVERY:])
    finally:
        # Normal end (the last call's answer), or an exception (a provider bug, Redis or
        # PostgreSQL down, the soft time limit): record what the providers answered and
        # hand back what was never attempted.
        if pending or remaining:
            try:
                _settle(session_factory, batch, pending, remaining, clock.now(), rng)
            except BaseException:
                journal_leftover()
                raise
            forget(pending)


def _checkpoint(
    session: Session,
    batch: _Batch,
    rest: list[_Claimed],
    in_flight: _Claimed | None,
    now: datetime,
    lease_seconds: float,
) -> list[_Claimed]:
    """Between two chunks: keep the lease on the rows still to send (and on the call in
    flight, recorded at the next checkpoint), and stop (handing the rest back) if the
    campaign was paused or cancelled meanwhile. Returns the rows to go on with."""
    # Renewing rewrites every remaining row (and its index entries: lease_expires_at is
    # in a partial index, so no HOT update), so it is done only once half the lease is
    # gone. Before that nobody can have taken the rows back: reclaiming waits for expiry.
    if batch.lease - now < timedelta(seconds=lease_seconds / 2):
        lease = now + timedelta(seconds=lease_seconds)
        keep = rest + ([in_flight] if in_flight is not None else [])
        still_ours = _renew(session, batch, keep, lease)
        if len(still_ours) < len(rest):
            log.warning("lease lost on %d row(s) of a batch", len(rest) - len(still_ours))
            batch.stopped = batch.stopped or "lease lost"
        batch.lease = lease
        rest = [row for row in rest if row.id in still_ours]
    status = session.scalar(select(Campaign.status).where(Campaign.id == batch.campaign_id))
    if status == "running":
        return rest
    batch.add("handed_back", _hand_back(session, batch, rest))
    batch.stopped = f"campaign {status}"
    log.info("batch stopped: campaign %s is %s", batch.campaign_id, status)
    return []


def _settle(
    session_factory: sessionmaker[Session],
    batch: _Batch,
    pending: list[tuple[_Claimed, SendResult]],
    remaining: list[_Claimed],
    now: datetime,
    rng: Callable[[], float],
) -> None:
    attempted = {row.id for row, _ in pending}
    unsent = [row for row in remaining if row.id not in attempted]
    with session_scope(session_factory) as session:
        if pending:
            _record(session, batch, pending, now, rng)
        if unsent:
            batch.add("handed_back", _hand_back(session, batch, unsent))


def _message(
    compiled: CompiledChannel,
    row: _Claimed,
    contacts: dict[uuid.UUID, Any],
    settings: Settings,
) -> OutboundMessage | SendResult:
    """The message for one claimed row, or the permanent failure that replaces it."""
    contact = contacts.get(row.contact_id) if row.contact_id else None
    if contact is None or not row.address:
        return SendResult.permanent(row.id, "the contact was erased before sending")
    url = unsubscribe_url(settings, row.id)
    try:
        return build_message(
            compiled,
            contact,
            message_id=row.id,
            idempotency_key=f"d{row.id}",
            address=row.address,
            unsubscribe_url=url,
            push_data=push_data(settings, row.id) if compiled.channel_type == "push" else None,
        )
    except TemplateRenderError as exc:
        return SendResult.permanent(row.id, f"template {exc.field}: {exc.problem}")


# -- recording ---------------------------------------------------------------------------


def _outcome(
    batch: _Batch, row: _Claimed, result: SendResult, now: datetime, rng: Callable[[], float]
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


# The hot recording statement, PostgreSQL form. The outcomes arrive as one JSON document
# (one bind parameter whatever the batch size, so one cached plan); the UPDATE applies
# them with a compare-and-set on status, lease and attempt number; the second CTE adds
# to sent_count exactly the rows the first one changed to 'sent' — counted in SQL, in
# the same statement, so the counter and the log cannot disagree.
_RECORD_POSTGRESQL = """
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
bumped AS (
    UPDATE campaign_channels
    SET sent_count = sent_count + (SELECT count(*) FROM changed WHERE status = 'sent')
    WHERE id = :channel_id AND EXISTS (SELECT 1 FROM changed WHERE status = 'sent')
)
SELECT status, count(*) AS n FROM changed GROUP BY status
"""
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


def _record(
    session: Session,
    batch: _Batch,
    results: list[tuple[_Claimed, SendResult]],
    now: datetime,
    rng: Callable[[], float],
) -> None:
    if not results:
        return
    outcomes = []
    for row, result in results:
        outcome = {"id": row.id, "attempts": row.attempts, **_outcome(batch, row, result, now, rng)}
        if outcome.get("next_attempt_at") is not None:
            outcome["next_attempt_at"] = _stored_timestamp(outcome["next_attempt_at"], batch)
        outcomes.append(outcome)
    changed = _apply_outcomes(session, batch.dialect, batch.channel_id, batch.lease, outcomes, now)
    for status, n in changed.items():
        batch.add(status, n)
    if sum(changed.values()) < len(results):
        log.warning(
            "%d outcome(s) not recorded: their lease was taken back",
            len(results) - sum(changed.values()),
        )
    _drop_invalid_push_tokens(session, batch, results)
    _suppress_refused_addresses(session, batch, results)
    if any(result.outcome != "sent" for _, result in results):
        _check_error_threshold(session, batch)


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


def _stored_timestamp(value: datetime, batch: _Batch) -> str:
    """A timestamp inside the JSON outcomes, as each database stores UTCDateTime."""
    naive = value.astimezone(UTC).replace(tzinfo=None)
    if batch.dialect == "postgresql":
        return naive.isoformat()
    return naive.strftime("%Y-%m-%d %H:%M:%S.%f")  # SQLAlchemy's SQLite DateTime format


def _drop_invalid_push_tokens(
    session: Session, batch: _Batch, results: list[tuple[_Claimed, SendResult]]
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
    session: Session, batch: _Batch, results: list[tuple[_Claimed, SendResult]]
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


def _check_error_threshold(session: Session, batch: _Batch) -> None:
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


# -- leases ------------------------------------------------------------------------------


def _renew(session: Session, batch: _Batch, rows: list[_Claimed], lease: datetime) -> set[int]:
    """Extend the lease of the rows still to send; those that are no longer ours (the
    lease ran out and reconciliation took them back) are dropped from this batch."""
    renewed = session.execute(
        update(deliveries)
        .where(_ours(batch, rows))
        .values(lease_expires_at=lease)
        .returning(deliveries.c.id)
    ).all()
    return {row.id for row in renewed}


def _hand_back(session: Session, batch: _Batch, rows: list[_Claimed]) -> int:
    """Unsent rows go back to queued, their claim undone (nothing was attempted), so a
    resume or another batch sends them once. dispatched_at is cleared so the next
    reconciliation re-batches them at once instead of after the stale-dispatch grace."""
    if not rows:
        return 0
    return session.execute(
        update(deliveries)
        .where(_ours(batch, rows))
        .values(
            status="queued",
            lease_expires_at=None,
            dispatched_at=None,
            attempts=deliveries.c.attempts - 1,
        )
    ).rowcount

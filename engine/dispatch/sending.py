"""The sending step: one batch of a channel's deliveries, from queued to an outcome.

    claim ─commit─▶ render ▶ rate token ▶ provider call ─ … ─▶ checkpoint ─ … ─▶ done
    (the first chunk;                    (every 50th call: re-check status while that
     the rest on a thread)                call is with the provider; record on a thread)

Unlike the rest of the engine this function owns its transactions (it takes a
sessionmaker), because a provider call must never happen inside an open transaction:

- The claim (queued → sending with a lease, engine.dispatch.claiming) is committed
  BEFORE the first provider call to any row it claims (the first chunk's in line, the
  rest's on the helper thread while the first chunk goes out). It is the durable mark
  "these may have been sent": if the worker dies, the rows stay in 'sending' until the
  lease runs out and reconciliation hands them to another worker, instead of rolling
  back to 'queued' and being resent at once by anyone. It also keeps provider latency
  out of the database: no row locks, no idle-in-transaction connection held for the
  seconds a batch takes, nothing blocking pause or cancel.
- Outcomes are recorded (engine.dispatch.recording) in short transactions, one per
  checkpoint (during every CHECKPOINT_EVERY-th call, and at the end), each a handful
  of set-based statements. A checkpoint's re-check of the campaign is made while its
  chunk's last call waits for the provider, and its acceptances, already in the
  journal, are recorded on a helper thread while the next calls go out
  (engine.dispatch.background_recording; failures are recorded in line, since they
  may pause the campaign), so it adds no time of its own to a batch. The call in
  flight is recorded by the next checkpoint.

Every write after the claim is a compare-and-set on (status = 'sending', our lease,
the attempt number we claimed), so a row that reconciliation took back after our lease
ran out (and someone else claimed again) is never recorded twice, and
campaign_channels.sent_count grows, in the same statement, by exactly the rows that
changed to 'sent'.

Each provider call is made in two halves (Channel.begin, then its answer): the next
message is rendered and built between them, i.e. while the provider works on this one,
instead of between two calls. The next call still starts only after this one's answer
is in the journal, so there is never more than one call in flight.

Between checkpoints, each acceptance is written to the Redis acceptance journal before
the next provider call (engine.dispatch.journal): in the round trip that takes the
next message's rate token when a rate applies; with none, written to Redis's socket
just before the call, held there by the kernel until the call is out, and its reply
read while the call is out (RateLimiter.hand_over: written bytes outlive the process,
so a kill cannot undo it, and neither the round trip nor Redis's wake-up stands
between two calls). In flight, i.e. called but not recorded anywhere, is then at most
the one call awaiting its answer per worker process (the whole batch for a provider that
takes batches in one call, like `null`; a whole checkpoint without Redis). A worker
killed mid-batch can therefore cause at most that many resends, each with the same
idempotency key (d<delivery id>: the SMTP Message-ID, the providers' idempotency
headers): reconciliation records journaled acceptances as sent before it takes the rest
of an expired lease back.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from engine.campaigns.rendering import CompiledChannel
from engine.campaigns.templates import TemplateRenderError
from engine.channels import Channel, OutboundMessage, SendResult
from engine.clock import Clock
from engine.db import session_scope
from engine.dispatch.background_recording import BackgroundRecorder, RecordingFailed
from engine.dispatch.claiming import Claim, ClaimAhead, claim, ours
from engine.dispatch.journal import AcceptanceJournal, JournalEntry, acceptance
from engine.dispatch.messages import build_message
from engine.dispatch.recording import (
    BatchReport,
    BatchRun,
    ClaimedRow,
    forget_journaled,
    load_batch_run,
    record_outcomes,
)
from engine.models import Campaign, Delivery
from engine.ratelimit import RateLimiter, wait_seconds
from engine.settings import Settings
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
    journal = journal if rate_limiter.durable else None
    # The rest of the batch is claimed on the helper thread while the first chunk is
    # sent, where that thread records too (see _send): PostgreSQL and the journal.
    in_two_steps = (
        journal is not None
        and not channel.accepts_batch
        and session_factory.kw["bind"].dialect.name == "postgresql"
    )
    with session_scope(session_factory) as session:
        loaded = load_batch_run(
            session, channel_id, settings, now + timedelta(seconds=lease_seconds)
        )
        if loaded is None:
            return BatchReport(stopped="not running")
        batch, compiled = loaded
        first = claim(
            session, batch, compiled, first_id, last_id, now,
            limit=CHECKPOINT_EVERY if in_two_steps else None,
        )  # fmt: skip
    # Committed: the claim is durable before any provider hears of these rows.
    first.count_into(batch)
    rest = None
    if first.more_after is not None:  # claim what remains while the first chunk goes out
        rest = ClaimAhead(session_factory, batch, compiled, first.more_after, last_id, now)
    if first.rows or rest is not None:
        _send(
            session_factory, batch, compiled, first, rest, settings, clock,
            rate_limiter, channel, lease_seconds, sleep, rng, journal,
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


# -- sending -----------------------------------------------------------------------------


def _send(
    session_factory: sessionmaker[Session],
    batch: BatchRun,
    compiled: CompiledChannel,
    first: Claim,
    ahead: ClaimAhead | None,
    settings: Settings,
    clock: Clock,
    rate_limiter: RateLimiter,
    channel: Channel,
    lease_seconds: float,
    sleep: Callable[[float], None],
    rng: Callable[[], float],
    journal: AcceptanceJournal | None,
) -> None:
    remaining = list(first.rows)  # claimed rows not yet recorded nor handed back
    contacts = first.contacts
    pending: list[tuple[ClaimedRow, SendResult]] = []  # answered, not yet recorded
    unjournaled: JournalEntry | None = None  # the last acceptance, not yet in Redis
    rate_limited = any(rate > 0 for _, rate in batch.buckets)  # may a take have to wait?
    recorder = (
        BackgroundRecorder(session_factory, batch, rng, journal)
        if journal is not None and batch.dialect == "postgresql"
        else None
    )
    status_connection: Connection | None = None  # see campaign_running

    def campaign_running() -> bool | None:
        """The checkpoint's re-check when it has nothing to write: one statement on an
        autocommit connection the batch keeps (a pooled session's checkout ping, BEGIN
        and COMMIT were three more round trips in the 50th call's wait). None when it
        could not be read so (PostgreSQL restarted since): the full checkpoint, on a
        fresh pooled connection, reads it instead."""
        nonlocal status_connection
        try:
            if status_connection is None:
                engine = session_factory.kw["bind"]
                status_connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            status = status_connection.scalar(
                select(Campaign.status).where(Campaign.id == batch.campaign_id)
            )
        except SQLAlchemyError:
            close_status_connection()
            return None
        return status == "running"

    def close_status_connection() -> None:
        nonlocal status_connection
        if status_connection is not None:
            with contextlib.suppress(SQLAlchemyError):  # broken: nothing to give back
                status_connection.close()
            status_connection = None

    def collect_rest() -> list[ClaimedRow]:
        # The rest of the batch, claimed while the first chunk went out (ClaimAhead).
        nonlocal ahead
        if ahead is None:
            return []
        rest, ahead = ahead.collect(), None
        rest.count_into(batch)
        contacts.update(rest.contacts)
        remaining.extend(rest.rows)
        return rest.rows

    def take_token() -> None:
        # One round trip journals the previous call's acceptance and takes this call's
        # token: the acceptance is durable before the next provider call.
        nonlocal unjournaled
        entry, unjournaled = unjournaled, None
        while (wait := rate_limiter.take(batch.buckets, journal=entry)) > 0:
            entry = None  # the denied take wrote it already
            sleep(wait_seconds(wait))

    def hand_over_acceptance() -> None:
        # No token to wait for: the previous acceptance is written to Redis before this
        # call and its reply read once the call is out (RateLimiter.hand_over).
        nonlocal unjournaled
        entry, unjournaled = unjournaled, None
        if entry is not None:
            rate_limiter.hand_over(entry)

    def prepare(row: ClaimedRow) -> OutboundMessage | None:
        message = _message(compiled, row, contacts, settings)
        if isinstance(message, SendResult):  # nothing sendable: fails without a call
            pending.append((row, message))
            return None
        return channel.prepare(message)

    def send_each(rows: list[ClaimedRow], rest: list[ClaimedRow]) -> list[ClaimedRow]:
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
                else:
                    try:
                        answer = channel.begin(message, hand_over_acceptance)
                    finally:
                        rate_limiter.push()  # the acceptance held until this call was out
            try:
                if index + 1 < len(rows):
                    following = prepare(rows[index + 1])
                else:
                    rest = checkpoint(row if answer is not None else None, rest)
                if answer is not None:
                    # The hand-over's reply, while the call is out; read after the next
                    # message is prepared, by when it has come: no wait, no wake-up.
                    rate_limiter.confirm()
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

    def checkpoint(in_flight: ClaimedRow | None, rest: list[ClaimedRow]) -> list[ClaimedRow]:
        """Re-check the campaign (and the lease) while `in_flight`, the chunk's last
        call, is with the provider, and record the answered calls: acceptances on the
        recorder's thread, failures in line (they may pause the campaign, which this
        very re-check then sees). The call in flight is not recorded yet; it keeps its
        lease like the rows still to send, and its answer is journaled at the next
        call (or recorded by the final settle)."""
        nonlocal pending, remaining
        rest = rest + collect_rest()  # only the first checkpoint has any to collect
        recorded, lease = pending, batch.lease
        in_line = recorder is None or any(res.outcome != "sent" for _, res in recorded)
        try:
            if recorder is not None:
                recorder.wait()  # the previous chunk's, done long ago
        except RecordingFailed as failed:  # the final settle tries them again
            pending = failed.outcomes + pending
            raise
        renewal_due = _renewal_due(batch, clock.now(), lease_seconds)
        nothing_to_write = recorder is not None and not in_line and not renewal_due
        if nothing_to_write and (not rest or campaign_running()):
            pass  # running, and the acceptances go to the recorder: no transaction
        else:
            try:
                with session_scope(session_factory) as session:
                    if in_line:
                        record_outcomes(session, batch, recorded, clock.now(), rng)
                    if rest:
                        rest = _checkpoint(
                            session, batch, rest, in_flight, clock.now(), lease_seconds
                        )
            except BaseException:
                batch.lease = lease  # rolled back: the rows still carry the old lease
                raise
        pending = []
        remaining = ([in_flight] if in_flight is not None else []) + rest
        if in_line:
            forget_journaled(journal, batch, recorded)
        else:
            recorder.submit(recorded, lease, clock.now())
        return rest

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
        to_send = list(remaining) or collect_rest()  # the first chunk all suppressed
        while to_send:
            to_send = send_each(to_send[:CHECKPOINT_EVERY], to_send[CHECKPOINT_EVERY:])
    finally:
        # Normal end (the last call's answer), or an exception (a provider bug, Redis or
        # PostgreSQL down, the soft time limit): record what the providers answered and
        # hand back what was never attempted.
        close_status_connection()
        collect_rest()  # not collected (the first chunk ended early): handed back below
        try:
            if pending or remaining:
                try:
                    _settle(session_factory, batch, pending, remaining, clock.now(), rng)
                except BaseException:
                    journal_leftover()
                    raise
                unjournaled = None  # recorded: no next call will carry it
                forget_journaled(journal, batch, pending)
        finally:
            # The last checkpoint's recording ran meanwhile (other rows): collect it.
            if recorder is not None:
                try:
                    recorder.wait()
                except RecordingFailed as failed:
                    log.warning("a checkpoint's recording failed: recorded now", exc_info=True)
                    _settle(session_factory, batch, failed.outcomes, [], clock.now(), rng)
                    forget_journaled(journal, batch, failed.outcomes)


def _checkpoint(
    session: Session,
    batch: BatchRun,
    rest: list[ClaimedRow],
    in_flight: ClaimedRow | None,
    now: datetime,
    lease_seconds: float,
) -> list[ClaimedRow]:
    """Between two chunks: keep the lease on the rows still to send (and on the call in
    flight, recorded at the next checkpoint), and stop (handing the rest back) if the
    campaign was paused or cancelled meanwhile. Returns the rows to go on with."""
    if _renewal_due(batch, now, lease_seconds):
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


def _renewal_due(batch: BatchRun, now: datetime, lease_seconds: float) -> bool:
    # Renewing rewrites every remaining row (and its index entries: lease_expires_at is
    # in a partial index, so no HOT update), so it is done only once half the lease is
    # gone. Before that nobody can have taken the rows back: reclaiming waits for expiry.
    return batch.lease - now < timedelta(seconds=lease_seconds / 2)


def _settle(
    session_factory: sessionmaker[Session],
    batch: BatchRun,
    pending: list[tuple[ClaimedRow, SendResult]],
    remaining: list[ClaimedRow],
    now: datetime,
    rng: Callable[[], float],
) -> None:
    attempted = {row.id for row, _ in pending}
    unsent = [row for row in remaining if row.id not in attempted]
    with session_scope(session_factory) as session:
        if pending:
            record_outcomes(session, batch, pending, now, rng)
        if unsent:
            batch.add("handed_back", _hand_back(session, batch, unsent))


def _message(
    compiled: CompiledChannel,
    row: ClaimedRow,
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


# -- leases ------------------------------------------------------------------------------


def _renew(session: Session, batch: BatchRun, rows: list[ClaimedRow], lease: datetime) -> set[int]:
    """Extend the lease of the rows still to send; those that are no longer ours (the
    lease ran out and reconciliation took them back) are dropped from this batch."""
    renewed = session.execute(
        update(deliveries)
        .where(ours(batch, rows))
        .values(lease_expires_at=lease)
        .returning(deliveries.c.id)
    ).all()
    return {row.id for row in renewed}


def _hand_back(session: Session, batch: BatchRun, rows: list[ClaimedRow]) -> int:
    """Unsent rows go back to queued, their claim undone (nothing was attempted), so a
    resume or another batch sends them once. dispatched_at is cleared so the next
    reconciliation re-batches them at once instead of after the stale-dispatch grace."""
    if not rows:
        return 0
    return session.execute(
        update(deliveries)
        .where(ours(batch, rows))
        .values(
            status="queued",
            lease_expires_at=None,
            dispatched_at=None,
            attempts=deliveries.c.attempts - 1,
        )
    ).rowcount

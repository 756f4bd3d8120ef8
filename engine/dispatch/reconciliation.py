"""Reconciliation: PostgreSQL alone decides what is left to do.

Redis keeps nothing on disk, so a restart loses every queued task; a SIGKILLed worker
leaves its rows in `sending`. Beat runs `reconcile` every few seconds and finds that work
again from the rows themselves:

    (a) running campaigns with channels not planned yet     → plan them
    (b) `sending` rows whose lease expired: those the
        acceptance journal says a provider accepted         → sent (counted)
        the others                                          → queued, dispatch again
    (c) cancelled campaigns                                 → queued rows cancelled,
                                                              channels done
    (d) queued rows whose retry is due                      → batch them
    (e) queued rows never dispatched, or dispatched longer
        ago than the grace period while their channel's
        queue is empty (their task vanished)                → batch them
    (f) completion                                          → done / completed

Each sweep takes at most `limit` rows, so one run stays short; the next run continues.
Re-batching a row whose old task is merely slow is harmless: sending claims rows by
compare-and-set, so only one batch can send each row. It is not free, though: a big
campaign's backlog can take minutes to drain, and re-dispatching everything older than
the grace would flood the queue with empty duplicates. So (e) skips dispatched rows of
channel types whose queue still holds tasks (the caller asks the broker): while a queue
is non-empty its rows may simply be waiting in it, and a Redis restart that lost them
also emptied it. Rows never dispatched are batched whatever the queue holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from engine.dispatch.completion import channel_has_work, complete_finished
from engine.dispatch.journal import AcceptanceJournal
from engine.dispatch.planning import BATCH_SIZE, PLANNABLE, Batch, dispatch_queued
from engine.dispatch.recording import record_recovered_acceptances
from engine.models import Campaign, CampaignChannel, Delivery

# How long a queued row may wait for the batch task that was enqueued for it before
# it is presumed lost. Well above the time a healthy queue takes to start a task,
# well below what a user would call "stuck".
DISPATCH_GRACE = timedelta(seconds=60)
# Rows (or campaigns) one sweep looks at.
SWEEP_LIMIT = 20_000


@dataclass
class Reconciled:
    """What one run decided; the task enqueues it after commit."""

    campaigns_to_plan: list[uuid.UUID] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)
    leases_reclaimed: int = 0
    # Acceptances recovered from the journal: (channel, [(delivery id, attempts)]),
    # for the caller to forget once this transaction has committed.
    recovered: list[tuple[uuid.UUID, list[tuple[int, int]]]] = field(default_factory=list)
    cancelled: int = 0
    completed: list[uuid.UUID] = field(default_factory=list)


def reconcile(
    session: Session,
    now: datetime,
    *,
    grace: timedelta = DISPATCH_GRACE,
    limit: int = SWEEP_LIMIT,
    batch_size: int = BATCH_SIZE,
    busy_channel_types: Collection[str] = (),
    journal: AcceptanceJournal | None = None,
) -> Reconciled:
    result = Reconciled()
    result.campaigns_to_plan = unplanned_campaigns(session, limit=limit)
    if journal is not None:
        result.recovered = recover_acceptances(session, now, journal, limit=limit)
    result.leases_reclaimed = reclaim_expired_leases(session, now, limit=limit)
    result.cancelled = cancel_remaining(session, limit=limit)
    result.batches = dispatch_queued(
        session, due_retries(now), now, batch_size=batch_size, limit=limit
    )
    result.batches += dispatch_queued(
        session,
        lost_dispatches(now, grace, busy_channel_types),
        now,
        batch_size=batch_size,
        limit=limit,
    )
    result.completed = complete_finished(session, now)
    return result


def unplanned_campaigns(session: Session, *, limit: int = SWEEP_LIMIT) -> list[uuid.UUID]:
    """(a) Running campaigns with a channel still pending: launched from the API, or
    promoted while the plan task was lost."""
    stmt = (
        select(Campaign.id)
        .where(
            Campaign.status == "running",
            Campaign.id.in_(
                select(CampaignChannel.campaign_id).where(CampaignChannel.status.in_(PLANNABLE))
            ),
        )
        .limit(limit)
    )
    return list(session.scalars(stmt))


def recover_acceptances(
    session: Session, now: datetime, journal: AcceptanceJournal, *, limit: int = SWEEP_LIMIT
) -> list[tuple[uuid.UUID, list[tuple[int, int]]]]:
    """(b, first half) A worker killed mid-batch leaves rows in `sending` that a provider
    already accepted: their acceptance is in the journal (engine.dispatch.journal), not
    yet in PostgreSQL. Record those as sent, so that (b) re-queues only the rows that
    were never sent. Rows of one dead batch share its channel and lease; each such group
    is recorded by the checkpoint's own compare-and-set statement."""
    expired = session.execute(
        select(
            Delivery.campaign_channel_id, Delivery.lease_expires_at, Delivery.id, Delivery.attempts
        )
        .where(Delivery.status == "sending", Delivery.lease_expires_at < now)
        .order_by(Delivery.id)
        .limit(limit)
    ).all()
    groups: dict[tuple[uuid.UUID, datetime], list[tuple[int, int]]] = {}
    for channel_id, lease, delivery_id, attempts in expired:
        groups.setdefault((channel_id, lease), []).append((delivery_id, attempts))
    recovered = []
    for (channel_id, lease), rows in groups.items():
        accepted = journal.accepted(channel_id, rows)
        if not accepted:
            continue
        attempts = dict(rows)
        record_recovered_acceptances(
            session,
            channel_id,
            lease,
            {(delivery_id, attempts[delivery_id]): pmid for delivery_id, pmid in accepted.items()},
            now,
        )
        recovered.append((channel_id, [(i, attempts[i]) for i in accepted]))
    return recovered


def reclaim_expired_leases(session: Session, now: datetime, *, limit: int = SWEEP_LIMIT) -> int:
    """(b) `sending` rows whose worker died or hung → queued and undispatched again.

    Compare-and-set on status and lease: a worker that records its result first wins,
    and this statement then leaves the row alone. The partial index of sending rows
    keeps the scan to those few. Clearing dispatched_at lets (e) batch them in this
    same run if their campaign is running, or on resume if it is paused.
    """
    expired = (Delivery.status == "sending", Delivery.lease_expires_at < now)
    picked = select(Delivery.id).where(*expired).order_by(Delivery.id).limit(limit)
    return session.execute(
        update(Delivery)
        .where(*expired, Delivery.id.in_(picked.scalar_subquery()))
        .values(status="queued", lease_expires_at=None, dispatched_at=None)
        .execution_options(synchronize_session=False)
    ).rowcount


def cancel_remaining(session: Session, *, limit: int = SWEEP_LIMIT) -> int:
    """(c) A cancelled campaign sends nothing more: its queued rows become cancelled, and
    its channels done once no row is queued or sending (a batch mid-send finishes or
    has its lease reclaimed, then lands here)."""
    open_channels = (
        select(CampaignChannel.id)
        .join(Campaign, Campaign.id == CampaignChannel.campaign_id)
        .where(Campaign.status == "cancelled", CampaignChannel.status != "done")
    )
    queued = (
        Delivery.status == "queued",
        Delivery.campaign_channel_id.in_(open_channels.scalar_subquery()),
    )
    picked = select(Delivery.id).where(*queued).limit(limit)
    cancelled = session.execute(
        update(Delivery)
        .where(*queued, Delivery.id.in_(picked.scalar_subquery()))
        .values(status="cancelled")
        .execution_options(synchronize_session=False)
    ).rowcount
    session.execute(
        update(CampaignChannel)
        .where(
            CampaignChannel.id.in_(open_channels.scalar_subquery()),
            ~channel_has_work(),
        )
        .values(status="done")
        .execution_options(synchronize_session=False)
    )
    return cancelled


def _on_running_channel(*, excluding: Collection[str] = ()) -> ColumnElement[bool]:
    # Only planned (or done, then reopened) channels of running campaigns are sent; a
    # paused campaign's rows wait, undispatched or stale, until it resumes.
    sendable = (
        select(CampaignChannel.id)
        .join(Campaign, Campaign.id == CampaignChannel.campaign_id)
        .where(Campaign.status == "running", CampaignChannel.status.in_(("planned", "done")))
    )
    if excluding:
        sendable = sendable.where(CampaignChannel.channel_type.not_in(list(excluding)))
    return Delivery.campaign_channel_id.in_(sendable.scalar_subquery())


def due_retries(now: datetime) -> list[ColumnElement[bool]]:
    """(d) Rows a transient failure put back with a next_attempt_at that has come, not
    yet dispatched since it was set (served by the due-retries partial index)."""
    return [
        Delivery.status == "queued",
        Delivery.next_attempt_at.is_not(None),
        Delivery.next_attempt_at <= now,
        or_(Delivery.dispatched_at.is_(None), Delivery.dispatched_at < Delivery.next_attempt_at),
        _on_running_channel(),
    ]


def lost_dispatches(
    now: datetime, grace: timedelta, busy_channel_types: Collection[str] = ()
) -> list[ColumnElement[bool]]:
    """(e) Queued rows no live batch owns: never dispatched (reclaimed, handed back,
    re-queued by retry-failed), or dispatched longer ago than `grace` (the task was
    lost with Redis) on a channel type whose queue is empty. Rows waiting for a retry
    in the future are left alone."""
    stale = and_(
        Delivery.dispatched_at < now - grace,
        _on_running_channel(excluding=busy_channel_types),
    )
    return [
        Delivery.status == "queued",
        or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
        _on_running_channel(),
        or_(Delivery.dispatched_at.is_(None), stale),
    ]

"""Dispatch orchestration tasks: promote, plan, reconcile. Thin and repeatable.

Each task opens its transaction, calls the engine, commits, and only then enqueues what
the engine decided (plan tasks, send_batch tasks), so a worker never receives work
whose rows are not committed. If enqueueing fails after the commit (Redis down), no
retry is needed here: the rows are in PostgreSQL and reconciliation finds them again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from datetime import timedelta

from amqp.exceptions import ChannelError
from celery import current_app, shared_task

from engine.clock import system_clock
from engine.dispatch.completion import complete_finished
from engine.dispatch.planning import Batch, channels_to_plan, plan_channel
from engine.dispatch.promotion import promote_due
from engine.dispatch.reconciliation import reconcile
from engine.settings import CHANNELS, get_settings
from workers.db import task_session
from workers.tasks.sending import acceptance_journal

log = logging.getLogger("herald.dispatch")

PROMOTE_DUE = "herald.promote_due"
PLAN_CAMPAIGN = "herald.plan_campaign"
PLAN_CHANNEL = "herald.plan_channel"
RECONCILE = "herald.reconcile"


def send_batch_task_name(channel_type: str) -> str:
    # Routed by prefix to the channel's own queue (herald.email.* → email, …).
    return f"herald.{channel_type}.send_batch"


def enqueue_batches(batches: Iterable[Batch]) -> int:
    count = 0
    for batch in batches:
        current_app.send_task(
            send_batch_task_name(batch.channel_type),
            kwargs={
                "channel_id": str(batch.channel_id),
                "first_id": batch.first_id,
                "last_id": batch.last_id,
            },
        )
        count += 1
    return count


def enqueue_planning(campaign_ids: Iterable[uuid.UUID]) -> None:
    for campaign_id in campaign_ids:
        current_app.send_task(PLAN_CAMPAIGN, kwargs={"campaign_id": str(campaign_id)})


@shared_task(name=PROMOTE_DUE)
def promote_due_task() -> int:
    with task_session() as session:
        promoted = promote_due(session, system_clock.now())
    enqueue_planning(promoted)
    if promoted:
        log.info("promoted %d due campaign(s)", len(promoted))
    return len(promoted)


@shared_task(name=PLAN_CAMPAIGN)
def plan_campaign_task(campaign_id: str) -> int:
    """Plan the campaign's pending channels side by side: this task plans the first and
    hands each other one to a plan_channel task, which another pool process takes.

    A channel's planning is one long INSERT … SELECT, run by one PostgreSQL backend on
    one CPU. Planned one after the other, a campaign's first channel kept the other CPU
    of a 2-core host idle for its whole insert (~40 % idle for the first ~3 s of a
    100,000 x 2 bench run), and the second waited for it."""
    campaign = uuid.UUID(campaign_id)
    with task_session() as session:
        channel_ids = channels_to_plan(session, campaign)
    for channel_id in channel_ids[1:]:
        current_app.send_task(
            PLAN_CHANNEL, kwargs={"campaign_id": campaign_id, "channel_id": str(channel_id)}
        )
    if not channel_ids:  # nothing to plan; complete it if its audience reached nobody
        with task_session() as session:
            complete_finished(session, system_clock.now(), campaign_id=campaign)
        return 0
    return plan_channel_task(campaign_id, str(channel_ids[0]))


@shared_task(name=PLAN_CHANNEL)
def plan_channel_task(campaign_id: str, channel_id: str) -> int:
    """Plan one channel, enqueue its batches once committed. A duplicate, or a channel
    planned meanwhile, plans nothing (plan_channel skips it)."""
    with task_session() as session:
        batches = plan_channel(session, uuid.UUID(channel_id), system_clock.now())
    enqueued = enqueue_batches(batches)
    # A campaign whose audience reaches nobody is finished as soon as it is planned;
    # whichever channel is planned last sees it (complete_finished decides by
    # compare-and-set from what is committed).
    with task_session() as session:
        complete_finished(session, system_clock.now(), campaign_id=uuid.UUID(campaign_id))
    log.info("planned channel %s of campaign %s: %d batch(es)", channel_id, campaign_id, enqueued)
    return enqueued


def busy_channel_types() -> set[str]:
    """Channel types whose queue still holds tasks. Their stale-looking queued rows may
    just be waiting in line, so reconciliation leaves them alone until the queue
    empties (see engine.dispatch.reconciliation). If the broker cannot say, every
    queue counts as busy: a late re-dispatch is better than a flood of duplicates."""
    busy = set()
    try:
        with current_app.connection_for_read() as connection:
            channel = connection.default_channel
            for name in CHANNELS:
                try:
                    waiting = channel.queue_declare(queue=name, passive=True).message_count
                except ChannelError:  # never declared (or not since Redis restarted)
                    waiting = 0
                if waiting:
                    busy.add(name)
    except Exception:
        log.warning("could not read queue lengths; treating all as busy", exc_info=True)
        return set(CHANNELS)
    return busy


@shared_task(name=RECONCILE)
def reconcile_task() -> dict[str, int]:
    busy = busy_channel_types()
    grace = timedelta(seconds=get_settings().dispatch_grace)
    journal = acceptance_journal()
    with task_session() as session:
        found = reconcile(
            session, system_clock.now(), grace=grace, busy_channel_types=busy, journal=journal
        )
    if journal is not None:  # committed: the recovered entries have served
        for channel_id, rows in found.recovered:
            journal.forget(channel_id, rows)
    enqueue_planning(found.campaigns_to_plan)
    enqueue_batches(found.batches)
    summary = {
        "campaigns_to_plan": len(found.campaigns_to_plan),
        "batches": len(found.batches),
        "acceptances_recovered": sum(len(rows) for _, rows in found.recovered),
        "leases_reclaimed": found.leases_reclaimed,
        "cancelled": found.cancelled,
        "completed": len(found.completed),
    }
    if any(summary.values()):
        log.info("reconciled: %s", summary)
    return summary

"""Issue 4's chaos scenarios, each on a real campaign (email over SMTP, SMS over the
Twilio API, to loopback sinks) sent by real `celery worker` processes driven by a real
`celery beat`, against a private redis-server and PostgreSQL cluster.

Every test ends with the same verdict (`Harness.verify`): the campaign completed; every
recipient has exactly one delivery per channel, sent; the sink accepted at least one
message for each delivery, under that delivery's idempotency key and to its address;
the counters equal the deliveries. Then each states its bound on resends (a second
accepted message with the same key) and prints what it measured.
"""

from __future__ import annotations

import re
import signal
import time

import pytest
from sqlalchemy import func, select

from engine.campaigns.transitions import transition
from engine.db import session_scope
from engine.dispatch.sending import CHECKPOINT_EVERY
from engine.models import Campaign, CampaignChannel, Delivery
from tests.chaos.conftest import CampaignRun, Harness
from tests.chaos.services import wait_until

pytestmark = pytest.mark.slow

CONCURRENCY = 2  # pool processes per worker
# Times 2 channels: one batch per channel, so each pool process has one to send, a few
# checkpoints long (~3 s on this machine when idle; much longer when it is busy).
RECIPIENTS = 300
MID_CAMPAIGN = 0.3  # strike once this share of the messages was accepted


def report(name: str, **figures) -> None:
    """One line per scenario with what it measured (shown with pytest -s or -rA)."""
    print(f"\nCHAOS {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def start(chaos: Harness, *, beats: int = 1):
    """A worker and its beat(s), started together (each takes seconds to import)."""
    worker = chaos.worker(concurrency=CONCURRENCY, wait=False)
    started = [chaos.beat() for _ in range(beats)]
    worker.wait_ready()
    return worker, started


def failed_batches(log: str) -> list[str]:
    """The send_batch tasks a worker's log reports as raised on a database error."""
    return re.findall(r"send_batch\[([^]]+)\] raised unexpected: OperationalError", log)


def strike_point(run: CampaignRun) -> int:
    return int(run.messages * MID_CAMPAIGN)


def sending_rows(chaos: Harness, run: CampaignRun) -> int:
    return sum(
        n for (_, status), n in chaos.deliveries_by_status(run).items() if status == "sending"
    )


def waiting_rows(chaos: Harness, run: CampaignRun) -> int:
    """Queued rows whose batch task was enqueued (and is still waiting in Redis)."""
    with session_scope(chaos.factory) as session:
        return session.scalar(
            select(func.count())
            .select_from(Delivery)
            .join(CampaignChannel, CampaignChannel.id == Delivery.campaign_channel_id)
            .where(
                CampaignChannel.campaign_id == run.campaign_id,
                Delivery.status == "queued",
                Delivery.dispatched_at.is_not(None),
            )
        )


def batch_reports(log: str) -> list[int]:
    """Messages sent by each send_batch task a worker's log reports, in order."""
    return [int(n) for n in re.findall(r"send_batch\[[^]]+\] succeeded .*'sent': (\d+)", log)]


def test_sigkill_of_a_worker_loses_nothing_and_resends_at_most_one_per_pool_process(chaos):
    started = time.monotonic()
    run = chaos.campaign(RECIPIENTS)
    worker, _ = start(chaos)
    chaos.wait_accepted(strike_point(run))

    pool = worker.pool_pids()
    worker.signal_group(signal.SIGKILL)  # the parent and its pool processes, at once
    worker.wait_exit(10)
    wait_until(lambda: not worker.group_alive(), 10, "the killed pool processes to be gone")
    accepted_at_kill = chaos.accepted()
    in_flight_claims = sending_rows(chaos, run)
    assert accepted_at_kill < run.messages, "the campaign was over before the kill"
    assert in_flight_claims > 0, "no batch was running when the worker was killed"

    chaos.worker(concurrency=CONCURRENCY)
    chaos.wait_completed(run)
    outcome = chaos.verify(run)

    report(
        "sigkill",
        runtime=f"{time.monotonic() - started:.1f}s",
        pool_processes_killed=len(pool),
        accepted_at_kill=accepted_at_kill,
        rows_sending_at_kill=in_flight_claims,
        resends=outcome.resends,
        resent_keys=dict(outcome.resent_keys),
    )
    # In flight = provider calls whose answer was not yet recorded: one per pool process.
    assert len(pool) == CONCURRENCY
    assert outcome.total_resends <= len(pool), outcome.resent_keys


def test_a_redis_restart_mid_campaign_delays_it_but_loses_nothing(chaos):
    started = time.monotonic()
    # Two batches per channel: while the first two are sent, the other two wait in
    # Redis and vanish with it; reconciliation must find their rows again.
    run = chaos.campaign(2 * RECIPIENTS)
    _, (beat,) = start(chaos)
    chaos.wait_accepted(strike_point(run))

    chaos.redis.stop()  # every queued task, lock and journal entry is gone with it
    accepted_at_stop = chaos.accepted()
    lost_with_redis = waiting_rows(chaos, run)
    time.sleep(1.0)  # Redis stays down a moment: the scenario itself, not a wait
    chaos.redis.start()
    reconciles_before = beat.sent("reconcile-dispatch")

    chaos.wait_completed(run)
    outcome = chaos.verify(run)
    report(
        "redis-restart",
        runtime=f"{time.monotonic() - started:.1f}s",
        accepted_at_stop=accepted_at_stop,
        rows_of_lost_tasks=lost_with_redis,
        resends=outcome.resends,
        beat_reconciles_after_restart=beat.sent("reconcile-dispatch") - reconciles_before,
    )
    assert lost_with_redis > 0, "no batch task was waiting in Redis when it stopped"
    assert beat.alive, "beat died with Redis"
    # A batch that loses Redis records what the provider accepted in PostgreSQL on its
    # way out (engine.dispatch.sending._settle): nothing is resent.
    assert outcome.total_resends == 0, outcome.resent_keys


def test_a_postgresql_restart_mid_campaign_delays_it_but_loses_nothing(chaos):
    started = time.monotonic()
    run = chaos.campaign(RECIPIENTS)
    worker, _ = start(chaos)
    chaos.wait_accepted(strike_point(run))

    accepted_at_stop = chaos.accepted()
    stopped = time.monotonic()
    chaos.cluster.stop()  # -m fast: every session is terminated, mid-transaction or not
    # Down until each running batch has reached a checkpoint it could not record (the
    # sending itself needs no database, so that takes a chunk's time), then back.
    wait_until(
        lambda: len(failed_batches(worker.log_text())) >= CONCURRENCY,
        30,
        "both running batches to fail on the outage",
    )
    chaos.cluster.start()
    outage_s = time.monotonic() - stopped

    chaos.wait_completed(run)
    outcome = chaos.verify(run)
    report(
        "postgresql-restart",
        runtime=f"{time.monotonic() - started:.1f}s",
        outage=f"{outage_s:.1f}s",
        accepted_at_stop=accepted_at_stop,
        resends=outcome.resends,
    )
    # The failed checkpoints' outcomes are not in PostgreSQL; the rows come back when
    # their lease runs out, and reconciliation records the ones the acceptance journal
    # holds as sent. Every acceptance is journaled before its checkpoint (a chunk's last
    # one on its own, having no next token to ride on): nothing is resent.
    assert outcome.total_resends == 0, outcome.resent_keys


def test_sigterm_drains_the_worker_and_resends_nothing(chaos):
    started = time.monotonic()
    # Two batches per channel: the draining worker must finish the two it runs and
    # leave the two waiting in the queue to its replacement.
    run = chaos.campaign(2 * RECIPIENTS)
    worker, _ = start(chaos)
    chaos.wait_accepted(strike_point(run))

    assert sending_rows(chaos, run) > 0, "no batch was running at SIGTERM"
    assert waiting_rows(chaos, run) > 0, "no batch was left waiting in the queue"
    accepted_at_term = chaos.accepted()
    term_sent = time.monotonic()
    worker.signal_parent(signal.SIGTERM)  # what `docker stop` sends: warm shutdown
    replacement = chaos.worker(concurrency=CONCURRENCY)  # the deploy's new worker
    worker.wait_exit(60)
    exit_s = time.monotonic() - term_sent
    wait_until(lambda: not worker.group_alive(), 10, "the drained pool processes to exit")
    drained_log = worker.log_text()

    chaos.wait_completed(run)
    outcome = chaos.verify(run)
    drained = batch_reports(drained_log)
    replaced = batch_reports(replacement.log_text())
    report(
        "sigterm",
        runtime=f"{time.monotonic() - started:.1f}s",
        exit_after_sigterm=f"{exit_s:.1f}s",
        accepted_at_term=accepted_at_term,
        sent_by_drained_worker_batches=drained,
        sent_by_replacement_batches=replaced,
        resends=outcome.resends,
    )
    assert worker.proc.returncode == 0, f"the worker did not exit cleanly:\n{drained_log[-3000:]}"
    # Warm shutdown: the two running batches were finished, not cut short or handed
    # back, and the waiting ones were left to the replacement.
    assert len(drained) == CONCURRENCY and all(n > 0 for n in drained), drained
    assert sum(drained) + sum(replaced) == run.messages, (drained, replaced)
    assert outcome.total_resends == 0, outcome.resent_keys


def test_two_beats_promote_once_and_send_each_message_once(chaos):
    started = time.monotonic()
    worker, beats = start(chaos, beats=2)
    wait_until(
        lambda: all(b.sent("promote-due-campaigns") for b in beats), 30, "both beats ticking"
    )
    run = chaos.campaign(200, start_in=1.0)

    chaos.wait_completed(run)
    outcome = chaos.verify(run)
    promotions = [
        line
        for line in worker.log_text().splitlines()
        if "herald.promote_due[" in line and " succeeded " in line and not line.endswith(": 0")
    ]
    report(
        "two-beats",
        runtime=f"{time.monotonic() - started:.1f}s",
        promote_ticks=[b.sent("promote-due-campaigns") for b in beats],
        promotions=len(promotions),
        resends=outcome.resends,
    )
    assert all(b.alive for b in beats)
    # Both beats kept sending the promotion throughout, yet one run promoted the campaign.
    assert all(b.sent("promote-due-campaigns") >= 4 for b in beats)
    assert len(promotions) == 1, promotions
    assert outcome.total_resends == 0, outcome.resent_keys


# Failure bursts by request number, each channel seeing RECIPIENTS first attempts.
# Cumulative failures per attempt stay under the default error threshold (20 % once
# 100 attempts were made): 15 of the first 115 at worst, 13 %.
SMS_BURSTS = [(100, 15, 429), (180, 15, 503), (260, 10, 500)]
EMAIL_BURSTS = [(120, 15, "451 4.3.0 Try again later"), (220, 15, "421 4.3.2 Busy, closing")]


def test_a_provider_answering_429_and_5xx_in_bursts(chaos):
    started = time.monotonic()
    for first, length, status in SMS_BURSTS:
        chaos.twilio.burst(first, length, status, retry_after=1 if status == 429 else None)
    for first, length, reply in EMAIL_BURSTS:
        chaos.smtp.burst(first, length, reply)
    run = chaos.campaign(RECIPIENTS, config={"max_attempts": 10})
    start(chaos)

    chaos.wait_completed(run, timeout=120)
    outcome = chaos.verify(run)  # every message accepted exactly once at least

    refused_sms = {status: len(chaos.twilio.answered(status)) for _, _, status in SMS_BURSTS}
    with session_scope(chaos.factory) as session:
        reason = session.scalar(
            select(Campaign.status_reason).where(Campaign.id == run.campaign_id)
        )
        attempts = dict(
            session.execute(
                select(CampaignChannel.channel_type, func.sum(Delivery.attempts))
                .join(CampaignChannel, CampaignChannel.id == Delivery.campaign_channel_id)
                .where(CampaignChannel.campaign_id == run.campaign_id)
                .group_by(CampaignChannel.channel_type)
            ).all()
        )
    report(
        "provider-bursts",
        runtime=f"{time.monotonic() - started:.1f}s",
        sms_refused=refused_sms,
        email_refused=chaos.smtp.refused,
        attempts=attempts,
        resends=outcome.resends,
    )
    # The bursts happened, as scripted…
    assert refused_sms == {status: length for _, length, status in SMS_BURSTS}
    assert chaos.smtp.refused == sum(length for _, length, _ in EMAIL_BURSTS)
    # …every attempt is accounted for: one per recipient plus one per refusal (a retry
    # is a new attempt, through the database, not a resend of an accepted message)…
    assert attempts == {
        "sms": run.recipients + sum(refused_sms.values()),
        "email": run.recipients + chaos.smtp.refused,
    }
    # …a refused message is not an accepted one: nothing was accepted twice…
    assert outcome.total_resends == 0, outcome.resent_keys
    # …Retry-After was honoured (the engine's own backoff is longer still)…
    accepted_at = {chaos.twilio.key(r): r.received_at for r in chaos.twilio.accepted()}
    for refused in chaos.twilio.answered(429):
        assert accepted_at[chaos.twilio.key(refused)] >= refused.received_at + 1.0
    # …and the error threshold never paused the campaign.
    assert reason is None, reason


def test_pause_stops_sending_within_a_checkpoint_and_resume_resends_nothing(chaos):
    started = time.monotonic()
    run = chaos.campaign(RECIPIENTS)
    start(chaos)
    chaos.wait_accepted(strike_point(run))

    with session_scope(chaos.factory) as session:
        transition(session, run.user_id, run.campaign_id, "pause")
    # Read once the pause is committed: what was accepted before it is not "after".
    accepted_at_pause = chaos.accepted()

    # Settled: nothing accepted for 1.5 s (three reconciliation runs, a checkpoint's
    # worth of messages several times over), and every claimed row handed back.
    last = {"count": -1, "since": time.monotonic()}

    def settled() -> bool:
        now, count = time.monotonic(), chaos.accepted()
        if count != last["count"]:
            last.update(count=count, since=now)
        return now - last["since"] >= 1.5 and sending_rows(chaos, run) == 0

    wait_until(settled, 30, "sending to stop after the pause", interval=0.1)
    after_pause = chaos.accepted() - accepted_at_pause
    paused_at = chaos.accepted()
    time.sleep(1.0)  # paused a while longer: two more reconciliation runs send nothing
    assert chaos.accepted() == paused_at, "messages were sent while the campaign was paused"
    assert chaos.status(run) == "paused"

    with session_scope(chaos.factory) as session:
        transition(session, run.user_id, run.campaign_id, "resume")
    chaos.wait_completed(run)
    outcome = chaos.verify(run)
    report(
        "pause-resume",
        runtime=f"{time.monotonic() - started:.1f}s",
        accepted_at_pause=accepted_at_pause,
        accepted_after_pause=after_pause,
        resends=outcome.resends,
    )
    assert paused_at < run.messages, "the campaign finished before the pause took effect"
    # A batch re-checks the campaign at every checkpoint (CHECKPOINT_EVERY messages): a
    # pool process whose check came just before the pause starts at most one more
    # checkpoint's worth of calls, and may still have had one call out at the pause.
    assert after_pause <= (CHECKPOINT_EVERY + 1) * CONCURRENCY
    assert outcome.total_resends == 0, outcome.resent_keys

"""One-transaction sending for providers that take a whole batch in one call (null).

engine.dispatch.batch_sending, reached through send_batch, against real PostgreSQL:
rows go from queued straight to their outcome, under row locks, in one transaction.
Every test ends with the counter invariant.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta

import pytest
import redis
from sqlalchemy import select, text, update
from sqlalchemy.exc import OperationalError

from engine.channels import Channel, OutboundMessage, SendResult, channel_for
from engine.clock import FixedClock
from engine.dispatch.reconciliation import cancel_remaining
from engine.dispatch.sending import send_batch
from engine.models import Campaign, CampaignChannel, Contact, Delivery, Suppression
from engine.ratelimit import RateLimiter
from engine.unsubscribe import delivery_of
from tests.conftest import TEST_REDIS_URL
from tests.test_dispatch_sending import NOW, assert_counters_match, make_scenario, rows, run


@pytest.fixture
def factory(app):
    from api.extensions import db

    with app.app_context():
        yield db.factory


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


@pytest.fixture
def limiter(clock):
    client = redis.Redis.from_url(TEST_REDIS_URL)
    yield RateLimiter(client, clock)
    client.close()


class BatchProvider(Channel):
    """A provider that takes a whole batch in one call, like null, but records what it
    was given, can answer otherwise than "sent", and runs a hook during the call."""

    name = "batchy"
    accepts_batch = True

    def __init__(
        self,
        channel_type: str,
        answer: Callable[[OutboundMessage], SendResult] | None = None,
        during: Callable[[], None] | None = None,
    ) -> None:
        self.channel_type = channel_type
        self.answer = answer or (lambda m: SendResult.sent(m.delivery_id, f"b-{m.delivery_id}"))
        self.during = during
        self.calls: list[list[OutboundMessage]] = []

    def send(self, message: OutboundMessage) -> SendResult:
        return self.send_many([message])[0]

    def send_many(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        self.calls.append(list(messages))
        if self.during is not None:
            self.during()
        return [self.answer(m) for m in messages]


def statuses(session, scenario) -> list[tuple[str, int]]:
    return [(d.status, d.attempts) for d in rows(session, scenario)]


# -- the happy path ----------------------------------------------------------------------


def test_rows_go_from_queued_to_sent_in_one_call_and_one_transaction(
    factory, db_session, settings, clock, limiter
):
    scenario = make_scenario(db_session, "email", 30)
    seen: list[set[str]] = []

    def look_from_another_connection() -> None:
        with factory() as other:  # mid-call, nothing is committed: no 'sending' state
            seen.append(set(other.scalars(select(Delivery.status)).all()))

    provider = BatchProvider("email", during=look_from_another_connection)
    report = run(factory, scenario, settings, clock, limiter, provider)

    assert (report.claimed, report.sent, report.stopped) == (30, 30, None)
    assert seen == [{"queued"}]
    assert len(provider.calls) == 1 and len(provider.calls[0]) == 30
    delivered = rows(db_session, scenario)
    assert {(d.status, d.attempts, d.sent_at, d.lease_expires_at) for d in delivered} == {
        ("sent", 1, NOW, None)
    }
    assert [d.provider_message_id for d in delivered] == [f"b-{i}" for i in scenario.delivery_ids]
    by_id = {m.delivery_id: m for m in provider.calls[0]}
    for delivery, contact in zip(delivered, scenario.contacts, strict=True):
        message = by_id[delivery.id]
        assert message.idempotency_key == f"d{delivery.id}"
        assert message.address == contact.email
        assert message.content["subject"] == f"Hello {contact.first_name}"
        html = message.content["html"]  # and the open pixel after it (link tracking)
        assert html.startswith(f"<p>Hi {contact.first_name}, tier gold</p><img src=")
        assert html.count("/t/o/") == 1
        link = message.content["headers"]["List-Unsubscribe"]
        assert delivery_of(settings, link.strip("<>").rsplit("/", 1)[1]) == delivery.id
    assert assert_counters_match(db_session, scenario) == 30


def test_the_null_provider_takes_this_path(factory, db_session, settings, clock, limiter):
    scenario = make_scenario(db_session, "sms", 5)
    report = run(factory, scenario, settings, clock, limiter, channel_for("sms", settings))
    assert report.sent == 5
    delivered = rows(db_session, scenario)
    assert [d.provider_message_id for d in delivered] == [
        f"null-{i}" for i in scenario.delivery_ids
    ]
    assert assert_counters_match(db_session, scenario) == 5


def test_a_redelivered_batch_sends_nothing(factory, db_session, settings, clock, limiter):
    scenario = make_scenario(db_session, "sms", 10)
    provider = BatchProvider("sms")
    first = run(factory, scenario, settings, clock, limiter, provider)
    again = run(factory, scenario, settings, clock, limiter, provider)
    assert (first.sent, again.claimed, again.sent) == (10, 0, 0)
    assert len(provider.calls) == 1
    assert assert_counters_match(db_session, scenario) == 10


def test_rows_locked_by_another_batch_are_skipped_not_waited_for(
    factory, db_session, settings, clock, limiter
):
    scenario = make_scenario(db_session, "sms", 10)
    held = scenario.delivery_ids[:4]
    with factory() as other:  # another worker's batch, mid-transaction
        other.execute(select(Delivery.id).where(Delivery.id.in_(held)).with_for_update())
        provider = BatchProvider("sms")
        report = run(factory, scenario, settings, clock, limiter, provider)
        other.rollback()
    assert (report.claimed, report.sent) == (6, 6)
    assert {m.delivery_id for m in provider.calls[0]} == set(scenario.delivery_ids[4:])
    assert statuses(db_session, scenario) == [("queued", 0)] * 4 + [("sent", 1)] * 6
    assert assert_counters_match(db_session, scenario) == 6


def test_push_fans_out_to_the_tokens_and_dead_tokens_are_dropped(
    factory, db_session, settings, clock, limiter
):
    scenario = make_scenario(db_session, "push", 2)
    first = scenario.contacts[0]
    db_session.execute(
        update(Contact).where(Contact.id == first.id).values(push_tokens=["dead", "alive"])
    )
    db_session.commit()

    def answer(message: OutboundMessage) -> SendResult:
        dead = [t for t in message.push_tokens if t == "dead"]
        return SendResult.sent(message.delivery_id, f"p-{message.delivery_id}", dead)

    provider = BatchProvider("push", answer=answer)
    report = run(factory, scenario, settings, clock, limiter, provider)
    assert report.sent == 2
    assert [list(m.push_tokens) for m in provider.calls[0]] == [["dead", "alive"], ["token-1"]]
    assert provider.calls[0][0].content["body"] == "New for gold"
    db_session.expire_all()
    assert db_session.get(Contact, first.id).push_tokens == ["alive"]
    assert assert_counters_match(db_session, scenario) == 2


def test_templates_that_need_jinja_get_the_whole_contact(
    factory, db_session, settings, clock, limiter
):
    scenario = make_scenario(db_session, "sms", 2)
    db_session.execute(
        update(CampaignChannel)
        .where(CampaignChannel.id == scenario.channel_id)
        .values(
            config={
                "body": "{{ contact.first_name|upper }} {{ contact.attributes|length }}"
                " {% if contact.consent.sms %}ok{% endif %} {{ unsubscribe_url[:12] }}"
            }
        )
    )
    db_session.commit()
    provider = BatchProvider("sms")
    run(factory, scenario, settings, clock, limiter, provider)
    assert [m.content["body"] for m in provider.calls[0]] == [
        "C0 1 ok http://heral",
        "C1 1 ok http://heral",
    ]
    assert assert_counters_match(db_session, scenario) == 2


# -- campaign state, suppression, failures -------------------------------------------------


def test_a_paused_campaign_locks_nothing(factory, db_session, settings, clock, limiter):
    scenario = make_scenario(db_session, "sms", 3)
    db_session.execute(
        update(Campaign).where(Campaign.id == scenario.campaign_id).values(status="paused")
    )
    db_session.commit()
    provider = BatchProvider("sms")
    report = run(factory, scenario, settings, clock, limiter, provider)
    assert (report.claimed, report.stopped) == (0, "not running")
    assert provider.calls == []
    assert statuses(db_session, scenario) == [("queued", 0)] * 3
    assert assert_counters_match(db_session, scenario) == 0


def test_a_cancel_waits_for_the_batch_then_leaves_its_rows_alone(
    factory, db_session, settings, clock, limiter
):
    """The rows are locked while the provider call runs: a cancel sweep cannot turn
    them 'cancelled' under the batch, and after the commit finds them sent."""
    scenario = make_scenario(db_session, "sms", 4)
    blocked: list[str] = []

    def cancel_meanwhile() -> None:
        with factory() as other:
            other.execute(
                update(Campaign)
                .where(Campaign.id == scenario.campaign_id)
                .values(status="cancelled")
            )
            other.execute(text("SET LOCAL lock_timeout = '200ms'"))
            try:
                cancel_remaining(other)
            except OperationalError as exc:
                blocked.append(type(exc.orig).__name__)
            other.rollback()

    report = run(
        factory, scenario, settings, clock, limiter, BatchProvider("sms", during=cancel_meanwhile)
    )
    assert report.sent == 4
    assert blocked == ["LockNotAvailable"]
    db_session.execute(
        update(Campaign).where(Campaign.id == scenario.campaign_id).values(status="cancelled")
    )
    assert cancel_remaining(db_session) == 0  # nothing queued is left to cancel
    db_session.commit()
    assert statuses(db_session, scenario) == [("sent", 1)] * 4
    assert assert_counters_match(db_session, scenario) == 4


def test_suppressed_since_planning_is_not_sent_and_not_attempted(
    factory, db_session, settings, clock, limiter
):
    scenario = make_scenario(db_session, "email", 3)
    db_session.add(
        Suppression(
            user_id=scenario.user_id, channel="email", address="C1@Example.com", reason="manual"
        )
    )
    db_session.commit()
    provider = BatchProvider("email")
    report = run(factory, scenario, settings, clock, limiter, provider)
    assert (report.claimed, report.sent, report.suppressed) == (3, 2, 1)
    assert [m.address for m in provider.calls[0]] == ["c0@example.com", "c2@example.com"]
    assert statuses(db_session, scenario) == [("sent", 1), ("suppressed", 0), ("sent", 1)]
    assert rows(db_session, scenario)[1].sent_at is None
    assert assert_counters_match(db_session, scenario) == 2


def test_a_template_error_or_an_erased_contact_fails_that_row_only(
    factory, db_session, settings, clock, limiter
):
    scenario = make_scenario(db_session, "sms", 3)
    db_session.execute(
        update(CampaignChannel)
        .where(CampaignChannel.id == scenario.channel_id)
        .values(config={"body": "{{ contact.first_name.upper() }}"})
    )
    db_session.execute(
        update(Contact).where(Contact.id == scenario.contacts[0].id).values(first_name=None)
    )
    db_session.execute(
        update(Delivery)
        .where(Delivery.id == scenario.delivery_ids[2])
        .values(contact_id=None, address=None)
    )
    db_session.commit()
    provider = BatchProvider("sms")
    report = run(factory, scenario, settings, clock, limiter, provider)
    assert (report.sent, report.failed) == (1, 2)
    assert [m.content["body"] for m in provider.calls[0]] == ["C1"]
    broken, sent, erased = rows(db_session, scenario)
    assert (broken.status, broken.attempts, broken.failed_at) == ("failed", 1, NOW)
    assert broken.last_error.startswith("template body: UndefinedError")
    assert sent.status == "sent"
    assert (erased.status, erased.last_error) == ("failed", "the contact was erased before sending")
    assert assert_counters_match(db_session, scenario) == 1


def test_transient_answers_retry_later_and_permanent_ones_fail(
    factory, db_session, settings, clock, limiter
):
    scenario = make_scenario(db_session, "sms", 3)
    first, second, _third = scenario.delivery_ids

    def answer(message: OutboundMessage) -> SendResult:
        if message.delivery_id == first:
            return SendResult.transient(first, "busy", retry_after=60)
        if message.delivery_id == second:
            return SendResult.permanent(second, "no such number")
        return SendResult.sent(message.delivery_id, "ok")

    provider = BatchProvider("sms", answer=answer)
    report = run(factory, scenario, settings, clock, limiter, provider)
    assert (report.sent, report.retrying, report.failed) == (1, 1, 1)
    retried, failed, sent = rows(db_session, scenario)
    assert (retried.status, retried.attempts, retried.last_error) == ("queued", 1, "busy")
    assert retried.next_attempt_at == NOW + timedelta(seconds=60)
    assert (failed.status, failed.last_error, failed.failed_at) == ("failed", "no such number", NOW)
    assert sent.status == "sent"

    # Not due yet: nothing; once due, the second attempt is sent.
    assert run(factory, scenario, settings, clock, limiter, provider).claimed == 0
    clock.set(NOW + timedelta(seconds=61))
    report = run(factory, scenario, settings, clock, limiter, BatchProvider("sms"))
    assert (report.claimed, report.sent) == (1, 1)
    retried = rows(db_session, scenario)[0]
    assert (retried.status, retried.attempts, retried.last_error) == ("sent", 2, None)
    assert retried.next_attempt_at is None
    assert assert_counters_match(db_session, scenario) == 2


def test_the_error_threshold_pauses_the_campaign(factory, db_session, settings, clock, limiter):
    scenario = make_scenario(
        db_session, "sms", 20, error_threshold={"rate": 0.2, "min_attempts": 10}
    )
    bad = set(scenario.delivery_ids[:5])

    def answer(message: OutboundMessage) -> SendResult:
        if message.delivery_id in bad:
            return SendResult.permanent(message.delivery_id, "rejected")
        return SendResult.sent(message.delivery_id, "ok")

    report = run(factory, scenario, settings, clock, limiter, BatchProvider("sms", answer=answer))
    assert (report.sent, report.failed) == (15, 5)
    campaign = db_session.get(Campaign, scenario.campaign_id, populate_existing=True)
    assert campaign.status == "paused"
    assert campaign.status_reason == "paused automatically: 25% of 20 attempts failed on sms"
    assert assert_counters_match(db_session, scenario) == 15


def test_a_provider_that_raises_leaves_every_row_queued(
    factory, db_session, settings, clock, limiter
):
    """Nothing is recorded, as if the worker had died with the call in flight: the rows
    stay queued, unattempted, for the next batch."""
    scenario = make_scenario(db_session, "sms", 5)

    def boom() -> None:
        raise ConnectionError("provider went away")

    with pytest.raises(ConnectionError):
        run(factory, scenario, settings, clock, limiter, BatchProvider("sms", during=boom))
    assert statuses(db_session, scenario) == [("queued", 0)] * 5
    assert assert_counters_match(db_session, scenario) == 0
    assert run(factory, scenario, settings, clock, limiter, BatchProvider("sms")).sent == 5
    assert assert_counters_match(db_session, scenario) == 5


def test_concurrent_overlapping_batches_send_each_row_once(
    factory, db_session, settings, clock, limiter
):
    scenario = make_scenario(db_session, "sms", 200)
    providers = [BatchProvider("sms") for _ in range(4)]
    reports = []

    def worker(provider: BatchProvider) -> None:
        reports.append(run(factory, scenario, settings, clock, limiter, provider))

    threads = [threading.Thread(target=worker, args=(p,)) for p in providers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    sent_ids = [m.delivery_id for p in providers for call in p.calls for m in call]
    assert sorted(sent_ids) == scenario.delivery_ids  # each exactly once
    assert sum(r.sent for r in reports) == 200
    assert assert_counters_match(db_session, scenario) == 200


# -- completion ----------------------------------------------------------------------------


def test_the_last_batch_completes_the_campaign_without_waiting_for_reconciliation(
    factory, db_session, settings, clock, limiter
):
    scenario = make_scenario(db_session, "sms", 10)
    ids = scenario.delivery_ids
    provider = BatchProvider("sms")

    def send(first: int, last: int):
        return send_batch(
            factory,
            channel_id=scenario.channel_id,
            first_id=first,
            last_id=last,
            settings=settings,
            clock=clock,
            rate_limiter=limiter,
            channel=provider,
        )

    def state() -> tuple[str, str, object]:
        db_session.expire_all()
        campaign = db_session.get(Campaign, scenario.campaign_id)
        return (
            campaign.status,
            db_session.get(CampaignChannel, scenario.channel_id).status,
            campaign.ended_at,
        )

    assert send(ids[5], ids[9]).sent == 5  # the tail first: earlier rows still queued
    assert state() == ("running", "planned", None)
    assert send(ids[0], ids[4]).sent == 5
    assert state() == ("completed", "done", NOW)
    assert assert_counters_match(db_session, scenario) == 10


def test_a_retry_left_queued_keeps_the_campaign_running(
    factory, db_session, settings, clock, limiter
):
    scenario = make_scenario(db_session, "sms", 3)
    busy = scenario.delivery_ids[0]

    def answer(message: OutboundMessage) -> SendResult:
        if message.delivery_id == busy:
            return SendResult.transient(busy, "busy")
        return SendResult.sent(message.delivery_id, "ok")

    run(factory, scenario, settings, clock, limiter, BatchProvider("sms", answer=answer))
    db_session.expire_all()
    assert db_session.get(Campaign, scenario.campaign_id).status == "running"
    assert assert_counters_match(db_session, scenario) == 2


# -- where the usual path is taken instead -------------------------------------------------


def test_a_rate_limited_batch_takes_the_usual_path(factory, db_session, settings, clock, limiter):
    """Tokens are never waited for with row locks held: a limited batch is claimed with
    a lease and committed first, as for any other provider."""
    scenario = make_scenario(db_session, "sms", 3, rate_per_second=1)
    seen: list[set[str]] = []

    def look() -> None:
        with factory() as other:
            seen.append(set(other.scalars(select(Delivery.status)).all()))

    report = run(factory, scenario, settings, clock, limiter, BatchProvider("sms", during=look))
    assert report.sent == 3
    assert seen == [{"sending"}]
    assert assert_counters_match(db_session, scenario) == 3


def test_the_embedded_sqlite_default_takes_the_usual_path(tmp_path, settings):
    from engine.db import make_engine, make_session_factory
    from engine.models import Base

    sqlite_settings = replace(settings, database_url="", var_dir=tmp_path)
    engine = make_engine(sqlite_settings)
    Base.metadata.create_all(engine)
    sqlite_factory = make_session_factory(engine)
    fixed = FixedClock(NOW)
    try:
        with sqlite_factory() as session:
            scenario = make_scenario(session, "sms", 4)
            report = send_batch(
                sqlite_factory,
                channel_id=scenario.channel_id,
                first_id=scenario.delivery_ids[0],
                last_id=scenario.delivery_ids[-1],
                settings=settings,
                clock=fixed,
                rate_limiter=RateLimiter(None, fixed),
                channel=channel_for("sms", settings),
            )
            assert report.sent == 4
            assert statuses(session, scenario) == [("sent", 1)] * 4
            assert assert_counters_match(session, scenario) == 4
    finally:
        engine.dispose()

"""The sending step against real PostgreSQL and Redis and the loopback providers.

Campaigns, channels and queued deliveries are written straight to the database (the
planning step is someone else's), then engine.dispatch.sending.send_batch runs as a
worker would, with a FixedClock and a fake sleep that moves it. Every test ends with
the invariant: each channel's sent_count equals its deliveries with sent_at.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import func, select, text, update

from engine.channels import Channel, channel_for
from engine.channels.smtp import SmtpChannel
from engine.clock import FixedClock
from engine.dispatch.background_recording import RecordingFailed
from engine.dispatch.helper_thread import helper_thread
from engine.dispatch.journal import AcceptanceJournal, journal_key
from engine.dispatch.reconciliation import reconcile
from engine.dispatch.sending import CHECKPOINT_EVERY, LEASE_SECONDS, send_batch
from engine.models import Campaign, CampaignChannel, Contact, Delivery, Suppression, User
from engine.ratelimit import RateLimiter
from engine.unsubscribe import unsubscribe_url
from tests.campaigns_fixtures import VALID_CONFIGS
from tests.conftest import TEST_REDIS_URL
from tests.providers.fixtures import (  # noqa: F401
    fcm_credentials_fixture,
    fcm_sink_fixture,
    smtp_server_fixture,
    twilio_sink_fixture,
)

NOW = datetime(2030, 3, 1, 9, 0, tzinfo=UTC)


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


@dataclass
class Scenario:
    campaign_id: uuid.UUID
    channel_id: uuid.UUID
    delivery_ids: list[int]
    contacts: list[Contact]
    user_id: uuid.UUID


def make_scenario(session, channel_type: str, count: int, **config) -> Scenario:
    """A running campaign with one planned channel and `count` queued deliveries."""
    user = User(email=f"{uuid.uuid4().hex[:10]}@example.com", password_hash="x")
    session.add(user)
    session.flush()
    campaign = Campaign(
        user_id=user.id,
        name="Spring",
        status="running",
        config={"max_attempts": 3, "error_threshold": {"rate": 0.2, "min_attempts": 100}} | config,
    )
    session.add(campaign)
    session.flush()
    channel = CampaignChannel(
        campaign_id=campaign.id,
        channel_type=channel_type,
        config=VALID_CONFIGS[channel_type],
        status="planned",
    )
    contacts = [
        Contact(
            user_id=user.id,
            email=f"c{i}@example.com",
            phone=f"+1555000{i:04d}",
            whatsapp=f"+1666000{i:04d}",
            push_tokens=[f"token-{i}"],
            first_name=f"C{i}",
            attributes={"tier": "gold"},
            consent_email=True,
            consent_sms=True,
            consent_push=True,
            consent_whatsapp=True,
        )
        for i in range(count)
    ]
    session.add(channel)
    session.add_all(contacts)
    session.flush()
    field = {"email": "email", "sms": "phone", "whatsapp": "whatsapp"}.get(channel_type)
    rows = [
        Delivery(
            campaign_channel_id=channel.id,
            contact_id=c.id,
            address=getattr(c, field) if field else str(c.id),
        )
        for c in contacts
    ]
    session.add_all(rows)
    session.commit()
    return Scenario(campaign.id, channel.id, sorted(r.id for r in rows), contacts, user.id)


def run(factory, scenario, settings, clock, limiter, channel, **kwargs):
    sleeps = kwargs.pop("sleeps", [])

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.set(clock.now() + timedelta(seconds=seconds))

    return send_batch(
        factory,
        channel_id=scenario.channel_id,
        first_id=scenario.delivery_ids[0],
        last_id=scenario.delivery_ids[-1],
        settings=settings,
        clock=clock,
        rate_limiter=limiter,
        channel=channel,
        sleep=fake_sleep,
        rng=lambda: 0.5,  # no jitter: backoff is exactly 10 s * 2**attempts
        **kwargs,
    )


def rows(session, scenario) -> list[Delivery]:
    session.expire_all()
    return session.scalars(
        select(Delivery).where(Delivery.campaign_channel_id == scenario.channel_id)
        .order_by(Delivery.id)
    ).all()  # fmt: skip


def statuses_of(factory, scenario) -> dict[str, int]:
    with factory() as other:
        found = other.scalars(
            select(Delivery.status).where(Delivery.campaign_channel_id == scenario.channel_id)
        ).all()
    return {s: found.count(s) for s in set(found)}


def assert_counters_match(session, scenario) -> int:
    session.expire_all()
    sent_count = session.scalar(
        select(CampaignChannel.sent_count).where(CampaignChannel.id == scenario.channel_id)
    )
    sent_rows = session.scalar(
        select(func.count()).where(
            Delivery.campaign_channel_id == scenario.channel_id, Delivery.sent_at.is_not(None)
        )
    )
    sent_status = session.scalar(
        select(func.count()).where(
            Delivery.campaign_channel_id == scenario.channel_id, Delivery.status == "sent"
        )
    )
    assert sent_count == sent_rows == sent_status
    return sent_count


class Hooked(Channel):
    """A real provider channel with a test hook run after each send (to pause the
    campaign or take rows back at an exact point of the batch)."""

    def __init__(self, inner: Channel, hook) -> None:
        self.inner, self.hook, self.calls = inner, hook, 0
        self.name, self.channel_type = inner.name, inner.channel_type

    def send(self, message):
        result = self.inner.send(message)
        self.calls += 1
        self.hook(self.calls)
        return result

    def close(self) -> None:
        self.inner.close()


def durable_acceptances(client, factory, scenario):
    """What outlives the worker: the journal's entries, and the rows recorded sent
    (whose entries the checkpoint then forgets). Redis is read first: an entry gone
    from it was recorded before it was forgotten."""

    def fields() -> set[str]:
        in_redis = {f.decode() for f in client.hkeys(journal_key(scenario.channel_id))}
        with factory() as other:
            sent = other.scalars(
                select(Delivery.id).where(
                    Delivery.campaign_channel_id == scenario.channel_id,
                    Delivery.status == "sent",
                )
            ).all()
        return in_redis | {f"{i}:1" for i in sent}

    return fields


class Traced(SmtpChannel):
    """The real SMTP channel, noting the order of its halves and which acceptances
    were durable (journaled or recorded) when each call's answer was about to be read."""

    def __init__(self, settings, journal_fields) -> None:
        super().__init__(settings)
        self.events: list[tuple[str, int]] = []
        self.journal_fields = journal_fields
        self.durable_when_answered: dict[int, set[str]] = {}

    def prepare(self, message):
        self.events.append(("prepare", message.delivery_id))
        return super().prepare(message)

    def begin(self, message, cleared=lambda: None):
        self.events.append(("begin", message.delivery_id))

        def traced_cleared():
            cleared()
            self.events.append(("cleared", message.delivery_id))

        answer = super().begin(message, traced_cleared)

        def traced_answer():
            self.events.append(("answer", message.delivery_id))
            self.durable_when_answered[message.delivery_id] = self.journal_fields()
            return answer()

        return traced_answer


class BeforeAnswer(SmtpChannel):
    """The real SMTP channel, running `hook(delivery_id)` when a call's answer is about
    to be read: the call is out, the next message prepared, any checkpoint made."""

    def __init__(self, settings, hook) -> None:
        super().__init__(settings)
        self.hook = hook

    def begin(self, message, cleared=lambda: None):
        answer = super().begin(message, cleared)

        def hooked_answer():
            self.hook(message.delivery_id)
            return answer()

        return hooked_answer


# -- the happy path ----------------------------------------------------------------------


def test_email_batch_sends_each_row_once_with_unsubscribe_headers(
    factory, db_session, settings, clock, limiter, smtp_server
):
    scenario = make_scenario(db_session, "email", 3)
    with channel_for("email", smtp_server.settings(settings)) as channel:
        report = run(factory, scenario, settings, clock, limiter, channel)
        again = run(factory, scenario, settings, clock, limiter, channel)

    assert (report.claimed, report.sent, report.stopped) == (3, 3, None)
    assert (again.claimed, again.sent) == (0, 0)  # the claim guard: nothing twice
    smtp_server.wait_for(3)
    assert len(smtp_server.messages) == 3
    by_to = {m.message["To"]: m.message for m in smtp_server.messages}
    for delivery, contact in zip(rows(db_session, scenario), scenario.contacts, strict=True):
        assert delivery.status == "sent"
        assert delivery.sent_at == NOW
        assert delivery.attempts == 1
        assert delivery.lease_expires_at is None
        assert delivery.provider_message_id == f"<herald.d{delivery.id}@example.com>"
        email = by_to[contact.email]
        assert email["Subject"] == f"Hello {contact.first_name}"
        assert email["Message-ID"] == delivery.provider_message_id
        assert email["List-Unsubscribe"] == f"<{unsubscribe_url(settings, delivery.id)}>"
        assert email["List-Unsubscribe"].startswith("<http://herald.test/u/")
        assert email["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert assert_counters_match(db_session, scenario) == 3


def test_the_next_email_is_built_while_the_relay_answers_and_journaled_calls_stay_serial(
    factory, db_session, settings, clock, limiter, smtp_server
):
    """Each call is begun, the next message is rendered and built, then the answer is
    read: the work leaves the gap between two calls. Yet each acceptance is handed to
    Redis when the next call is cleared to hand its message over, and confirmed while
    that call is out: by the time its answer is read every earlier acceptance is
    durable (journaled, or recorded), so one call at most is in flight."""
    scenario = make_scenario(db_session, "email", 3)
    client = redis.Redis.from_url(TEST_REDIS_URL)
    key = journal_key(scenario.channel_id)
    channel = Traced(smtp_server.settings(settings), durable_acceptances(client, factory, scenario))
    with channel:
        report = run(
            factory, scenario, settings, clock, limiter, channel, journal=AcceptanceJournal(client)
        )

    first, second, third = scenario.delivery_ids
    assert channel.events == [
        ("prepare", first), ("begin", first), ("cleared", first),
        ("prepare", second), ("answer", first),
        ("begin", second), ("cleared", second), ("prepare", third), ("answer", second),
        ("begin", third), ("cleared", third), ("answer", third),
    ]  # fmt: skip
    assert channel.durable_when_answered == {
        first: set(),
        second: {f"{first}:1"},
        third: {f"{first}:1", f"{second}:1"},
    }
    assert report.sent == 3
    received = {m.message["Message-ID"] for m in smtp_server.wait_for(3)}
    assert received == {f"<herald.d{i}@example.com>" for i in scenario.delivery_ids}
    assert client.exists(key) == 0  # recorded at the checkpoint, then forgotten
    assert assert_counters_match(db_session, scenario) == 3


def test_a_checkpoint_holds_up_no_call_its_acceptances_are_recorded_while_sending_goes_on(
    factory, db_session, settings, clock, limiter, smtp_server
):
    """The checkpoint costs the batch no time of its own: the campaign is re-checked
    while the 50th call waits for the relay, and the first 49 acceptances (in the
    journal already) are recorded on the recorder's thread while the next calls go
    out. The 50th keeps its lease and is recorded at the next checkpoint, once."""
    scenario = make_scenario(db_session, "email", CHECKPOINT_EVERY + 2)
    ids = scenario.delivery_ids
    seen: dict[int, dict[str, int]] = {}

    def watch(delivery_id: int) -> None:  # what PostgreSQL holds before the answer is read
        seen[delivery_id] = now = statuses_of(factory, scenario)
        if delivery_id == ids[CHECKPOINT_EVERY]:  # call 51 is out
            deadline = time.monotonic() + 10
            while now.get("sent") != CHECKPOINT_EVERY - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
                now = statuses_of(factory, scenario)
            seen[delivery_id] = now

    client = redis.Redis.from_url(TEST_REDIS_URL)
    with BeforeAnswer(smtp_server.settings(settings), watch) as channel:
        report = run(
            factory, scenario, settings, clock, limiter, channel, journal=AcceptanceJournal(client)
        )

    assert seen[ids[CHECKPOINT_EVERY - 2]] == {"sending": CHECKPOINT_EVERY + 2}
    # Recorded by the thread while the batch went on (nothing else records before the
    # next checkpoint, made during call 52).
    assert seen[ids[CHECKPOINT_EVERY]] == {
        "sent": CHECKPOINT_EVERY - 1,
        "sending": 3,  # call 50, call 51 (out) and call 52 (to send)
    }
    assert report.sent == CHECKPOINT_EVERY + 2
    assert len(smtp_server.wait_for(CHECKPOINT_EVERY + 2)) == CHECKPOINT_EVERY + 2
    assert client.exists(journal_key(scenario.channel_id)) == 0
    assert assert_counters_match(db_session, scenario) == CHECKPOINT_EVERY + 2


def test_a_checkpoint_recording_that_fails_is_recorded_by_the_batchs_settle(
    factory, db_session, settings, clock, limiter, smtp_server
):
    """The recorder's transaction dies (its backend terminated while it waits for a
    lock on the channel's counter): its 49 outcomes are not lost. The next checkpoint
    finds the failure, the batch stops, and its settle records them with the rest."""
    scenario = make_scenario(db_session, "email", CHECKPOINT_EVERY + 2)
    ids = scenario.delivery_ids
    blocker = factory()  # holds the channel's counter row from call 49 to call 51
    terminated: list[bool] = []

    def sabotage(delivery_id: int) -> None:
        if delivery_id == ids[CHECKPOINT_EVERY - 2]:  # before the checkpoint
            _lock_the_channel_counter(blocker, scenario)
        if delivery_id == ids[CHECKPOINT_EVERY]:  # call 51 is out
            terminated.append(_terminate_the_backend_waiting_for_a_lock(factory))
            blocker.rollback()

    client = redis.Redis.from_url(TEST_REDIS_URL)
    channel = BeforeAnswer(smtp_server.settings(settings), sabotage)
    with channel, pytest.raises(RecordingFailed):
        run(
            factory, scenario, settings, clock, limiter, channel,
            journal=AcceptanceJournal(client),
        )  # fmt: skip
    blocker.close()

    assert terminated == [True]
    assert len(smtp_server.wait_for(CHECKPOINT_EVERY + 2)) == CHECKPOINT_EVERY + 2
    assert {d.status for d in rows(db_session, scenario)} == {"sent"}
    assert client.exists(journal_key(scenario.channel_id)) == 0
    assert assert_counters_match(db_session, scenario) == CHECKPOINT_EVERY + 2


def test_the_last_checkpoints_recording_failing_is_recorded_once_the_batch_ends(
    factory, db_session, settings, clock, limiter, smtp_server
):
    """One chunk: its checkpoint's recording (calls 1-49) runs while the batch settles
    call 50. Its backend terminated, it fails; the batch records those 49 itself after
    its settle, and ends normally."""
    scenario = make_scenario(db_session, "email", CHECKPOINT_EVERY)
    ids = scenario.delivery_ids
    blocker = factory()
    terminated: list[bool] = []

    def sabotage(delivery_id: int) -> None:
        if delivery_id == ids[-2]:  # before the checkpoint
            _lock_the_channel_counter(blocker, scenario)
        if delivery_id == ids[-1]:  # the recording waits for the lock
            terminated.append(_terminate_the_backend_waiting_for_a_lock(factory))
            blocker.rollback()

    client = redis.Redis.from_url(TEST_REDIS_URL)
    with BeforeAnswer(smtp_server.settings(settings), sabotage) as channel:
        report = run(
            factory, scenario, settings, clock, limiter, channel, journal=AcceptanceJournal(client)
        )
    blocker.close()

    assert terminated == [True]
    assert (report.sent, report.stopped) == (CHECKPOINT_EVERY, None)
    assert {d.status for d in rows(db_session, scenario)} == {"sent"}
    assert client.exists(journal_key(scenario.channel_id)) == 0
    assert assert_counters_match(db_session, scenario) == CHECKPOINT_EVERY


def test_a_checkpoint_re_check_survives_its_connection_dying_between_checkpoints(
    factory, db_session, settings, clock, limiter, smtp_server
):
    """With nothing to write in line, a checkpoint re-checks the campaign on a
    connection the batch keeps. Killed between two checkpoints (as a PostgreSQL restart
    would), the next re-check falls back to a fresh pooled connection, and the batch
    goes on."""
    scenario = make_scenario(db_session, "email", 2 * CHECKPOINT_EVERY + 2)
    ids = scenario.delivery_ids
    killed: list[int] = []

    class Watched(SmtpChannel):
        def begin(self, message, cleared=lambda: None):
            answer = super().begin(message, cleared)
            if message.delivery_id == ids[CHECKPOINT_EVERY + 10]:  # between checkpoints
                with factory() as other:
                    killed.extend(
                        other.scalars(
                            text(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE datname = current_database() AND state = 'idle'"
                                " AND query LIKE 'SELECT campaigns.status%'"
                            )
                        ).all()
                    )
            return answer

    client = redis.Redis.from_url(TEST_REDIS_URL)
    with Watched(smtp_server.settings(settings)) as channel:
        report = run(
            factory, scenario, settings, clock, limiter, channel, journal=AcceptanceJournal(client)
        )

    assert killed == [True]  # the batch's re-check connection, and only it
    assert (report.sent, report.stopped) == (len(ids), None)
    assert len(smtp_server.wait_for(len(ids))) == len(ids)
    assert assert_counters_match(db_session, scenario) == len(ids)


def _lock_the_channel_counter(session, scenario) -> None:
    """Hold the channel's row (whose sent_count every recording bumps) until rollback."""
    session.execute(
        select(CampaignChannel.id)
        .where(CampaignChannel.id == scenario.channel_id)
        .with_for_update()
    )


def _terminate_the_backend_waiting_for_a_lock(factory, on: str = "campaign_channels") -> bool:
    """pg_terminate_backend on the one session of this database blocked on a lock, in
    a statement that names the table `on`."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with factory() as other:  # pg_stat_activity is a snapshot per transaction
            pids = other.scalars(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE :named"
                ),
                {"named": f"%{on}%"},
            ).all()
            if pids:
                (pid,) = pids
                return bool(other.scalar(text("SELECT pg_terminate_backend(:p)"), {"p": pid}))
        time.sleep(0.01)
    return False


def test_a_message_that_cannot_be_built_fails_without_a_call_between_two_that_are_sent(
    factory, db_session, settings, clock, limiter, smtp_server
):
    scenario = make_scenario(db_session, "email", 3)
    first, erased, third = scenario.delivery_ids
    db_session.delete(scenario.contacts[1])  # erased after planning (no key holds it)
    db_session.commit()
    channel = Traced(smtp_server.settings(settings), set)
    with channel:
        report = run(factory, scenario, settings, clock, limiter, channel)

    # The erased contact's message fails in rendering: no prepare, no call.
    assert channel.events == [
        ("prepare", first), ("begin", first), ("cleared", first), ("answer", first),
        ("prepare", third), ("begin", third), ("cleared", third), ("answer", third),
    ]  # fmt: skip
    assert (report.sent, report.failed) == (2, 1)
    statuses = {d.id: (d.status, d.last_error) for d in rows(db_session, scenario)}
    assert statuses[erased] == ("failed", "the contact was erased before sending")
    assert statuses[first][0] == statuses[third][0] == "sent"
    assert len(smtp_server.wait_for(2)) == 2
    assert assert_counters_match(db_session, scenario) == 2


def test_batch_provider_gets_one_call_and_counters_follow(
    factory, db_session, settings, clock, limiter
):
    scenario = make_scenario(db_session, "whatsapp", 120)
    report = run(factory, scenario, settings, clock, limiter, channel_for("whatsapp", settings))
    assert report.sent == 120
    statuses = {d.status for d in rows(db_session, scenario)}
    assert statuses == {"sent"}
    assert assert_counters_match(db_session, scenario) == 120


def test_rate_limit_spaces_the_sends(factory, db_session, settings, clock, limiter):
    scenario = make_scenario(db_session, "sms", 12, rate_per_second=5)
    sleeps: list[float] = []
    report = run(
        factory, scenario, settings, clock, limiter, channel_for("sms", settings), sleeps=sleeps
    )
    assert report.sent == 12
    # A new bucket starts empty (no opening burst): one token every 0.2 s from the start.
    assert sleeps == [pytest.approx(0.2)] * 12
    assert clock.now() - NOW == pytest.approx(timedelta(seconds=2.4), abs=timedelta(0.001))
    assert assert_counters_match(db_session, scenario) == 12


def test_a_rate_limited_email_waits_for_its_token_before_the_envelope(
    factory, db_session, settings, clock, limiter, smtp_server
):
    """With a rate set, a take may have to wait: it is made before the call begins, so
    the relay is never held mid-envelope; each acceptance is journaled by then."""
    scenario = make_scenario(db_session, "email", 3, rate_per_second=5)
    client = redis.Redis.from_url(TEST_REDIS_URL)
    channel = Traced(smtp_server.settings(settings), durable_acceptances(client, factory, scenario))
    journaled_at_begin: dict[int, set[str]] = {}
    sleeps: list[float] = []
    begin = channel.begin

    def begin_noting_the_journal(message, *cleared):
        journaled_at_begin[message.delivery_id] = channel.journal_fields()
        return begin(message, *cleared)

    channel.begin = begin_noting_the_journal
    with channel:
        report = run(
            factory, scenario, settings, clock, limiter, channel,
            journal=AcceptanceJournal(client), sleeps=sleeps,
        )  # fmt: skip

    first, second, third = scenario.delivery_ids
    assert report.sent == 3
    assert sleeps == [pytest.approx(0.2)] * 3  # every take waited, before its call
    # cleared is the channel's no-op default here: the take was confirmed before begin
    assert (
        channel.durable_when_answered
        == journaled_at_begin
        == {
            first: set(),
            second: {f"{first}:1"},
            third: {f"{first}:1", f"{second}:1"},
        }
    )
    assert assert_counters_match(db_session, scenario) == 3


def test_campaign_not_running_claims_nothing(factory, db_session, settings, clock, limiter):
    scenario = make_scenario(db_session, "sms", 3)
    db_session.execute(
        update(Campaign).where(Campaign.id == scenario.campaign_id).values(status="paused")
    )
    db_session.commit()
    report = run(factory, scenario, settings, clock, limiter, channel_for("sms", settings))
    assert (report.claimed, report.stopped) == (0, "not running")
    assert {d.status for d in rows(db_session, scenario)} == {"queued"}
    assert {d.attempts for d in rows(db_session, scenario)} == {0}
    assert assert_counters_match(db_session, scenario) == 0


# -- suppression -------------------------------------------------------------------------


def test_contact_suppressed_since_planning_is_not_sent(
    factory, db_session, settings, clock, limiter, smtp_server
):
    scenario = make_scenario(db_session, "email", 3)
    db_session.add(
        Suppression(
            user_id=scenario.user_id, channel="email", address="C1@Example.com", reason="manual"
        )
    )
    db_session.commit()
    with channel_for("email", smtp_server.settings(settings)) as channel:
        report = run(factory, scenario, settings, clock, limiter, channel)
    assert (report.claimed, report.sent, report.suppressed) == (3, 2, 1)
    delivered = rows(db_session, scenario)
    assert [d.status for d in delivered] == ["sent", "suppressed", "sent"]
    assert delivered[1].attempts == 0 and delivered[1].lease_expires_at is None
    assert sorted(m.message["To"] for m in smtp_server.messages) == [
        "c0@example.com",
        "c2@example.com",
    ]
    assert assert_counters_match(db_session, scenario) == 2


# -- claiming the rest of a batch ahead ----------------------------------------------------


@contextmanager
def helper_thread_held():
    """Keep the worker's helper thread busy until the yielded function is called: what
    a batch submits to it meanwhile (the rest's claim, a recording) waits its turn."""
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(30)

    held = helper_thread().submit(hold)
    assert holding.wait(5)
    try:
        yield release.set
    finally:
        release.set()
        held.result()


def test_the_rest_of_a_batch_is_claimed_while_its_first_chunk_goes_out(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    """Only the first chunk is claimed before the first call; the rest is claimed on
    the helper thread meanwhile and sent after the first checkpoint, each row once."""
    scenario = make_scenario(db_session, "sms", 3 * CHECKPOINT_EVERY - 30)
    seen: dict[int, dict[str, int]] = {}
    with helper_thread_held() as release:

        def look(calls: int) -> None:
            if calls in (1, CHECKPOINT_EVERY + 1):
                seen[calls] = statuses_of(factory, scenario)
            if calls == 5:
                release()

        channel = Hooked(channel_for("sms", twilio_sink.settings(settings)), look)
        report = run(
            factory, scenario, settings, clock, limiter, channel,
            journal=AcceptanceJournal(redis.Redis.from_url(TEST_REDIS_URL)),
        )  # fmt: skip

    total = len(scenario.delivery_ids)
    assert seen[1] == {"sending": CHECKPOINT_EVERY, "queued": total - CHECKPOINT_EVERY}
    assert "queued" not in seen[CHECKPOINT_EVERY + 1]
    assert (report.claimed, report.sent, report.stopped) == (total, total, None)
    recipients = [r.form["To"] for r in twilio_sink.accepted()]
    assert len(recipients) == len(set(recipients)) == total
    assert {d.attempts for d in rows(db_session, scenario)} == {1}
    assert assert_counters_match(db_session, scenario) == total


def test_the_rest_claimed_ahead_is_suppressed_and_sent_when_the_whole_first_chunk_is_not(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    """Every row of the first chunk suppressed since planning: no call to overlap the
    rest's claim with, which is then waited for; the rest is still sent."""
    scenario = make_scenario(db_session, "sms", CHECKPOINT_EVERY + 5)
    for contact in scenario.contacts[: CHECKPOINT_EVERY + 1]:  # one of the rest too
        db_session.add(
            Suppression(
                user_id=scenario.user_id, channel="sms", address=contact.phone, reason="manual"
            )
        )
    db_session.commit()
    report = run(
        factory, scenario, settings, clock, limiter,
        channel_for("sms", twilio_sink.settings(settings)),
        journal=AcceptanceJournal(redis.Redis.from_url(TEST_REDIS_URL)),
    )  # fmt: skip
    assert (report.claimed, report.suppressed, report.sent) == (CHECKPOINT_EVERY + 5, 51, 4)
    assert [d.status for d in rows(db_session, scenario)] == ["suppressed"] * 51 + ["sent"] * 4
    assert len(twilio_sink.accepted()) == 4
    assert assert_counters_match(db_session, scenario) == 4


def test_a_batch_that_breaks_before_its_rest_is_collected_hands_the_rest_back(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    """A provider bug ends the batch in its first chunk while the rest's claim is still
    under way: the batch waits for that claim and hands those rows back, unattempted,
    with the first chunk's unsent rows."""
    scenario = make_scenario(db_session, "sms", 2 * CHECKPOINT_EVERY)
    with helper_thread_held() as release:

        def breaks(calls: int) -> None:
            if calls == 10:
                release()
                raise RuntimeError("provider client bug")

        channel = Hooked(channel_for("sms", twilio_sink.settings(settings)), breaks)
        with pytest.raises(RuntimeError, match="provider client bug"):
            run(
                factory, scenario, settings, clock, limiter, channel,
                journal=AcceptanceJournal(redis.Redis.from_url(TEST_REDIS_URL)),
            )  # fmt: skip

    after = rows(db_session, scenario)
    assert [d.status for d in after] == ["sent"] * 9 + ["queued"] * (2 * CHECKPOINT_EVERY - 9)
    assert {(d.attempts, d.lease_expires_at) for d in after[9:]} == {(0, None)}
    assert assert_counters_match(db_session, scenario) == 9


class SoftTimeLimit(Exception):
    """Stands for Celery's SoftTimeLimitExceeded: raised by a signal handler."""


@contextmanager
def soft_time_limit_armed():
    """Yields arm(seconds): SIGALRM then raises SoftTimeLimit wherever the batch is,
    as Celery's soft time limit does."""

    def limit_reached(signum, frame):
        raise SoftTimeLimit()

    previous = signal.signal(signal.SIGALRM, limit_reached)
    try:
        yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_soft_time_limit_while_the_rest_is_claimed_still_hands_the_rest_back(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    """The soft time limit strikes while the first checkpoint waits for the rest's
    claim. It is not taken for a failed claim: it ends the batch, which collects the
    claim (committed meanwhile) and hands those rows back with nothing attempted."""
    scenario = make_scenario(db_session, "sms", 2 * CHECKPOINT_EVERY)
    with soft_time_limit_armed() as arm, helper_thread_held() as release:

        def strike_at_the_checkpoint(calls: int) -> None:
            if calls == CHECKPOINT_EVERY:  # the checkpoint is next, and will wait
                threading.Timer(0.5, release).start()
                arm(0.1)

        channel = Hooked(
            channel_for("sms", twilio_sink.settings(settings)), strike_at_the_checkpoint
        )
        with pytest.raises(SoftTimeLimit):
            run(
                factory, scenario, settings, clock, limiter, channel,
                journal=AcceptanceJournal(redis.Redis.from_url(TEST_REDIS_URL)),
            )  # fmt: skip

    after = rows(db_session, scenario)
    assert [d.status for d in after] == ["sent"] * CHECKPOINT_EVERY + ["queued"] * CHECKPOINT_EVERY
    assert {(d.attempts, d.lease_expires_at) for d in after[CHECKPOINT_EVERY:]} == {(0, None)}
    assert len(twilio_sink.accepted()) == CHECKPOINT_EVERY
    assert assert_counters_match(db_session, scenario) == CHECKPOINT_EVERY


def test_the_soft_time_limit_while_a_recording_is_awaited_ends_the_batch_as_itself(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    """The second checkpoint waits for the first one's recording (held behind the busy
    helper thread) when the soft time limit strikes: the batch ends with that
    exception, not as a failed recording; what was sent is recorded once, the rest
    handed back."""
    scenario = make_scenario(db_session, "sms", 3 * CHECKPOINT_EVERY)
    release = threading.Event()
    with soft_time_limit_armed() as arm:

        def strike(calls: int) -> None:
            if calls == CHECKPOINT_EVERY - 5:  # the first recording will queue behind it
                helper_thread().submit(release.wait, 30)
            if calls == 2 * CHECKPOINT_EVERY:  # the second checkpoint is next
                threading.Timer(0.5, release.set).start()
                arm(0.1)

        channel = Hooked(channel_for("sms", twilio_sink.settings(settings)), strike)
        try:
            with pytest.raises(SoftTimeLimit):
                run(
                    factory, scenario, settings, clock, limiter, channel,
                    journal=AcceptanceJournal(redis.Redis.from_url(TEST_REDIS_URL)),
                )  # fmt: skip
        finally:
            release.set()

    after = rows(db_session, scenario)
    sent = 2 * CHECKPOINT_EVERY
    assert [d.status for d in after] == ["sent"] * sent + ["queued"] * CHECKPOINT_EVERY
    assert {d.attempts for d in after[sent:]} == {0}
    assert len(twilio_sink.accepted()) == sent
    assert assert_counters_match(db_session, scenario) == sent


def test_a_rest_claim_that_fails_leaves_its_rows_queued_for_another_batch(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    """The rest's claim dies (its backend terminated while it waits to read the
    contacts): it committed nothing, so those rows are still queued, untouched. The
    batch sends its first chunk and ends; a second batch over the range sends the rest,
    each row once."""
    scenario = make_scenario(db_session, "sms", 2 * CHECKPOINT_EVERY)
    blocker = factory()
    terminated: list[bool] = []
    with helper_thread_held() as release:

        def sabotage(calls: int) -> None:
            if calls == 1:
                blocker.execute(text("LOCK TABLE contacts IN ACCESS EXCLUSIVE MODE"))
                release()
                terminated.append(_terminate_the_backend_waiting_for_a_lock(factory, "contacts"))
                blocker.rollback()

        channel = Hooked(channel_for("sms", twilio_sink.settings(settings)), sabotage)
        journal = AcceptanceJournal(redis.Redis.from_url(TEST_REDIS_URL))
        first = run(factory, scenario, settings, clock, limiter, channel, journal=journal)
    blocker.close()

    assert terminated == [True]
    assert (first.claimed, first.sent, first.stopped) == (CHECKPOINT_EVERY, CHECKPOINT_EVERY, None)
    after = rows(db_session, scenario)
    assert [d.status for d in after] == ["sent"] * CHECKPOINT_EVERY + ["queued"] * CHECKPOINT_EVERY
    assert {(d.attempts, d.lease_expires_at) for d in after[CHECKPOINT_EVERY:]} == {(0, None)}

    second = run(factory, scenario, settings, clock, limiter, channel, journal=journal)
    assert (second.claimed, second.sent) == (CHECKPOINT_EVERY, CHECKPOINT_EVERY)
    recipients = [r.form["To"] for r in twilio_sink.accepted()]
    assert len(recipients) == len(set(recipients)) == 2 * CHECKPOINT_EVERY
    assert assert_counters_match(db_session, scenario) == 2 * CHECKPOINT_EVERY


# -- failures ----------------------------------------------------------------------------


def test_transient_failures_back_off_then_fail_at_max_attempts(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    scenario = make_scenario(db_session, "sms", 3)
    always_down, throttled = scenario.contacts[0].phone, scenario.contacts[1].phone
    twilio_sink.fail(500, match=always_down, times=None)
    twilio_sink.fail(429, match=throttled, retry_after=7200)
    channel = channel_for("sms", twilio_sink.settings(settings))

    report = run(factory, scenario, settings, clock, limiter, channel)
    assert (report.sent, report.retrying, report.failed) == (1, 2, 0)
    first, second, third = rows(db_session, scenario)
    assert (first.status, first.attempts) == ("queued", 1)
    assert first.next_attempt_at == NOW + timedelta(seconds=20)  # 10 s * 2**1
    assert "500" in first.last_error
    assert (second.status, second.attempts) == ("queued", 1)
    assert second.next_attempt_at == NOW + timedelta(seconds=7200)  # Retry-After wins
    assert third.status == "sent"
    assert assert_counters_match(db_session, scenario) == 1

    # Not due yet: a redelivered batch claims nothing.
    assert run(factory, scenario, settings, clock, limiter, channel).claimed == 0

    clock.set(NOW + timedelta(seconds=30))  # only the first row is due
    report = run(factory, scenario, settings, clock, limiter, channel)
    assert (report.claimed, report.retrying) == (1, 1)
    first = rows(db_session, scenario)[0]
    assert first.attempts == 2
    assert first.next_attempt_at == clock.now() + timedelta(seconds=40)

    clock.set(NOW + timedelta(hours=3))  # both due; the third attempt is the last
    report = run(factory, scenario, settings, clock, limiter, channel)
    assert (report.claimed, report.sent, report.failed) == (2, 1, 1)
    first, second, _ = rows(db_session, scenario)
    assert (first.status, first.attempts, first.failed_at) == ("failed", 3, clock.now())
    assert "500" in first.last_error and first.next_attempt_at is None
    assert (second.status, second.attempts, second.last_error) == ("sent", 2, None)
    assert len(twilio_sink.accepted()) == 2
    assert assert_counters_match(db_session, scenario) == 2


def test_permanent_failure_fails_at_once(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    scenario = make_scenario(db_session, "sms", 2)
    twilio_sink.reject_number(scenario.contacts[0].phone)
    channel = channel_for("sms", twilio_sink.settings(settings))
    report = run(factory, scenario, settings, clock, limiter, channel)
    assert (report.sent, report.failed) == (1, 1)
    rejected, sent = rows(db_session, scenario)
    assert (rejected.status, rejected.attempts, rejected.failed_at) == ("failed", 1, NOW)
    assert "21211" in rejected.last_error
    assert sent.status == "sent"
    assert assert_counters_match(db_session, scenario) == 1
    # An invalid number is suppressed at once, as its status callback would have done.
    assert suppressions_of(db_session, scenario) == [("sms", rejected.address, "bounce")]


def suppressions_of(session, scenario) -> list[tuple[str, str, str]]:
    session.expire_all()
    return [
        (s.channel, s.address, s.reason)
        for s in session.scalars(
            select(Suppression)
            .where(Suppression.user_id == scenario.user_id)
            .order_by(Suppression.channel, Suppression.address)
        )
    ]


def test_smtp_refusals_suppress_only_when_they_condemn_the_mailbox(
    factory, db_session, settings, clock, limiter, smtp_server
):
    scenario = make_scenario(db_session, "email", 3)
    unknown, policy, _fine = scenario.contacts
    smtp_server.reply_to_recipient(unknown.email, "550 5.1.1 No such user here")
    smtp_server.reply_to_recipient(policy.email, "550 5.7.1 Message refused by policy")
    with channel_for("email", smtp_server.settings(settings)) as channel:
        report = run(factory, scenario, settings, clock, limiter, channel)
    assert (report.sent, report.failed) == (1, 2)
    assert suppressions_of(db_session, scenario) == [("email", unknown.email, "bounce")]
    assert assert_counters_match(db_session, scenario) == 1


def test_a_recipients_stop_at_send_time_suppresses_as_unsubscribe(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    scenario = make_scenario(db_session, "sms", 2)
    twilio_sink.reject_number(scenario.contacts[1].phone, code=21610)  # STOPped at Twilio
    twilio_sink.fail(400, code=21608, match=scenario.contacts[0].phone)  # account issue
    channel = channel_for("sms", twilio_sink.settings(settings))
    report = run(factory, scenario, settings, clock, limiter, channel)
    assert report.failed == 2
    assert suppressions_of(db_session, scenario) == [
        ("sms", scenario.contacts[1].phone, "unsubscribe")
    ]


def test_error_threshold_pauses_the_campaign_with_a_reason(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    scenario = make_scenario(
        db_session, "sms", 20, error_threshold={"rate": 0.2, "min_attempts": 10}
    )
    for contact in scenario.contacts[:5]:
        twilio_sink.reject_number(contact.phone)
    channel = channel_for("sms", twilio_sink.settings(settings))
    report = run(factory, scenario, settings, clock, limiter, channel)
    assert (report.sent, report.failed) == (15, 5)
    campaign = db_session.get(Campaign, scenario.campaign_id, populate_existing=True)
    assert campaign.status == "paused"
    # Judged at the checkpoint written while the 20th call was with Twilio: 19 answered.
    assert campaign.status_reason == "paused automatically: 26% of 19 attempts failed on sms"
    assert assert_counters_match(db_session, scenario) == 15


def test_failures_under_the_threshold_keep_running(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    scenario = make_scenario(
        db_session, "sms", 20, error_threshold={"rate": 0.2, "min_attempts": 10}
    )
    # The last four: judged with 3 of 19 attempts failed during the 20th call, then
    # 4 of 20 at the end; 20 % is not more than 20 %. (The first four would be 4 of 19,
    # over the threshold at that moment, and pause it.)
    for contact in scenario.contacts[-4:]:
        twilio_sink.reject_number(contact.phone)
    channel = channel_for("sms", twilio_sink.settings(settings))
    run(factory, scenario, settings, clock, limiter, channel)
    campaign = db_session.get(Campaign, scenario.campaign_id, populate_existing=True)
    assert (campaign.status, campaign.status_reason) == ("running", None)
    assert assert_counters_match(db_session, scenario) == 16


# -- pause, resume, leases ---------------------------------------------------------------


@pytest.mark.parametrize("journaled", [False, True], ids=["claimed-at-once", "claimed-ahead"])
def test_pause_mid_batch_hands_back_the_rest_and_resume_sends_each_once(
    factory, db_session, settings, clock, limiter, twilio_sink, journaled
):
    """With the journal the rest of the batch is claimed while the first chunk goes
    out (engine.dispatch.claiming): the pause is seen, and the rest handed back, at
    the same checkpoint as when the whole batch is claimed at once."""
    scenario = make_scenario(db_session, "sms", 120)
    journal = {"journal": AcceptanceJournal(redis.Redis.from_url(TEST_REDIS_URL))}
    extra = journal if journaled else {}

    def pause_after_30(calls: int) -> None:
        if calls == 30:
            with factory() as other:
                other.execute(
                    update(Campaign)
                    .where(Campaign.id == scenario.campaign_id)
                    .values(status="paused")
                )
                other.commit()

    channel = Hooked(channel_for("sms", twilio_sink.settings(settings)), pause_after_30)
    report = run(factory, scenario, settings, clock, limiter, channel, **extra)
    # The pause is noticed at the next checkpoint: the first chunk is sent and recorded.
    assert (report.sent, report.handed_back) == (CHECKPOINT_EVERY, 120 - CHECKPOINT_EVERY)
    assert report.stopped == "campaign paused"
    after_pause = rows(db_session, scenario)
    assert [d.status for d in after_pause] == ["sent"] * 50 + ["queued"] * 70
    assert {(d.attempts, d.lease_expires_at, d.dispatched_at) for d in after_pause[50:]} == {
        (0, None, None)
    }
    assert assert_counters_match(db_session, scenario) == 50

    db_session.execute(
        update(Campaign).where(Campaign.id == scenario.campaign_id).values(status="running")
    )
    db_session.commit()
    report = run(factory, scenario, settings, clock, limiter, channel, **extra)
    assert (report.claimed, report.sent) == (70, 70)
    recipients = [r.form["To"] for r in twilio_sink.accepted()]
    assert len(recipients) == len(set(recipients)) == 120
    assert assert_counters_match(db_session, scenario) == 120


def test_rows_taken_back_after_the_lease_are_not_recorded_twice(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    """Our lease ran out mid-batch and another worker claimed the rows: none of our
    outcomes may land on them, and we stop sending them."""
    scenario = make_scenario(db_session, "sms", 60)
    other_lease = NOW + timedelta(hours=1)

    def reclaimed_by_another_worker(calls: int) -> None:
        if calls == 1:
            # We stalled (a long GC pause, a frozen VM) past our lease, so the rows could
            # be taken back; the checkpoint renews once half the lease is gone and finds out.
            clock.set(NOW + timedelta(seconds=LEASE_SECONDS + 1))
            with factory() as other:
                other.execute(
                    update(Delivery)
                    .where(Delivery.campaign_channel_id == scenario.channel_id)
                    .values(lease_expires_at=other_lease, attempts=Delivery.attempts + 1)
                )
                other.commit()

    channel = Hooked(
        channel_for("sms", twilio_sink.settings(settings)), reclaimed_by_another_worker
    )
    report = run(factory, scenario, settings, clock, limiter, channel)
    assert report.sent == 0
    assert report.stopped == "lease lost"
    assert len(twilio_sink.accepted()) == CHECKPOINT_EVERY  # nothing after the checkpoint
    assert {(d.status, d.lease_expires_at, d.attempts) for d in rows(db_session, scenario)} == {
        ("sending", other_lease, 2)
    }
    assert assert_counters_match(db_session, scenario) == 0


def test_claim_sets_a_lease_and_counts_the_attempt(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    scenario = make_scenario(db_session, "sms", 1)
    seen = {}

    def look(calls: int) -> None:
        with factory() as other:
            seen["row"] = other.scalars(select(Delivery)).one()

    channel = Hooked(channel_for("sms", twilio_sink.settings(settings)), look)
    run(factory, scenario, settings, clock, limiter, channel)
    # While the provider was being called, the claim was already committed.
    assert seen["row"].status == "sending"
    assert seen["row"].attempts == 1
    assert seen["row"].lease_expires_at == NOW + timedelta(seconds=LEASE_SECONDS)
    assert assert_counters_match(db_session, scenario) == 1


# -- push --------------------------------------------------------------------------------


def test_unregistered_push_token_is_removed_from_the_contact(
    factory, db_session, settings, clock, limiter, fcm_sink, fcm_credentials
):
    scenario = make_scenario(db_session, "push", 2)
    contact = scenario.contacts[0]
    db_session.execute(
        update(Contact).where(Contact.id == contact.id).values(push_tokens=["dead", "alive"])
    )
    db_session.commit()
    fcm_sink.unregister("dead")
    channel = channel_for("push", fcm_sink.settings(settings, fcm_credentials))
    report = run(factory, scenario, settings, clock, limiter, channel)
    assert report.sent == 2
    db_session.expire_all()
    assert db_session.get(Contact, contact.id).push_tokens == ["alive"]
    assert db_session.get(Contact, scenario.contacts[1].id).push_tokens == ["token-1"]
    tokens = sorted(r.json["message"]["token"] for r in fcm_sink.accepted())
    assert tokens == ["alive", "token-1"]
    assert assert_counters_match(db_session, scenario) == 2
    # Each push carries its delivery's signed token, which the app posts back.
    from engine.tracking.tokens import DATA_TOKEN_KEY, delivery_of_push_token

    carried = {
        delivery_of_push_token(settings, r.json["message"]["data"][DATA_TOKEN_KEY])
        for r in fcm_sink.accepted()
    }
    assert carried == set(scenario.delivery_ids)


# -- the embedded default ----------------------------------------------------------------


def test_embedded_sqlite_sends_records_and_counts(tmp_path, settings, twilio_sink):
    from engine.db import make_engine, make_session_factory
    from engine.models import Base

    sqlite_settings = replace(settings, database_url="", var_dir=tmp_path)
    engine = make_engine(sqlite_settings)
    Base.metadata.create_all(engine)
    factory = make_session_factory(engine)
    clock = FixedClock(NOW)
    try:
        with factory() as session:
            scenario = make_scenario(session, "sms", 4)
            session.add(
                Suppression(
                    user_id=scenario.user_id,
                    channel="sms",
                    address=scenario.contacts[3].phone,
                    reason="manual",
                )
            )
            session.commit()
            twilio_sink.fail(503, match=scenario.contacts[0].phone)
            channel = channel_for("sms", twilio_sink.settings(settings))
            report = run(factory, scenario, settings, clock, RateLimiter(None, clock), channel)
            assert (report.sent, report.retrying, report.suppressed) == (2, 1, 1)
            statuses = [(d.status, d.attempts) for d in rows(session, scenario)]
            assert statuses == [("queued", 1), ("sent", 1), ("sent", 1), ("suppressed", 0)]
            assert rows(session, scenario)[0].next_attempt_at == NOW + timedelta(seconds=20)
            assert assert_counters_match(session, scenario) == 2

            clock.set(NOW + timedelta(minutes=1))
            report = run(factory, scenario, settings, clock, RateLimiter(None, clock), channel)
            assert (report.claimed, report.sent) == (1, 1)
            assert assert_counters_match(session, scenario) == 3
    finally:
        engine.dispose()


# -- the Celery task ---------------------------------------------------------------------


def test_send_batch_task_runs_on_a_real_worker(app, db_session, celery_worker):
    """herald.sms.send_batch, routed to the sms queue, sends through the configured
    provider (null here) and records the batch."""
    import time

    scenario = make_scenario(db_session, "sms", 5)
    celery = app.extensions["herald"].celery
    celery.send_task(
        "herald.sms.send_batch",
        kwargs={
            "channel_id": str(scenario.channel_id),
            "first_id": scenario.delivery_ids[0],
            "last_id": scenario.delivery_ids[-1],
        },
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # waiting on another thread's work, not pacing
        if {d.status for d in rows(db_session, scenario)} == {"sent"}:
            break
        time.sleep(0.05)
    assert [d.provider_message_id for d in rows(db_session, scenario)] == [
        f"null-{i}" for i in scenario.delivery_ids
    ]
    assert assert_counters_match(db_session, scenario) == 5


# -- the acceptance journal ----------------------------------------------------------------


def test_each_acceptance_is_journaled_before_the_next_call(
    factory, db_session, settings, clock, limiter, twilio_sink
):
    """Each acceptance is handed to Redis before the next call goes out (its reply is
    read while that call is out); once recorded in PostgreSQL, on the recorder's thread,
    its entry is forgotten. At every moment each earlier acceptance is in one or the
    other."""
    scenario = make_scenario(db_session, "sms", CHECKPOINT_EVERY + 10)
    client = redis.Redis.from_url(TEST_REDIS_URL)
    journal = AcceptanceJournal(client)
    key = journal_key(scenario.channel_id)
    ids = scenario.delivery_ids
    events: list[tuple[str, str | int]] = []
    seen: list[tuple[set[str], set[str]]] = []
    hand_over = limiter.hand_over

    def noted_hand_over(entry) -> None:  # observed, not replaced
        hand_over(entry)
        events.append(("handed over", entry.field))

    def snapshot(calls: int) -> None:  # right after call `calls` came back
        events.append(("answered", calls))
        limiter.confirm()  # what the dispatcher does once the call is out
        in_redis = {f.decode() for f in client.hkeys(key)}  # first: forgotten => recorded
        with factory() as other:
            in_postgresql = {
                f"{i}:1"
                for i in other.scalars(
                    select(Delivery.id).where(
                        Delivery.campaign_channel_id == scenario.channel_id,
                        Delivery.status == "sent",
                    )
                )
            }
        seen.append((in_redis, in_postgresql))

    limiter.hand_over = noted_hand_over
    channel = Hooked(channel_for("sms", twilio_sink.settings(settings)), snapshot)
    report = run(factory, scenario, settings, clock, limiter, channel, journal=journal)
    assert report.sent == len(ids)
    assert events == [("answered", 1)] + [
        event
        for call in range(2, len(ids) + 1)
        for event in (("handed over", f"{ids[call - 2]}:1"), ("answered", call))
    ]
    for call, (in_redis, in_postgresql) in enumerate(seen, start=1):
        earlier = {f"{i}:1" for i in ids[: call - 1]}
        assert earlier <= in_redis | in_postgresql, call
        assert in_redis <= earlier, call
    assert client.exists(key) == 0  # all recorded in PostgreSQL, nothing left behind
    assert assert_counters_match(db_session, scenario) == len(ids)


class DiesOnceBegun(Channel):
    """A real provider channel whose process dies the moment its `at`-th call is out:
    the request written, the previous acceptance handed to Redis, its reply unread."""

    def __init__(self, inner: Channel, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0
        self.name, self.channel_type = inner.name, inner.channel_type

    def send(self, message):
        return self.inner.send(message)

    def begin(self, message, cleared=lambda: None):
        answer = self.inner.begin(message, cleared)
        self.calls += 1
        if self.calls == self.at:
            os._exit(17)  # like SIGKILL: nothing after this line runs
        return answer


def _send_then_die(
    settings, scenario, sink_settings, die_at: int, clock_now, once_begun: bool = False
) -> None:
    """A worker process that dies abruptly (no finally, no checkpoint) right after its
    `die_at`-th provider call came back accepted (or, `once_begun`, as soon as that call
    is out)."""
    from sqlalchemy.orm import sessionmaker

    from engine.db import make_engine
    from engine.dispatch.journal import AcceptanceJournal

    engine = make_engine(settings)
    client = redis.Redis.from_url(TEST_REDIS_URL)

    def die(calls: int) -> None:
        if calls == die_at:
            os._exit(17)  # like SIGKILL: nothing after this line runs

    inner = channel_for("sms", sink_settings)
    channel = DiesOnceBegun(inner, die_at) if once_begun else Hooked(inner, die)
    send_batch(
        sessionmaker(engine),
        channel_id=scenario.channel_id,
        first_id=scenario.delivery_ids[0],
        last_id=scenario.delivery_ids[-1],
        settings=settings,
        clock=FixedClock(clock_now),
        rate_limiter=RateLimiter(client, FixedClock(clock_now)),
        channel=channel,
        journal=AcceptanceJournal(client),
    )
    os._exit(0)


@pytest.mark.parametrize("once_begun", [False, True], ids=["answered", "begun"])
def test_a_killed_worker_resends_only_the_call_in_flight(
    factory, db_session, settings, clock, limiter, twilio_sink, once_begun
):
    """Killed mid-checkpoint, a worker has sent 30 messages but recorded none of them in
    PostgreSQL. Reconciliation records the 29 the journal holds as sent and re-queues
    the rest; the re-run resends only the 30th, whose acceptance never came back to us
    in a form we kept, under the same idempotency key. Killed once the 30th call is out
    ("begun"), the 29th acceptance was handed to Redis but its reply never read: it is
    in the journal all the same."""
    import multiprocessing

    scenario = make_scenario(db_session, "sms", 40)
    channel_settings = twilio_sink.settings(settings)
    child = multiprocessing.get_context("fork").Process(
        target=_send_then_die,
        args=(settings, scenario, channel_settings, 30, NOW, once_begun),
    )
    child.start()
    child.join(60)
    assert child.exitcode == 17
    twilio_sink.wait_for(30)
    assert len(twilio_sink.accepted()) == 30
    assert {d.status for d in rows(db_session, scenario)} == {"sending"}
    assert assert_counters_match(db_session, scenario) == 0

    journal = AcceptanceJournal(redis.Redis.from_url(TEST_REDIS_URL))
    after_lease = NOW + timedelta(seconds=LEASE_SECONDS + 1)
    with factory() as session:
        found = reconcile(session, after_lease, journal=journal)
        session.commit()
    for channel_id, recovered in found.recovered:
        journal.forget(channel_id, recovered)
    assert [len(recovered) for _, recovered in found.recovered] == [29]
    assert found.leases_reclaimed == 11
    statuses = [d.status for d in rows(db_session, scenario)]
    assert statuses == ["sent"] * 29 + ["queued"] * 11
    accepted_ids = {r.form["To"]: r.response["sid"] for r in twilio_sink.accepted()}
    first = rows(db_session, scenario)[0]
    assert first.provider_message_id == accepted_ids[first.address]
    assert assert_counters_match(db_session, scenario) == 29

    clock.set(after_lease)
    report = run(factory, scenario, settings, clock, limiter, channel_for("sms", channel_settings))
    assert report.sent == 11
    sends = twilio_sink.accepted()
    assert len(sends) == 41  # 40 recipients, one resent: the call in flight
    by_recipient: dict[str, list] = {}
    for request in sends:
        by_recipient.setdefault(request.form["To"], []).append(request)
    (twice,) = [r for r in by_recipient.values() if len(r) == 2]
    assert twice[0].form["To"] == scenario.contacts[29].phone
    assert len({r.header("I-Twilio-Idempotency-Token") for r in twice}) == 1
    assert assert_counters_match(db_session, scenario) == 40

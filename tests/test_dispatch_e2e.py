"""End to end: a campaign scheduled a second ahead is promoted, planned, sent on all four
channels through the real protocols, and completed.

Real PostgreSQL and Redis, a real Celery worker (solo pool, consuming every queue), the
loopback provider servers. The test plays beat: a thread sends the two beat tasks
(herald.promote_due, herald.reconcile) through the broker on a short tick, exactly as
`celery beat` would with HERALD_BEAT_TICK lowered. Everything else happens in the worker.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from engine.models import Campaign, CampaignChannel, Delivery, User
from engine.settings import reset_settings
from tests.campaigns_fixtures import insert_campaign
from tests.dispatch_helpers import assert_counters_match, insert_contacts
from tests.providers.fixtures import (  # noqa: F401
    fcm_credentials_fixture,
    fcm_sink_fixture,
    smtp_server_fixture,
    twilio_sink_fixture,
    whatsapp_sink_fixture,
)
from workers.tasks import sending

RECIPIENTS = 40
BEAT_TICK = 0.2
CHANNELS = ("email", "sms", "push", "whatsapp")


@pytest.fixture
def provider_env(
    monkeypatch, base_settings, smtp_server, twilio_sink, fcm_sink, fcm_credentials, whatsapp_sink
):
    """Point the worker's settings (engine.settings.get_settings, read lazily from the
    environment) at the loopback servers for this test only."""
    for name, value in {
        **smtp_server.env(),
        **twilio_sink.env(),
        **fcm_sink.env(fcm_credentials),
        **whatsapp_sink.env(),
    }.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    sending._close_channels()  # providers cached by an earlier test point elsewhere
    yield
    sending._close_channels()
    reset_settings()  # monkeypatch restores the environment after this teardown


@pytest.fixture
def worker(provider_env, celery_worker):
    return celery_worker


class Beat:
    """Sends the beat tasks through the broker every `tick` seconds, in a thread."""

    def __init__(self, celery, tick: float) -> None:
        self._celery = celery
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._celery.send_task("herald.promote_due")
            self._celery.send_task("herald.reconcile")
            self._stop.wait(self._tick)

    def __enter__(self) -> Beat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _wait_for_status(db_session, campaign_id, status: str, timeout: float) -> Campaign:
    deadline = time.monotonic() + timeout
    while True:
        db_session.expire_all()
        campaign = db_session.get(Campaign, campaign_id)
        db_session.rollback()
        if campaign.status == status or time.monotonic() > deadline:
            return campaign
        time.sleep(0.05)  # waiting on the worker thread, not pacing the scenario


def test_a_scheduled_campaign_reaches_everyone_once_on_every_channel(
    app, db_session, worker, smtp_server, twilio_sink, fcm_sink, whatsapp_sink
):
    user = User(email="e2e@example.com", password_hash="not-a-real-hash", is_verified=True)
    db_session.add(user)
    db_session.commit()
    insert_contacts(db_session, user.id, RECIPIENTS)
    campaign = insert_campaign(db_session, user.id, status="scheduled", channels=CHANNELS)
    scheduled_at = datetime.now(UTC) + timedelta(seconds=1)
    db_session.execute(
        update(Campaign).where(Campaign.id == campaign.id).values(scheduled_at=scheduled_at)
    )
    db_session.commit()

    with Beat(app.extensions["herald"].celery, BEAT_TICK):
        done = _wait_for_status(db_session, campaign.id, "completed", timeout=60)

    assert done.status == "completed", f"campaign stuck in {done.status}"
    assert scheduled_at <= done.started_at <= done.ended_at

    # Every recipient got exactly one message per channel, as the servers saw it.
    emails = {f"c{n}@example.com" for n in range(1, RECIPIENTS + 1)}
    phones = {f"+1555{n:07}" for n in range(1, RECIPIENTS + 1)}
    tokens = {f"push-c{n}" for n in range(1, RECIPIENTS + 1)}
    received = {
        "email": Counter(rcpt for mail in smtp_server.messages for rcpt in mail.rcpt_tos),
        "sms": Counter(request.form["To"] for request in twilio_sink.accepted()),
        "push": Counter(request.json["message"]["token"] for request in fcm_sink.accepted()),
        "whatsapp": Counter(request.json["to"] for request in whatsapp_sink.accepted()),
    }
    expected = {"email": emails, "sms": phones, "push": tokens, "whatsapp": phones}
    for kind, addresses in expected.items():
        assert set(received[kind]) == addresses, kind
        assert set(received[kind].values()) == {1}, f"{kind} sent something twice"

    # The log and the counters agree with what the servers received.
    db_session.expire_all()
    channels = db_session.scalars(
        select(CampaignChannel).where(CampaignChannel.campaign_id == campaign.id)
    ).all()
    assert {c.channel_type: c.status for c in channels} == dict.fromkeys(CHANNELS, "done")
    for channel in channels:
        by_status = dict(
            db_session.execute(
                select(Delivery.status, func.count())
                .where(Delivery.campaign_channel_id == channel.id)
                .group_by(Delivery.status)
            ).all()
        )
        sent = db_session.scalar(
            select(func.count()).where(
                Delivery.campaign_channel_id == channel.id, Delivery.sent_at.is_not(None)
            )
        )
        assert by_status == {"sent": RECIPIENTS}, channel.channel_type
        assert channel.sent_count == sent == RECIPIENTS
    assert_counters_match(db_session)

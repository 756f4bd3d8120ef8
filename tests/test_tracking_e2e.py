"""End to end: a campaign with tracked links goes out through the loopback providers (a
real Celery worker, real SMTP and Twilio servers); the messages as the providers
received them carry tracked links and an open pixel; people (and a scanner) open and
click them; afterwards every counter equals the deliveries."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from engine.clock import FixedClock
from engine.models import Audience, Campaign, CampaignChannel, User
from engine.settings import get_settings
from tests.dispatch_helpers import assert_counters_match, insert_contacts
from tests.providers.fixtures import (  # noqa: F401
    smtp_server_fixture,
    twilio_sink_fixture,
    whatsapp_sink_fixture,
)
from tests.test_webhooks_e2e import worker  # noqa: F401
from tests.tracking_helpers import PUBLIC

RECIPIENTS = 6
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120 Safari/537.36"
EMAIL = {
    "subject": "Spring",
    "html": '<html><body><p>Hi {{ contact.first_name }}</p><a href="https://shop.example/sale">'
    'Sale</a> <a href="{{ unsubscribe_url }}">Unsubscribe</a></body></html>',
    "text": "Sale: https://shop.example/sale",
    "utm": {"source": "newsletter", "medium": "email"},
}
SMS = {"body": "Hi {{ contact.first_name }}: https://shop.example/s"}
LINK = re.compile(r"http://herald\.test(/t/[co]/[0-9]+\.[0-9.A-Za-z_-]+?)(?=[\"'\s]|$)")

pytestmark = pytest.mark.slow


@pytest.fixture
def track_client(worker):  # noqa: F811
    from api import create_app
    from api.extensions import db

    app = create_app(
        replace(get_settings(), public_base_url=PUBLIC),
        clock=FixedClock(datetime.now(UTC) + timedelta(hours=1)),
    )
    yield app.test_client()
    db.dispose(app)
    app.extensions["herald"].celery.close()


def run_campaign(app, db_session, user_id) -> Campaign:
    """A running campaign with the tracked email and SMS channels, sent by the worker
    while this plays beat's reconciliation, until it completes."""
    campaign = Campaign(user_id=user_id, name="Tracked", status="running", config={})
    db_session.add(campaign)
    db_session.flush()
    db_session.add_all(
        [
            CampaignChannel(campaign_id=campaign.id, channel_type="email", config=EMAIL),
            CampaignChannel(campaign_id=campaign.id, channel_type="sms", config=SMS),
            Audience(campaign_id=campaign.id, name="all", definition={"all": []}),
        ]
    )
    db_session.commit()
    celery = app.extensions["herald"].celery
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            celery.send_task("herald.reconcile")
            stop.wait(0.2)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    try:
        while True:
            db_session.expire_all()
            status = db_session.get(Campaign, campaign.id).status
            db_session.rollback()
            if status == "completed":
                return campaign
            assert time.monotonic() < deadline, f"campaign stuck in {status}"
            time.sleep(0.05)  # waiting on the worker thread
    finally:
        stop.set()
        thread.join(5)


def test_tracked_messages_go_out_and_opens_and_clicks_count_once(
    app,
    db_session,
    worker,  # noqa: F811
    track_client,
    smtp_server,
    twilio_sink,
):
    user = User(email="e2e@example.com", password_hash="x", is_verified=True)
    db_session.add(user)
    db_session.commit()
    insert_contacts(db_session, user.id, RECIPIENTS, channels=("email", "sms"))
    campaign = run_campaign(app, db_session, user.id)

    mails = [mail.message for mail in smtp_server.messages]
    texts = [r.form["Body"] for r in twilio_sink.accepted()]
    assert len(mails) == len(texts) == RECIPIENTS
    tracked: list[list[str]] = []
    for mail in mails:
        html = next(p for p in mail.walk() if p.get_content_type() == "text/html")
        text = next(p for p in mail.walk() if p.get_content_type() == "text/plain")
        body = html.get_content() + text.get_content()
        assert "shop.example" not in body and "/u/" in body  # tracked; unsubscribe left alone
        tracked.append(LINK.findall(body))
    for body in texts:
        assert "shop.example" not in body
        tracked.append(LINK.findall(body))

    client = track_client
    headers = {"User-Agent": BROWSER}
    email_paths, sms_paths = tracked[:RECIPIENTS], tracked[RECIPIENTS:]
    for index, paths in enumerate(email_paths):
        pixel = next(p for p in paths if p.startswith("/t/o/"))
        click = next(p for p in paths if p.startswith("/t/c/"))
        if index < 4:
            for _ in range(3):
                assert client.get(pixel, headers=headers).status_code == 200
        if index < 2:
            response = client.get(click, headers=headers)
            assert response.status_code == 302
            assert response.headers["Location"] == (
                "https://shop.example/sale?utm_source=newsletter&utm_medium=email"
            )
        if index == 5:  # a scanner
            assert client.get(click, headers={"User-Agent": "curl/8.5"}).status_code == 302
    for paths in sms_paths[:3]:
        assert client.get(paths[0], headers=headers).status_code == 302

    assert_counters_match(db_session)
    counts = {
        c.channel_type: (c.sent_count, c.delivered_count, c.opened_count, c.clicked_count)
        for c in db_session.scalars(
            select(CampaignChannel).where(CampaignChannel.campaign_id == campaign.id)
        )
    }
    assert counts == {
        "email": (RECIPIENTS, 5, 4, 2),  # the scanner proves delivery only
        "sms": (RECIPIENTS, 3, 3, 3),
    }


def test_a_channel_config_takes_utm_on_every_channel(client, alice):
    from tests.campaigns_fixtures import API, VALID_CONFIGS, create_campaign

    campaign = create_campaign(client, alice)
    for channel_type, config in VALID_CONFIGS.items():
        body = {"channel_type": channel_type, "config": {**config, "utm": {"source": " news "}}}
        response = client.post(
            f"{API}/{campaign['id']}/channels", json=body, headers=alice["headers"]
        )
        assert response.status_code == 201, response.get_json()
        assert response.get_json()["config"]["utm"] == {"source": "news"}
    other = create_campaign(client, alice)
    bad = {"channel_type": "sms", "config": {"body": "x", "utm": {"source": "", "term": "t"}}}
    response = client.post(f"{API}/{other['id']}/channels", json=bad, headers=alice["headers"])
    assert response.status_code == 422
    assert set(response.get_json()["error"]["fields"]) == {
        "config.utm.source",
        "config.utm.term",
    }

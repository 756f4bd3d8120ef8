"""End to end: a campaign goes out through the loopback providers (a real Celery worker,
real SMTP, Twilio and WhatsApp servers), the providers' reports come back through the
webhooks, signed as the providers sign them, and afterwards every counter equals the
deliveries table; the hard bounce and the STOP keep the next campaign away from those
addresses."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from email.utils import make_msgid

import pytest
from sqlalchemy import func, select

from engine.models import Campaign, CampaignChannel, Delivery, Suppression, User
from engine.settings import get_settings, reset_settings
from tests.campaigns_fixtures import insert_campaign
from tests.dispatch_helpers import assert_counters_match, insert_contacts
from tests.providers.fixtures import (  # noqa: F401
    smtp_server_fixture,
    twilio_sink_fixture,
    whatsapp_sink_fixture,
)
from tests.tracking_helpers import (
    EMAIL_SECRET,
    PUBLIC,
    WHATSAPP_SECRET,
    hub_signature,
    post_email,
    post_whatsapp,
    twilio_signature,
    whatsapp_payload,
    whatsapp_status,
)
from workers.tasks import sending

RECIPIENTS = 12
CHANNELS = ("email", "sms", "whatsapp")

pytestmark = pytest.mark.slow


@pytest.fixture
def worker(monkeypatch, base_settings, smtp_server, twilio_sink, whatsapp_sink, celery_worker):
    for name, value in {**smtp_server.env(), **twilio_sink.env(), **whatsapp_sink.env()}.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    sending._close_channels()  # providers cached by an earlier test point elsewhere
    yield celery_worker
    sending._close_channels()
    reset_settings()


@pytest.fixture
def webhook_client(worker, twilio_sink):
    """The API with the providers' webhook secrets; Twilio signs with its auth token."""
    from api import create_app
    from api.extensions import db

    settings = replace(
        get_settings(),
        public_base_url=PUBLIC,
        whatsapp_app_secret=WHATSAPP_SECRET,
        email_webhook_secret=EMAIL_SECRET,
    )
    assert settings.twilio_auth_token == twilio_sink.auth_token
    app = create_app(settings)
    yield app.test_client()
    db.dispose(app)
    app.extensions["herald"].celery.close()


def run_campaign(app, db_session, user_id) -> Campaign:
    campaign = insert_campaign(db_session, user_id, status="running", channels=CHANNELS)
    celery = app.extensions["herald"].celery
    stop = threading.Event()

    def beat() -> None:  # plays beat's reconciliation, which plans and completes
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


def deliveries(db_session, campaign_id, channel: str) -> list[Delivery]:
    db_session.expire_all()
    return list(
        db_session.scalars(
            select(Delivery)
            .join(CampaignChannel, CampaignChannel.id == Delivery.campaign_channel_id)
            .where(
                CampaignChannel.campaign_id == campaign_id, CampaignChannel.channel_type == channel
            )
            .order_by(Delivery.id)
        )
    )


def test_provider_reports_come_back_and_counters_equal_the_log(
    app, db_session, worker, webhook_client, smtp_server, twilio_sink, whatsapp_sink
):
    client = webhook_client
    user = User(email="track@example.com", password_hash="not-a-real-hash", is_verified=True)
    db_session.add(user)
    db_session.commit()
    insert_contacts(db_session, user.id, RECIPIENTS)

    campaign = run_campaign(app, db_session, user.id)

    # -- SMS: Twilio calls back for every message it was given, in whatever order.
    sms = deliveries(db_session, campaign.id, "sms")
    assert len(sms) == RECIPIENTS and all(d.provider_message_id for d in sms)
    callback = twilio_sink.accepted()[0].form["StatusCallback"]
    path = "/webhooks/twilio/status"
    assert callback == PUBLIC + path
    for index, row in enumerate(sms):
        statuses = ["sent", "delivered"] if index else ["undelivered"]  # the first: a dead number
        for status in reversed(statuses):  # delivered before sent: out of order
            form = {"MessageSid": row.provider_message_id, "MessageStatus": status}
            if status == "undelivered":
                form["ErrorCode"] = "21211"
            headers = {
                "X-Twilio-Signature": twilio_signature(callback, form, twilio_sink.auth_token)
            }
            assert client.post(path, data=form, headers=headers).status_code == 200

    # -- WhatsApp: statuses name our delivery in biz_opaque_callback_data.
    sent_keys = {r.json["to"]: r.json["biz_opaque_callback_data"] for r in whatsapp_sink.accepted()}
    wa = deliveries(db_session, campaign.id, "whatsapp")
    assert {row.address for row in wa} == set(sent_keys)
    statuses = []
    for index, row in enumerate(wa):
        key = int(sent_keys[row.address].removeprefix("d"))
        statuses.append(whatsapp_status(row.provider_message_id, "delivered", delivery_id=key))
        if index % 3 == 0:
            statuses.append(whatsapp_status(row.provider_message_id, "read", delivery_id=key))
    assert post_whatsapp(client, whatsapp_payload(statuses)).get_json()["recorded"] == len(statuses)

    # -- Email: the relay reports by the Message-ID each message carried.
    sent_to = {mail.rcpt_tos[0]: mail.message["Message-ID"] for mail in smtp_server.messages}
    assert len(sent_to) == RECIPIENTS
    bouncing, complaining, *others = sorted(sent_to)
    events = [{"type": "delivered", "message_id": sent_to[a]} for a in [complaining, *others]]
    events.append({"type": "complaint", "message_id": sent_to[complaining]})
    assert post_email(client, {"events": events}).status_code == 200
    bounced = sent_to[bouncing]
    dsn = (
        f"From: MAILER-DAEMON@mx.example\r\nMessage-ID: {make_msgid()}\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\n"
        f"Final-Recipient: rfc822; {bouncing}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: {bounced}\r\n\r\n--b--\r\n"
    )
    raw = dsn.encode()
    response = client.post(
        "/webhooks/email",
        data=raw,
        content_type="message/rfc822",
        headers={"X-Herald-Signature": hub_signature(raw, EMAIL_SECRET)},
    )
    assert response.get_json()["suppressed"] == 1

    # -- STOP from the second SMS recipient.
    stop = {"From": sms[1].address, "To": "+15005550006", "Body": "STOP"}
    inbound = "/webhooks/twilio/inbound"
    headers = {
        "X-Twilio-Signature": twilio_signature(PUBLIC + inbound, stop, twilio_sink.auth_token)
    }
    assert client.post(inbound, data=stop, headers=headers).status_code == 200

    # Every counter equals its deliveries, and says what the providers reported.
    assert_counters_match(db_session)
    counts = {
        c.channel_type: (c.sent_count, c.delivered_count, c.opened_count)
        for c in db_session.scalars(
            select(CampaignChannel).where(CampaignChannel.campaign_id == campaign.id)
        )
    }
    read = len(range(0, RECIPIENTS, 3))
    assert counts == {
        "email": (RECIPIENTS, RECIPIENTS - 1, 0),
        "sms": (RECIPIENTS, RECIPIENTS - 1, 0),
        "whatsapp": (RECIPIENTS, RECIPIENTS, read),
    }
    suppressed = dict(db_session.execute(select(Suppression.address, Suppression.reason)).all())
    assert suppressed == {
        bouncing: "bounce",
        complaining: "complaint",
        sms[0].address: "bounce",
        sms[1].address: "unsubscribe",
    }

    # The next campaign leaves them out.
    second = run_campaign(app, db_session, user.id)
    planned = dict(
        db_session.execute(
            select(CampaignChannel.channel_type, func.count(Delivery.id))
            .join(Delivery, Delivery.campaign_channel_id == CampaignChannel.id)
            .where(CampaignChannel.campaign_id == second.id)
            .group_by(CampaignChannel.channel_type)
        ).all()
    )
    assert planned == {"email": RECIPIENTS - 2, "sms": RECIPIENTS - 2, "whatsapp": RECIPIENTS}
    assert_counters_match(db_session)

"""Issue 5: an unsubscribe mid-campaign stops further messages to that contact.

A campaign on email and SMS is planned; the email batch goes out through the loopback
SMTP server; one recipient follows the unsubscribe link from the email it received
(its real List-Unsubscribe URL, over HTTP) and ticks both channels; then the SMS batch
runs, and that contact gets no SMS: its row is suppressed at send time, the others are
sent, and the counters equal the deliveries.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit

from sqlalchemy import select

from engine.channels import channel_for
from engine.clock import FixedClock
from engine.dispatch.planning import plan_channel
from engine.dispatch.sending import send_batch
from engine.models import CampaignChannel, Contact, Delivery
from engine.ratelimit import RateLimiter
from tests.campaigns_fixtures import insert_campaign
from tests.dispatch_helpers import assert_counters_match, insert_contacts
from tests.providers.fixtures import smtp_server_fixture, twilio_sink_fixture  # noqa: F401

NOW = datetime(2030, 5, 1, 9, 0, tzinfo=UTC)


def test_a_contact_who_unsubscribes_mid_campaign_gets_nothing_more(
    app, client, db_session, alice, settings, smtp_server, twilio_sink
):
    from api.extensions import db

    insert_contacts(db_session, alice["id"], 3, channels=("email", "sms"))
    campaign = insert_campaign(db_session, alice["id"], status="running", channels=("email", "sms"))
    channels = {
        c.channel_type: c
        for c in db_session.scalars(
            select(CampaignChannel).where(CampaignChannel.campaign_id == campaign.id)
        )
    }
    for channel in channels.values():
        plan_channel(db_session, channel.id, NOW)
    db_session.commit()
    clock = FixedClock(NOW)

    def send(channel_type: str, provider) -> None:
        ids = db_session.scalars(
            select(Delivery.id).where(Delivery.campaign_channel_id == channels[channel_type].id)
        ).all()
        send_batch(
            db.factory,
            channel_id=channels[channel_type].id,
            first_id=min(ids),
            last_id=max(ids),
            settings=settings,
            clock=clock,
            rate_limiter=RateLimiter(None, clock),
            channel=provider,
        )

    with channel_for("email", smtp_server.settings(settings)) as email:
        send("email", email)
    smtp_server.wait_for(3)
    mail = next(m.message for m in smtp_server.messages if m.message["To"] == "c1@example.com")
    url = mail["List-Unsubscribe"].strip("<>")
    response = client.post(
        urlsplit(url).path, data={"form": "choices", "channels": ["email", "sms"]}
    )
    assert response.status_code == 200 and "You are unsubscribed" in response.text

    with channel_for("sms", twilio_sink.settings(settings)) as sms:
        send("sms", sms)

    leaver = db_session.scalar(select(Contact).where(Contact.email == "c1@example.com"))
    assert sorted(r.form["To"] for r in twilio_sink.accepted()) == ["+15550000002", "+15550000003"]
    db_session.expire_all()
    by_contact = {
        d.contact_id: d.status
        for d in db_session.scalars(
            select(Delivery).where(Delivery.campaign_channel_id == channels["sms"].id)
        )
    }
    assert by_contact.pop(leaver.id) == "suppressed"
    assert set(by_contact.values()) == {"sent"}
    assert_counters_match(db_session)

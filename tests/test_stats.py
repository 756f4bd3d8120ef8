"""GET /campaigns/{id}/stats after a campaign's recipients (and machines) acted on it,
every event arriving as a real HTTP request: pixel fetches and clicks at /t, delivery
reports, bounces, a complaint and a STOP at /webhooks, an unsubscribe at /u. The
expected figures are worked out by hand from the script below.

Script (UTC; email sent at 10:05 to d1-d3 and at 11:10 to d4-d6, SMS at 10:05):

    10:10  twilio: s1, s2 delivered; s3 undelivered 30005 (hard)
    10:30  d1 opened by a person; d2 prefetched by Apple's privacy proxy (machine)
    10:35  email relay: d1 delivered (already known from the open); d3 hard bounce
    10:40  d1 clicks "sale"; 10:41 again
    10:50  s2 clicks its link (a person)
    11:10:03  d6's "sale" clicked by a scanner, 3 s after sending (machine)
    11:15  relay: d4 delivered; d6 soft bounce; d5 complaint
    11:20  d4 clicks "sale"; 11:50 d4 clicks "help"
    11:30  d5's "sale" fetched by curl (machine)
    12:00  d4 unsubscribes (one-click); s1 texts STOP
    (d2's address was unsubscribed the day before its message: not this campaign's)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from engine.models import CampaignChannel, Delivery, Suppression
from engine.tracking.links import click_token, ensure_links
from engine.tracking.opens import open_token
from engine.unsubscribe import unsubscribe_token
from tests.campaigns_fixtures import API, insert_campaign, insert_contact
from tests.dispatch_helpers import assert_counters_match
from tests.test_tracking_endpoints import (  # noqa: F401
    BROWSER,
    clock_fixture,
    get,
    track_app_fixture,
    track_fixture,
)
from tests.tracking_helpers import post_email, post_twilio, webhook_settings

T0 = datetime(2026, 3, 2, 10, 5, tzinfo=UTC)
EMAIL = {
    "subject": "Spring",
    "html": '<a href="https://shop.example/sale">Sale</a>'
    '<a href="https://shop.example/p/{{ contact.id }}">Yours</a>'
    '<a href="https://shop.example/help">Help</a>',
    "utm": {"source": "newsletter"},
}
SMS = {"body": "Sale https://shop.example/s"}


@dataclass
class Campaign:
    id: uuid.UUID
    email: list[int]
    sms: list[int]
    links: dict[str, int]  # url -> link id


def at(hours: int, minutes: int, seconds: int = 0) -> datetime:
    return datetime(2026, 3, 2, hours, minutes, seconds, tzinfo=UTC)


@pytest.fixture
def campaign(db_session, alice, settings) -> Campaign:
    row = insert_campaign(db_session, alice["id"], status="running", channels=("email", "sms"))
    channels = {
        c.channel_type: c
        for c in db_session.scalars(
            select(CampaignChannel).where(CampaignChannel.campaign_id == row.id)
        )
    }
    email, sms = channels["email"], channels["sms"]
    email.config, sms.config = EMAIL, SMS
    ids: dict[str, list[int]] = {"email": [], "sms": []}
    for n in range(1, 7):
        contact = insert_contact(
            db_session, alice["id"], email=f"c{n}@example.com", phone=f"+1415555010{n}"
        )
        sent_at = T0 if n <= 3 else T0 + timedelta(hours=1, minutes=5)
        ids["email"].append(_sent(db_session, email.id, contact.id, contact.email, sent_at))
        if n <= 3:
            ids["sms"].append(
                _sent(db_session, sms.id, contact.id, contact.phone, T0, f"SM{n:032d}")
            )
    email.sent_count, sms.sent_count = 6, 3
    hooked = webhook_settings(settings)
    links = ensure_links(db_session, hooked, email.id, "email", EMAIL)
    links += ensure_links(db_session, hooked, sms.id, "sms", SMS)
    # d2's address was unsubscribed before its message went out.
    db_session.add(
        Suppression(
            user_id=alice["id"],
            channel="email",
            address="c2@example.com",
            reason="unsubscribe",
            created_at=T0 - timedelta(days=1),
        )
    )
    db_session.commit()
    return Campaign(row.id, ids["email"], ids["sms"], {link.url: link.id for link in links})


def _sent(db_session, channel_id, contact_id, address, sent_at, sid=None) -> int:
    delivery = Delivery(
        campaign_channel_id=channel_id,
        contact_id=contact_id,
        address=address,
        status="sent",
        attempts=1,
        sent_at=sent_at,
        provider_message_id=sid,
    )
    db_session.add(delivery)
    db_session.flush()
    return delivery.id


def test_stats_count_humans_machines_links_bounces_unsubscribes_and_hours(
    track, db_session, alice, settings, clock, campaign
):
    hooked = webhook_settings(settings)
    d1, d2, d3, d4, d5, d6 = campaign.email
    s2 = campaign.sms[1]
    sale, help_link = (
        campaign.links["https://shop.example/sale"],
        campaign.links["https://shop.example/help"],
    )
    sms_link = campaign.links["https://shop.example/s"]

    def pixel(delivery_id, agent=BROWSER, ip="203.0.113.9"):
        assert (
            get(track, f"/t/o/{open_token(hooked, delivery_id)}", agent, ip=ip).status_code == 200
        )

    def click(delivery_id, link_id, agent=BROWSER):
        path = f"/t/c/{click_token(hooked, delivery_id, link_id)}"
        assert get(track, path, agent).status_code == 302

    def twilio(sid, status, code=None):
        form = {"MessageSid": sid, "MessageStatus": status}
        if code:
            form["ErrorCode"] = code
        assert post_twilio(track, "/webhooks/twilio/status", form).status_code == 200

    def relay(*events):
        assert post_email(track, {"events": list(events)}).status_code == 200

    def mid(delivery_id):
        return f"<herald.d{delivery_id}@example.com>"

    clock.set(at(10, 10))
    twilio(f"SM{1:032d}", "delivered")
    twilio(f"SM{2:032d}", "delivered")
    twilio(f"SM{3:032d}", "undelivered", "30005")
    clock.set(at(10, 30))
    pixel(d1)
    pixel(d2, "Mozilla/5.0", ip="17.58.1.1")
    clock.set(at(10, 35))
    relay(
        {"type": "delivered", "message_id": mid(d1)},
        {"type": "bounce", "bounce_type": "hard", "message_id": mid(d3)},
    )
    clock.set(at(10, 40))
    click(d1, sale)
    clock.set(at(10, 41))
    click(d1, sale)
    clock.set(at(10, 50))
    click(s2, sms_link)
    clock.set(at(11, 10, 3))
    click(d6, sale)
    clock.set(at(11, 15))
    relay(
        {"type": "delivered", "message_id": mid(d4)},
        {"type": "bounce", "bounce_type": "soft", "message_id": mid(d6)},
        {"type": "complaint", "message_id": mid(d5)},
    )
    clock.set(at(11, 20))
    click(d4, sale)
    clock.set(at(11, 30))
    click(d5, sale, "curl/8.5.0")
    clock.set(at(11, 50))
    click(d4, help_link)
    clock.set(at(12, 0))
    one_click = track.post(
        f"/u/{unsubscribe_token(hooked, d4)}", data={"List-Unsubscribe": "One-Click"}
    )
    assert one_click.status_code == 200
    stop = {"From": "+14155550101", "Body": "STOP", "MessageSid": "SM" + "9" * 32}
    assert post_twilio(track, "/webhooks/twilio/inbound", stop).status_code == 200

    response = track.get(f"{API}/{campaign.id}/stats", headers=alice["headers"])

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    email, sms = body["engagement"]
    assert [c["channel"] for c in body["channels"]] == ["email", "sms"]
    yours = campaign.links["https://shop.example/p/{{ contact.id }}"]
    assert email == {
        "channel_id": body["channels"][0]["channel_id"],
        "channel": "email",
        "rate_base": "sent",
        # delivered: d1, d4 (relay), d2 (proxy), d5, d6 (machine clicks prove arrival)
        "rates": {"delivery": 0.8333, "open": 0.3333, "click": 0.3333},
        "humans": {"opened": 2, "clicked": 2, "clicks": 4},
        "machines": {"opened": 1, "clicked": 2, "clicks": 2},
        "bounces": {"hard": 1, "soft": 1},
        "complaints": 1,
        "failed": 2,
        "unsubscribes": 1,
        "links": [
            {
                "link_id": sale,
                "url": "https://shop.example/sale",
                "dynamic": False,
                "unique_clicks": 2,
                "total_clicks": 3,
                "machine_clicks": 2,
            },
            {
                "link_id": yours,
                "url": "https://shop.example/p/{{ contact.id }}",
                "dynamic": True,
                "unique_clicks": 0,
                "total_clicks": 0,
                "machine_clicks": 0,
            },
            {
                "link_id": help_link,
                "url": "https://shop.example/help",
                "dynamic": False,
                "unique_clicks": 1,
                "total_clicks": 1,
                "machine_clicks": 0,
            },
        ],
        "timeline": [
            _hour(10, sent=3, delivered=2, opened=1, clicked=1),
            _hour(11, sent=3, delivered=3, opened=1, clicked=1),
        ],
    }
    assert sms == {
        "channel_id": body["channels"][1]["channel_id"],
        "channel": "sms",
        "rate_base": "delivered",
        "rates": {"delivery": 0.6667, "open": 0.5, "click": 0.5},
        "humans": {"opened": 1, "clicked": 1, "clicks": 1},
        "machines": {"opened": 0, "clicked": 0, "clicks": 0},
        "bounces": {"hard": 1, "soft": 0},
        "complaints": 0,
        "failed": 1,
        "unsubscribes": 1,
        "links": [
            {
                "link_id": sms_link,
                "url": "https://shop.example/s",
                "dynamic": False,
                "unique_clicks": 1,
                "total_clicks": 1,
                "machine_clicks": 0,
            }
        ],
        "timeline": [_hour(10, sent=3, delivered=2, opened=1, clicked=1)],
    }
    assert body["timeline"] == [
        _hour(10, sent=6, delivered=4, opened=2, clicked=2),
        _hour(11, sent=3, delivered=3, opened=1, clicked=1),
    ]
    # The rates agree with the per-status counts next to them.
    assert body["channels"][0]["from_deliveries"] == {
        "sent": 6,
        "delivered": 5,
        "opened": 2,
        "clicked": 2,
    }
    assert_counters_match(db_session)


def _hour(hour: int, **counts) -> dict:
    return {"hour": at(hour, 0).isoformat(), **counts}


def test_stats_of_a_campaign_nobody_acted_on(track, db_session, alice, campaign):
    db_session.execute(update(Delivery).values(sent_at=None, status="queued"))
    db_session.execute(update(CampaignChannel).values(sent_count=0))
    db_session.commit()
    body = track.get(f"{API}/{campaign.id}/stats", headers=alice["headers"]).get_json()
    email = body["engagement"][0]
    assert email["rates"] == {"delivery": None, "open": None, "click": None}
    assert email["humans"] == email["machines"] == {"opened": 0, "clicked": 0, "clicks": 0}
    assert email["unsubscribes"] == 0 and email["timeline"] == [] and body["timeline"] == []
    assert [link["total_clicks"] for link in email["links"]] == [0, 0, 0]


def test_stats_are_only_the_owners(track, campaign, bob):
    response = track.get(f"{API}/{campaign.id}/stats", headers=bob["headers"])
    assert response.status_code == 404


def test_tracking_and_stats_on_the_embedded_sqlite_database(tmp_path):
    """The embedded default (SQLite) records pixel hits and clicks and answers stats with
    the same figures: its JSON, hour truncation and recording paths differ."""
    from engine.db import make_engine, make_session_factory
    from engine.models import Base, Campaign, Contact, User
    from engine.services.deliveries import campaign_stats
    from engine.settings import Settings
    from engine.tracking import hits
    from engine.tracking.machine import Hit

    lite = Settings(var_dir=tmp_path, public_base_url="http://herald.test")
    engine = make_engine(lite)
    Base.metadata.create_all(engine)
    session = make_session_factory(engine)()
    user = User(email="lite@example.com", password_hash="x")
    session.add(user)
    session.flush()
    row = Campaign(user_id=user.id, name="Lite", status="running")
    session.add(row)
    session.flush()
    channel = CampaignChannel(campaign_id=row.id, channel_type="email", config=EMAIL)
    contact = Contact(user_id=user.id, email="a@example.com")
    session.add_all([channel, contact])
    session.flush()
    delivery_id = _sent(session, channel.id, contact.id, "a@example.com", T0)
    channel.sent_count = 1
    links = {link.url: link.id for link in ensure_links(session, lite, channel.id, "email", EMAIL)}
    session.commit()
    sale, help_link = links["https://shop.example/sale"], links["https://shop.example/help"]

    def open_(agent, when):
        hits.record_open(
            session, lite, open_token(lite, delivery_id), Hit("GET", agent, None), when
        )

    def click(link_id, agent, when):
        token = click_token(lite, delivery_id, link_id)
        assert hits.record_click(session, lite, token, Hit("GET", agent, None), when)

    open_("Mozilla/5.0", at(10, 20))  # Apple's proxy
    open_(BROWSER, at(10, 30))
    open_(BROWSER, at(10, 31))
    click(sale, BROWSER, at(11, 0))
    click(help_link, BROWSER, at(11, 0, 0))  # within the second: a burst
    click(sale, "curl/8.5.0", at(11, 40))
    session.commit()

    stats = campaign_stats(session, user.id, row.id)
    (engagement,) = stats.engagement
    assert engagement.humans == {"opened": 1, "clicked": 1, "clicks": 1}
    assert engagement.machines == {"opened": 1, "clicked": 1, "clicks": 2}
    assert [
        (link.url, link.unique_clicks, link.total_clicks, link.machine_clicks)
        for link in engagement.links
    ] == [
        ("https://shop.example/sale", 1, 1, 1),
        ("https://shop.example/p/{{ contact.id }}", 0, 0, 0),
        ("https://shop.example/help", 0, 0, 1),
    ]
    assert [(h.hour, h.sent, h.delivered, h.opened, h.clicked) for h in stats.timeline] == [
        (at(10, 0), 1, 1, 1, 0),
        (at(11, 0), 0, 0, 0, 1),
    ]
    session.close()
    engine.dispose()

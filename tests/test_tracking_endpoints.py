"""/t/o and /t/c over real HTTP requests (the app's test client) on PostgreSQL: messages
rendered and filled exactly as the sender will, then their pixel fetched and their
links clicked by people and by machines.

`tracked_message` and the `track_app` / `track` / `clock` fixtures are shared with the
other tracking tests (import them by name)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest
from sqlalchemy import select, update

from engine.campaigns.rendering import CompiledChannel
from engine.clock import FixedClock
from engine.models import Campaign, CampaignChannel, Contact, Delivery
from engine.tracking.links import Tracking, click_token, ensure_links
from engine.tracking.opens import PIXEL_GIF, open_token
from tests.dispatch_helpers import assert_counters_match
from tests.tracking_helpers import (
    PUBLIC,
    Sent,
    channel_counts,
    delivery,
    events_of,
    sent_delivery,
    webhook_settings,
)

BROWSER = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.0 Safari/605.1.15"
)
GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
CLICK = re.compile(re.escape(PUBLIC) + r"(/t/c/[0-9]+\.[0-9]+(?:\.[\w-]+)?\.[\w-]{22})")
OPEN = re.compile(re.escape(PUBLIC) + r"(/t/o/[0-9]+\.[\w-]{22})")

EMAIL = {
    "subject": "Spring",
    "html": (
        "<html><body><p>Hi {{ contact.first_name }}</p>"
        '<a href="https://shop.example/sale?src=mail#top">Sale</a>'
        '<a href="https://shop.example/p/{{ contact.first_name }}">Yours</a>'
        '<a href="https://shop.example/help">Help</a>'
        "</body></html>"
    ),
    "text": "Sale: https://shop.example/sale?src=mail#top",
    "utm": {"source": "newsletter", "medium": "email", "campaign": "spring"},
}
SALE = "https://shop.example/sale?src=mail&utm_source=newsletter&utm_medium=email&utm_campaign=spring#top"


@pytest.fixture(name="clock")
def clock_fixture() -> FixedClock:
    """The app's clock: an hour from now, so clicks are not 'too soon' unless a test
    says so (sent_delivery stamps sent_at with the real time)."""
    return FixedClock(datetime.now(UTC) + timedelta(hours=1))


@pytest.fixture(name="track_app")
def track_app_fixture(settings, clock):
    from api import create_app
    from api.extensions import db

    app = create_app(webhook_settings(settings), clock=clock)
    yield app
    db.dispose(app)
    app.extensions["herald"].celery.close()


@pytest.fixture(name="track")
def track_fixture(track_app):
    return track_app.test_client()


@dataclass(frozen=True)
class Message:
    sent: Sent
    content: dict
    clicks: list[str]  # the tracked links' paths, in order
    pixel: str | None


def tracked_message(
    db_session,
    settings,
    user_id,
    channel: str = "email",
    config: dict | None = None,
    *,
    first_name: str = "Ann",
    status: str = "sent",
) -> Message:
    """One delivery of a running campaign, recorded as sent, whose message is built the
    way the sender will build it: campaign_links written, the marked config compiled,
    the contact rendered, the tracking filled in."""
    sent = sent_delivery(db_session, user_id, channel, status=status)
    config = dict(config or EMAIL)
    db_session.execute(
        update(CampaignChannel).where(CampaignChannel.id == sent.channel_id).values(config=config)
    )
    db_session.execute(
        update(Contact).where(Contact.id == sent.contact_id).values(first_name=first_name)
    )
    hooked = webhook_settings(settings)
    links = ensure_links(db_session, hooked, sent.channel_id, channel, config)
    db_session.commit()
    campaign = db_session.get(Campaign, sent.campaign_id)
    tracking = Tracking(hooked, channel, config, links)
    compiled = CompiledChannel.compile(channel, tracking.config, campaign)
    contact = db_session.get(Contact, sent.contact_id)
    content = tracking.fill(
        compiled.render(contact, unsubscribe_url=f"{PUBLIC}/u/x"), sent.delivery_id
    )
    text = " ".join(str(value) for value in content.values())
    pixels = OPEN.findall(text)
    return Message(sent, content, CLICK.findall(text), pixels[0] if pixels else None)


def get(client, path: str, agent: str | None = BROWSER, *, method="GET", ip="203.0.113.9", **kw):
    """A request as a mail client or browser sends it; agent None sends no User-Agent
    (the test client would otherwise add its own)."""
    environ = {"REMOTE_ADDR": ip, "HTTP_USER_AGENT": agent or ""}
    return client.open(path, method=method, environ_base=environ, **kw)


def kinds(db_session, delivery_id: int) -> list[tuple[str, bool]]:
    return [(e.kind, e.machine) for e in events_of(db_session, delivery_id)]


# -- the pixel ----------------------------------------------------------------------------


def test_a_first_open_counts_once_and_the_pixel_is_never_cached(track, db_session, alice, settings):
    message = tracked_message(db_session, settings, alice["id"])

    for _ in range(3):
        response = get(track, message.pixel)
        assert response.status_code == 200
        assert response.mimetype == "image/gif" and response.data == PIXEL_GIF
        assert "no-store" in response.headers["Cache-Control"]

    counts = channel_counts(db_session, message.sent.channel_id)
    assert (counts["delivered"], counts["opened"], counts["clicked"]) == (1, 1, 0)
    row = delivery(db_session, message.sent.delivery_id)
    assert row.opened_at is not None and row.delivered_at == row.opened_at
    assert kinds(db_session, message.sent.delivery_id) == [("opened", False)]  # reloads: not kept
    assert_counters_match(db_session)


@pytest.mark.parametrize(
    "token",
    ["nonsense", "1.AAAAAAAAAAAAAAAAAAAAAA", "%20", "0.x", "9" * 30 + ".AAAAAAAAAAAAAAAAAAAAAA"],
)
def test_a_forged_pixel_still_answers_the_image_and_records_nothing(
    track, db_session, alice, settings, token
):
    message = tracked_message(db_session, settings, alice["id"])
    response = get(track, f"/t/o/{token}")
    assert response.status_code == 200 and response.data == PIXEL_GIF
    # A tampered genuine token too: one character of the tag changed.
    genuine = message.pixel
    tampered = genuine[:-1] + ("A" if genuine[-1] != "A" else "B")
    assert get(track, tampered).data == PIXEL_GIF
    assert events_of(db_session) == []
    assert channel_counts(db_session, message.sent.channel_id)["opened"] == 0


def test_a_pixel_for_a_deleted_campaign_still_answers_the_image(track, db_session, alice, settings):
    message = tracked_message(db_session, settings, alice["id"])
    db_session.delete(db_session.get(Campaign, message.sent.campaign_id))
    db_session.commit()
    response = get(track, message.pixel)
    assert response.status_code == 200 and response.data == PIXEL_GIF
    assert events_of(db_session) == []


# -- links --------------------------------------------------------------------------------


def test_a_click_redirects_to_the_campaign_link_with_utm_and_counts_once(
    track, db_session, alice, settings, clock
):
    message = tracked_message(db_session, settings, alice["id"])
    sale, yours, _help, sale_in_text = message.clicks
    assert sale == sale_in_text  # one token per link and message

    response = get(track, sale)
    assert response.status_code == 302
    assert response.headers["Location"] == SALE
    assert "no-store" in response.headers["Cache-Control"]
    assert get(track, sale).headers["Location"] == SALE
    clock.set(clock.now() + timedelta(seconds=5))  # not a burst of links: a reader
    assert get(track, yours).headers["Location"] == (
        "https://shop.example/p/Ann?utm_source=newsletter&utm_medium=email&utm_campaign=spring"
    )

    counts = channel_counts(db_session, message.sent.channel_id)
    # A click implies an open and a delivery; each counted once.
    assert (counts["delivered"], counts["opened"], counts["clicked"]) == (1, 1, 1)
    events = events_of(db_session, message.sent.delivery_id)
    assert [(e.kind, e.machine) for e in events] == [("clicked", False)] * 3  # every click kept
    assert [e.detail["link"] for e in events][:2] == [int(sale.split(".")[1])] * 2
    assert_counters_match(db_session)


def test_a_click_before_any_open_marks_it_opened_and_a_later_pixel_changes_nothing(
    track, db_session, alice, settings
):
    message = tracked_message(db_session, settings, alice["id"])
    get(track, message.clicks[0])
    row = delivery(db_session, message.sent.delivery_id)
    assert row.opened_at == row.clicked_at == row.delivered_at
    get(track, message.pixel)
    counts = channel_counts(db_session, message.sent.channel_id)
    assert (counts["opened"], counts["clicked"]) == (1, 1)
    assert_counters_match(db_session)


def test_a_non_ascii_destination_is_sent_as_a_valid_uri(track, db_session, alice, settings):
    config = {"body": "Voir https://boutique.example/été?q=ü"}
    message = tracked_message(db_session, settings, alice["id"], "sms", config)
    response = get(track, message.clicks[0])
    assert response.headers["Location"] == "https://boutique.example/%C3%A9t%C3%A9?q=%C3%BC"


def test_sms_whatsapp_and_push_links_redirect(track, db_session, alice, settings):
    cases = {
        "sms": ({"body": "Sale https://shop.example/s. STOP to opt out"}, "/s"),
        "whatsapp": ({"body": "Hi {{ contact.first_name }}: https://shop.example/w"}, "/w"),
        "push": ({"title": "t", "body": "b", "url": "https://shop.example/app"}, "/app"),
    }
    for channel, (config, path) in cases.items():
        message = tracked_message(db_session, settings, alice["id"], channel, config)
        (tracked,) = message.clicks
        response = get(track, tracked)
        assert response.status_code == 302, channel
        assert response.headers["Location"] == f"https://shop.example{path}"
        assert channel_counts(db_session, message.sent.channel_id)["clicked"] == 1
    assert_counters_match(db_session)


# -- bad tokens and open-redirect attempts ---------------------------------------------


def test_a_bad_click_token_is_a_json_404_or_a_page_for_browsers(track, db_session, alice, settings):
    message = tracked_message(db_session, settings, alice["id"])
    good = message.clicks[0]
    bad = good[:-1] + ("A" if good[-1] != "A" else "B")

    response = get(track, bad)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"
    page = get(track, bad, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 404 and page.mimetype == "text/html"
    assert "Link not found" in page.get_data(as_text=True)
    assert events_of(db_session) == []


def test_no_open_redirect(track, db_session, alice, settings):
    message = tracked_message(db_session, settings, alice["id"])
    sale, yours, *_ = message.clicks
    hooked = webhook_settings(settings)
    delivery_id = message.sent.delivery_id
    other = tracked_message(db_session, settings, alice["id"], "sms", {"body": "https://other.ex"})
    other_link = int(other.clicks[0].split(".")[1])
    evil = "https://evil.example/phish"
    d, link, _encoded, tag = yours.removeprefix("/t/c/").split(".")
    forged_destination = click_token(hooked, delivery_id, int(link), evil).split(".")[2]

    attempts = [
        # The request cannot name a destination: query strings and extra path are ignored
        # or refused.
        (f"{sale}?url={quote(evil)}", SALE),
        (f"{sale}?next={quote(evil)}&redirect={quote(evil)}", SALE),
        (f"/t/c/{quote(evil, safe='')}", None),
        (f"{sale}/{quote(evil, safe='')}", None),
        (f"/t/c//{evil.removeprefix('https://')}", None),
        (f"{sale}%0d%0aLocation:%20{quote(evil)}", None),
        # A signed dynamic token with its destination swapped: the tag no longer matches.
        (f"/t/c/{d}.{link}.{forged_destination}.{tag}", None),
        # A static token made dynamic, and a dynamic link's id in a static token.
        (f"{sale.rsplit('.', 1)[0]}.{forged_destination}.{sale.rsplit('.', 1)[1]}", None),
        (f"/t/c/{click_token(hooked, delivery_id, int(link))}", None),
        # Genuinely signed (with the server's key), but naming another campaign's link:
        # the link must belong to the delivery's own channel.
        (f"/t/c/{click_token(hooked, delivery_id, other_link)}", None),
    ]
    for path, location in attempts:
        response = get(track, path)
        if location is None:
            assert response.status_code == 404, path
            assert "Location" not in response.headers
        else:
            assert response.status_code == 302 and response.headers["Location"] == location, path
    assert all(e.detail["link"] != other_link for e in events_of(db_session))


def test_a_click_for_a_deleted_delivery_is_not_found(track, db_session, alice, settings):
    message = tracked_message(db_session, settings, alice["id"])
    db_session.delete(db_session.get(Delivery, message.sent.delivery_id))
    db_session.commit()
    assert get(track, message.clicks[0]).status_code == 404


def test_an_open_token_is_not_a_click_token_and_the_reverse(track, db_session, alice, settings):
    message = tracked_message(db_session, settings, alice["id"])
    opened = message.pixel.removeprefix("/t/o/")
    assert get(track, f"/t/c/{opened}").status_code == 404
    click = message.clicks[0].removeprefix("/t/c/")
    assert get(track, f"/t/o/{click}").data == PIXEL_GIF
    assert events_of(db_session) == []
    assert open_token(webhook_settings(settings), message.sent.delivery_id) == opened


# -- machines -----------------------------------------------------------------------------

BOTS = {
    "curl": "curl/8.5.0",
    "python-requests": "python-requests/2.32.3",
    "wget": "Wget/1.21.4",
    "go": "Go-http-client/2.0",
    "crawler": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "safelinks": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like "
    "Gecko) BingPreview/1.0b",
    "barracuda": "Barracuda Sentinel (EE)",
    "mimecast": "Mozilla/5.0 Mimecast-URL-Protect",
    "proofpoint": "Proofpoint URL Defense",
    "office": "Mozilla/4.0 (compatible; ms-office; MSOffice 16)",
    "slack": "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "whatsapp preview": "WhatsApp/2.23.20.0 A",
    "headless": "Mozilla/5.0 (X11; Linux x86_64) HeadlessChrome/120.0.0.0 Safari/537.36",
}


def test_apple_privacy_proxy_open_next_to_a_human_open(track, db_session, alice, settings):
    message = tracked_message(db_session, settings, alice["id"])
    delivery_id, channel_id = message.sent.delivery_id, message.sent.channel_id

    # Apple Mail Privacy Protection prefetches the pixel on arrival.
    get(track, message.pixel, "Mozilla/5.0", ip="17.58.101.12")
    get(track, message.pixel, "Mozilla/5.0", ip="17.58.101.13")
    counts = channel_counts(db_session, channel_id)
    assert (counts["delivered"], counts["opened"]) == (1, 0)  # proves delivery, not a reader
    (proxy,) = events_of(db_session, delivery_id)
    assert proxy.machine and proxy.detail["machine_rule"] == "apple_mpp"

    # The person opens it later: counted, once.
    get(track, message.pixel, BROWSER)
    get(track, message.pixel, BROWSER)
    counts = channel_counts(db_session, channel_id)
    assert (counts["delivered"], counts["opened"]) == (1, 1)
    assert kinds(db_session, delivery_id) == [("opened", True), ("opened", False)]
    assert_counters_match(db_session)


def test_a_fetch_from_apples_network_is_a_machine_open_whatever_its_agent(
    track, db_session, alice, settings
):
    message = tracked_message(db_session, settings, alice["id"])
    get(track, message.pixel, BROWSER, ip="17.142.160.59")
    get(track, message.pixel, BROWSER, ip="2620:149:a44::1")
    (event,) = events_of(db_session, message.sent.delivery_id)
    assert event.machine and event.detail["machine_rule"] == "apple_network"
    assert channel_counts(db_session, message.sent.channel_id)["opened"] == 0


def test_gmails_image_proxy_is_the_reader(track, db_session, alice, settings):
    message = tracked_message(db_session, settings, alice["id"])
    get(track, message.pixel, GMAIL, ip="66.249.84.1")
    (event,) = events_of(db_session, message.sent.delivery_id)
    assert not event.machine and event.detail == {"proxy": "google"}
    assert channel_counts(db_session, message.sent.channel_id)["opened"] == 1


@pytest.mark.parametrize("name", sorted(BOTS))
def test_known_bots_open_and_click_as_machines(track, db_session, alice, settings, name):
    message = tracked_message(db_session, settings, alice["id"])
    get(track, message.pixel, BOTS[name])
    response = get(track, message.clicks[0], BOTS[name])
    assert response.status_code == 302  # a machine is still redirected
    events = events_of(db_session, message.sent.delivery_id)
    assert [(e.kind, e.machine, e.detail["machine_rule"]) for e in events] == [
        ("opened", True, "bot_user_agent"),
        ("clicked", True, "bot_user_agent"),
    ]
    assert events[1].detail["user_agent"] == BOTS[name]
    counts = channel_counts(db_session, message.sent.channel_id)
    assert (counts["delivered"], counts["opened"], counts["clicked"]) == (1, 0, 0)


def test_no_user_agent_and_head_requests_are_machines(track, db_session, alice, settings):
    message = tracked_message(db_session, settings, alice["id"])
    get(track, message.pixel, None)
    head = get(track, message.clicks[0], BROWSER, method="HEAD")
    assert head.status_code == 302 and head.data == b""
    get(track, message.clicks[0], "")
    events = events_of(db_session, message.sent.delivery_id)
    assert [(e.kind, e.detail["machine_rule"]) for e in events] == [
        ("opened", "no_user_agent"),
        ("clicked", "head"),
        ("clicked", "no_user_agent"),
    ]
    assert events[1].detail["method"] == "HEAD"
    assert channel_counts(db_session, message.sent.channel_id)["clicked"] == 0


def test_a_scanner_clicking_on_arrival_then_the_person(track, db_session, alice, settings, clock):
    message = tracked_message(db_session, settings, alice["id"])
    sent_at = delivery(db_session, message.sent.delivery_id).sent_at

    clock.set(sent_at + timedelta(seconds=3))  # a security gateway follows every link
    assert get(track, message.clicks[0]).status_code == 302
    clock.set(sent_at + timedelta(seconds=9, milliseconds=999))
    get(track, message.clicks[2])
    counts = channel_counts(db_session, message.sent.channel_id)
    assert (counts["delivered"], counts["opened"], counts["clicked"]) == (1, 0, 0)

    clock.set(sent_at + timedelta(minutes=20))  # the reader
    get(track, message.clicks[0])
    clock.set(sent_at + timedelta(minutes=21))
    get(track, message.clicks[0])
    events = events_of(db_session, message.sent.delivery_id)
    assert [(e.machine, e.detail.get("machine_rule")) for e in events] == [
        (True, "too_soon"),
        (True, "too_soon"),
        (False, None),
        (False, None),
    ]
    counts = channel_counts(db_session, message.sent.channel_id)
    assert (counts["opened"], counts["clicked"]) == (1, 1)
    assert_counters_match(db_session)


def test_a_click_before_the_sender_recorded_the_send_is_too_soon(
    track, db_session, alice, settings
):
    message = tracked_message(db_session, settings, alice["id"], status="sending")
    assert get(track, message.clicks[0]).status_code == 302
    (event,) = events_of(db_session, message.sent.delivery_id)
    assert event.machine and event.detail["machine_rule"] == "too_soon"


def test_many_links_of_one_message_within_a_second_are_a_scanner(
    track, db_session, alice, settings, clock
):
    message = tracked_message(db_session, settings, alice["id"])
    sale, yours, help_link, _ = message.clicks
    start = clock.now()

    get(track, sale)  # judged alone: nothing else was clicked yet
    clock.set(start + timedelta(milliseconds=300))
    get(track, yours)
    clock.set(start + timedelta(milliseconds=600))
    get(track, help_link)
    clock.set(start + timedelta(milliseconds=800))
    get(track, sale)  # help and yours were clicked within the second
    clock.set(start + timedelta(seconds=30))
    get(track, help_link)  # a person, later

    events = events_of(db_session, message.sent.delivery_id)
    assert [e.detail.get("machine_rule") for e in events] == [None, "burst", "burst", "burst", None]


def test_the_same_link_clicked_twice_quickly_is_not_a_burst(
    track, db_session, alice, settings, clock
):
    message = tracked_message(db_session, settings, alice["id"])
    start = clock.now()
    get(track, message.clicks[0])
    clock.set(start + timedelta(milliseconds=200))  # a double click
    get(track, message.clicks[0])
    assert [e.machine for e in events_of(db_session, message.sent.delivery_id)] == [False, False]


# -- documented ---------------------------------------------------------------------------


def test_the_tracking_endpoints_are_in_the_openapi_document(track):
    spec = track.get("/api/v1/openapi.json").get_json()
    pixel = spec["paths"]["/t/o/{token}"]["get"]["responses"]
    assert "image/gif" in pixel["200"]["content"]
    click = spec["paths"]["/t/c/{token}"]["get"]["responses"]
    assert "302" in click and "404" in click
    assert set(click["404"]["content"]) == {"application/json", "text/html"}


def test_an_unknown_delivery_id_in_a_well_signed_open_token_records_nothing(
    track, db_session, alice, settings
):
    token = open_token(webhook_settings(settings), 987654321)
    assert get(track, f"/t/o/{token}").data == PIXEL_GIF
    assert events_of(db_session) == []
    assert db_session.scalar(select(Delivery.id).limit(1)) is None

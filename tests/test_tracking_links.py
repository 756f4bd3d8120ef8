"""Link tracking as the sender will use it: links found in a channel's templates, the
marked config compiled by the real CompiledChannel, each rendered message filled with
tracked URLs, and every token read back. Pure functions; no database except where
campaign_links is written (ensure_links)."""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from engine.campaigns.rendering import CompiledChannel
from engine.models import CampaignChannel, CampaignLink, Contact
from engine.settings import Settings
from engine.tracking.links import (
    Link,
    Tracking,
    click_token,
    ensure_links,
    find_links,
    links_of,
    read_click_token,
    utm_parameters,
    utm_problems,
    with_utm,
)
from engine.tracking.opens import delivery_of_open_token, open_token
from engine.tracking.tokens import push_token
from engine.unsubscribe import unsubscribe_token
from tests.campaigns_fixtures import insert_campaign

BASE = "https://h.example"
SETTINGS = replace(Settings(), public_base_url=BASE, secret_key="k" * 40)
CAMPAIGN = SimpleNamespace(id=uuid.UUID(int=1), name="Spring", description=None)
CLICK = re.compile(re.escape(BASE) + r"/t/c/([0-9]+\.[0-9]+(?:\.[\w-]+)?\.[\w-]{22})")
OPEN = re.compile(re.escape(BASE) + r"/t/o/([0-9]+\.[\w-]{22})")

EMAIL = {
    "subject": "Hi {{ contact.first_name }} https://shop.example/subject",
    "html": (
        "<html><body><p>Hi {{ contact.first_name }}</p>"
        '<a href="https://shop.example/sale?a=1&amp;b=2">Sale</a>'
        "<a class='x' href='https://shop.example/p/{{ contact.id }}'>Yours</a>"
        '<img src="https://cdn.example/logo.png">'
        '<a href="https://shop.example/sale?a=1&amp;b=2">Sale again</a>'
        '<area shape="rect" href="https://shop.example/map">'
        '<a href="{{ contact.attributes.site }}">Your site</a>'
        '<a href="mailto:help@shop.example">Mail</a><a href="tel:+15550100">Call</a>'
        '<a href="{{ unsubscribe_url }}">Unsubscribe</a>'
        "<p>Visit https://shop.example/plain in the text</p>"
        "</body></html>"
    ),
    "text": (
        "Sale: https://shop.example/sale?a=1&b=2. "
        "Yours: https://shop.example/p/{{ contact.id }} "
        "(and https://en.example/wiki/Foo_(bar)) "
        "{% if contact.attributes.vip %}VIP: https://shop.example/vip{% endif %} "
        "Unsubscribe: {{ unsubscribe_url }}"
    ),
    "utm": {"source": "newsletter", "medium": "email", "campaign": "spring sale"},
}


def a_contact(**fields) -> SimpleNamespace:
    base = {column.key: None for column in Contact.__table__.columns}
    base.update(id=uuid.UUID(int=42), first_name="Ann", push_tokens=[], attributes={})
    base.update(fields)
    return SimpleNamespace(**base)


def rows(channel_type: str, config: dict) -> list[Link]:
    """campaign_links as ensure_links would write them, ids from 1."""
    utm = utm_parameters(config)
    return [
        Link(index, url, None if dynamic else with_utm(url, utm), dynamic)
        for index, (url, dynamic) in enumerate(links_of(channel_type, config, BASE), start=1)
    ]


def send(channel_type: str, config: dict, delivery_id: int = 7, contact=None, links=None):
    """What the sender will do: compile the marked config, render, fill."""
    links = rows(channel_type, config) if links is None else links
    tracking = Tracking(SETTINGS, channel_type, config, links)
    compiled = CompiledChannel.compile(channel_type, tracking.config, CAMPAIGN)
    rendered = compiled.render(contact or a_contact(), unsubscribe_url=f"{BASE}/u/7.tok")
    return tracking.fill(rendered, delivery_id), {link.id: link for link in links}


def clicks_in(text: str) -> list:
    return [read_click_token(SETTINGS, token) for token in CLICK.findall(text)]


# -- finding links ------------------------------------------------------------------------


def test_links_are_found_where_a_reader_can_click_them():
    assert links_of("email", EMAIL, BASE) == [
        ("https://shop.example/sale?a=1&b=2", False),  # entities decoded
        ("https://shop.example/p/{{ contact.id }}", True),
        ("https://shop.example/map", False),  # <area> too
        ("https://en.example/wiki/Foo_(bar)", False),  # balanced parentheses kept
        ("https://shop.example/vip", False),  # inside {% if %}: literal text all the same
    ]
    # Never: an image's src, URLs in the page's text, a wholly variable href, mailto:,
    # tel:, the unsubscribe link, the subject.
    found = " ".join(link.url for link in find_links("email", EMAIL, BASE))
    for absent in ("cdn.example", "plain", "attributes", "mailto", "tel:", "unsubscribe", "subj"):
        assert absent not in found


def test_herald_own_urls_long_urls_and_urls_inside_tags_are_not_links():
    config = {
        "body": f"{BASE}/u/1.x {BASE}/t/c/1.2.x https://ok.example/a "
        '{% if contact.attributes.x == "https://in.tag.example" %}yes{% endif %} '
        "https://long.example/" + "a" * 2100
    }
    assert links_of("sms", config, BASE) == [("https://ok.example/a", False)]


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("see https://x.example.", "https://x.example"),
        ("(https://x.example/a)", "https://x.example/a"),
        ("https://x.example/a?b=c, next", "https://x.example/a?b=c"),
        ("[https://x.example/a]", "https://x.example/a"),
        ("`https://x.example/a`", "https://x.example/a"),
        ('"https://x.example/a"!', "https://x.example/a"),
        ("https://x.example/a#frag;", "https://x.example/a#frag"),
    ],
)
def test_sentence_punctuation_ends_a_link(text, url):
    assert links_of("sms", {"body": text}, BASE) == [(url, False)]


def test_push_tracks_its_url_and_whatsapp_its_body_only():
    push = {"title": "https://t.example", "body": "https://b.example", "url": "https://u.example"}
    assert links_of("push", push, BASE) == [("https://u.example", False)]
    template = {"template": {"name": "offer", "language": "en", "parameters": ["https://p.ex"]}}
    assert links_of("whatsapp", template, BASE) == []
    assert links_of("whatsapp", {"body": "Go https://w.example/x"}, BASE) == [
        ("https://w.example/x", False)
    ]


# -- the rendered message ------------------------------------------------------------------


def test_an_email_has_every_link_tracked_and_an_open_pixel_before_body_close():
    message, links = send("email", EMAIL, delivery_id=7)

    html, text = message["html"], message["text"]
    assert "\x1b" not in html + text + message["subject"]
    assert "utm" not in message  # tracking configuration, not content
    assert message["subject"] == "Hi Ann https://shop.example/subject"
    assert 'src="https://cdn.example/logo.png"' in html
    assert 'href="mailto:help@shop.example"' in html and 'href="tel:+15550100"' in html
    assert f'href="{BASE}/u/7.tok"' in html and f"Unsubscribe: {BASE}/u/7.tok" in text
    assert "Visit https://shop.example/plain in the text" in html
    assert '<a href="">Your site</a>' in html  # wholly variable: left as rendered
    assert "VIP" not in text  # a link in a branch this contact does not see

    html_clicks = clicks_in(html)
    assert [(c.delivery_id, links[c.link_id].url) for c in html_clicks] == [
        (7, "https://shop.example/sale?a=1&b=2"),
        (7, "https://shop.example/p/{{ contact.id }}"),
        (7, "https://shop.example/sale?a=1&b=2"),
        (7, "https://shop.example/map"),
    ]
    # The same link twice in one message is one token; the dynamic one carries the
    # contact's own destination, with the UTM parameters.
    assert CLICK.findall(html)[0] == CLICK.findall(html)[2]
    assert html_clicks[1].destination == (
        "https://shop.example/p/00000000-0000-0000-0000-00000000002a"
        "?utm_source=newsletter&utm_medium=email&utm_campaign=spring%20sale"
    )
    assert "class='x' href='" in html  # its quotes kept
    assert [links[c.link_id].url for c in clicks_in(text)] == [
        "https://shop.example/sale?a=1&b=2",
        "https://shop.example/p/{{ contact.id }}",
        "https://en.example/wiki/Foo_(bar)",
    ]
    assert ". Yours:" in text  # the full stop after the first link stayed text

    pixels = OPEN.findall(html)
    assert len(pixels) == 1 and delivery_of_open_token(SETTINGS, pixels[0]) == 7
    assert re.search(r'<img src="[^"]+/t/o/[^"]+" width="1" height="1" alt=""[^>]*></body>', html)


def test_a_vip_sees_the_vip_link_tracked_and_static_destinations_carry_utm():
    message, links = send("email", EMAIL, contact=a_contact(attributes={"vip": True}))
    vip = [c for c in clicks_in(message["text"]) if links[c.link_id].url.endswith("/vip")]
    assert len(vip) == 1 and vip[0].destination is None  # static: read from the row
    assert links[vip[0].link_id].destination == (
        "https://shop.example/vip?utm_source=newsletter&utm_medium=email&utm_campaign=spring%20sale"
    )


def test_the_pixel_is_appended_when_there_is_no_body_close_tag():
    message, _ = send("email", {"subject": "s", "html": "<p>Hello</p>"}, delivery_id=3)
    assert message["html"].startswith("<p>Hello</p><img src=")
    assert delivery_of_open_token(SETTINGS, OPEN.findall(message["html"])[0]) == 3
    upper, _ = send("email", {"subject": "s", "html": "<BODY>x</BODY >"})
    assert re.search(r"x<img [^>]+></BODY >$", upper["html"])


def test_a_text_only_email_gets_no_pixel():
    message, _ = send("email", {"subject": "s", "text": "Go https://x.example/a"})
    assert "/t/o/" not in message["text"] and len(clicks_in(message["text"])) == 1


def test_html_entities_in_a_dynamic_destination_are_decoded():
    config = {
        "subject": "s",
        "html": '<a href="https://x.example/?n={{ contact.first_name }}&amp;k=1">x</a>',
    }
    message, _ = send("email", config, contact=a_contact(first_name="A&B<C>"))
    (click,) = clicks_in(message["html"])
    assert click.destination == "https://x.example/?n=A&B<C>&k=1"


def test_a_dynamic_link_whose_value_breaks_the_url_is_left_as_rendered():
    config = {"body": "Hi https://x.example/p/{{ contact.first_name }} bye"}
    message, _ = send("sms", config, contact=a_contact(first_name="has space"))
    assert message["body"] == "Hi https://x.example/p/has space bye"


@pytest.mark.parametrize(
    "name",
    [
        "\x1b",
        "\x1bL1\x1b",
        "\x1bO\x1b",
        "\x1bD2\x1bhttps://evil.example\x1bE\x1b",
        "\x1bE\x1b",
        # Even with the real delimiter's shape: the nonce is secret.
        "\x1bAAAAAAAAAAAAD2\x1bAAAAAAAAAAAAhttps://evil.example\x1bAAAAAAAAAAAAE\x1bAAAAAAAAAAAA",
    ],
)
def test_contact_data_cannot_forge_a_marker(name):
    # A first name from a sign-up form, shown in the text and inside a dynamic link.
    config = {
        "subject": "s",
        "html": "<body>{{ contact.first_name }} <a href='https://x.example/a'>a</a> "
        "<a href='https://x.example/{{ contact.first_name }}'>b</a></body>",
        "text": "Hi {{ contact.first_name }}",
    }
    message, _ = send("email", config, contact=a_contact(first_name=name))
    html = message["html"]
    assert html.startswith(f"<body>{name} <a href='{BASE}/t/c/7.1.")  # kept as data
    assert message["text"] == f"Hi {name}"
    assert html.count("/t/o/") == 1
    destinations = [c.destination for c in clicks_in(html)]
    assert destinations[0] is None  # the static link, tracked
    assert all(d is None or d.startswith("https://x.example/") for d in destinations)
    assert "evil.example" not in " ".join(d or "" for d in destinations)


def test_sms_whatsapp_and_push_are_tracked_and_a_channel_without_links_is_untouched():
    sms, _ = send("sms", {"body": "Sale https://x.example/s. Reply STOP", "utm": {"source": "s"}})
    assert re.fullmatch(rf"Sale {re.escape(BASE)}/t/c/7\.1\.[\w-]{{22}}\. Reply STOP", sms["body"])
    wa, _ = send("whatsapp", {"body": "Hi https://x.example/w"})
    assert len(clicks_in(wa["body"])) == 1
    push_config = {"title": "t", "body": "b", "url": "https://x.example/app", "data": {"k": "v"}}
    push, _ = send("push", push_config)
    assert CLICK.fullmatch(push["url"]) and push["data"] == {"k": "v"}

    plain = {"body": "No links here, {{ contact.first_name }}"}
    tracking = Tracking(SETTINGS, "sms", plain, [])
    assert not tracking.tracks and tracking.config == plain
    assert send("sms", plain)[0]["body"] == "No links here, Ann"


def test_links_not_yet_in_campaign_links_are_left_untracked():
    message, _ = send("email", EMAIL, links=[])
    assert "/t/c/" not in message["html"] + message["text"]
    assert "https://shop.example/sale?a=1&amp;b=2" in message["html"]
    assert "/t/o/" in message["html"]  # the pixel needs no link


def test_filling_leaves_the_rendered_message_alone():
    tracking = Tracking(
        SETTINGS, "sms", {"body": "https://x.example"}, rows("sms", {"body": "https://x.example"})
    )
    rendered = {"body": tracking.config["body"]}
    before = dict(rendered)
    tracking.fill(rendered, 1)
    assert rendered == before


# -- tokens -----------------------------------------------------------------------------


def test_click_tokens_read_back_and_refuse_any_change():
    static = click_token(SETTINGS, 12, 3)
    parsed = read_click_token(SETTINGS, static)
    assert (parsed.delivery_id, parsed.link_id, parsed.destination) == (12, 3, None)
    dynamic = click_token(SETTINGS, 12, 4, "https://x.example/p/ü?q=1")
    assert read_click_token(SETTINGS, dynamic).destination == "https://x.example/p/ü?q=1"

    delivery, link, tag = static.split(".")
    tampered = [
        f"13.{link}.{tag}",
        f"{delivery}.4.{tag}",
        f"{delivery}.{link}.{tag[:-1]}{'A' if tag[-1] != 'A' else 'B'}",
        f"0{delivery}.{link}.{tag}",
        static + ".",
        static.upper(),
    ]
    d, lk, _encoded, dtag = dynamic.split(".")
    evil = click_token(SETTINGS, 12, 4, "https://evil.example").split(".")[2]
    tampered += [f"{d}.{lk}.{evil}.{dtag}", f"{d}.{lk}.{dtag}"]
    for token in tampered:
        assert read_click_token(SETTINGS, token) is None, token
    other = replace(SETTINGS, secret_key="o" * 40)
    assert read_click_token(other, static) is None


@pytest.mark.parametrize("token", [None, 12, "", "1.2", "x" * 4000, "1.2.3.4.5", "../1.2.abc"])
def test_garbage_is_not_a_click_token(token):
    assert read_click_token(SETTINGS, token) is None


def test_each_purpose_has_its_own_key():
    # Same delivery, four tokens: none verifies as another purpose's.
    opened = open_token(SETTINGS, 5)
    assert delivery_of_open_token(SETTINGS, opened) == 5
    assert delivery_of_open_token(SETTINGS, unsubscribe_token(SETTINGS, 5)) is None
    assert delivery_of_open_token(SETTINGS, push_token(SETTINGS, 5)) is None
    delivery, tag = opened.split(".")
    assert read_click_token(SETTINGS, f"{delivery}.1.{tag}") is None
    assert delivery_of_open_token(SETTINGS, f"6.{tag}") is None


# -- UTM -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://x.example", "https://x.example?utm_source=a%20b&utm_medium=m"),
        ("https://x.example/p?q=1", "https://x.example/p?q=1&utm_source=a%20b&utm_medium=m"),
        ("https://x.example/p?q=1&", "https://x.example/p?q=1&utm_source=a%20b&utm_medium=m"),
        ("https://x.example/p#top", "https://x.example/p?utm_source=a%20b&utm_medium=m#top"),
        (
            "https://x.example/p?q=%20x#a?b",
            "https://x.example/p?q=%20x&utm_source=a%20b&utm_medium=m#a?b",
        ),
        # A parameter the link has wins; the other is still added.
        ("https://x.example/?utm_source=ad", "https://x.example/?utm_source=ad&utm_medium=m"),
        (
            "https://x.example/?utm_source=ad&utm_medium=b",
            "https://x.example/?utm_source=ad&utm_medium=b",
        ),
    ],
)
def test_utm_parameters_are_appended_without_overriding(url, expected):
    assert with_utm(url, (("utm_source", "a b"), ("utm_medium", "m"))) == expected


def test_utm_config_is_validated_and_read_in_a_fixed_order():
    assert utm_problems(None) == {} and utm_problems({"source": "s", "campaign": None}) == {}
    assert utm_problems([]) == {
        "config.utm": ["must be an object with source, medium and/or campaign"]
    }
    assert utm_problems({"term": "x", "source": " ", "medium": 3, "campaign": "c" * 201}) == {
        "config.utm.term": ["unknown key (allowed: source, medium, campaign)"],
        "config.utm.source": ["must be a non-blank string"],
        "config.utm.medium": ["must be a non-blank string"],
        "config.utm.campaign": ["at most 200 characters"],
    }
    config = {"utm": {"campaign": "c", "source": " s "}}
    assert utm_parameters(config) == (("utm_source", "s"), ("utm_campaign", "c"))
    assert utm_parameters({}) == ()


# -- campaign_links ------------------------------------------------------------------------


def test_links_are_written_once_per_channel_and_a_new_config_only_adds(db_session, alice):
    campaign = insert_campaign(db_session, alice["id"], channels=("email",))
    channel = db_session.scalars(
        select(CampaignChannel).where(CampaignChannel.campaign_id == campaign.id)
    ).one()

    first = ensure_links(db_session, SETTINGS, channel.id, "email", EMAIL)
    db_session.commit()
    again = ensure_links(db_session, SETTINGS, channel.id, "email", EMAIL)
    assert first == again and [link.url for link in first] == [
        url for url, _ in links_of("email", EMAIL, BASE)
    ]
    sale = first[0]
    assert sale.destination == (
        "https://shop.example/sale?a=1&b=2&utm_source=newsletter&utm_medium=email"
        "&utm_campaign=spring%20sale"
    )
    assert [link.destination for link in first if link.dynamic] == [None]

    edited = {**EMAIL, "text": "New: https://shop.example/new"}
    after = ensure_links(db_session, SETTINGS, channel.id, "email", edited)
    db_session.commit()
    assert after[: len(first)] == first  # old links keep their ids and destinations
    assert after[-1].url == "https://shop.example/new"
    count = db_session.scalar(select(CampaignLink.id).order_by(CampaignLink.id.desc()).limit(1))
    assert count == after[-1].id


def test_tags_are_hmac_sha256_truncated_to_128_bits():
    import base64
    import hashlib
    import hmac

    from engine.tracking.opens import OPEN_SALT, signer

    key = hmac.new(SETTINGS.secret_key.encode(), OPEN_SALT.encode(), hashlib.sha256).digest()
    for message in ("7", "123456789.42", "x" * 500, "é"):
        expected = hmac.new(key, message.encode(), hashlib.sha256).digest()[:16]
        tag = signer(SETTINGS.secret_key, OPEN_SALT).tag(message)
        assert base64.urlsafe_b64decode(tag + "==") == expected
        assert len(tag) == 22 and "=" not in tag

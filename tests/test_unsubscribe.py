"""The public unsubscribe link /u/<token>: a confirmation page on GET, RFC 8058
one-click on POST, one suppression however often or concurrently it is clicked."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from itsdangerous import URLSafeSerializer
from sqlalchemy import select, update

from engine.models import CampaignChannel, Delivery, Suppression
from engine.unsubscribe import SALT, delivery_of, unsubscribe_token, unsubscribe_url
from tests.campaigns_fixtures import insert_campaign, insert_contact

ONE_CLICK = {"List-Unsubscribe": "One-Click"}
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.fixture
def sent(db_session, alice) -> dict:
    """Alice's campaign sent to one contact on email and on sms: {"email": id, "sms": id}."""
    campaign = insert_campaign(db_session, alice["id"], status="running", channels=("email", "sms"))
    contact = insert_contact(db_session, alice["id"], email="ann@example.com", phone="+15550001234")
    ids = {}
    for channel in db_session.scalars(
        select(CampaignChannel).where(CampaignChannel.campaign_id == campaign.id)
    ):
        address = "Ann@Example.com" if channel.channel_type == "email" else contact.phone
        delivery = Delivery(
            campaign_channel_id=channel.id, contact_id=contact.id, address=address, status="sent"
        )
        db_session.add(delivery)
        db_session.flush()
        ids[channel.channel_type] = delivery.id
    db_session.commit()
    return ids


def link(settings, delivery_id: int) -> str:
    return f"/u/{unsubscribe_token(settings, delivery_id)}"


def suppressions(db_session) -> list[tuple]:
    db_session.expire_all()
    return [
        (row.user_id, row.channel, row.address, row.reason)
        for row in db_session.scalars(select(Suppression).order_by(Suppression.channel))
    ]


def test_get_shows_a_form_that_posts_back_and_changes_nothing(client, settings, db_session, sent):
    response = client.get(link(settings, sent["email"]))

    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert '<form method="post">' in page
    assert 'name="List-Unsubscribe" value="One-Click"' in page
    assert "Stop receiving email messages" in page
    assert "ann@example.com" not in page.lower()  # the page never reveals the address
    assert suppressions(db_session) == []


def test_one_click_post_suppresses_the_address_on_its_channel(
    client, settings, db_session, alice, sent
):
    response = client.post(link(settings, sent["email"]), data=ONE_CLICK)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert "You are unsubscribed" in response.get_data(as_text=True)
    # Stored lower-cased: email suppressions match whatever the case.
    assert suppressions(db_session) == [(alice["id"], "email", "ann@example.com", "unsubscribe")]
    again = client.get(link(settings, sent["email"]))
    assert again.status_code == 200 and "You are unsubscribed" in again.get_data(as_text=True)


def test_an_empty_post_also_unsubscribes(client, settings, db_session, alice, sent):
    response = client.post(link(settings, sent["sms"]))
    assert response.status_code == 200
    assert suppressions(db_session) == [(alice["id"], "sms", "+15550001234", "unsubscribe")]


def test_a_token_unsubscribes_only_its_deliverys_address_and_channel(
    client, settings, db_session, alice, sent
):
    other = insert_contact(db_session, alice["id"], email="bea@example.com", phone="+15550009999")
    channel_id = db_session.scalar(
        select(Delivery.campaign_channel_id).where(Delivery.id == sent["email"])
    )
    bea = Delivery(campaign_channel_id=channel_id, contact_id=other.id, address=other.email)
    db_session.add(bea)
    db_session.commit()

    assert client.post(link(settings, sent["sms"]), data=ONE_CLICK).status_code == 200

    assert suppressions(db_session) == [(alice["id"], "sms", "+15550001234", "unsubscribe")]


def test_twenty_concurrent_clicks_leave_one_suppression(app, settings, db_session, alice, sent):
    url = link(settings, sent["email"])
    start = threading.Barrier(20)
    statuses: list[int] = []

    def click() -> None:
        client = app.test_client()
        start.wait()
        statuses.append(client.post(url, data=ONE_CLICK).status_code)

    threads = [threading.Thread(target=click) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert statuses == [200] * 20
    assert suppressions(db_session) == [(alice["id"], "email", "ann@example.com", "unsubscribe")]


@pytest.mark.parametrize(
    "token",
    [
        "not-a-token",
        "MTI.tampered",
        "%00",
        "x" * 2000,
    ],
)
def test_a_bad_token_is_not_found(client, db_session, sent, token):
    post = client.post(f"/u/{token}", data=ONE_CLICK)
    assert post.status_code == 404
    assert post.get_json()["error"]["code"] == "not_found"
    browser = client.get(f"/u/{token}", headers={"Accept": BROWSER_ACCEPT})
    assert browser.status_code == 404 and browser.mimetype == "text/html"
    assert "Link not found" in browser.get_data(as_text=True)
    api_client = client.get(f"/u/{token}")
    assert api_client.status_code == 404
    assert api_client.get_json()["error"]["code"] == "not_found"
    assert suppressions(db_session) == []


def test_a_tampered_signature_is_not_found(client, settings, db_session, sent):
    token = unsubscribe_token(settings, sent["email"])
    payload, signature = token.rsplit(".", 1)
    forged = f"{unsubscribe_token(settings, sent['sms']).rsplit('.', 1)[0]}.{signature}"
    flipped = f"{payload}.{signature[:-1]}{'A' if signature[-1] != 'A' else 'B'}"
    for bad in (forged, flipped):
        assert client.post(f"/u/{bad}", data=ONE_CLICK).status_code == 404
    assert suppressions(db_session) == []


def test_a_token_for_a_deleted_delivery_is_not_found(client, settings, db_session, sent):
    assert client.post(link(settings, 987654321)).status_code == 404
    assert client.get(link(settings, 987654321)).status_code == 404


def test_an_erased_address_has_nothing_to_unsubscribe(client, settings, db_session, sent):
    db_session.execute(
        update(Delivery).where(Delivery.id == sent["email"]).values(address=None, contact_id=None)
    )
    db_session.commit()

    get = client.get(link(settings, sent["email"]))
    post = client.post(link(settings, sent["email"]), data=ONE_CLICK)

    for response in (get, post):
        assert response.status_code == 200
        assert "Nothing to unsubscribe" in response.get_data(as_text=True)
    assert suppressions(db_session) == []


def test_a_wrong_one_click_value_names_the_field(client, settings, db_session, sent):
    response = client.post(link(settings, sent["email"]), data={"List-Unsubscribe": "Maybe"})
    assert response.status_code == 422
    assert "List-Unsubscribe" in response.get_json()["error"]["fields"]
    assert suppressions(db_session) == []


def test_the_link_is_public_and_documented(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    operations = spec["paths"]["/u/{token}"]
    assert set(operations) >= {"get", "post"}
    assert "security" not in operations["post"]
    assert "text/html" in operations["get"]["responses"]["200"]["content"]


# -- per-channel choices ---------------------------------------------------------------


def test_the_page_offers_every_channel_of_the_contact_with_its_own_ticked(client, settings, sent):
    page = client.get(link(settings, sent["sms"])).get_data(as_text=True)
    assert 'name="form" value="choices"' in page
    assert 'name="channels" value="sms" checked' in page
    assert 'name="channels" value="email">' in page  # offered, not ticked
    assert 'value="push"' not in page and 'value="whatsapp"' not in page  # no address
    assert "ann@example.com" not in page.lower() and "5550001234" not in page


def test_choosing_channels_suppresses_each_ticked_address(
    client, settings, db_session, alice, sent
):
    response = client.post(
        link(settings, sent["sms"]),
        data={"form": "choices", "channels": ["email", "sms", "push"]},  # push: no address
    )
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "You are unsubscribed" in page and "Email" in page and "SMS" in page
    assert suppressions(db_session) == [
        (alice["id"], "email", "ann@example.com", "unsubscribe"),
        (alice["id"], "sms", "+15550001234", "unsubscribe"),
    ]
    # Both done: the page now says so and offers nothing more.
    again = client.get(link(settings, sent["email"])).get_data(as_text=True)
    assert "You are unsubscribed" in again and 'name="form"' not in again


def test_nothing_ticked_changes_nothing(client, settings, db_session, sent):
    response = client.post(link(settings, sent["email"]), data={"form": "choices"})
    assert response.status_code == 200
    assert "Nothing changed" in response.get_data(as_text=True)
    assert suppressions(db_session) == []


def test_an_unsubscribed_channel_shows_as_such_and_the_rest_stay_offered(
    client, settings, db_session, alice, sent
):
    client.post(link(settings, sent["email"]), data=ONE_CLICK)
    page = client.get(link(settings, sent["email"])).get_data(as_text=True)
    assert "You are unsubscribed" in page
    assert "Email (unsubscribed)" in page
    assert 'name="channels" value="sms">' in page  # still offered, not ticked


def test_an_unknown_channel_choice_is_a_422(client, settings, db_session, sent):
    response = client.post(
        link(settings, sent["email"]), data={"form": "choices", "channels": ["fax"]}
    )
    assert response.status_code == 422
    assert "channels[0]" in response.get_json()["error"]["fields"]
    assert suppressions(db_session) == []


# -- the token itself --------------------------------------------------------------------


def test_a_token_names_its_delivery_and_verifies(settings):
    token = unsubscribe_token(settings, 42)
    assert token.startswith("42.") and len(token) == len("42.") + 22
    assert delivery_of(settings, token) == 42
    assert unsubscribe_url(settings, 42) == f"{settings.public_base_url}/u/{token}"
    assert unsubscribe_token(settings, 42) == token  # deterministic: one link per delivery


def test_tokens_minted_in_the_old_format_keep_working(client, settings, db_session, alice, sent):
    legacy = URLSafeSerializer(settings.secret_key, salt=SALT).dumps(sent["email"])
    assert delivery_of(settings, legacy) == sent["email"]
    assert client.post(f"/u/{legacy}", data=ONE_CLICK).status_code == 200
    assert suppressions(db_session) == [(alice["id"], "email", "ann@example.com", "unsubscribe")]


def test_a_token_cannot_be_forged_or_bent(settings):
    token = unsubscribe_token(settings, 42)
    tag = token.split(".")[1]
    other_key = replace(settings, secret_key="another-secret-key-that-is-long-enough-x")
    candidates = [
        f"43.{tag}",  # another delivery, same tag
        f"042.{tag}",  # the same number spelled differently
        f"-42.{tag}",
        f"42.{tag[:-1]}{'B' if tag[-1] == 'A' else 'A'}",  # spare bits of the last char
        f"42.{tag}\n",
        f"42.{tag}=",
        unsubscribe_token(other_key, 42),  # signed with another SECRET_KEY
        f"{2**70}.{tag}",
    ]
    assert [delivery_of(settings, bad) for bad in candidates] == [None] * len(candidates)
    legacy = URLSafeSerializer(settings.secret_key, salt="herald.push.delivered").dumps(42)
    assert delivery_of(settings, legacy) is None

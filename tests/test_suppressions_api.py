"""/api/v1/suppressions: list (filtered, paged), add (idempotent, normalised), remove;
each tenant sees only its own; planning leaves suppressed addresses out."""

from __future__ import annotations

import uuid

import pytest

from engine.models import SoftBounce
from tests.campaigns_fixtures import API as CAMPAIGNS
from tests.campaigns_fixtures import insert_campaign, insert_contact
from tests.helpers import assert_error

API = "/api/v1/suppressions"


def add(client, account, **body):
    return client.post(API, json=body, headers=account["headers"])


def test_adding_an_email_normalises_it_and_is_idempotent(client, alice):
    first = add(client, alice, channel="email", address="  Ann@Example.COM ")
    again = add(client, alice, channel="email", address="ann@example.com", reason="complaint")

    assert first.status_code == 201, first.get_json()
    body = first.get_json()
    assert (body["channel"], body["address"], body["reason"]) == (
        "email",
        "ann@example.com",
        "manual",
    )
    assert again.status_code == 200
    # The existing suppression, reason unchanged.
    assert again.get_json() == body


@pytest.mark.parametrize(
    ("channel", "given", "stored"),
    [
        ("sms", "+1 (415) 555-0101", "+14155550101"),
        ("whatsapp", "+33 6 12 34 56 78", "+33612345678"),
        ("push", "7C9E6679-7425-40DE-944B-E07FC1F90AE7", "7c9e6679-7425-40de-944b-e07fc1f90ae7"),
    ],
)
def test_addresses_are_normalised_like_contacts(client, alice, channel, given, stored):
    response = add(client, alice, channel=channel, address=given, reason="unsubscribe")
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["address"] == stored


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"channel": "email", "address": "not an email"}, "address"),
        ({"channel": "sms", "address": "0612345678"}, "address"),
        ({"channel": "sms", "address": "+1 555"}, "address"),
        ({"channel": "push", "address": "device-token"}, "address"),
        ({"channel": "email", "address": ""}, "address"),
        ({"channel": "fax", "address": "x"}, "channel"),
        ({"channel": "email", "address": "a@example.com", "reason": "because"}, "reason"),
        ({"address": "a@example.com"}, "channel"),
        ({"channel": "email"}, "address"),
    ],
)
def test_bad_input_is_422_naming_the_field(client, alice, body, field):
    assert_error(
        client.post(API, json=body, headers=alice["headers"]), 422, "validation_error", field
    )


def test_list_filters_and_pages_newest_first(client, alice, bob):
    for n in range(5):
        add(client, alice, channel="email", address=f"u{n}@example.com", reason="bounce")
    add(client, alice, channel="sms", address="+14155550101", reason="unsubscribe")
    add(client, bob, channel="email", address="bobs@example.com")

    everything = client.get(API, headers=alice["headers"]).get_json()
    assert [s["address"] for s in everything["items"]] == [
        "+14155550101",
        *(f"u{n}@example.com" for n in reversed(range(5))),
    ]
    assert everything["next_cursor"] is None

    seen, cursor = [], None
    while True:
        query = {"channel": "email", "reason": "bounce", "limit": 2}
        if cursor:
            query["cursor"] = cursor
        page = client.get(API, query_string=query, headers=alice["headers"]).get_json()
        seen += [s["address"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"u{n}@example.com" for n in reversed(range(5))]

    sms = client.get(API, query_string={"channel": "sms"}, headers=alice["headers"]).get_json()
    assert [s["reason"] for s in sms["items"]] == ["unsubscribe"]
    none = client.get(API, query_string={"reason": "complaint"}, headers=alice["headers"])
    assert none.get_json()["items"] == []


@pytest.mark.parametrize("query", [{"channel": "fax"}, {"reason": "x"}, {"cursor": "!!"}])
def test_bad_filters_are_422(client, alice, query):
    assert client.get(API, query_string=query, headers=alice["headers"]).status_code == 422


def test_delete_removes_it_and_other_tenants_get_404(client, alice, bob):
    created = add(client, alice, channel="email", address="ann@example.com").get_json()
    url = f"{API}/{created['id']}"

    assert_error(client.delete(url, headers=bob["headers"]), 404, "not_found")
    assert_error(client.get(url, headers=bob["headers"]), 404, "not_found")
    assert client.get(url, headers=alice["headers"]).get_json() == created

    assert client.delete(url, headers=alice["headers"]).status_code == 204
    assert_error(client.delete(url, headers=alice["headers"]), 404, "not_found")
    assert client.get(API, headers=alice["headers"]).get_json()["items"] == []
    assert_error(client.delete(f"{API}/{uuid.uuid4()}", headers=alice["headers"]), 404, "not_found")


def test_deleting_a_suppression_restarts_its_soft_bounce_count(client, db_session, alice):
    from datetime import UTC, datetime

    created = add(
        client, alice, channel="email", address="ann@example.com", reason="soft_bounce"
    ).get_json()
    db_session.add(
        SoftBounce(
            user_id=alice["id"],
            channel="email",
            address="ann@example.com",
            bounces=2,
            last_bounced_at=datetime.now(UTC),
        )
    )
    db_session.commit()

    client.delete(f"{API}/{created['id']}", headers=alice["headers"])

    db_session.expire_all()
    assert db_session.query(SoftBounce).count() == 0


def test_the_routes_need_a_token(client):
    assert client.get(API).status_code == 401
    assert (
        client.post(API, json={"channel": "email", "address": "a@example.com"}).status_code == 401
    )


def test_a_suppressed_address_is_left_out_of_the_recipients(client, db_session, alice):
    campaign = insert_campaign(db_session, alice["id"], channels=("email",))
    insert_contact(db_session, alice["id"], email="ann@example.com", consent_email=True)
    insert_contact(db_session, alice["id"], email="bea@example.com", consent_email=True)
    count = f"{CAMPAIGNS}/{campaign.id}/recipients/count"
    assert client.get(count, headers=alice["headers"]).get_json()["email"] == 2

    add(client, alice, channel="email", address="ANN@example.com")

    assert client.get(count, headers=alice["headers"]).get_json()["email"] == 1

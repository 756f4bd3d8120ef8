"""POST /api/v1/campaigns/{id}/test-send: real messages through the loopback providers,
outside the campaign (no delivery rows, no counters)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from engine.models import CampaignChannel, Delivery, Suppression
from tests.campaigns_fixtures import API, insert_campaign, insert_contact, set_status
from tests.helpers import assert_error
from tests.providers.fixtures import smtp_server_fixture, twilio_sink_fixture  # noqa: F401


@pytest.fixture
def providers_client(settings, smtp_server, twilio_sink):
    """An API whose email goes to a loopback SMTP relay and SMS to a loopback Twilio."""
    from api import create_app
    from api.extensions import db

    app = create_app(twilio_sink.settings(smtp_server.settings(settings)))
    yield app.test_client()
    db.dispose(app)
    app.extensions["herald"].celery.close()


def _contact(db_session, user_id, **fields):
    values = {
        "email": "ada@example.com",
        "phone": "+15550001111",
        "first_name": "Ada",
        "consent_email": True,
        "consent_sms": True,
        **fields,
    }
    return insert_contact(db_session, uuid.UUID(str(user_id)), **values)


def _campaign(db_session, account, status="draft"):
    return insert_campaign(
        db_session, uuid.UUID(str(account["id"])), status=status, channels=("email", "sms")
    )


def _test_send(client, account, campaign_id, contact_ids):
    return client.post(
        f"{API}/{campaign_id}/test-send",
        json={"contact_ids": [str(c) for c in contact_ids]},
        headers=account["headers"],
    )


def test_messages_reach_the_providers_outside_the_campaign(
    providers_client, alice, db_session, smtp_server, twilio_sink
):
    campaign = _campaign(db_session, alice, status="running")
    ada = _contact(db_session, alice["id"])
    response = _test_send(providers_client, alice, campaign.id, [ada.id])
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert [(r["contact_id"], r["channel"], r["outcome"], r["error"]) for r in results] == [
        (str(ada.id), "email", "sent", None),
        (str(ada.id), "sms", "sent", None),
    ]
    assert all(r["provider_message_id"] for r in results)

    (mail,) = smtp_server.wait_for(1)
    assert mail.rcpt_tos == ["ada@example.com"]
    assert mail.message["Subject"] == "[TEST] Hello Ada"
    assert mail.message["List-Unsubscribe"] is None
    assert "test-" in mail.message["Message-ID"]
    (sms,) = twilio_sink.accepted()
    assert sms.form["To"] == "+15550001111"
    assert sms.form["Body"] == "Hi Ada, Direct"

    db_session.expire_all()
    assert db_session.scalar(select(func.count()).select_from(Delivery)) == 0
    counters = db_session.execute(
        select(
            CampaignChannel.sent_count,
            CampaignChannel.delivered_count,
            CampaignChannel.opened_count,
            CampaignChannel.clicked_count,
        )
    ).all()
    assert counters == [(0, 0, 0, 0), (0, 0, 0, 0)]


def test_each_test_is_sent_again_with_a_fresh_idempotency_key(
    providers_client, alice, db_session, smtp_server
):
    campaign = _campaign(db_session, alice)
    ada = _contact(db_session, alice["id"], phone=None)
    for _ in range(2):
        assert _test_send(providers_client, alice, campaign.id, [ada.id]).status_code == 200
    first, second = smtp_server.wait_for(2)
    assert first.message["Message-ID"] != second.message["Message-ID"]


def test_contacts_without_address_consent_or_suppressed_are_skipped_with_the_reason(
    providers_client, alice, db_session, smtp_server, twilio_sink
):
    campaign = _campaign(db_session, alice)
    no_phone = _contact(db_session, alice["id"], email="a@example.com", phone=None)
    no_consent = _contact(db_session, alice["id"], email="b@example.com", consent_email=False)
    suppressed = _contact(db_session, alice["id"], email="C@Example.com", phone="+15550002222")
    db_session.add_all(
        [
            Suppression(
                user_id=uuid.UUID(str(alice["id"])), channel="email", address="c@example.com",
                reason="unsubscribe",
            ),
            Suppression(
                user_id=uuid.UUID(str(alice["id"])), channel="sms", address="+15550001111",
                reason="manual",
            ),
        ]
    )  # fmt: skip
    db_session.commit()
    ids = [no_phone.id, no_consent.id, suppressed.id]
    response = _test_send(providers_client, alice, campaign.id, ids)
    assert response.status_code == 200, response.get_json()
    outcomes = {
        (r["contact_id"], r["channel"]): (r["outcome"], r["error"])
        for r in response.get_json()["results"]
    }
    assert outcomes == {
        (str(no_phone.id), "email"): ("sent", None),
        (str(no_phone.id), "sms"): ("skipped", "no sms address"),
        (str(no_consent.id), "email"): ("skipped", "no consent for email"),
        (str(no_consent.id), "sms"): ("skipped", "suppressed"),
        (str(suppressed.id), "email"): ("skipped", "suppressed"),
        (str(suppressed.id), "sms"): ("sent", None),
    }
    assert [mail.rcpt_tos for mail in smtp_server.wait_for(1)] == [["a@example.com"]]
    assert [request.form["To"] for request in twilio_sink.accepted()] == ["+15550002222"]


def test_a_provider_refusal_is_reported_not_recorded(
    providers_client, alice, db_session, smtp_server, twilio_sink
):
    campaign = _campaign(db_session, alice)
    ada = _contact(db_session, alice["id"])
    smtp_server.reply_to_recipient("ada@example.com", "550 5.1.1 No such user")
    response = _test_send(providers_client, alice, campaign.id, [ada.id])
    email = response.get_json()["results"][0]
    assert (email["channel"], email["outcome"]) == ("email", "permanent")
    assert "550" in email["error"]
    assert db_session.scalar(select(func.count()).select_from(Delivery)) == 0


def test_contact_ids_are_validated_naming_the_field(client, alice, db_session, subtests):
    campaign = _campaign(db_session, alice)
    ada = _contact(db_session, alice["id"])
    cases = {
        "none": ({"contact_ids": []}, "contact_ids"),
        "more than 20": ({"contact_ids": [str(uuid.uuid4()) for _ in range(21)]}, "contact_ids"),
        "not a uuid": ({"contact_ids": [str(ada.id), "nope"]}, "contact_ids[1]"),
        "missing": ({}, "contact_ids"),
        "unknown field": ({"contact_ids": [str(ada.id)], "extra": 1}, "extra"),
    }
    for name, (body, field) in cases.items():
        with subtests.test(name):
            response = client.post(
                f"{API}/{campaign.id}/test-send", json=body, headers=alice["headers"]
            )
            assert_error(response, 422, "validation_error", field)


def test_ids_that_are_not_the_users_contacts_are_named(client, alice, bob, db_session):
    campaign = _campaign(db_session, alice)
    ada = _contact(db_session, alice["id"])
    bobs = _contact(db_session, bob["id"])
    missing = uuid.uuid4()
    response = _test_send(client, alice, campaign.id, [ada.id, bobs.id, missing])
    error = assert_error(response, 422, "validation_error", "contact_ids[1]", "contact_ids[2]")
    assert "contact_ids[0]" not in error["fields"]
    assert error["fields"]["contact_ids[1]"] == error["fields"]["contact_ids[2]"]


def test_another_tenants_or_a_missing_campaign_is_404(client, alice, bob, db_session):
    campaign = _campaign(db_session, alice)
    bobs = _contact(db_session, bob["id"])
    assert_error(_test_send(client, bob, campaign.id, [bobs.id]), 404, "not_found")
    assert_error(_test_send(client, bob, uuid.uuid4(), [bobs.id]), 404, "not_found")


def test_a_cancelled_campaign_cannot_be_tested(client, alice, db_session):
    campaign = _campaign(db_session, alice)
    ada = _contact(db_session, alice["id"])
    set_status(db_session, campaign.id, "cancelled")
    error = assert_error(
        _test_send(client, alice, campaign.id, [ada.id]), 409, "invalid_transition"
    )
    assert error["current_status"] == "cancelled"


def test_route_needs_a_token_and_is_documented(client):
    response = client.post(f"{API}/{uuid.uuid4()}/test-send", json={"contact_ids": []})
    assert response.status_code == 401
    spec = client.get("/api/v1/openapi.json").get_json()
    operation = spec["paths"]["/api/v1/campaigns/{campaign_id}/test-send"]["post"]
    assert {"200", "404", "409", "422"} <= set(operation["responses"])
    assert operation["security"]

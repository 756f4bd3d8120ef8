"""Twilio status callbacks and inbound STOP, through real HTTP requests at the app:
signatures, replays, out-of-order callbacks and the suppressions they cause."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from engine.channels import OutboundMessage, channel_for
from engine.dispatch.recording import record_recovered_acceptances
from engine.models import Delivery
from tests.campaigns_fixtures import insert_contact
from tests.dispatch_helpers import assert_counters_match
from tests.helpers import assert_error
from tests.providers.fixtures import (  # noqa: F401
    FAST_TIMEOUTS,
    channel_settings_fixture,
    twilio_sink_fixture,
)
from tests.tracking_helpers import (  # noqa: F401
    PUBLIC,
    TWILIO_TOKEN,
    channel_counts,
    delivery,
    events_of,
    hook_app_fixture,
    hooks_fixture,
    post_twilio,
    sent_delivery,
    suppressions_of,
    twilio_signature,
    webhook_settings,
)

STATUS = "/webhooks/twilio/status"
INBOUND = "/webhooks/twilio/inbound"
SID = "SM" + "a" * 32


def status_form(status: str, sid: str = SID, **extra: str) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "SmsSid": sid,
        "AccountSid": "AC" + "1" * 32,
        "MessageStatus": status,
        "SmsStatus": status,
        "From": "+15005550006",
        "To": "+14155550101",
        "ApiVersion": "2010-04-01",
        **extra,
    }


@pytest.fixture
def sms(db_session, alice):
    return sent_delivery(db_session, alice["id"], "sms", provider_message_id=SID)


# -- signatures ----------------------------------------------------------------------------


def test_delivered_callback_marks_the_delivery_and_counts_once(hooks, db_session, sms):
    response = post_twilio(hooks, STATUS, status_form("delivered"))

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["recorded"] == 1
    row = delivery(db_session, sms.delivery_id)
    assert row.delivered_at is not None and row.status == "sent"
    assert channel_counts(db_session, sms.channel_id) == {
        "sent": 1,
        "delivered": 1,
        "opened": 0,
        "clicked": 0,
    }
    (event,) = events_of(db_session, sms.delivery_id)
    assert (event.kind, event.source, event.provider_message_id) == ("delivered", "twilio", SID)
    assert event.detail == {"status": "delivered"}
    assert_counters_match(db_session)


def test_missing_signature_is_401_and_stores_nothing(hooks, db_session, sms):
    response = post_twilio(hooks, STATUS, status_form("delivered"), signature=None)
    assert_error(response, 401, "signature_missing")
    assert events_of(db_session) == []
    assert delivery(db_session, sms.delivery_id).delivered_at is None


@pytest.mark.parametrize(
    "signature",
    [
        "not-base64-at-all",
        twilio_signature(PUBLIC + STATUS, status_form("failed")),  # another body's
        twilio_signature("http://localhost" + STATUS, status_form("delivered")),  # request URL
        twilio_signature(PUBLIC + STATUS, status_form("delivered"), token="other-token"),
    ],
)
def test_a_wrong_signature_is_403_and_stores_nothing(hooks, db_session, sms, signature):
    response = post_twilio(hooks, STATUS, status_form("delivered"), signature=signature)
    assert_error(response, 403, "signature_invalid")
    assert events_of(db_session) == []
    assert channel_counts(db_session, sms.channel_id)["delivered"] == 0


def test_signature_is_checked_against_the_public_url_not_the_request_url(hooks, db_session, sms):
    # Behind a proxy the app sees http://localhost/…; Twilio signed PUBLIC_BASE_URL's.
    form = status_form("delivered")
    signed_for_public = twilio_signature(PUBLIC + STATUS, form)
    response = hooks.post(
        STATUS,
        data=form,
        base_url="http://10.0.0.7:8000",
        headers={"X-Twilio-Signature": signed_for_public},
    )
    assert response.status_code == 200


def test_without_an_auth_token_every_call_is_refused(client, db_session, sms):
    # The default test app has no TWILIO_AUTH_TOKEN: nothing could be verified.
    response = post_twilio(client, STATUS, status_form("delivered"))
    assert_error(response, 403, "webhook_not_configured")
    assert events_of(db_session) == []


def test_a_signed_form_with_a_nul_character_is_stored_without_it(hooks, db_session, sms):
    form = status_form("undelivered", ErrorCode="300\x0008")
    response = post_twilio(hooks, STATUS, form)
    assert response.status_code == 200
    (event,) = events_of(db_session, sms.delivery_id)
    assert event.kind == "failed" and "error_code" not in event.detail


# -- replays and order ---------------------------------------------------------------------


def test_a_replayed_callback_changes_nothing(hooks, db_session, sms):
    first = post_twilio(hooks, STATUS, status_form("delivered"))
    again = [post_twilio(hooks, STATUS, status_form("delivered")) for _ in range(3)]

    assert first.get_json()["recorded"] == 1
    assert [r.get_json()["duplicates"] for r in again] == [1, 1, 1]
    assert len(events_of(db_session, sms.delivery_id)) == 1
    assert channel_counts(db_session, sms.channel_id)["delivered"] == 1


def test_late_queued_and_sent_callbacks_move_nothing_backwards(hooks, db_session, sms):
    assert post_twilio(hooks, STATUS, status_form("delivered")).status_code == 200
    delivered_at = delivery(db_session, sms.delivery_id).delivered_at
    for status in ("sent", "queued"):
        assert post_twilio(hooks, STATUS, status_form(status)).get_json()["recorded"] == 1

    row = delivery(db_session, sms.delivery_id)
    assert (row.status, row.delivered_at) == ("sent", delivered_at)
    assert [e.kind for e in events_of(db_session, sms.delivery_id)] == [
        "delivered",
        "sent",
        "sent",
    ]
    assert channel_counts(db_session, sms.channel_id)["delivered"] == 1
    assert_counters_match(db_session)


def test_delivered_before_the_sender_records_the_sid_is_kept_and_adopted(hooks, db_session, alice):
    # The provider accepted the message; the worker's checkpoint has not recorded it yet.
    sms = sent_delivery(db_session, alice["id"], "sms", status="sending")
    lease = _now() + timedelta(minutes=5)
    db_session.execute(
        update(Delivery).where(Delivery.id == sms.delivery_id).values(lease_expires_at=lease)
    )
    db_session.commit()

    early = post_twilio(hooks, STATUS, status_form("delivered"))
    assert early.get_json()["pending"] == 1
    assert delivery(db_session, sms.delivery_id).delivered_at is None
    assert channel_counts(db_session, sms.channel_id)["delivered"] == 0

    # The checkpoint records the acceptance (the dispatch engine's own statement) …
    assert (
        record_recovered_acceptances(
            db_session, sms.channel_id, lease, {(sms.delivery_id, 1): SID}, _now()
        )
        == 1
    )
    db_session.commit()
    # … and the next callback about the message adopts the early one first.
    post_twilio(hooks, STATUS, status_form("sent"))

    row = delivery(db_session, sms.delivery_id)
    assert (row.status, row.provider_message_id) == ("sent", SID)
    assert row.delivered_at is not None
    assert channel_counts(db_session, sms.channel_id) == {
        "sent": 1,
        "delivered": 1,
        "opened": 0,
        "clicked": 0,
    }
    assert {e.kind for e in events_of(db_session, sms.delivery_id)} == {"delivered", "sent"}
    assert_counters_match(db_session)


def test_an_unknown_message_is_acknowledged_and_kept_for_a_while(hooks, db_session, sms):
    response = post_twilio(hooks, STATUS, status_form("delivered", sid="SM" + "f" * 32))
    assert response.status_code == 200
    assert response.get_json()["pending"] == 1
    assert channel_counts(db_session, sms.channel_id)["delivered"] == 0


def test_a_callback_without_a_known_status_is_ignored(hooks, db_session, sms):
    response = post_twilio(hooks, STATUS, status_form("teleported"))
    assert response.status_code == 200 and response.get_json()["ignored"] == 1
    assert events_of(db_session) == []


# -- failures and suppression --------------------------------------------------------------


@pytest.mark.parametrize("code", ["21211", "21614", "30005", "30006"])
def test_a_number_that_cannot_receive_is_suppressed(hooks, db_session, alice, sms, code):
    response = post_twilio(hooks, STATUS, status_form("undelivered", ErrorCode=code))

    assert response.get_json()["suppressed"] == 1
    row = delivery(db_session, sms.delivery_id)
    assert row.failed_at is not None and row.status == "sent"
    assert row.last_error == f"twilio undelivered {code}"
    assert suppressions_of(db_session) == [(alice["id"], "sms", "+14155550101", "bounce")]
    (event,) = events_of(db_session, sms.delivery_id)
    assert event.detail == {"status": "undelivered", "error_code": int(code), "failure": "hard"}


def test_twilio_opt_out_code_is_an_unsubscribe(hooks, db_session, alice, sms):
    post_twilio(hooks, STATUS, status_form("failed", ErrorCode="21610"))
    assert suppressions_of(db_session) == [(alice["id"], "sms", "+14155550101", "unsubscribe")]


def test_other_failures_fail_the_delivery_without_suppressing(hooks, db_session, sms):
    response = post_twilio(hooks, STATUS, status_form("failed", ErrorCode="30008"))
    assert response.get_json() == {**_zero(), "received": 1, "recorded": 1}
    assert delivery(db_session, sms.delivery_id).failed_at is not None
    assert suppressions_of(db_session) == []


def test_handset_off_counts_as_a_soft_bounce_until_the_threshold(hooks, db_session, alice):
    # 30003 (switched off, out of coverage) passes: three in a row suppress the number.
    sids = [f"SM{n:032d}" for n in range(3)]
    for sid in sids:
        sent_delivery(db_session, alice["id"], "sms", provider_message_id=sid)
    replies = [
        post_twilio(hooks, STATUS, status_form("undelivered", sid=sid, ErrorCode="30003"))
        for sid in sids
    ]
    assert [r.get_json()["suppressed"] for r in replies] == [0, 0, 1]
    assert suppressions_of(db_session) == [(alice["id"], "sms", "+14155550101", "soft_bounce")]


def test_a_delivery_in_between_restarts_the_soft_bounce_count(hooks, db_session, alice):
    sids = [f"SM{n:032d}" for n in range(4)]
    for sid in sids:
        sent_delivery(db_session, alice["id"], "sms", provider_message_id=sid)
    post_twilio(hooks, STATUS, status_form("undelivered", sid=sids[0], ErrorCode="30003"))
    post_twilio(hooks, STATUS, status_form("undelivered", sid=sids[1], ErrorCode="30003"))
    post_twilio(hooks, STATUS, status_form("delivered", sid=sids[2]))
    post_twilio(hooks, STATUS, status_form("undelivered", sid=sids[3], ErrorCode="30003"))
    assert suppressions_of(db_session) == []


# -- inbound STOP / START ------------------------------------------------------------------


def inbound_form(body: str, sender: str = "+14155550101", **extra: str) -> dict[str, str]:
    return {
        "MessageSid": "SM" + "b" * 32,
        "AccountSid": "AC" + "1" * 32,
        "From": sender,
        "To": "+15005550006",
        "Body": body,
        "NumMedia": "0",
        **extra,
    }


@pytest.mark.parametrize("body", ["STOP", "stop", "  Stop \n", "STOPALL", "unsubscribe", "Quit"])
def test_stop_suppresses_the_number_for_every_user_who_has_it(hooks, db_session, alice, bob, body):
    insert_contact(db_session, alice["id"], phone="+14155550101")
    insert_contact(db_session, bob["id"], phone="+14155550101")
    insert_contact(db_session, bob["id"], phone="+14155550199")

    response = post_twilio(hooks, INBOUND, inbound_form(body))

    assert response.status_code == 200
    assert response.mimetype == "text/xml"
    assert "<Response></Response>" in response.get_data(as_text=True)
    assert sorted(suppressions_of(db_session)) == sorted(
        [
            (alice["id"], "sms", "+14155550101", "unsubscribe"),
            (bob["id"], "sms", "+14155550101", "unsubscribe"),
        ]
    )


def test_start_lifts_only_the_stop(hooks, db_session, alice, bob):
    insert_contact(db_session, alice["id"], phone="+14155550101")
    insert_contact(db_session, bob["id"], phone="+14155550101")
    # Bob had suppressed the number himself: his decision, which STOP and START leave be.
    manual = hooks.post(
        "/api/v1/suppressions",
        json={"channel": "sms", "address": "+14155550101"},
        headers=bob["headers"],
    )
    assert manual.status_code == 201
    post_twilio(hooks, INBOUND, inbound_form("STOP"))
    assert sorted(suppressions_of(db_session)) == sorted(
        [
            (alice["id"], "sms", "+14155550101", "unsubscribe"),
            (bob["id"], "sms", "+14155550101", "manual"),
        ]
    )

    response = post_twilio(hooks, INBOUND, inbound_form(" unstop "))

    assert response.status_code == 200
    assert suppressions_of(db_session) == [(bob["id"], "sms", "+14155550101", "manual")]


def test_advanced_opt_out_type_is_authoritative(hooks, db_session, alice):
    insert_contact(db_session, alice["id"], phone="+14155550101")
    post_twilio(hooks, INBOUND, inbound_form("ARRET", OptOutType="STOP"))
    assert suppressions_of(db_session) == [(alice["id"], "sms", "+14155550101", "unsubscribe")]


@pytest.mark.parametrize("body", ["stop it please", "hello", "", "STOP!"])
def test_other_messages_change_nothing(hooks, db_session, alice, body):
    insert_contact(db_session, alice["id"], phone="+14155550101")
    assert post_twilio(hooks, INBOUND, inbound_form(body)).status_code == 200
    assert suppressions_of(db_session) == []


def test_inbound_is_signed_against_its_own_url(hooks, db_session, alice):
    insert_contact(db_session, alice["id"], phone="+14155550101")
    form = inbound_form("STOP")
    wrong = twilio_signature(PUBLIC + STATUS, form)  # signed for the status URL
    assert_error(post_twilio(hooks, INBOUND, form, signature=wrong), 403, "signature_invalid")
    assert_error(post_twilio(hooks, INBOUND, form, signature=None), 401, "signature_missing")
    assert suppressions_of(db_session) == []


# -- the channel names the callback, and the callback comes back -----------------------------


def test_a_real_send_names_the_status_callback_that_then_verifies(
    twilio_sink, channel_settings, hooks, db_session, alice
):
    sms = sent_delivery(db_session, alice["id"], "sms", status="sending")
    settings = twilio_sink.settings(webhook_settings(channel_settings))
    with channel_for("sms", settings, **FAST_TIMEOUTS) as channel:
        result = channel.send(
            OutboundMessage(sms.delivery_id, f"d{sms.delivery_id}", sms.address, {"body": "Hi"})
        )
    (request,) = twilio_sink.wait_for(1)
    callback = request.form["StatusCallback"]
    assert callback == f"{PUBLIC}/webhooks/twilio/status"
    db_session.execute(
        update(Delivery)
        .where(Delivery.id == sms.delivery_id)
        .values(status="sent", provider_message_id=result.provider_message_id)
    )
    db_session.commit()

    # Twilio signs with the auth token for the URL it was given.
    form = status_form("delivered", sid=result.provider_message_id)
    signature = twilio_signature(callback, form, token=TWILIO_TOKEN)
    response = post_twilio(hooks, STATUS, form, signature=signature)

    assert response.get_json()["recorded"] == 1
    assert delivery(db_session, sms.delivery_id).delivered_at is not None


def test_the_endpoints_are_public_and_documented(hooks):
    spec = hooks.get("/api/v1/openapi.json").get_json()
    for path in (STATUS, INBOUND):
        operation = spec["paths"][path]["post"]
        assert "security" not in operation
        assert set(operation["responses"]) >= {"401", "403"}


def _zero() -> dict[str, int]:
    return dict.fromkeys(
        ("received", "recorded", "duplicates", "pending", "ignored", "suppressed", "unsubscribed"),
        0,
    )


def _now() -> datetime:
    return datetime.now(UTC)


def test_an_oversized_body_is_413_before_anything_else(hooks, db_session, sms):
    form = status_form("delivered", Body="x" * 70_000)
    response = post_twilio(hooks, STATUS, form)
    assert_error(response, 413, "payload_too_large")
    assert events_of(db_session) == []

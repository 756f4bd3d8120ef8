"""WhatsApp Cloud API webhooks through real HTTP requests: the subscription check, the
signature, statuses (read counts as opened), failures and inbound opt-outs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from tests.campaigns_fixtures import insert_contact
from tests.dispatch_helpers import assert_counters_match
from tests.helpers import assert_error
from tests.tracking_helpers import (  # noqa: F401
    WHATSAPP_SECRET,
    WHATSAPP_VERIFY,
    channel_counts,
    delivery,
    events_of,
    hook_app_fixture,
    hooks_fixture,
    hub_signature,
    post_whatsapp,
    sent_delivery,
    suppressions_of,
    whatsapp_payload,
    whatsapp_status,
)

WAMID = "wamid.HBgLMTQxNTU1NTAxMDIVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA"
NUMBER = "+14155550102"


@pytest.fixture
def wa(db_session, alice):
    return sent_delivery(db_session, alice["id"], "whatsapp", provider_message_id=WAMID)


# -- the subscription handshake ------------------------------------------------------------


def subscribe(client, **params):
    query = {
        "hub.mode": "subscribe",
        "hub.verify_token": WHATSAPP_VERIFY,
        "hub.challenge": "1158201444",
    }
    query.update(params)
    return client.get(
        "/webhooks/whatsapp", query_string={k: v for k, v in query.items() if v is not None}
    )


def test_the_verification_request_echoes_the_challenge(hooks):
    response = subscribe(hooks)
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == "1158201444"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "params",
    [
        {"hub.verify_token": "wrong"},
        {"hub.verify_token": None},
        {"hub.mode": "unsubscribe"},
        {"hub.mode": None},
    ],
)
def test_a_wrong_verify_token_is_403(hooks, params):
    assert_error(subscribe(hooks, **params), 403, "verify_token_invalid")


@pytest.mark.parametrize("challenge", [None, "<script>alert(1)</script>", "x" * 300])
def test_a_missing_or_odd_challenge_is_not_echoed(hooks, challenge):
    assert_error(subscribe(hooks, **{"hub.challenge": challenge}), 422, "validation_error")


def test_verification_is_refused_while_no_verify_token_is_configured(client):
    # Otherwise an empty hub.verify_token would match an empty setting.
    assert_error(subscribe(client, **{"hub.verify_token": ""}), 403, "webhook_not_configured")


# -- signatures ----------------------------------------------------------------------------


def test_signed_delivered_status_marks_the_delivery_at_metas_time(hooks, db_session, wa):
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    payload = whatsapp_payload(
        [
            whatsapp_status(
                WAMID, "delivered", delivery_id=wa.delivery_id, timestamp=int(at.timestamp())
            )
        ]
    )

    response = post_whatsapp(hooks, payload)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["recorded"] == 1
    assert delivery(db_session, wa.delivery_id).delivered_at == at
    assert channel_counts(db_session, wa.channel_id)["delivered"] == 1
    (event,) = events_of(db_session, wa.delivery_id)
    assert (event.occurred_at, event.provider_message_id) == (at, WAMID)


def test_an_implausible_timestamp_gives_way_to_the_arrival_time(hooks, db_session, wa):
    long_ago = int((datetime.now(UTC) - timedelta(days=400)).timestamp())
    before = datetime.now(UTC)
    payload = whatsapp_payload(
        [whatsapp_status(WAMID, "delivered", delivery_id=wa.delivery_id, timestamp=long_ago)]
    )
    post_whatsapp(hooks, payload)
    assert delivery(db_session, wa.delivery_id).delivered_at >= before - timedelta(seconds=1)


@pytest.mark.parametrize(
    ("signature", "status", "code"),
    [
        (None, 401, "signature_missing"),
        ("sha256=" + "0" * 64, 403, "signature_invalid"),
        ("sha1=abc", 403, "signature_invalid"),
        (hub_signature(b"{}", WHATSAPP_SECRET), 403, "signature_invalid"),
        (hub_signature(b"", "another-secret"), 403, "signature_invalid"),
    ],
)
def test_bad_signatures_store_nothing(hooks, db_session, wa, signature, status, code):
    payload = whatsapp_payload([whatsapp_status(WAMID, "delivered", delivery_id=wa.delivery_id)])
    assert_error(post_whatsapp(hooks, payload, signature=signature), status, code)
    assert events_of(db_session) == []
    assert delivery(db_session, wa.delivery_id).delivered_at is None


def test_the_signature_covers_the_raw_bytes(hooks, db_session, wa):
    # The same JSON re-serialised (other spacing) no longer matches.
    payload = whatsapp_payload([whatsapp_status(WAMID, "delivered", delivery_id=wa.delivery_id)])
    body = json.dumps(payload).encode()
    signature = hub_signature(body, WHATSAPP_SECRET)
    spaced = json.dumps(payload, indent=2).encode()
    assert_error(post_whatsapp(hooks, spaced, signature=signature), 403, "signature_invalid")
    assert post_whatsapp(hooks, body, signature=signature).status_code == 200


def test_a_signed_body_that_is_not_json_is_400(hooks, db_session):
    response = post_whatsapp(hooks, b"\xff{not json")
    assert_error(response, 400, "invalid_json")


def test_without_an_app_secret_every_call_is_refused(client, db_session, wa):
    payload = whatsapp_payload([whatsapp_status(WAMID, "delivered", delivery_id=wa.delivery_id)])
    assert_error(post_whatsapp(client, payload), 403, "webhook_not_configured")


# -- statuses ------------------------------------------------------------------------------


def test_read_counts_as_opened_and_implies_delivered(hooks, db_session, wa):
    # Out of order: read arrives first, delivered after it.
    read = whatsapp_payload([whatsapp_status(WAMID, "read", delivery_id=wa.delivery_id)])
    delivered = whatsapp_payload([whatsapp_status(WAMID, "delivered", delivery_id=wa.delivery_id)])

    assert post_whatsapp(hooks, read).get_json()["recorded"] == 1
    assert post_whatsapp(hooks, delivered).get_json()["recorded"] == 1

    row = delivery(db_session, wa.delivery_id)
    assert row.opened_at is not None and row.delivered_at is not None
    counts = channel_counts(db_session, wa.channel_id)
    assert (counts["delivered"], counts["opened"], counts["clicked"]) == (1, 1, 0)
    assert [e.kind for e in events_of(db_session, wa.delivery_id)] == ["opened", "delivered"]
    assert_counters_match(db_session)


def test_one_call_with_many_statuses(hooks, db_session, alice, wa):
    other = sent_delivery(db_session, alice["id"], "whatsapp", provider_message_id="wamid.other")
    payload = whatsapp_payload(
        [
            whatsapp_status(WAMID, "sent", delivery_id=wa.delivery_id),
            whatsapp_status(WAMID, "delivered", delivery_id=wa.delivery_id),
            whatsapp_status("wamid.other", "delivered", delivery_id=other.delivery_id),
            whatsapp_status("wamid.other", "read", delivery_id=other.delivery_id),
            whatsapp_status("wamid.unknown", "delivered", delivery_id=987654321),
            {"id": WAMID, "status": "deleted"},
            "not an object",
        ]
    )
    body = post_whatsapp(hooks, payload).get_json()
    assert body == {
        "received": 7,
        "recorded": 4,
        "duplicates": 0,
        "pending": 0,
        "ignored": 3,
        "suppressed": 0,
        "unsubscribed": 0,
    }
    assert channel_counts(db_session, wa.channel_id)["delivered"] == 1
    assert channel_counts(db_session, other.channel_id)["opened"] == 1
    assert_counters_match(db_session)


def test_a_status_without_our_callback_data_is_found_by_message_id(hooks, db_session, wa):
    payload = whatsapp_payload([whatsapp_status(WAMID, "delivered")])
    assert post_whatsapp(hooks, payload).get_json()["recorded"] == 1
    assert delivery(db_session, wa.delivery_id).delivered_at is not None


def test_callback_data_for_another_channel_names_nothing(hooks, db_session, alice):
    email = sent_delivery(db_session, alice["id"], "email")
    payload = whatsapp_payload([whatsapp_status(WAMID, "delivered", delivery_id=email.delivery_id)])
    assert post_whatsapp(hooks, payload).get_json()["ignored"] == 1
    assert delivery(db_session, email.delivery_id).delivered_at is None


def test_a_replayed_call_changes_nothing(hooks, db_session, wa):
    payload = whatsapp_payload([whatsapp_status(WAMID, "read", delivery_id=wa.delivery_id)])
    post_whatsapp(hooks, payload)
    replay = post_whatsapp(hooks, payload).get_json()
    assert (replay["recorded"], replay["duplicates"]) == (0, 1)
    assert len(events_of(db_session, wa.delivery_id)) == 1
    assert channel_counts(db_session, wa.channel_id)["opened"] == 1


def test_a_late_sent_status_moves_nothing(hooks, db_session, wa):
    post_whatsapp(
        hooks, whatsapp_payload([whatsapp_status(WAMID, "read", delivery_id=wa.delivery_id)])
    )
    post_whatsapp(
        hooks, whatsapp_payload([whatsapp_status(WAMID, "sent", delivery_id=wa.delivery_id)])
    )
    row = delivery(db_session, wa.delivery_id)
    assert row.status == "sent" and row.opened_at is not None and row.failed_at is None
    assert_counters_match(db_session)


def failed(code: int, title: str) -> list[dict]:
    return [{"code": code, "title": title, "message": title, "error_data": {"details": title}}]


def test_undeliverable_number_is_suppressed(hooks, db_session, alice, wa):
    payload = whatsapp_payload(
        [
            whatsapp_status(
                WAMID,
                "failed",
                delivery_id=wa.delivery_id,
                errors=failed(131026, "Message undeliverable"),
            )
        ]
    )
    body = post_whatsapp(hooks, payload).get_json()
    assert body["suppressed"] == 1
    row = delivery(db_session, wa.delivery_id)
    assert row.failed_at is not None
    assert row.last_error == "whatsapp failed 131026: Message undeliverable"
    assert suppressions_of(db_session) == [(alice["id"], "whatsapp", NUMBER, "bounce")]


def test_user_stopped_marketing_is_an_unsubscribe(hooks, db_session, alice, wa):
    payload = whatsapp_payload(
        [
            whatsapp_status(
                WAMID,
                "failed",
                delivery_id=wa.delivery_id,
                errors=failed(131050, "User stopped marketing"),
            )
        ]
    )
    post_whatsapp(hooks, payload)
    assert suppressions_of(db_session) == [(alice["id"], "whatsapp", NUMBER, "unsubscribe")]


def test_a_passing_failure_does_not_suppress(hooks, db_session, wa):
    payload = whatsapp_payload(
        [
            whatsapp_status(
                WAMID,
                "failed",
                delivery_id=wa.delivery_id,
                errors=failed(131049, "Not delivered to maintain ecosystem"),
            )
        ]
    )
    post_whatsapp(hooks, payload)
    assert delivery(db_session, wa.delivery_id).failed_at is not None
    assert suppressions_of(db_session) == []


# -- inbound opt-outs ----------------------------------------------------------------------


def inbound(kind: str = "text", text: str = "STOP", sender: str = "14155550102") -> dict:
    message: dict = {"from": sender, "id": "wamid.in", "timestamp": "1732000000", "type": kind}
    if kind == "text":
        message["text"] = {"body": text}
    elif kind == "button":
        message["button"] = {"text": text, "payload": "stop"}
    return message


@pytest.mark.parametrize(
    ("kind", "text"), [("text", "STOP"), ("text", " unsubscribe "), ("button", "Stop promotions")]
)
def test_stop_suppresses_the_number_for_its_users(hooks, db_session, alice, bob, kind, text):
    insert_contact(db_session, alice["id"], whatsapp=NUMBER)
    insert_contact(db_session, bob["id"], phone=NUMBER)  # bob has it as an SMS number only

    body = post_whatsapp(hooks, whatsapp_payload(messages=[inbound(kind, text)])).get_json()

    assert body["suppressed"] == 1
    assert suppressions_of(db_session) == [(alice["id"], "whatsapp", NUMBER, "unsubscribe")]


def test_start_lifts_it_and_chatter_is_ignored(hooks, db_session, alice):
    insert_contact(db_session, alice["id"], whatsapp=NUMBER)
    post_whatsapp(hooks, whatsapp_payload(messages=[inbound(text="stop")]))
    chatter = post_whatsapp(hooks, whatsapp_payload(messages=[inbound(text="Where is my order?")]))
    assert chatter.get_json()["ignored"] == 1
    assert len(suppressions_of(db_session)) == 1

    body = post_whatsapp(hooks, whatsapp_payload(messages=[inbound(text="START")])).get_json()

    assert body["unsubscribed"] == 1
    assert suppressions_of(db_session) == []


def test_the_endpoints_are_documented(hooks):
    spec = hooks.get("/api/v1/openapi.json").get_json()
    operations = spec["paths"]["/webhooks/whatsapp"]
    assert set(operations) >= {"get", "post"}
    assert "text/plain" in operations["get"]["responses"]["200"]["content"]

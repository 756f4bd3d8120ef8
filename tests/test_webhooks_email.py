"""The email events webhook through real HTTP requests: Herald's JSON shape, RFC 3464
DSN bounces and ARF complaints posted raw, signatures, replays and suppression."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.dispatch_helpers import assert_counters_match
from tests.helpers import assert_error
from tests.tracking_helpers import (  # noqa: F401
    EMAIL_SECRET,
    channel_counts,
    delivery,
    events_of,
    hook_app_fixture,
    hooks_fixture,
    hub_signature,
    post_email,
    sent_delivery,
    suppressions_of,
    webhook_settings,
)

ANN = "ann@example.com"


def message_id(delivery_id: int, domain: str = "news.example.com") -> str:
    return f"<herald.d{delivery_id}@{domain}>"


@pytest.fixture
def mail(db_session, alice):
    return sent_delivery(db_session, alice["id"], "email")  # sent to Ann@Example.com


# -- the JSON shape ------------------------------------------------------------------------


def test_delivered_event_marks_the_delivery(hooks, db_session, mail):
    body = {"type": "delivered", "message_id": message_id(mail.delivery_id)}
    response = post_email(hooks, body)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["recorded"] == 1
    row = delivery(db_session, mail.delivery_id)
    assert row.delivered_at is not None and row.status == "sent"
    assert channel_counts(db_session, mail.channel_id)["delivered"] == 1
    assert_counters_match(db_session)


def test_a_hard_bounce_fails_the_delivery_and_suppresses_the_address(
    hooks, db_session, alice, mail
):
    body = {
        "events": [
            {
                "type": "bounce",
                "bounce_type": "hard",
                "message_id": message_id(mail.delivery_id),
                "status": "5.1.1",
                "diagnostic": "smtp; 550 5.1.1 <Ann@Example.com>: Recipient address rejected",
                "id": "evt-1",
                "timestamp": "2026-11-25T10:00:00+01:00",
            }
        ]
    }
    response = post_email(hooks, body)

    assert response.get_json()["suppressed"] == 1
    row = delivery(db_session, mail.delivery_id)
    assert row.failed_at is not None and row.status == "sent"
    # The address never lingers in the log: the diagnostic is scrubbed of it.
    assert row.last_error == (
        "hard bounce 5.1.1: smtp; 550 5.1.1 <<recipient>>: Recipient address rejected"
    )
    (event,) = events_of(db_session, mail.delivery_id)
    assert event.kind == "failed" and event.provider_event_id == "id:evt-1"
    assert "ann@" not in str(event.detail).lower()
    assert suppressions_of(db_session) == [(alice["id"], "email", ANN, "bounce")]
    assert channel_counts(db_session, mail.channel_id)["sent"] == 1


def test_a_complaint_suppresses_once(hooks, db_session, alice, mail):
    body = {"type": "complaint", "message_id": message_id(mail.delivery_id)}
    first = post_email(hooks, body).get_json()
    replay = post_email(hooks, body).get_json()

    assert (first["recorded"], first["suppressed"]) == (1, 1)
    assert (replay["duplicates"], replay["suppressed"]) == (1, 0)
    assert suppressions_of(db_session) == [(alice["id"], "email", ANN, "complaint")]
    assert [e.kind for e in events_of(db_session)] == ["complained"]


def soft(delivery_id: int, event_id: str | None = None) -> dict:
    event = {"type": "bounce", "bounce_type": "soft", "message_id": message_id(delivery_id)}
    if event_id:
        event["id"] = event_id
    return event


def test_soft_bounces_suppress_at_the_threshold(hooks, db_session, alice):
    sent = [sent_delivery(db_session, alice["id"], "email") for _ in range(3)]
    # A repeated soft bounce for one delivery counts once.
    post_email(hooks, soft(sent[0].delivery_id, "a"))
    post_email(hooks, soft(sent[0].delivery_id, "b"))
    post_email(hooks, soft(sent[1].delivery_id))
    assert suppressions_of(db_session) == []

    third = post_email(hooks, soft(sent[2].delivery_id)).get_json()

    assert third["suppressed"] == 1
    assert suppressions_of(db_session) == [(alice["id"], "email", ANN, "soft_bounce")]


def test_the_threshold_is_a_setting(settings, db_session, alice):
    from api import create_app
    from api.extensions import db

    app = create_app(replace(webhook_settings(settings), soft_bounce_threshold=1))
    try:
        mail = sent_delivery(db_session, alice["id"], "email")
        post_email(app.test_client(), soft(mail.delivery_id))
    finally:
        db.dispose(app)
        app.extensions["herald"].celery.close()
    assert suppressions_of(db_session) == [(alice["id"], "email", ANN, "soft_bounce")]


def test_a_delivery_in_between_restarts_the_count(hooks, db_session, alice):
    sent = [sent_delivery(db_session, alice["id"], "email") for _ in range(4)]
    post_email(hooks, soft(sent[0].delivery_id))
    post_email(hooks, soft(sent[1].delivery_id))
    post_email(hooks, {"type": "delivered", "message_id": message_id(sent[2].delivery_id)})
    post_email(hooks, soft(sent[3].delivery_id))
    assert suppressions_of(db_session) == []


def test_events_not_about_our_messages_are_ignored(hooks, db_session, alice, mail):
    sms = sent_delivery(db_session, alice["id"], "sms")
    body = {
        "events": [
            {"type": "delivered", "message_id": "<CAF=abc@mail.gmail.com>"},
            {"type": "delivered", "message_id": "<herald.test-0123abcd@news.example.com>"},
            {"type": "delivered", "message_id": message_id(987654321)},
            {"type": "delivered", "message_id": message_id(sms.delivery_id)},  # not an email
            {"type": "delivered", "message_id": message_id(mail.delivery_id)},
        ]
    }
    answer = post_email(hooks, body).get_json()
    assert (answer["received"], answer["recorded"], answer["ignored"]) == (5, 1, 4)
    assert delivery(db_session, sms.delivery_id).delivered_at is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"events": [{"type": "delivered"}]}, "events[0].message_id"),
        ({"events": [{"type": "opened", "message_id": "<x@y>"}]}, "events[0].type"),
        ({"events": [{"type": "bounce", "message_id": "<x@y>"}]}, "events[0].bounce_type"),
        (
            {"events": [{"type": "delivered", "message_id": "<x@y>", "bounce_type": "hard"}]},
            "events[0].bounce_type",
        ),
        (
            {"events": [{"type": "delivered", "message_id": "<x@y>", "timestamp": "yesterday"}]},
            "events[0].timestamp",
        ),
        (
            {"events": [{"type": "delivered", "message_id": "<x@y>", "colour": 1}]},
            "events[0].colour",
        ),
        ({"events": []}, "events"),
        ({"events": "all of them"}, "events"),
        ([], "body"),
        ({"type": "delivered", "message_id": 42}, "message_id"),
    ],
)
def test_a_malformed_event_is_422_naming_the_field(hooks, db_session, mail, body, field):
    assert_error(post_email(hooks, body), 422, "validation_error", field)
    assert events_of(db_session) == []


# -- signatures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signature", "status", "code"),
    [
        (None, 401, "signature_missing"),
        ("", 401, "signature_missing"),
        ("sha256=" + "f" * 64, 403, "signature_invalid"),
        (hub_signature(b"{}", EMAIL_SECRET), 403, "signature_invalid"),
        (hub_signature(b"x", "wrong").removeprefix("sha256="), 403, "signature_invalid"),
    ],
)
def test_bad_signatures_store_nothing(hooks, db_session, mail, signature, status, code):
    body = {"type": "complaint", "message_id": message_id(mail.delivery_id)}
    assert_error(post_email(hooks, body, signature=signature), status, code)
    assert events_of(db_session) == [] and suppressions_of(db_session) == []


def test_the_signature_may_come_without_its_prefix(hooks, db_session, mail):
    import json

    raw = json.dumps({"type": "delivered", "message_id": message_id(mail.delivery_id)}).encode()
    bare = hub_signature(raw, EMAIL_SECRET).removeprefix("sha256=")
    assert post_email(hooks, raw, signature=bare).status_code == 200


def test_without_a_secret_every_call_is_refused(client, db_session, mail):
    body = {"type": "complaint", "message_id": message_id(mail.delivery_id)}
    assert_error(post_email(client, body), 403, "webhook_not_configured")


def test_other_content_types_are_415(hooks, db_session, mail):
    assert_error(
        post_email(hooks, b"delivered", content_type="text/plain"), 415, "unsupported_media_type"
    )


# -- RFC 3464 delivery status notifications ------------------------------------------------


def dsn(
    delivery_id: int,
    *,
    action: str = "failed",
    status: str = "5.1.1",
    returned: str = "headers",
    original_message_id: bool = False,
    dsn_id: str = "<20261125100000.4F2A1@mx.example.net>",
) -> str:
    """A bounce as Postfix writes it: a human part, the delivery-status part, and the
    returned headers (text/rfc822-headers) or message (message/rfc822)."""
    original = (
        f"From: News <news@news.example.com>\r\nTo: Ann@Example.com\r\n"
        f"Subject: Spring sale\r\nMessage-ID: {message_id(delivery_id)}\r\n"
    )
    per_recipient = (
        "Final-Recipient: rfc822; Ann@Example.com\r\n"
        "Original-Recipient: rfc822;Ann@Example.com\r\n"
        f"Action: {action}\r\nStatus: {status}\r\n"
        f"Remote-MTA: dns; mx.example.com\r\n"
        f"Diagnostic-Code: smtp; 550 {status} <Ann@Example.com>: User unknown\r\n"
    )
    if original_message_id:
        per_recipient += f"Original-Message-ID: {message_id(delivery_id)}\r\n"
        original = original.replace(f"Message-ID: {message_id(delivery_id)}\r\n", "")
    if returned == "headers":
        third = f"Content-Type: text/rfc822-headers\r\n\r\n{original}"
    else:
        third = f"Content-Type: message/rfc822\r\n\r\n{original}\r\nHello Ann\r\n"
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        "To: bounces@news.example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: {dsn_id}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status;\r\n boundary="B0UND"\r\n'
        "\r\n"
        "--B0UND\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n"
        "\r\n--B0UND\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n"
        "Arrival-Date: Wed, 25 Nov 2026 10:00:00 +0000\r\n\r\n"
        f"{per_recipient}"
        f"\r\n--B0UND\r\n{third}"
        "\r\n--B0UND--\r\n"
    )


def post_dsn(client, text: str):
    return post_email(client, text.encode(), content_type="message/rfc822")


@pytest.mark.parametrize("returned", ["headers", "message"])
def test_a_permanent_dsn_is_a_hard_bounce(hooks, db_session, alice, mail, returned):
    answer = post_dsn(hooks, dsn(mail.delivery_id, returned=returned)).get_json()

    assert (answer["recorded"], answer["suppressed"]) == (1, 1)
    row = delivery(db_session, mail.delivery_id)
    assert row.failed_at is not None
    assert row.last_error.startswith("hard bounce 5.1.1: smtp; 550 5.1.1 <<recipient>>")
    assert suppressions_of(db_session) == [(alice["id"], "email", ANN, "bounce")]
    (event,) = events_of(db_session, mail.delivery_id)
    assert event.detail["bounce"] == "hard" and event.detail["status"] == "5.1.1"


def test_original_message_id_names_the_delivery_too(hooks, db_session, mail):
    post_dsn(hooks, dsn(mail.delivery_id, original_message_id=True))
    assert delivery(db_session, mail.delivery_id).failed_at is not None


def test_a_transient_failure_dsn_is_a_soft_bounce(hooks, db_session, mail):
    answer = post_dsn(hooks, dsn(mail.delivery_id, status="4.2.2")).get_json()
    assert (answer["recorded"], answer["suppressed"]) == (1, 0)
    (event,) = events_of(db_session, mail.delivery_id)
    assert event.detail["bounce"] == "soft"
    assert suppressions_of(db_session) == []


def test_a_delayed_dsn_records_nothing(hooks, db_session, mail):
    answer = post_dsn(hooks, dsn(mail.delivery_id, action="delayed", status="4.4.1")).get_json()
    assert answer["recorded"] == 0
    assert delivery(db_session, mail.delivery_id).failed_at is None


def test_a_success_dsn_is_delivered(hooks, db_session, mail):
    post_dsn(hooks, dsn(mail.delivery_id, action="delivered", status="2.0.0"))
    row = delivery(db_session, mail.delivery_id)
    assert row.delivered_at is not None and row.failed_at is None


def test_the_same_dsn_posted_twice_is_one_event(hooks, db_session, mail):
    text = dsn(mail.delivery_id)
    post_dsn(hooks, text)
    again = post_dsn(hooks, text).get_json()
    assert again["duplicates"] == 1
    assert len(events_of(db_session, mail.delivery_id)) == 1


def test_a_dsn_posted_as_its_own_multipart_report(hooks, db_session, mail):
    text = dsn(mail.delivery_id)
    body = text.split("\r\n\r\n", 1)[1]  # the MIME body, headers stripped
    response = post_email(
        hooks,
        body.encode(),
        content_type='multipart/report; report-type=delivery-status; boundary="B0UND"',
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["recorded"] == 1


def test_mail_that_is_not_a_report_is_acknowledged_and_ignored(hooks, db_session, mail):
    auto_reply = (
        "From: ann@example.com\r\nSubject: Out of office\r\n"
        f"In-Reply-To: {message_id(mail.delivery_id)}\r\n\r\nBack on Monday.\r\n"
    )
    answer = post_dsn(hooks, auto_reply).get_json()
    assert answer["received"] == 0
    assert events_of(db_session) == []


def test_garbage_posted_as_a_message_is_harmless(hooks, db_session, mail):
    for junk in (b"\x00\xff\xfe" * 100, b"Content-Type: multipart/report\r\n\r\n--", b""):
        assert post_email(hooks, junk, content_type="message/rfc822").status_code == 200
    assert events_of(db_session) == []


# -- RFC 5965 complaints -------------------------------------------------------------------


def arf(delivery_id: int) -> str:
    return (
        "From: fbl@isp.example\r\nTo: abuse@news.example.com\r\n"
        "Subject: FW: Spring sale\r\nMessage-ID: <fbl-1@isp.example>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="ARF"\r\n\r\n'
        "--ARF\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n"
        "\r\n--ARF\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nUser-Agent: SomeGenerator/1.0\r\nVersion: 1\r\n"
        "\r\n--ARF\r\nContent-Type: message/rfc822\r\n\r\n"
        f"From: news@news.example.com\r\nTo: ann@example.com\r\n"
        f"Message-ID: {message_id(delivery_id)}\r\nSubject: Spring sale\r\n\r\nHello\r\n"
        "\r\n--ARF--\r\n"
    )


def test_an_arf_complaint_suppresses_the_address(hooks, db_session, alice, mail):
    answer = post_dsn(hooks, arf(mail.delivery_id)).get_json()
    assert (answer["recorded"], answer["suppressed"]) == (1, 1)
    (event,) = events_of(db_session, mail.delivery_id)
    assert (event.kind, event.detail) == ("complained", {"feedback_type": "abuse"})
    assert suppressions_of(db_session) == [(alice["id"], "email", ANN, "complaint")]


def test_the_endpoint_is_documented(hooks):
    operation = hooks.get("/api/v1/openapi.json").get_json()["paths"]["/webhooks/email"]["post"]
    assert set(operation["requestBody"]["content"]) == {
        "application/json",
        "message/rfc822",
        "multipart/report",
    }

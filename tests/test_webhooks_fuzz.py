"""Correctly signed but otherwise arbitrary webhook calls never cause a server error.

tests/test_fuzz.py runs schemathesis over the OpenAPI document, but it cannot sign,
so there every webhook stops at 401/403. Here hypothesis builds payloads shaped like
each provider's (with wrong types, odd strings, NULs, unknown ids, ids of real
deliveries on the wrong channel) and signs them as the provider would, so the parsing
and recording behind the signature check are what gets exercised.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dispatch_helpers import assert_counters_match
from tests.tracking_helpers import (  # noqa: F401
    hook_app_fixture,
    hooks_fixture,
    post_email,
    post_twilio,
    post_whatsapp,
    sent_delivery,
    whatsapp_payload,
)

EXAMPLES = 150
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=12,
)


def answered_well(response, *, allowed=("application/json",)) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    assert response.mimetype in allowed, (response.status_code, response.mimetype)


def test_signed_whatsapp_payloads(hooks, db_session, alice):
    wa = sent_delivery(db_session, alice["id"], "whatsapp", provider_message_id="wamid.F")
    email = sent_delivery(db_session, alice["id"], "email")
    keys = st.sampled_from([f"d{wa.delivery_id}", f"d{email.delivery_id}", "d0", "d" + "9" * 25])
    statuses = st.fixed_dictionaries(
        {},
        optional={
            "id": st.just("wamid.F") | text | json_values,
            "status": st.sampled_from(["sent", "delivered", "read", "failed"]) | json_values,
            "timestamp": st.integers() | text | json_values,
            "biz_opaque_callback_data": keys | json_values,
            "errors": st.lists(
                st.fixed_dictionaries(
                    {}, optional={"code": st.integers() | json_values, "title": json_values}
                ),
                max_size=2,
            )
            | json_values,
        },
    )
    messages = st.fixed_dictionaries(
        {},
        optional={
            "from": st.sampled_from(["14155550102", "1", ""]) | text,
            "type": st.sampled_from(["text", "button", "interactive", "image"]) | json_values,
            "text": st.fixed_dictionaries({}, optional={"body": st.just("STOP") | json_values}),
            "button": json_values,
            "interactive": json_values,
        },
    )
    payloads = (
        st.builds(
            lambda s, m: whatsapp_payload(s, m),
            st.lists(statuses | json_values, max_size=4),
            st.lists(messages | json_values, max_size=3),
        )
        | json_values
    )

    @given(payload=payloads)
    @FUZZ
    def never_a_server_error(payload):
        answered_well(post_whatsapp(hooks, json.dumps(payload).encode()))

    never_a_server_error()
    assert_counters_match(db_session)


def test_signed_twilio_forms(hooks, db_session, alice):
    sent_delivery(db_session, alice["id"], "sms", provider_message_id="SM" + "f" * 32)
    forms = st.fixed_dictionaries(
        {},
        optional={
            "MessageSid": st.just("SM" + "f" * 32) | text,
            "MessageStatus": st.sampled_from(["delivered", "undelivered", "failed", "sent"]) | text,
            "ErrorCode": st.sampled_from(["21211", "30003", "-1", "9" * 30]) | text,
            "From": st.sampled_from(["+14155550101", "whatsapp:+14155550101", "HERALD"]) | text,
            "Body": st.sampled_from(["STOP", "start"]) | text,
            "OptOutType": st.sampled_from(["STOP", "START", "HELP"]) | text,
        },
    )

    @given(
        form=forms, path=st.sampled_from(["/webhooks/twilio/status", "/webhooks/twilio/inbound"])
    )
    @FUZZ
    def never_a_server_error(form, path):
        answered_well(post_twilio(hooks, path, form), allowed=("application/json", "text/xml"))

    never_a_server_error()
    assert_counters_match(db_session)


def test_signed_email_events_and_reports(hooks, db_session, alice):
    mail = sent_delivery(db_session, alice["id"], "email")
    ids = st.sampled_from(
        [f"<herald.d{mail.delivery_id}@news.example.com>", "<herald.d0@x>", "<a@b>"]
    )
    events = st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["delivered", "bounce", "complaint"]) | json_values,
            "message_id": ids | json_values,
            "bounce_type": st.sampled_from(["hard", "soft"]) | json_values,
            "id": text | json_values,
            "timestamp": st.sampled_from(["2026-11-25T10:00:00Z", "1764064800"]) | json_values,
            "status": st.sampled_from(["5.1.1", "4.2.2", "9.9.9"]) | json_values,
            "diagnostic": json_values,
        },
    )
    bodies = events | st.fixed_dictionaries({"events": st.lists(events, max_size=4)}) | json_values
    reports = st.binary(max_size=400) | st.builds(
        lambda parts: "\r\n".join(parts).encode(),
        st.lists(
            st.sampled_from(
                [
                    "Content-Type: multipart/report; report-type=delivery-status; boundary=B",
                    "--B",
                    "Content-Type: message/delivery-status",
                    "Content-Type: text/rfc822-headers",
                    "Action: failed",
                    "Status: 5.1.1",
                    f"Message-ID: <herald.d{mail.delivery_id}@news.example.com>",
                    "--B--",
                    "",
                ]
            ),
            max_size=20,
        ),
    )

    @given(body=bodies)
    @FUZZ
    def json_never_fails(body):
        answered_well(post_email(hooks, json.dumps(body).encode()))

    @given(raw=reports, content_type=st.sampled_from(["message/rfc822", "multipart/report"]))
    @FUZZ
    def reports_never_fail(raw, content_type):
        if content_type == "multipart/report":
            content_type += "; boundary=B"
        answered_well(post_email(hooks, raw, content_type=content_type))

    json_never_fails()
    reports_never_fail()
    assert_counters_match(db_session)


def test_push_bodies(hooks, db_session):
    @given(body=json_values | st.fixed_dictionaries({"token": json_values}))
    @FUZZ
    def never_a_server_error(body):
        answered_well(
            hooks.post("/webhooks/push", data=json.dumps(body), content_type="application/json")
        )

    never_a_server_error()

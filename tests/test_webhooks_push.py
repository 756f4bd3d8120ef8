"""POST /webhooks/push: the app posts back the signed per-delivery token its push carried;
the token is the only proof, and it can mark only its own delivery delivered."""

from __future__ import annotations

import pytest

from engine.tracking.tokens import push_data, push_token
from engine.unsubscribe import unsubscribe_token
from tests.dispatch_helpers import assert_counters_match
from tests.helpers import assert_error
from tests.tracking_helpers import (  # noqa: F401
    PUBLIC,
    channel_counts,
    delivery,
    events_of,
    hook_app_fixture,
    hooks_fixture,
    sent_delivery,
    webhook_settings,
)

PUSH = "/webhooks/push"


@pytest.fixture
def push(db_session, alice):
    return sent_delivery(db_session, alice["id"], "push")


@pytest.fixture
def hook_settings(settings):
    return webhook_settings(settings)


def test_the_token_marks_its_delivery_delivered_once(hooks, hook_settings, db_session, push):
    token = push_token(hook_settings, push.delivery_id)

    first = hooks.post(PUSH, json={"token": token})
    again = hooks.post(PUSH, json={"token": token})

    assert first.status_code == 200, first.get_data(as_text=True)
    assert first.get_json()["recorded"] == 1 and again.get_json()["duplicates"] == 1
    assert delivery(db_session, push.delivery_id).delivered_at is not None
    assert channel_counts(db_session, push.channel_id)["delivered"] == 1
    (event,) = events_of(db_session, push.delivery_id)
    assert (event.kind, event.source) == ("delivered", "push")
    assert_counters_match(db_session)


def test_what_the_push_data_carries(hook_settings):
    data = push_data(hook_settings, 42)
    assert data == {
        "herald_token": push_token(hook_settings, 42),
        "herald_delivered_url": f"{PUBLIC}/webhooks/push",
    }
    assert all(isinstance(v, str) for v in data.values())  # FCM data is strings only


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"json": {}},
        {"json": {"token": ""}},
        {"json": {"token": 12345}},
        {"json": ["token"]},
        {"data": "token=abc", "content_type": "application/x-www-form-urlencoded"},
    ],
)
def test_no_token_is_401(hooks, db_session, push, kwargs):
    assert_error(hooks.post(PUSH, **kwargs), 401, "token_missing")
    assert events_of(db_session) == []


def test_forged_and_foreign_tokens_are_403(hooks, hook_settings, settings, db_session, push):
    genuine = push_token(hook_settings, push.delivery_id)
    payload, signature = genuine.rsplit(".", 1)
    other = push_token(hook_settings, push.delivery_id + 1).rsplit(".", 1)[0]
    for token in (
        "not-a-token",
        f"{other}.{signature}",  # another delivery's payload under this signature
        f"{payload}.{signature[:-2]}xx",
        unsubscribe_token(hook_settings, push.delivery_id),  # same id, other purpose
        "x" * 600,
        "MQ.\x00",
    ):
        assert_error(hooks.post(PUSH, json={"token": token}), 403, "token_invalid")
    assert events_of(db_session) == []
    assert delivery(db_session, push.delivery_id).delivered_at is None


def test_a_token_signed_with_another_secret_key_is_403(hooks, hook_settings, db_session, push):
    from dataclasses import replace

    elsewhere = replace(hook_settings, secret_key="another-deployment-secret-key-0123456789")
    token = push_token(elsewhere, push.delivery_id)
    assert_error(hooks.post(PUSH, json={"token": token}), 403, "token_invalid")


def test_a_valid_token_for_no_push_delivery_is_acknowledged_and_ignored(
    hooks, hook_settings, db_session, alice
):
    email = sent_delivery(db_session, alice["id"], "email")
    for delivery_id in (email.delivery_id, 987654321):
        answer = hooks.post(PUSH, json={"token": push_token(hook_settings, delivery_id)})
        assert answer.status_code == 200 and answer.get_json()["ignored"] == 1
    assert delivery(db_session, email.delivery_id).delivered_at is None


def test_the_endpoint_is_public_and_documented(hooks):
    operation = hooks.get("/api/v1/openapi.json").get_json()["paths"][PUSH]["post"]
    assert "security" not in operation
    assert operation["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "token"
    ]

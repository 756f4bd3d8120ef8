"""The FCM push channel against a loopback FCM HTTP v1 API and OAuth2 token endpoint."""

from __future__ import annotations

import json
import time

import jwt
import pytest

from engine.channels import OutboundMessage, channel_for
from engine.channels.fcm import SCOPE
from tests.providers.fixtures import (  # noqa: F401
    FAST_TIMEOUTS,
    STALL,
    channel_settings_fixture,
    fcm_credentials_fixture,
    fcm_sink_fixture,
)
from tests.providers.http_sinks import FcmSink


def push(delivery_id: int = 30, tokens=("phone-1",), **content) -> OutboundMessage:
    content = {"title": "Sale", "body": "20% off today", **content}
    return OutboundMessage(delivery_id, f"d{delivery_id}", "", content, push_tokens=list(tokens))


@pytest.fixture
def channel(fcm_sink, fcm_credentials, channel_settings):
    settings = fcm_sink.settings(channel_settings, fcm_credentials)
    channel = channel_for("push", settings, **FAST_TIMEOUTS)
    yield channel
    channel.close()


def test_signs_in_at_the_service_accounts_token_uri_and_sends(channel, fcm_sink):
    result = channel.send(
        push(
            image_url="https://cdn.shop.test/sale.png",
            url="https://shop.test/sale",
            data={"campaign": "spring", "t": "trk-30"},
        )
    )

    assert (result.outcome, result.error) == ("sent", None)
    (grant,) = fcm_sink.received("token")
    assert grant.path == "/token"  # the token_uri in the file, not Google's
    assert grant.form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assertion = grant.form["assertion"]
    assert jwt.get_unverified_header(assertion)["alg"] == "RS256"
    assert jwt.get_unverified_header(assertion)["kid"] == "test-key-1"
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert claims["iss"] == fcm_sink.client_email
    assert claims["aud"] == fcm_sink.token_uri
    assert claims["scope"] == SCOPE
    assert claims["exp"] - claims["iat"] == 3600
    (send,) = fcm_sink.wait_for(1)
    assert send.path == "/v1/projects/herald-test/messages:send"
    assert send.bearer in fcm_sink.issued_tokens
    assert send.json == {
        "message": {
            "token": "phone-1",
            "notification": {
                "title": "Sale",
                "body": "20% off today",
                "image": "https://cdn.shop.test/sale.png",
            },
            "data": {"campaign": "spring", "t": "trk-30", "url": "https://shop.test/sale"},
        }
    }
    assert result.provider_message_id.startswith("projects/herald-test/messages/")


def test_the_access_token_is_fetched_once_and_reused(channel, fcm_sink):
    results = channel.send_many([push(delivery_id=i) for i in (1, 2, 3)])
    assert [r.outcome for r in results] == ["sent"] * 3
    assert len(fcm_sink.received("token")) == 1
    sends = fcm_sink.wait_for(3)
    assert len({s.bearer for s in sends}) == 1
    assert len({s.peer_port for s in sends}) == 1  # and one kept-alive connection


def test_an_expiring_token_is_refreshed_before_use(channel_settings, tmp_path):
    with FcmSink(token_lifetime=0) as short_lived:
        settings = short_lived.settings(channel_settings, short_lived.write_credentials(tmp_path))
        with channel_for("push", settings, **FAST_TIMEOUTS) as channel:
            assert [channel.send(push(delivery_id=i)).outcome for i in (1, 2)] == ["sent"] * 2
        assert len(short_lived.received("token")) == 2


def test_one_call_per_device_token(channel, fcm_sink):
    result = channel.send(push(tokens=["phone-1", "tablet-2", "phone-1", "laptop-3"]))

    sends = fcm_sink.wait_for(3)
    assert [s.json["message"]["token"] for s in sends] == ["phone-1", "tablet-2", "laptop-3"]
    assert result.is_sent
    assert result.provider_message_id == sends[0].response["name"]


def test_sent_when_any_device_accepted_and_dead_tokens_are_reported(channel, fcm_sink):
    fcm_sink.unregister("old-phone")
    fcm_sink.invalid_token("garbage")

    result = channel.send(push(tokens=["old-phone", "new-phone", "garbage"]))

    assert result.outcome == "sent"
    assert result.invalid_push_tokens == ("old-phone", "garbage")
    (accepted,) = fcm_sink.accepted()
    assert accepted.json["message"]["token"] == "new-phone"
    assert result.provider_message_id == accepted.response["name"]
    assert len(fcm_sink.received()) == 3


def test_all_tokens_dead_is_permanent(channel, fcm_sink):
    fcm_sink.unregister("old-phone")
    fcm_sink.invalid_token("garbage")

    result = channel.send(push(tokens=["old-phone", "garbage"]))

    assert result.outcome == "permanent"
    assert result.invalid_push_tokens == ("old-phone", "garbage")
    assert "UNREGISTERED" in result.error and "INVALID_ARGUMENT" in result.error
    assert result.error.startswith("no push token accepted (2 tried)")


def test_a_token_of_another_project_fails_alone_and_is_kept(channel, fcm_sink):
    fcm_sink.fail(403, code="SENDER_ID_MISMATCH", match="foreign", times=None)
    result = channel.send(push(tokens=["foreign", "phone-1"]))
    assert result.is_sent
    assert result.invalid_push_tokens == ()
    assert [s.status for s in fcm_sink.received()] == [403, 200]


def test_a_bad_payload_does_not_condemn_the_token(channel, fcm_sink):
    fcm_sink.fail(400, code="INVALID_ARGUMENT", message="Invalid JSON payload")
    result = channel.send(push())
    assert result.outcome == "permanent"
    assert result.invalid_push_tokens == ()


def test_a_contact_without_tokens_is_permanent_without_a_call(channel, fcm_sink):
    result = channel.send(push(tokens=[]))
    assert (result.outcome, result.error) == ("permanent", "the contact has no push tokens")
    assert fcm_sink.requests == []


def test_a_401_refreshes_the_access_token_once(channel, fcm_sink):
    assert channel.send(push(delivery_id=1)).is_sent
    fcm_sink.revoke_tokens()

    result = channel.send(push(delivery_id=2))

    assert result.is_sent
    assert len(fcm_sink.received("token")) == 2
    assert [s.status for s in fcm_sink.received()] == [200, 401, 200]


def test_quota_exceeded_is_transient_with_retry_after(channel, fcm_sink):
    fcm_sink.fail(429, retry_after=12)
    result = channel.send(push())
    assert (result.outcome, result.retry_after) == ("transient", 12.0)
    assert "QUOTA_EXCEEDED" in result.error


def test_unavailable_stops_before_the_other_tokens(channel, fcm_sink):
    fcm_sink.fail(503)
    result = channel.send(push(tokens=["phone-1", "tablet-2"]))
    assert result.outcome == "transient"
    assert "503 UNAVAILABLE" in result.error
    # Nothing was accepted, so the retry can try both tokens without a duplicate.
    assert [s.json["message"]["token"] for s in fcm_sink.received()] == ["phone-1"]


def test_a_failure_after_an_acceptance_still_counts_as_sent(channel, fcm_sink):
    fcm_sink.fail(500, match="tablet-2")
    result = channel.send(push(tokens=["phone-1", "tablet-2", "laptop-3"]))
    assert result.is_sent
    assert [s.json["message"]["token"] for s in fcm_sink.accepted()] == ["phone-1", "laptop-3"]


def test_timeout_is_transient(channel, fcm_sink):
    channel.send(push(delivery_id=1))  # sign in first, so the stall hits the send
    fcm_sink.stall(STALL)
    started = time.monotonic()
    result = channel.send(push(delivery_id=2))
    assert time.monotonic() - started < STALL
    assert result.outcome == "transient"
    assert result.error.startswith("fcm timed out")


def test_rejected_service_account_is_permanent(fcm_sink, channel_settings, tmp_path):
    credentials = fcm_sink.write_credentials(tmp_path)
    account = json.loads(credentials.read_text())
    account["client_email"] = "intruder@elsewhere.iam.gserviceaccount.com"
    credentials.write_text(json.dumps(account))
    settings = fcm_sink.settings(channel_settings, credentials)
    with channel_for("push", settings, **FAST_TIMEOUTS) as channel:
        result = channel.send(push(tokens=["phone-1", "tablet-2"]))
    assert result.outcome == "permanent"
    assert result.error.startswith("no push token accepted (2 tried): fcm credentials rejected")
    assert "invalid_grant" in result.error
    assert fcm_sink.received() == []  # stopped at the first refusal


def test_token_endpoint_outage_is_transient(channel, fcm_sink):
    fcm_sink.fail(503, on="token")
    result = channel.send(push())
    assert result.outcome == "transient"
    assert result.error == "fcm OAuth token refused: 503"
    assert fcm_sink.received() == []


def test_missing_credentials_file_raises(channel_settings, tmp_path):
    from dataclasses import replace

    settings = replace(
        channel_settings, push_provider="fcm", fcm_credentials_file=str(tmp_path / "none.json")
    )
    with pytest.raises(ValueError, match="unreadable"):
        channel_for("push", settings)

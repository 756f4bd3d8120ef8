"""The Twilio SMS channel against a loopback server speaking the Messages API."""

from __future__ import annotations

import base64
import time
from email.utils import formatdate

import pytest

from engine.channels import OutboundMessage, channel_for
from tests.providers.fixtures import (  # noqa: F401
    FAST_TIMEOUTS,
    STALL,
    channel_settings_fixture,
    twilio_sink_fixture,
)

ADA = "+14155550101"


def sms(delivery_id: int = 12, to: str = ADA, **content) -> OutboundMessage:
    return OutboundMessage(delivery_id, f"d{delivery_id}", to, {"body": "Sale today", **content})


@pytest.fixture
def channel(twilio_sink, channel_settings):
    channel = channel_for("sms", twilio_sink.settings(channel_settings), **FAST_TIMEOUTS)
    yield channel
    channel.close()


def test_sends_the_message_form_with_basic_auth_and_idempotency_token(channel, twilio_sink):
    result = channel.send(sms(body="Hi Ada, 20% off today"))

    (request,) = twilio_sink.wait_for(1)
    assert (result.outcome, result.error) == ("sent", None)
    assert result.provider_message_id.startswith("SM") and len(result.provider_message_id) == 34
    assert request.method == "POST"
    assert request.path == f"/2010-04-01/Accounts/{twilio_sink.account_sid}/Messages.json"
    assert request.basic_auth == (twilio_sink.account_sid, twilio_sink.auth_token)
    assert request.header("I-Twilio-Idempotency-Token") == "d12"
    assert request.form == {
        "To": ADA,
        "From": "+15005550006",
        "Body": "Hi Ada, 20% off today",
        "StatusCallback": "http://herald.test/webhooks/twilio/status",
    }


def test_a_resend_carries_the_same_idempotency_token(channel, twilio_sink):
    assert channel.send(sms(delivery_id=5)).is_sent
    assert channel.send(sms(delivery_id=5)).is_sent
    tokens = [r.header("I-Twilio-Idempotency-Token") for r in twilio_sink.wait_for(2)]
    assert tokens == ["d5", "d5"]


def test_messaging_service_sid_replaces_from(twilio_sink, channel_settings):
    settings = twilio_sink.settings(channel_settings, twilio_from="MG" + "a" * 32)
    with channel_for("sms", settings, **FAST_TIMEOUTS) as channel:
        assert channel.send(sms(delivery_id=1)).is_sent
        assert channel.send(sms(delivery_id=2, sender="HERALD")).is_sent
    pooled, branded = twilio_sink.wait_for(2)
    assert pooled.form["MessagingServiceSid"] == "MG" + "a" * 32
    assert "From" not in pooled.form
    assert (branded.form["From"], branded.form["MessagingServiceSid"]) == (
        "HERALD",
        "MG" + "a" * 32,
    )


def test_consecutive_sends_reuse_one_connection(channel, twilio_sink):
    results = channel.send_many([sms(delivery_id=i) for i in (1, 2, 3)])
    assert [r.outcome for r in results] == ["sent"] * 3
    assert len({r.provider_message_id for r in results}) == 3
    assert len({r.peer_port for r in twilio_sink.wait_for(3)}) == 1


def test_server_error_is_transient(channel, twilio_sink):
    twilio_sink.fail(500)
    failed = channel.send(sms(delivery_id=1))
    assert (failed.outcome, failed.retry_after) == ("transient", None)
    assert failed.error == "twilio 500 20500: Internal Server Error"
    assert channel.send(sms(delivery_id=1)).is_sent


def test_429_is_transient_with_retry_after(channel, twilio_sink):
    twilio_sink.fail(429, retry_after=7)
    result = channel.send(sms())
    assert (result.outcome, result.retry_after) == ("transient", 7.0)
    assert "20429" in result.error


def test_retry_after_as_an_http_date(channel, twilio_sink):
    twilio_sink.fail(503, retry_after=formatdate(time.time() + 30, usegmt=True))
    result = channel.send(sms())
    assert result.outcome == "transient"
    assert 27 <= result.retry_after <= 30


def test_timeout_is_transient(channel, twilio_sink):
    twilio_sink.stall(STALL)
    started = time.monotonic()
    result = channel.send(sms())
    assert time.monotonic() - started < STALL
    assert result.outcome == "transient"
    assert result.error.startswith("twilio timed out")


def test_dropped_connection_is_transient(channel, twilio_sink):
    twilio_sink.drop()
    result = channel.send(sms(delivery_id=1))
    assert result.outcome == "transient"
    assert result.error.startswith("twilio")
    assert channel.send(sms(delivery_id=2)).is_sent


def test_a_connection_the_server_closed_while_idle_is_replaced_before_the_next_send(
    channel, twilio_sink
):
    twilio_sink.close_after_answer()
    assert channel.send(sms(delivery_id=1)).is_sent
    twilio_sink.wait_closed(1)  # its keep-alive timeout ran out between two sends
    assert channel.send(sms(delivery_id=2)).is_sent  # on a new connection, first time
    first, second = twilio_sink.wait_for(2)
    assert first.peer_port != second.peer_port
    assert len(twilio_sink.received()) == 2  # nothing was lost on the closed one


def test_the_request_is_out_before_its_answer_is_read(channel, twilio_sink):
    """begin writes the request and returns; the dispatcher works (renders the next
    message) while Twilio answers, then reads the answer."""
    answer = channel.begin(sms(delivery_id=3))
    (request,) = twilio_sink.wait_for(1)  # Twilio has it; we have not read a byte back
    assert request.header("I-Twilio-Idempotency-Token") == "d3"
    result = answer()
    assert result.is_sent
    assert result.provider_message_id == request.response["sid"]


def test_the_request_is_built_ahead_so_the_call_is_one_write(channel, twilio_sink):
    """prepare (run while the previous call is out) makes the request's bytes; begin
    writes exactly those."""
    prepared = channel.prepare(sms(delivery_id=4, body="Hi Ada"))
    head, _, body = prepared.wire.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /2010-04-01/Accounts/")
    assert b"\r\nI-Twilio-Idempotency-Token: d4" in head
    assert f"Content-Length: {len(body)}".encode() in head
    result = channel.begin(prepared)()
    (request,) = twilio_sink.wait_for(1)
    assert result.is_sent
    assert request.form["Body"] == "Hi Ada"
    assert request.basic_auth == (twilio_sink.account_sid, twilio_sink.auth_token)
    assert request.header("Host") == f"127.0.0.1:{twilio_sink.port}"


def test_a_space_in_the_request_target_is_refused_not_sent(twilio_sink, channel_settings):
    # (urlsplit drops CR and LF from the configured URL; what is left must not split
    # the request line either)
    settings = twilio_sink.settings(channel_settings, twilio_account_sid="AC1\r\nX-Evil: 1")
    with channel_for("sms", settings, **FAST_TIMEOUTS) as channel:
        assert channel.prepare(sms()).wire is None  # begin says why
        result = channel.send(sms())
    assert result.outcome == "permanent"
    assert result.error.startswith("could not build the request: a space or control")
    assert twilio_sink.received() == []


@pytest.fixture
def connect_proxy():
    from tests.providers.connect_proxy import ConnectProxy

    proxy = ConnectProxy().start()
    yield proxy
    proxy.stop()


def test_http_proxy_from_the_environment_tunnels_the_calls(
    twilio_sink, channel_settings, connect_proxy, monkeypatch
):
    """As with httpx before: ops behind an egress proxy set HTTPS_PROXY (HTTP_PROXY for
    this loopback http:// API), with credentials if the proxy wants them."""
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://ops:s%3Acret@127.0.0.1:{connect_proxy.port}")
    with channel_for("sms", twilio_sink.settings(channel_settings), **FAST_TIMEOUTS) as channel:
        assert channel.send(sms(delivery_id=1)).is_sent
        assert channel.send(sms(delivery_id=2)).is_sent

    (tunnel,) = connect_proxy.tunnels  # one kept-alive tunnel for both
    assert tunnel.target == f"127.0.0.1:{twilio_sink.port}"
    assert tunnel.proxy_authorization == "Basic " + base64.b64encode(b"ops:s:cret").decode()
    assert [r.header("I-Twilio-Idempotency-Token") for r in twilio_sink.wait_for(2)] == [
        "d1",
        "d2",
    ]


def test_no_proxy_names_the_hosts_reached_directly(
    twilio_sink, channel_settings, connect_proxy, monkeypatch
):
    monkeypatch.setenv("HTTP_PROXY", connect_proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with channel_for("sms", twilio_sink.settings(channel_settings), **FAST_TIMEOUTS) as channel:
        assert channel.send(sms()).is_sent
    assert connect_proxy.tunnels == []


def test_unreachable_api_is_transient(twilio_sink, channel_settings):
    settings = twilio_sink.settings(channel_settings)
    twilio_sink.stop()
    with channel_for("sms", settings, **FAST_TIMEOUTS) as channel:
        result = channel.send(sms())
    assert result.outcome == "transient"
    assert result.error.startswith("twilio connection failed")


@pytest.mark.parametrize("code", [21211, 21610, 21614])
def test_refused_number_is_permanent_for_that_number_only(channel, twilio_sink, code):
    twilio_sink.reject_number("+15555550000", code)

    results = channel.send_many([sms(1, to="+15555550000"), sms(2), sms(3, to="+15555550000")])

    assert [r.outcome for r in results] == ["permanent", "sent", "permanent"]
    assert results[0].error.startswith(f"twilio 400 {code}: ")
    assert [r.form["To"] for r in twilio_sink.accepted()] == [ADA]


def test_wrong_credentials_are_permanent(twilio_sink, channel_settings):
    settings = twilio_sink.settings(channel_settings, twilio_auth_token="not-the-token")
    with channel_for("sms", settings, **FAST_TIMEOUTS) as channel:
        result = channel.send(sms())
    assert result.outcome == "permanent"
    assert result.error == "twilio credentials rejected (twilio 401 20003: Authenticate)"
    assert twilio_sink.accepted() == []


def test_missing_account_configuration_raises(channel_settings):
    from dataclasses import replace

    settings = replace(channel_settings, sms_provider="twilio", twilio_account_sid="")
    with pytest.raises(ValueError, match="TWILIO_ACCOUNT_SID"):
        channel_for("sms", settings)

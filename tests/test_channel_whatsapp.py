"""The WhatsApp channel against a loopback server speaking Meta's Cloud API."""

from __future__ import annotations

import time

import pytest

from engine.channels import OutboundMessage, channel_for
from tests.providers.fixtures import (  # noqa: F401
    FAST_TIMEOUTS,
    STALL,
    channel_settings_fixture,
    whatsapp_sink_fixture,
)

ADA = "+447700900123"


def template_message(delivery_id: int = 50, to: str = ADA, parameters=("Ada", "20%")):
    template = {"name": "spring_sale", "language": "en_GB", "parameters": list(parameters)}
    return OutboundMessage(delivery_id, f"d{delivery_id}", to, {"template": template})


@pytest.fixture
def channel(whatsapp_sink, channel_settings):
    channel = channel_for("whatsapp", whatsapp_sink.settings(channel_settings), **FAST_TIMEOUTS)
    yield channel
    channel.close()


def test_sends_a_template_message(channel, whatsapp_sink):
    result = channel.send(template_message())

    (request,) = whatsapp_sink.wait_for(1)
    assert (result.outcome, result.error) == ("sent", None)
    assert result.provider_message_id == request.response["messages"][0]["id"]
    assert result.provider_message_id.startswith("wamid.")
    assert request.path == "/v21.0/106540352242922/messages"
    assert request.bearer == whatsapp_sink.access_token
    assert request.json == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": ADA,
        "biz_opaque_callback_data": "d50",
        "type": "template",
        "template": {
            "name": "spring_sale",
            "language": {"code": "en_GB"},
            "components": [
                {
                    "type": "body",
                    "parameters": [
                        {"type": "text", "text": "Ada"},
                        {"type": "text", "text": "20%"},
                    ],
                }
            ],
        },
    }


def test_a_template_without_parameters_has_no_components(channel, whatsapp_sink):
    assert channel.send(template_message(parameters=())).is_sent
    (request,) = whatsapp_sink.wait_for(1)
    assert request.json["template"] == {"name": "spring_sale", "language": {"code": "en_GB"}}


def test_sends_a_text_message(channel, whatsapp_sink):
    result = channel.send(OutboundMessage(51, "d51", ADA, {"body": "Thanks for writing!"}))
    (request,) = whatsapp_sink.wait_for(1)
    assert result.is_sent
    assert request.json["type"] == "text"
    assert request.json["text"] == {"body": "Thanks for writing!"}
    assert "template" not in request.json


def test_server_error_is_transient(channel, whatsapp_sink):
    whatsapp_sink.fail(500)
    result = channel.send(template_message())
    assert result.outcome == "transient"
    assert result.error == "whatsapp 500 131000: Something went wrong"


def test_throughput_limit_is_transient_with_retry_after(channel, whatsapp_sink):
    whatsapp_sink.fail(429, retry_after=3)
    result = channel.send(template_message())
    assert (result.outcome, result.retry_after) == ("transient", 3.0)
    assert "130429" in result.error


def test_pair_rate_limit_is_transient_despite_its_400(channel, whatsapp_sink):
    whatsapp_sink.fail(400, code=131056, message="Pair rate limit hit")
    result = channel.send(template_message())
    assert result.outcome == "transient"
    assert "131056" in result.error


def test_timeout_is_transient(channel, whatsapp_sink):
    whatsapp_sink.stall(STALL)
    started = time.monotonic()
    result = channel.send(template_message())
    assert time.monotonic() - started < STALL
    assert result.outcome == "transient"
    assert result.error.startswith("whatsapp timed out")


@pytest.mark.parametrize("code", [131026, 131047, 132001])
def test_permanent_refusals_for_one_recipient(channel, whatsapp_sink, code):
    whatsapp_sink.undeliverable("+15550001111", code)

    results = channel.send_many(
        [template_message(1, to="+15550001111"), template_message(2), template_message(3)]
    )

    assert [r.outcome for r in results] == ["permanent", "sent", "sent"]
    assert results[0].error.startswith(f"whatsapp 400 {code}: ")
    assert [r.json["to"] for r in whatsapp_sink.accepted()] == [ADA, ADA]


def test_rejected_access_token_is_permanent(whatsapp_sink, channel_settings):
    settings = whatsapp_sink.settings(channel_settings, whatsapp_access_token="expired")
    with channel_for("whatsapp", settings, **FAST_TIMEOUTS) as channel:
        result = channel.send(template_message())
    assert result.outcome == "permanent"
    assert result.error.startswith("whatsapp credentials rejected (whatsapp 401 190: ")
    assert whatsapp_sink.accepted() == []

"""The null provider, the factory, and the interface's own guarantees."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.channels import OutboundMessage, SendResult, channel_for
from engine.channels.base import ERROR_MAX
from engine.channels.null import NullChannel
from engine.channels.smtp import SmtpChannel
from engine.channels.twilio import TwilioChannel
from engine.channels.whatsapp import WhatsAppCloudChannel
from engine.settings import CHANNELS
from tests.providers.fixtures import (  # noqa: F401
    channel_settings_fixture,
)


def test_null_accepts_a_whole_batch_in_one_call(channel_settings):
    channel = channel_for("email", channel_settings)
    messages = [OutboundMessage(i, f"d{i}", f"user{i}@example.com") for i in range(1, 1001)]

    results = channel.send_many(messages)

    assert isinstance(channel, NullChannel) and channel.accepts_batch
    assert [r.delivery_id for r in results] == list(range(1, 1001))
    assert {r.outcome for r in results} == {"sent"}
    assert results[41].provider_message_id == "null-42"


def test_null_send_is_one_acceptance(channel_settings):
    result = channel_for("push", channel_settings).send(OutboundMessage(7, "d7"))
    assert result == SendResult(7, "sent", "null-7")


@pytest.mark.parametrize("channel_type", CHANNELS)
def test_every_channel_defaults_to_null(channel_settings, channel_type):
    channel = channel_for(channel_type, channel_settings)
    assert (channel.name, channel.channel_type) == ("null", channel_type)


def test_factory_picks_the_configured_providers(channel_settings):
    settings = replace(
        channel_settings,
        email_provider="smtp",
        sms_provider="twilio",
        twilio_account_sid="AC1",
        twilio_auth_token="t",
        whatsapp_provider="cloud",
        whatsapp_phone_number_id="1",
        whatsapp_access_token="t",
    )
    channels = {kind: channel_for(kind, settings) for kind in ("email", "sms", "whatsapp")}
    assert isinstance(channels["email"], SmtpChannel)
    assert isinstance(channels["sms"], TwilioChannel)
    assert isinstance(channels["whatsapp"], WhatsAppCloudChannel)
    assert [c.accepts_batch for c in channels.values()] == [False, False, False]
    for channel in channels.values():
        channel.close()


def test_factory_refuses_an_unknown_channel(channel_settings):
    with pytest.raises(ValueError, match="unknown channel type 'fax'"):
        channel_for("fax", channel_settings)


@pytest.mark.parametrize("key", ["", "has space", "<angle>", "x" * 129, "-leading"])
def test_idempotency_keys_must_fit_a_message_id(key):
    with pytest.raises(ValueError, match="idempotency_key"):
        OutboundMessage(1, key)


def test_errors_are_kept_short_and_on_one_line():
    result = SendResult.transient(1, "line one\nline two " + "x" * 2000, retry_after=3)
    assert result.error.startswith("line one line two x")
    assert len(result.error) == ERROR_MAX
    assert "\n" not in result.error
    assert result.retry_after == 3

"""Providers: one small interface (engine.channels.base), one implementation per protocol.

    with channel_for("sms", settings) as channel:
        result = channel.send(OutboundMessage(delivery_id=7, idempotency_key="d7", ...))

The provider for each channel type comes from the settings (EMAIL_PROVIDER,
SMS_PROVIDER, PUSH_PROVIDER, WHATSAPP_PROVIDER); `null` is always available.
"""

from __future__ import annotations

from typing import Any

from engine.channels.base import Channel, OutboundMessage, Outcome, SendResult
from engine.channels.null import NullChannel
from engine.settings import CHANNELS, Settings

__all__ = ["Channel", "OutboundMessage", "Outcome", "SendResult", "channel_for"]


def channel_for(channel_type: str, settings: Settings, **options: Any) -> Channel:
    """The configured provider for `channel_type`. `options` go to the provider's
    constructor (timeouts, an SSL context for SMTP); the null provider takes none.
    Raises ValueError for an unknown channel type or an incomplete configuration."""
    if channel_type not in CHANNELS:
        raise ValueError(f"unknown channel type {channel_type!r}")
    provider = {
        "email": settings.email_provider,
        "sms": settings.sms_provider,
        "push": settings.push_provider,
        "whatsapp": settings.whatsapp_provider,
    }[channel_type]
    if provider == "null":
        return NullChannel(channel_type)
    # Imported on demand: a deployment on the null provider never loads httpx or JWT.
    if provider == "smtp":
        from engine.channels.smtp import SmtpChannel

        return SmtpChannel(settings, **options)
    if provider == "twilio":
        from engine.channels.twilio import TwilioChannel

        return TwilioChannel(settings, **options)
    if provider == "fcm":
        from engine.channels.fcm import FcmChannel

        return FcmChannel(settings, **options)
    if provider == "cloud":
        from engine.channels.whatsapp import WhatsAppCloudChannel

        return WhatsAppCloudChannel(settings, **options)
    raise ValueError(f"unknown {channel_type} provider {provider!r}")

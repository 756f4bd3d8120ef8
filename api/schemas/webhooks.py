"""Provider webhooks: what each provider posts (documented, not loaded: the signature is
checked on the raw request before anything is parsed) and Herald's answer."""

from __future__ import annotations

from marshmallow import Schema, fields

from engine.tracking.email import MAX_EVENTS
from engine.tracking.twilio import KIND_OF_STATUS


class WebhookOut(Schema):
    received = fields.Integer(required=True, metadata={"description": "events in the call"})
    recorded = fields.Integer(
        required=True, metadata={"description": "new events about one of our deliveries"}
    )
    duplicates = fields.Integer(
        required=True, metadata={"description": "events already recorded (a retry or replay)"}
    )
    pending = fields.Integer(
        required=True,
        metadata={
            "description": "kept until the message's provider id is recorded by the "
            "sender, then applied"
        },
    )
    ignored = fields.Integer(
        required=True,
        metadata={"description": "not about a delivery of ours, or nothing to record"},
    )
    suppressed = fields.Integer(required=True, metadata={"description": "suppressions added"})
    unsubscribed = fields.Integer(
        required=True, metadata={"description": "suppressions lifted by START"}
    )


def header(name: str, description: str, *, required: bool = True) -> dict:
    return {
        "in": "header",
        "name": name,
        "required": required,
        "schema": {"type": "string"},
        "description": description,
    }


def _form(properties: dict, required: list[str]) -> dict:
    return {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "required": required, "properties": properties}
            }
        },
    }


_STRING = {"type": "string"}

TWILIO_STATUS_BODY = _form(
    {
        "MessageSid": {**_STRING, "description": "the message, as Twilio answered the send"},
        "MessageStatus": {"type": "string", "enum": sorted(KIND_OF_STATUS)},
        "ErrorCode": {**_STRING, "description": "for failed and undelivered"},
        "AccountSid": _STRING,
        "From": _STRING,
        "To": _STRING,
    },
    ["MessageSid", "MessageStatus"],
)

TWILIO_INBOUND_BODY = _form(
    {
        "MessageSid": _STRING,
        "From": {**_STRING, "description": "the sender, E.164"},
        "To": _STRING,
        "Body": {**_STRING, "description": "STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, START"},
        "OptOutType": {
            "type": "string",
            "enum": ["STOP", "START", "HELP"],
            "description": "set by Twilio's Advanced Opt-Out",
        },
    },
    ["From"],
)

WHATSAPP_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "description": "Meta's WhatsApp Business Account webhook: entry[].changes[]"
                ".value.statuses[] (id, status sent|delivered|read|failed, timestamp, "
                "biz_opaque_callback_data, errors[]) and .messages[] (from, type, text.body)",
                "properties": {
                    "object": {"type": "string", "example": "whatsapp_business_account"},
                    "entry": {"type": "array", "items": {"type": "object"}},
                },
            }
        }
    },
}

_EMAIL_EVENT = {
    "type": "object",
    "required": ["type", "message_id"],
    "properties": {
        "type": {"type": "string", "enum": ["delivered", "bounce", "complaint"]},
        "message_id": {
            "type": "string",
            "description": "the Message-ID Herald set: <herald.d<delivery id>@<domain>>",
        },
        "bounce_type": {
            "type": "string",
            "enum": ["hard", "soft"],
            "description": "required for bounces",
        },
        "id": {"type": "string", "description": "the provider's event id: re-posts are no-ops"},
        "timestamp": {
            "type": "string",
            "description": "ISO 8601 with an offset (or Unix seconds); default: arrival",
        },
        "status": {"type": "string", "description": "enhanced status code, e.g. 5.1.1"},
        "diagnostic": {"type": "string", "description": "the remote server's answer"},
    },
}

EMAIL_BODY = {
    "required": True,
    "description": "JSON events, or a DSN (RFC 3464) or ARF complaint (RFC 5965) posted raw",
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["events"],
                        "properties": {
                            "events": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": MAX_EVENTS,
                                "items": _EMAIL_EVENT,
                            }
                        },
                    },
                    _EMAIL_EVENT,
                ]
            }
        },
        "message/rfc822": {
            "schema": {"type": "string", "format": "binary", "description": "the whole report"}
        },
        "multipart/report": {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": "the report's MIME body; Content-Type carries its boundary",
            }
        },
    },
}

PUSH_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["token"],
                "properties": {
                    "token": {
                        "type": "string",
                        "description": "the push's data.herald_token, unchanged",
                    }
                },
            }
        }
    },
}

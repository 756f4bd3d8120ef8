"""Request and response schemas of campaigns and their channels.

`config` documents are checked by the engine (engine.campaigns.config and
engine.campaigns.channel_config), where their rules live; here they are only required
to be JSON objects, and described for the OpenAPI document.
"""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from api.schemas.common import PageArgs, page_schema
from engine.campaigns.channel_config import WHATSAPP_SESSION_WARNING, channel_warnings
from engine.models.enums import CAMPAIGN_STATUSES, CHANNEL_STATUSES, CHANNEL_TYPES

_NOT_BLANK = validate.Regexp(r"\S", error="must not be blank")

CAMPAIGN_CONFIG_DOC = {
    "description": (
        "Sending settings; unknown keys are refused and defaults are filled in. "
        "rate_per_second: number > 0 (optional); max_attempts: integer 1-10 (default 3); "
        "error_threshold: {rate: 0-1, min_attempts: >= 1} "
        "(default {rate: 0.2, min_attempts: 100}). PATCH replaces the whole document."
    ),
    "example": {"rate_per_second": 50, "max_attempts": 3},
}

CHANNEL_CONFIG_DOC = {
    "description": (
        "Per channel_type; unknown keys are refused. "
        "email: subject*, html and/or text*, from_email (domain in "
        "EMAIL_ALLOWED_FROM_DOMAINS when set), from_name, reply_to. "
        "sms: body*, sender (E.164 or 1-11 letters/digits). "
        "push: title*, body*, data (object of strings), image_url, url (http/https). "
        "whatsapp: exactly one of template {name*, language*, parameters: [strings]} or "
        f"body; {WHATSAPP_SESSION_WARNING}. "
        "subject, html, text, body, title and template parameters are sandboxed Jinja2 "
        "templates over `contact`, `campaign` and `unsubscribe_url`, checked when written."
    ),
    "example": {
        "subject": "Hello {{ contact.first_name or 'there' }}",
        "html": "<p>Your tier: {{ contact.attributes.tier }}</p>",
        "from_email": "news@example.com",
    },
}


class CampaignCreateArgs(Schema):
    name = fields.String(required=True, validate=[validate.Length(min=1, max=255), _NOT_BLANK])
    description = fields.String(
        load_default=None, allow_none=True, validate=validate.Length(max=10000)
    )
    config = fields.Dict(load_default=None, allow_none=True, metadata=CAMPAIGN_CONFIG_DOC)
    conversation_id = fields.UUID(
        load_default=None,
        allow_none=True,
        metadata={"description": "one of your conversations; null unlinks"},
    )


class CampaignUpdateArgs(Schema):
    name = fields.String(validate=[validate.Length(min=1, max=255), _NOT_BLANK])
    description = fields.String(allow_none=True, validate=validate.Length(max=10000))
    config = fields.Dict(allow_none=True, metadata=CAMPAIGN_CONFIG_DOC)
    conversation_id = fields.UUID(allow_none=True)


class CampaignListArgs(PageArgs):
    status = fields.String(load_default=None, validate=validate.OneOf(CAMPAIGN_STATUSES))


class CampaignScheduleArgs(Schema):
    scheduled_at = fields.AwareDateTime(
        required=True,
        format="iso",
        metadata={"description": "ISO 8601 with an offset, in the future"},
    )


class ChannelCreateArgs(Schema):
    channel_type = fields.String(required=True, validate=validate.OneOf(CHANNEL_TYPES))
    config = fields.Dict(required=True, metadata=CHANNEL_CONFIG_DOC)


class ChannelUpdateArgs(Schema):
    config = fields.Dict(required=True, metadata=CHANNEL_CONFIG_DOC)


class ChannelPreviewArgs(Schema):
    contact_id = fields.UUID(required=True)


class ChannelOut(Schema):
    id = fields.UUID(required=True)
    campaign_id = fields.UUID(required=True)
    channel_type = fields.String(required=True, metadata={"enum": list(CHANNEL_TYPES)})
    config = fields.Dict(required=True)
    status = fields.String(
        required=True,
        metadata={"enum": list(CHANNEL_STATUSES), "description": "set by the engine"},
    )
    sent_count = fields.Integer(required=True, metadata={"description": "read-only"})
    delivered_count = fields.Integer(required=True, metadata={"description": "read-only"})
    opened_count = fields.Integer(required=True, metadata={"description": "read-only"})
    clicked_count = fields.Integer(required=True, metadata={"description": "read-only"})
    warnings = fields.Function(
        lambda channel: channel_warnings(channel.channel_type, channel.config),
        metadata={
            "type": "array",
            "items": {"type": "string"},
            "description": "allowed but worth knowing, e.g. WhatsApp's 24-hour window",
        },
    )
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class CampaignOut(Schema):
    id = fields.UUID(required=True)
    name = fields.String(required=True)
    description = fields.String(allow_none=True)
    status = fields.String(required=True, metadata={"enum": list(CAMPAIGN_STATUSES)})
    conversation_id = fields.UUID(allow_none=True)
    scheduled_at = fields.DateTime(allow_none=True)
    started_at = fields.DateTime(
        allow_none=True, metadata={"description": "read-only; set by the engine"}
    )
    ended_at = fields.DateTime(
        allow_none=True,
        metadata={"description": "read-only; set on cancel, or by the engine on completion"},
    )
    config = fields.Dict(required=True)
    channels = fields.List(fields.Nested(ChannelOut), required=True)
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class ChannelPreviewOut(Schema):
    rendered = fields.Dict(
        required=True,
        metadata={"description": "the channel's config with every template rendered"},
    )


CampaignPage = page_schema(CampaignOut, "CampaignPage")
ChannelPage = page_schema(ChannelOut, "ChannelPage")

"""Request and response schemas of the suppressions endpoints."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from api.schemas.common import PageArgs, page_schema
from engine.models.enums import CHANNEL_TYPES, SUPPRESSION_REASONS

REASONS_DOC = (
    "unsubscribe (a link, STOP, or the provider says the recipient opted out), bounce "
    "(hard bounce or a number that cannot receive), complaint (marked as spam), "
    "soft_bounce (SOFT_BOUNCE_THRESHOLD soft bounces in a row), manual"
)


class SuppressionListArgs(PageArgs):
    channel = fields.String(load_default=None, validate=validate.OneOf(CHANNEL_TYPES))
    reason = fields.String(load_default=None, validate=validate.OneOf(SUPPRESSION_REASONS))


class SuppressionIn(Schema):
    channel = fields.String(required=True, validate=validate.OneOf(CHANNEL_TYPES))
    address = fields.String(
        required=True,
        validate=validate.Length(min=1, max=512),
        metadata={
            "description": "email (stored lower-cased), sms/whatsapp number in international "
            "format (stored as E.164), or for push the contact id"
        },
    )
    reason = fields.String(
        load_default="manual",
        validate=validate.OneOf(SUPPRESSION_REASONS),
        metadata={"description": REASONS_DOC},
    )


class SuppressionOut(Schema):
    id = fields.UUID(required=True)
    channel = fields.String(required=True, metadata={"enum": list(CHANNEL_TYPES)})
    address = fields.String(required=True)
    reason = fields.String(
        required=True, metadata={"enum": list(SUPPRESSION_REASONS), "description": REASONS_DOC}
    )
    created_at = fields.DateTime(required=True)


SuppressionPage = page_schema(SuppressionOut, "SuppressionPage")

"""Request and response schemas of the data source endpoints.

`config` is only shape-checked here (a JSON object); what each source type's config may
hold is the engine's rule (engine.sources.config), so its errors name "config.<key>".
"""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from api.schemas.common import PageArgs, page_schema
from engine.models.enums import SOURCE_STATUSES, SOURCE_TYPES
from engine.services.sources import USER_SETTABLE_STATUSES

CONFIG_DESCRIPTION = (
    "Per source_type. shopify: shop_domain (<name>.myshopify.com, required), access_token "
    "(secret, required), api_version (YYYY-MM, a quarterly Shopify release), "
    "webhook_secret (secret). facebook_pixel: pixel_id (digits, required), access_token "
    "(secret). gtm: container_id (GTM-XXXXXXX, required). Unknown keys are refused."
)


class SourceCreateArgs(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=255))
    source_type = fields.String(required=True, validate=validate.OneOf(SOURCE_TYPES))
    config = fields.Dict(
        keys=fields.String(), required=True, metadata={"description": CONFIG_DESCRIPTION}
    )
    status = fields.String(load_default="active", validate=validate.OneOf(USER_SETTABLE_STATUSES))


class SourceUpdateArgs(Schema):
    name = fields.String(validate=validate.Length(min=1, max=255))
    source_type = fields.String(
        validate=validate.OneOf(SOURCE_TYPES),
        metadata={"description": "accepted only unchanged: a source's type is fixed"},
    )
    config = fields.Dict(
        keys=fields.String(),
        metadata={
            "description": "Merged into the stored config: a key left out keeps its value, "
            "null removes an optional key, and a secret sent back exactly as masked keeps "
            "the stored secret."
        },
    )
    status = fields.String(
        validate=validate.OneOf(USER_SETTABLE_STATUSES),
        metadata={"description": "error is set by syncing; set active to clear it"},
    )


class SourceListArgs(PageArgs):
    source_type = fields.String(load_default=None, validate=validate.OneOf(SOURCE_TYPES))
    status = fields.String(load_default=None, validate=validate.OneOf(SOURCE_STATUSES))


class SourceOut(Schema):
    id = fields.UUID(required=True)
    name = fields.String(required=True)
    source_type = fields.String(required=True)
    status = fields.String(required=True)
    config = fields.Dict(
        keys=fields.String(),
        required=True,
        metadata={"description": "secrets masked: at most their last 4 characters show"},
    )
    unreadable_secrets = fields.List(
        fields.String(),
        required=True,
        metadata={
            "description": "config keys whose stored secret no configured ENCRYPTION_KEY "
            "decrypts; enter them again"
        },
    )
    ingest_key = fields.String(
        allow_none=True,
        metadata={"description": "public id for collection endpoints (gtm, facebook_pixel)"},
    )
    last_sync_at = fields.DateTime(allow_none=True)
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


SourcePage = page_schema(SourceOut, "SourcePage")

"""Request and response schemas of the conversation endpoints."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from api.schemas.common import PageArgs, page_schema
from engine.models.enums import CONVERSATION_STATUSES
from engine.services.conversations import (
    MAX_CONTENT_BYTES,
    MAX_METADATA_BYTES,
    MESSAGES_IN_DETAIL,
)


class ConversationCreateArgs(Schema):
    title = fields.String(
        load_default=None, allow_none=True, validate=validate.Length(min=1, max=255)
    )


class ConversationUpdateArgs(Schema):
    title = fields.String(allow_none=True, validate=validate.Length(min=1, max=255))
    status = fields.String(
        validate=validate.OneOf(CONVERSATION_STATUSES),
        metadata={"description": "archived conversations take no new messages"},
    )


class ConversationListArgs(PageArgs):
    status = fields.String(load_default=None, validate=validate.OneOf(CONVERSATION_STATUSES))


class ConversationMessageArgs(Schema):
    content = fields.String(
        required=True,
        metadata={"description": f"non-empty, at most {MAX_CONTENT_BYTES} bytes of UTF-8"},
    )
    message_metadata = fields.Dict(
        data_key="metadata",
        keys=fields.String(),
        load_default=None,
        metadata={"description": f"a JSON object of at most {MAX_METADATA_BYTES} bytes"},
    )


class ConversationMessageOut(Schema):
    id = fields.UUID(required=True)
    conversation_id = fields.UUID(required=True)
    role = fields.String(required=True)
    content = fields.String(required=True)
    message_metadata = fields.Dict(data_key="metadata")
    created_at = fields.DateTime()


class ConversationOut(Schema):
    id = fields.UUID(required=True)
    title = fields.String(allow_none=True)
    status = fields.String(required=True)
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class ConversationDetailOut(Schema):
    """Dumped from engine.services.conversations.ConversationDetail."""

    id = fields.UUID(required=True, attribute="conversation.id")
    title = fields.String(allow_none=True, attribute="conversation.title")
    status = fields.String(required=True, attribute="conversation.status")
    created_at = fields.DateTime(attribute="conversation.created_at")
    updated_at = fields.DateTime(attribute="conversation.updated_at")
    messages = fields.List(
        fields.Nested(ConversationMessageOut),
        required=True,
        metadata={
            "description": f"the latest {MESSAGES_IN_DETAIL} messages, oldest first; "
            "GET .../messages pages through all of them"
        },
    )
    message_count = fields.Integer(required=True)
    messages_truncated = fields.Boolean(required=True)


ConversationPage = page_schema(ConversationOut, "ConversationPage")
ConversationMessagePage = page_schema(ConversationMessageOut, "ConversationMessagePage")

"""/api/v1/conversations: conversations with the assistant (storage only for now)."""

from __future__ import annotations

import uuid

from flask_jwt_extended import current_user
from flask_smorest import Blueprint

from api.extensions import db
from api.openapi import login_required
from api.runtime import clock
from api.schemas.common import PageArgs
from api.schemas.conversations import (
    ConversationCreateArgs,
    ConversationDetailOut,
    ConversationListArgs,
    ConversationMessageArgs,
    ConversationMessageOut,
    ConversationMessagePage,
    ConversationOut,
    ConversationPage,
    ConversationUpdateArgs,
)
from engine.models import Conversation, Message
from engine.pagination import paginate
from engine.services import conversations

blp = Blueprint(
    "conversations", __name__, url_prefix="/api/v1/conversations", description="Conversations"
)


@blp.post("")
@login_required
@blp.arguments(ConversationCreateArgs)
@blp.response(201, ConversationOut)
def create_conversation(args: dict):
    return conversations.create_conversation(db.session, current_user.id, **args)


@blp.get("")
@login_required
@blp.arguments(ConversationListArgs, location="query")
@blp.response(200, ConversationPage)
def list_conversations(args: dict):
    """The user's conversations, newest first; filter by status."""
    page = paginate(
        db.session,
        conversations.list_conversations(current_user.id, status=args["status"]),
        Conversation,
        limit=args["limit"],
        cursor=args["cursor"],
    )
    return {"items": page.items, "next_cursor": page.next_cursor}


@blp.get("/<uuid:conversation_id>")
@login_required
@blp.response(200, ConversationDetailOut)
@blp.alt_response(404, response="NOT_FOUND")
def get_conversation(conversation_id: uuid.UUID):
    """The conversation with its latest 500 messages, oldest first."""
    return conversations.conversation_detail(db.session, current_user.id, conversation_id)


@blp.patch("/<uuid:conversation_id>")
@login_required
@blp.arguments(ConversationUpdateArgs)
@blp.response(200, ConversationOut)
@blp.alt_response(404, response="NOT_FOUND")
def update_conversation(args: dict, conversation_id: uuid.UUID):
    """Rename, archive or unarchive."""
    return conversations.update_conversation(db.session, current_user.id, conversation_id, args)


@blp.delete("/<uuid:conversation_id>")
@login_required
@blp.response(204)
@blp.alt_response(404, response="NOT_FOUND")
def delete_conversation(conversation_id: uuid.UUID):
    """Delete it and its messages; campaigns made from it stay, unlinked."""
    conversations.delete_conversation(db.session, current_user.id, conversation_id)


@blp.get("/<uuid:conversation_id>/messages")
@login_required
@blp.arguments(PageArgs, location="query")
@blp.response(200, ConversationMessagePage)
@blp.alt_response(404, response="NOT_FOUND")
def list_messages(args: dict, conversation_id: uuid.UUID):
    """Every message of the conversation, newest first, page by page."""
    conversation = conversations.get_conversation(db.session, current_user.id, conversation_id)
    page = paginate(
        db.session,
        conversations.list_messages(conversation),
        Message,
        limit=args["limit"],
        cursor=args["cursor"],
    )
    return {"items": page.items, "next_cursor": page.next_cursor}


@blp.post("/<uuid:conversation_id>/messages")
@login_required
@blp.arguments(ConversationMessageArgs)
@blp.response(201, ConversationMessageOut)
@blp.alt_response(404, response="NOT_FOUND")
@blp.alt_response(409, response="CONFLICT", description="the conversation is archived")
def add_message(args: dict, conversation_id: uuid.UUID):
    """Store a message from the user (role "user"; the assistant's come later)."""
    return conversations.add_user_message(
        db.session,
        current_user.id,
        conversation_id,
        content=args["content"],
        metadata=args["message_metadata"],
        now=clock().now(),
    )

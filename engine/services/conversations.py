"""Conversations with the assistant and their messages (storage only for now).

Messages read oldest first on (created_at, id). Each message is stamped with the
caller's clock rather than the transaction's start time, so two messages written in one
transaction (a later assistant turn) still sort in the order they were written.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from engine.errors import Conflict, ValidationFailed
from engine.models import Conversation, Message
from engine.services.ownership import get_owned

# A conversation answers with at most this many of its latest messages; older ones are
# read through the paginated message list.
MESSAGES_IN_DETAIL = 500
# Limits in UTF-8 bytes, so a message costs the same storage whatever its script.
MAX_CONTENT_BYTES = 32 * 1024
MAX_METADATA_BYTES = 16 * 1024


@dataclass(frozen=True)
class ConversationDetail:
    conversation: Conversation
    messages: list[Message]  # oldest first
    message_count: int

    @property
    def messages_truncated(self) -> bool:
        return self.message_count > len(self.messages)


def get_conversation(
    session: Session,
    user_id: uuid.UUID,
    conversation_id: uuid.UUID | str,
    *,
    for_update: bool = False,
) -> Conversation:
    return get_owned(
        session, Conversation, user_id, conversation_id, what="conversation", for_update=for_update
    )


def list_conversations(user_id: uuid.UUID, *, status: str | None = None) -> Select:
    """A select of the user's conversations, optionally by status; the caller paginates."""
    stmt = select(Conversation).where(Conversation.user_id == user_id)
    if status is not None:
        stmt = stmt.where(Conversation.status == status)
    return stmt


def conversation_detail(
    session: Session,
    user_id: uuid.UUID,
    conversation_id: uuid.UUID | str,
    *,
    limit: int = MESSAGES_IN_DETAIL,
) -> ConversationDetail:
    """The conversation with its latest `limit` messages, oldest first."""
    conversation = get_conversation(session, user_id, conversation_id)
    latest = list(
        session.scalars(
            select(Message)
            .where(Message.conversation_id == conversation.id)
            .order_by(Message.created_at.desc(), Message.id.desc())
            .limit(limit)
        )
    )
    count = session.scalar(
        select(func.count()).select_from(Message).where(Message.conversation_id == conversation.id)
    )
    return ConversationDetail(conversation, latest[::-1], count or 0)


def list_messages(conversation: Conversation) -> Select:
    """A select of a conversation's messages; the caller paginates it (newest first)."""
    return select(Message).where(Message.conversation_id == conversation.id)


def create_conversation(
    session: Session, user_id: uuid.UUID, *, title: str | None = None
) -> Conversation:
    conversation = Conversation(user_id=user_id, title=title)
    session.add(conversation)
    session.flush()
    return conversation


def update_conversation(
    session: Session,
    user_id: uuid.UUID,
    conversation_id: uuid.UUID | str,
    changes: dict[str, Any],
) -> Conversation:
    """Rename, archive or unarchive. The row lock orders an archive against a message
    being added, so no message lands in a conversation after it was archived."""
    conversation = get_conversation(session, user_id, conversation_id, for_update=True)
    for field in ("title", "status"):
        if field in changes:
            setattr(conversation, field, changes[field])
    session.flush()
    return conversation


def delete_conversation(
    session: Session, user_id: uuid.UUID, conversation_id: uuid.UUID | str
) -> None:
    """Delete it with its messages (ON DELETE CASCADE); campaigns started from it stay
    and lose the link (ON DELETE SET NULL)."""
    session.delete(get_conversation(session, user_id, conversation_id))
    session.flush()


def _check_message(content: str, metadata: dict[str, Any] | None) -> None:
    errors: dict[str, list[str]] = {}
    if not content.strip():
        errors["content"] = ["may not be empty"]
    elif len(content.encode()) > MAX_CONTENT_BYTES:
        errors["content"] = [f"longer than {MAX_CONTENT_BYTES} bytes (UTF-8)"]
    if (
        metadata
        and len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
        > MAX_METADATA_BYTES
    ):
        errors["metadata"] = [f"larger than {MAX_METADATA_BYTES} bytes as JSON"]
    if errors:
        raise ValidationFailed("invalid message", fields=errors)


def add_user_message(
    session: Session,
    user_id: uuid.UUID,
    conversation_id: uuid.UUID | str,
    *,
    content: str,
    metadata: dict[str, Any] | None,
    now: datetime,
) -> Message:
    """Store a message from the user. An archived conversation takes no new messages
    (409): archiving is how a user closes one; unarchive it to continue."""
    _check_message(content, metadata)
    conversation = get_conversation(session, user_id, conversation_id, for_update=True)
    if conversation.status == "archived":
        raise Conflict(
            "this conversation is archived; set its status to active to continue it",
            code="conversation_archived",
            current_status=conversation.status,
        )
    message = Message(
        conversation_id=conversation.id,
        role="user",
        content=content,
        message_metadata=metadata or {},
        created_at=now,
    )
    session.add(message)
    session.flush()
    return message

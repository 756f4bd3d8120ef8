"""Conversations with the assistant, and their messages."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from engine.models.base import Base, JSONDocument, check_in, created_at, updated_at, uuid_pk
from engine.models.enums import CONVERSATION_STATUSES, MESSAGE_ROLES


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        CheckConstraint(check_in("status", CONVERSATION_STATUSES), name="status"),
        Index(None, "user_id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    title: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(
        String(50), nullable=False, server_default="active", default="active"
    )
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = updated_at()


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        CheckConstraint(check_in("role", MESSAGE_ROLES), name="role"),
        Index(None, "conversation_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
    )
    role: Mapped[str] = mapped_column(String(20), nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    # The column (and the API field) is "metadata"; SQLAlchemy reserves that attribute.
    message_metadata: Mapped[dict[str, Any] | None] = mapped_column(
        "metadata", JSONDocument, server_default="{}", default=dict
    )
    created_at: Mapped[datetime] = created_at()

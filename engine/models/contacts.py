"""Contacts a marketer sends to, and the addresses that must never be sent to again."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, CheckConstraint, ForeignKey, Index, String, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column

from engine.models.base import (
    Base,
    check_in,
    created_at,
    json_array,
    json_object,
    updated_at,
    uuid_pk,
)
from engine.models.enums import CHANNEL_TYPES, SUPPRESSION_REASONS


def _consent() -> Mapped[bool]:
    # Consent is opt-in: absent means no.
    return mapped_column(Boolean, nullable=False, server_default=false(), default=False)


class Contact(Base):
    __tablename__ = "contacts"
    __table_args__ = (
        UniqueConstraint("user_id", "external_id"),
        UniqueConstraint("user_id", "email"),
        # Keyset pagination walks (user_id, id).
        Index(None, "user_id", "id"),
        # The contact list pages newest first on (created_at, id) within a user; without
        # this a million-contact tenant sorts everything (855 ms vs 0.09 ms measured).
        Index(None, "user_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    external_id: Mapped[str | None] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(32))
    whatsapp: Mapped[str | None] = mapped_column(String(32))
    push_tokens: Mapped[list[Any]] = json_array()
    first_name: Mapped[str | None] = mapped_column(String(100))
    last_name: Mapped[str | None] = mapped_column(String(100))
    timezone: Mapped[str | None] = mapped_column(String(64))
    locale: Mapped[str | None] = mapped_column(String(35))
    attributes: Mapped[dict[str, Any]] = json_object()
    consent_email: Mapped[bool] = _consent()
    consent_sms: Mapped[bool] = _consent()
    consent_push: Mapped[bool] = _consent()
    consent_whatsapp: Mapped[bool] = _consent()
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = updated_at()


class Suppression(Base):
    __tablename__ = "suppressions"
    __table_args__ = (
        CheckConstraint(check_in("channel", CHANNEL_TYPES), name="channel"),
        CheckConstraint(check_in("reason", SUPPRESSION_REASONS), name="reason"),
        UniqueConstraint("user_id", "channel", "address"),
        # The suppressions list pages newest first within a user.
        Index(None, "user_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    channel: Mapped[str] = mapped_column(String(20), nullable=False)
    address: Mapped[str] = mapped_column(String(512), nullable=False)
    reason: Mapped[str] = mapped_column(String(20), nullable=False)
    created_at: Mapped[datetime] = created_at()

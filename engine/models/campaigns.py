"""Campaigns, the channels they send on, and the audiences they target."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from engine.models.base import (
    Base,
    UTCDateTime,
    check_in,
    created_at,
    json_object,
    updated_at,
    uuid_pk,
)
from engine.models.enums import CAMPAIGN_STATUSES, CHANNEL_STATUSES, CHANNEL_TYPES


def _counter() -> Mapped[int]:
    return mapped_column(Integer, nullable=False, server_default="0", default=0)


class Campaign(Base):
    __tablename__ = "campaigns"
    __table_args__ = (
        CheckConstraint(check_in("status", CAMPAIGN_STATUSES), name="status"),
        Index(None, "user_id", "status"),
        # Beat's promotion scans only due scheduled campaigns; keep that scan tiny.
        Index(
            "ix_campaigns_due_scheduled",
            "scheduled_at",
            postgresql_where=text("status = 'scheduled'"),
            sqlite_where=text("status = 'scheduled'"),
        ),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    conversation_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="SET NULL")
    )
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(
        String(50), nullable=False, server_default="draft", default="draft"
    )
    scheduled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    config: Mapped[dict[str, Any]] = json_object()
    # Why the engine changed the status on its own (e.g. paused by the error threshold).
    status_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = updated_at()


class CampaignChannel(Base):
    __tablename__ = "campaign_channels"
    __table_args__ = (
        CheckConstraint(check_in("channel_type", CHANNEL_TYPES), name="channel_type"),
        CheckConstraint(check_in("status", CHANNEL_STATUSES), name="status"),
        CheckConstraint(
            "sent_count >= 0 AND delivered_count >= 0 AND opened_count >= 0 AND clicked_count >= 0",
            name="counters_non_negative",
        ),
        UniqueConstraint("campaign_id", "channel_type"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    campaign_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False
    )
    channel_type: Mapped[str] = mapped_column(String(50), nullable=False)
    config: Mapped[dict[str, Any]] = json_object()
    status: Mapped[str] = mapped_column(
        String(20), nullable=False, server_default="pending", default="pending"
    )
    sent_count: Mapped[int] = _counter()
    delivered_count: Mapped[int] = _counter()
    opened_count: Mapped[int] = _counter()
    clicked_count: Mapped[int] = _counter()
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = updated_at()


class Audience(Base):
    __tablename__ = "audiences"
    __table_args__ = (Index(None, "campaign_id"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    campaign_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False
    )
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    definition: Mapped[dict[str, Any]] = json_object()
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = updated_at()

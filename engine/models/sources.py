"""Data sources (GTM, Facebook pixel, Shopify), the events they generate, and the
contacts each source knows under its own external id."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, UniqueConstraint
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
from engine.models.enums import SOURCE_STATUSES, SOURCE_TYPES


class DataSource(Base):
    __tablename__ = "data_sources"
    __table_args__ = (
        CheckConstraint(check_in("source_type", SOURCE_TYPES), name="source_type"),
        CheckConstraint(check_in("status", SOURCE_STATUSES), name="status"),
        Index(None, "user_id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    source_type: Mapped[str] = mapped_column(String(50), nullable=False)
    config: Mapped[dict[str, Any]] = json_object()
    status: Mapped[str] = mapped_column(
        String(50), nullable=False, server_default="active", default="active"
    )
    last_sync_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Public key that collection endpoints (GTM, pixel) are addressed with; it sits in
    # web pages, so it identifies a source rather than proving anything.
    ingest_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = updated_at()


class DataEvent(Base):
    """An event a source reported; (source, external_id) makes re-imports idempotent."""

    __tablename__ = "data_events"
    __table_args__ = (
        UniqueConstraint("data_source_id", "external_id"),
        Index(None, "data_source_id", "occurred_at"),
        # Audience event conditions look up a contact's events of one type by time.
        Index(None, "contact_id", "event_type", "occurred_at"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    data_source_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("data_sources.id", ondelete="CASCADE"), nullable=False
    )
    contact_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("contacts.id", ondelete="SET NULL")
    )
    event_type: Mapped[str] = mapped_column(String(100), nullable=False)
    external_id: Mapped[str | None] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = json_object()
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    created_at: Mapped[datetime] = created_at()


class ContactSource(Base):
    __tablename__ = "contact_sources"
    __table_args__ = (
        UniqueConstraint("data_source_id", "external_id"),
        Index(None, "contact_id"),
    )

    data_source_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("data_sources.id", ondelete="CASCADE"), primary_key=True
    )
    contact_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True
    )
    external_id: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = created_at()

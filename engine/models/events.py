"""What providers and recipients report after a message left: the delivery event log, and
the per-address soft-bounce tally that turns repeated soft bounces into a suppression.

engine/tracking writes both; the counters on campaign_channels and the <event>_at
columns on deliveries stay the source of truth for "how many", these rows say what
happened, when, and from whom.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from engine.models.base import Base, UTCDateTime, check_in, created_at, json_object
from engine.models.deliveries import Delivery, DeliveryId
from engine.models.enums import CHANNEL_TYPES, DELIVERY_EVENT_KINDS

ORPHANS = "delivery_id IS NULL"
HAS_PROVIDER_ID = "provider_message_id IS NOT NULL"


class DeliveryEvent(Base):
    """One provider or recipient event about one delivery.

    (source, provider_event_id) is the idempotency key: a provider re-posting the same
    event (a retry, a replay) adds nothing. An event whose delivery is not known yet
    (a Twilio callback that beat the sender's checkpoint to the message sid) is kept
    with delivery_id NULL and its provider_message_id, and adopted once the sid is
    recorded (engine.tracking.orphans).
    """

    __tablename__ = "delivery_events"
    __table_args__ = (
        CheckConstraint(check_in("kind", DELIVERY_EVENT_KINDS), name="kind"),
        UniqueConstraint("source", "provider_event_id"),
        Index(None, "delivery_id"),
        # The hourly timeline and per-channel splits read one channel's events by time.
        Index(None, "campaign_channel_id", "occurred_at"),
        # Adoption looks orphans up by the provider's message id; orphans are few.
        Index(
            "ix_delivery_events_orphans",
            "source",
            "provider_message_id",
            postgresql_where=text(ORPHANS),
            sqlite_where=text(ORPHANS),
        ),
    )

    id: Mapped[int] = mapped_column(DeliveryId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int | None] = mapped_column(
        DeliveryId, ForeignKey("deliveries.id", ondelete="CASCADE")
    )
    # The delivery's channel, copied so timelines need not join the whole log.
    campaign_channel_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("campaign_channels.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    # Who reported it: twilio, whatsapp, email, push (and the tracking endpoints).
    source: Mapped[str] = mapped_column(String(20), nullable=False)
    # When it happened by the provider's clock when it says; else when it arrived.
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    received_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, server_default=func.current_timestamp()
    )
    provider_message_id: Mapped[str | None] = mapped_column(String(255))
    provider_event_id: Mapped[str | None] = mapped_column(String(255))
    # Link scanners, privacy proxies, prefetchers: recorded, never counted as a person.
    machine: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=false(), default=False
    )
    # Provider status, error code, bounce type, diagnostic; never the recipient's address.
    detail: Mapped[dict[str, Any]] = json_object()


class SoftBounce(Base):
    """Soft bounces in a row for one address of one user; a delivery to it clears them.

    At SOFT_BOUNCE_THRESHOLD the address is suppressed (reason soft_bounce)."""

    __tablename__ = "soft_bounces"
    __table_args__ = (CheckConstraint(check_in("channel", CHANNEL_TYPES), name="channel"),)

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    channel: Mapped[str] = mapped_column(String(20), primary_key=True)
    address: Mapped[str] = mapped_column(String(512), primary_key=True)
    bounces: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0", default=0)
    last_bounced_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    created_at: Mapped[datetime] = created_at()


# Declared with the tracking tables because tracking is what needs it: every Twilio
# status callback (and a WhatsApp status without our callback data) finds its delivery
# by the provider's message id. Partial: rows not sent yet have none.
Index(
    "ix_deliveries_provider_message_id",
    Delivery.__table__.c.provider_message_id,
    postgresql_where=text(HAS_PROVIDER_ID),
    sqlite_where=text(HAS_PROVIDER_ID),
)

"""The per-message log: one row per campaign channel and contact.

It is the source of truth: each campaign_channels counter must equal
count(*) WHERE <event>_at IS NOT NULL over these rows.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from engine.models.base import Base, UTCDateTime, check_in, created_at
from engine.models.enums import DELIVERY_STATUSES

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity,
# which keeps keyset batching over millions of rows cheap.
DeliveryId = BigInteger().with_variant(Integer(), "sqlite")


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        CheckConstraint(check_in("status", DELIVERY_STATUSES), name="status"),
        UniqueConstraint("campaign_channel_id", "contact_id"),
        # A batch is "this channel's queued rows with id between a and b": one range of
        # this index (migration 0005). Its prefix serves completion and stats by status.
        Index(None, "campaign_channel_id", "status", "id"),
        # No index on contact_id alone (migration 0010): erasure, its only reader, finds
        # a contact's rows through the unique key above, one probe per channel.
        # Reconciliation's two sweeps look only at these few rows, never the whole log:
        # retries that came due, and sends whose worker lease ran out.
        Index(
            "ix_deliveries_due_retries",
            "next_attempt_at",
            postgresql_where=text("status = 'queued' AND next_attempt_at IS NOT NULL"),
            sqlite_where=text("status = 'queued' AND next_attempt_at IS NOT NULL"),
        ),
        Index(
            "ix_deliveries_expired_leases",
            "lease_expires_at",
            postgresql_where=text("status = 'sending'"),
            sqlite_where=text("status = 'sending'"),
        ),
    )

    id: Mapped[int] = mapped_column(DeliveryId, primary_key=True, autoincrement=True)
    # No foreign key (migration 0009): its per-row check was ~30 % of planning's insert.
    # Planning holds the channel's row locked while it inserts; a trigger on
    # campaign_channels deletes a channel's deliveries with it, as the cascade did.
    campaign_channel_id: Mapped[uuid.UUID] = mapped_column(nullable=False)
    # Cleared when a contact is erased; the row (and so the counters) stays. No foreign
    # key (migration 0008): its per-row check and KEY SHARE lock were half of planning's
    # cost. Erasure clears it explicitly, after waiting out planners (delete_contact).
    contact_id: Mapped[uuid.UUID | None] = mapped_column()
    # The address used at send time, so the log survives edits and erasure (redacted then).
    address: Mapped[str | None] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(
        String(20), nullable=False, server_default="queued", default="queued"
    )
    provider_message_id: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0", default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    # When a batch task covering this queued row was last enqueued; a queued row whose
    # dispatch is older than the grace period has lost its task (Redis restarted).
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # While status is 'sending': the claiming worker's lease. Past it, the row is
    # reclaimed, because that worker died or hung.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    clicked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = created_at()

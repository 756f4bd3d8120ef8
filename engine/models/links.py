"""The links a campaign channel's messages carry, so a click is redirected only to them.

A tracked link in a message is `{PUBLIC_BASE_URL}/t/c/<token>`; the token names the
delivery and one of these rows (engine/tracking/links.py). The destination is read from
here at click time, never from the request, so the redirect cannot be pointed anywhere
else (no open redirect). Rows are written once per channel, the first time it is
compiled for sending, and never change: a config edited later gets new rows, and links
already in mailboxes keep their old destinations.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, String, Text, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column

from engine.models.base import Base, created_at
from engine.models.deliveries import DeliveryId

# A link longer than this (in UTF-8 bytes) is left untracked: the unique key below must
# fit a B-tree entry (PostgreSQL allows ~2,700 bytes), and such URLs are mistakes anyway.
URL_MAX_BYTES = 2000


class CampaignLink(Base):
    __tablename__ = "campaign_links"
    # The unique key makes writing a channel's links idempotent (ON CONFLICT DO NOTHING)
    # when several workers compile the same channel at once; its prefix serves the
    # per-channel read.
    __table_args__ = (UniqueConstraint("campaign_channel_id", "url"),)

    # Small serial numbers: they go into every tracked URL, so short is better.
    id: Mapped[int] = mapped_column(DeliveryId, primary_key=True, autoincrement=True)
    campaign_channel_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("campaign_channels.id", ondelete="CASCADE"), nullable=False
    )
    # As the template has it, HTML entities decoded. For a dynamic link, the template
    # text itself ("https://shop.example/?ref={{ contact.id }}"): stats group by it.
    url: Mapped[str] = mapped_column(String(URL_MAX_BYTES), nullable=False)
    # Where a click goes: the url with the channel's UTM parameters. NULL for a dynamic
    # link, whose per-contact destination is signed into each token instead.
    destination: Mapped[str | None] = mapped_column(Text)
    dynamic: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=false(), default=False
    )
    created_at: Mapped[datetime] = created_at()

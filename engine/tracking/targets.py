"""Which delivery an event is about, found by what the provider hands back: our own
delivery id (email Message-ID, WhatsApp callback data, push token) or the provider's
message id (Twilio's MessageSid, WhatsApp's wamid)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from engine.models import Campaign, CampaignChannel, Delivery

MAX_DELIVERY_ID = 2**63 - 1
# The idempotency key every message carries (engine/dispatch/sending.py): d<delivery id>.
_IDEMPOTENCY_KEY = re.compile(r"d([1-9][0-9]{0,18})")


@dataclass(frozen=True)
class Target:
    delivery_id: int
    user_id: uuid.UUID
    channel: str
    # The address the message went to; None once the contact was erased.
    address: str | None


def delivery_id_of_key(key: object) -> int | None:
    """The delivery id in an idempotency key "d<id>", or None."""
    if not isinstance(key, str):
        return None
    match = _IDEMPOTENCY_KEY.fullmatch(key.strip())
    if match is None:
        return None
    delivery_id = int(match.group(1))
    return delivery_id if delivery_id <= MAX_DELIVERY_ID else None


def by_delivery_id(session: Session, delivery_id: int, channel: str) -> Target | None:
    """The delivery, if it exists and went out on `channel` (a token or header for
    another channel's delivery names nothing here)."""
    if not 1 <= delivery_id <= MAX_DELIVERY_ID:
        return None
    return _one(session, _select(channel).where(Delivery.id == delivery_id))


def by_provider_message_id(session: Session, channel: str, message_id: str) -> Target | None:
    """The delivery the provider accepted under this id (served by the partial index
    ix_deliveries_provider_message_id)."""
    if not message_id or len(message_id) > 255:
        return None
    stmt = (
        _select(channel)
        .where(Delivery.provider_message_id == message_id)
        .order_by(Delivery.id)
        .limit(1)
    )
    return _one(session, stmt)


def _select(channel: str) -> Select:
    return (
        select(Delivery.id, Campaign.user_id, CampaignChannel.channel_type, Delivery.address)
        .join(CampaignChannel, CampaignChannel.id == Delivery.campaign_channel_id)
        .join(Campaign, Campaign.id == CampaignChannel.campaign_id)
        .where(CampaignChannel.channel_type == channel)
    )


def _one(session: Session, stmt: Select) -> Target | None:
    row = session.execute(stmt).first()
    if row is None:
        return None
    return Target(
        delivery_id=row.id,
        user_id=row.user_id,
        channel=row.channel_type,
        address=row.address or None,
    )

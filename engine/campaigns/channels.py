"""A campaign's channels: at most one per type, config validated per type, and a
preview that renders the channel's templates for one contact.

Writes lock the campaign row first (get_editable_campaign), which serializes them with
launches and with each other: two concurrent creates of the same type then meet the
existence check in order, and the unique key backs it up regardless.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Select, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from engine.campaigns.channel_config import validate_channel_config
from engine.campaigns.rendering import CompiledChannel
from engine.errors import Conflict, NotFound
from engine.models import Campaign, CampaignChannel, Contact
from engine.services.campaigns import get_campaign, get_editable_campaign
from engine.services.ownership import get_owned


def _duplicate(channel_type: str) -> Conflict:
    return Conflict(
        f"this campaign already has an {channel_type} channel",
        code="duplicate_channel",
        fields={"channel_type": [f"the campaign already has an {channel_type} channel"]},
    )


def get_channel(
    session: Session,
    user_id: uuid.UUID,
    campaign_id: uuid.UUID,
    channel_id: uuid.UUID,
) -> CampaignChannel:
    """The channel if it belongs to this campaign of this user, else NotFound."""
    channel = session.scalar(
        select(CampaignChannel)
        .join(Campaign, Campaign.id == CampaignChannel.campaign_id)
        .where(
            CampaignChannel.id == channel_id,
            CampaignChannel.campaign_id == campaign_id,
            Campaign.user_id == user_id,
        )
    )
    if channel is None:
        raise NotFound("channel not found")
    return channel


def list_channels(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID) -> Select:
    """A select of the campaign's channels (404 if the campaign is not the user's)."""
    campaign = get_campaign(session, user_id, campaign_id)
    return select(CampaignChannel).where(CampaignChannel.campaign_id == campaign.id)


def create_channel(
    session: Session,
    user_id: uuid.UUID,
    campaign_id: uuid.UUID,
    *,
    channel_type: str,
    config: Any,
    allowed_from_domains: tuple[str, ...] = (),
) -> CampaignChannel:
    campaign = get_editable_campaign(session, user_id, campaign_id)
    stored = validate_channel_config(
        channel_type, config, allowed_from_domains=allowed_from_domains
    )
    taken = session.scalar(
        select(
            exists().where(
                CampaignChannel.campaign_id == campaign.id,
                CampaignChannel.channel_type == channel_type,
            )
        )
    )
    if taken:
        raise _duplicate(channel_type)
    channel = CampaignChannel(campaign_id=campaign.id, channel_type=channel_type, config=stored)
    try:
        with session.begin_nested():
            session.add(channel)
    except IntegrityError as exc:
        raise _duplicate(channel_type) from exc
    return channel


def update_channel(
    session: Session,
    user_id: uuid.UUID,
    campaign_id: uuid.UUID,
    channel_id: uuid.UUID,
    *,
    config: Any,
    allowed_from_domains: tuple[str, ...] = (),
) -> CampaignChannel:
    """Replace the channel's config (validated for its type; the type never changes)."""
    campaign = get_editable_campaign(session, user_id, campaign_id)
    channel = get_channel(session, user_id, campaign.id, channel_id)
    channel.config = validate_channel_config(
        channel.channel_type, config, allowed_from_domains=allowed_from_domains
    )
    session.flush()
    return channel


def delete_channel(
    session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, channel_id: uuid.UUID
) -> None:
    campaign = get_editable_campaign(session, user_id, campaign_id)
    channel = get_channel(session, user_id, campaign.id, channel_id)
    session.delete(channel)
    session.flush()


def preview_channel(
    session: Session,
    user_id: uuid.UUID,
    campaign_id: uuid.UUID,
    channel_id: uuid.UUID,
    contact_id: uuid.UUID,
) -> Mapping[str, Any]:
    """The channel's config as it would be sent to one of the user's contacts.

    Works in any status (it writes nothing). unsubscribe_url renders empty: the link
    is minted per delivery by the dispatch engine.
    """
    campaign = get_campaign(session, user_id, campaign_id)
    channel = get_channel(session, user_id, campaign.id, channel_id)
    contact = get_owned(session, Contact, user_id, contact_id, what="contact")
    compiled = CompiledChannel.compile(channel.channel_type, channel.config, campaign)
    return compiled.render(contact)

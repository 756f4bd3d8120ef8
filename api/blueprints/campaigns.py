"""/api/v1/campaigns: campaigns, their status machine and their channels."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from flask_jwt_extended import current_user
from flask_smorest import Blueprint

from api.extensions import db
from api.openapi import login_required
from api.runtime import clock, settings
from api.schemas.campaigns import (
    CampaignCreateArgs,
    CampaignListArgs,
    CampaignOut,
    CampaignPage,
    CampaignScheduleArgs,
    CampaignUpdateArgs,
    ChannelCreateArgs,
    ChannelOut,
    ChannelPage,
    ChannelPreviewArgs,
    ChannelPreviewOut,
    ChannelUpdateArgs,
)
from api.schemas.common import ErrorEnvelope, PageArgs
from engine.campaigns import channels
from engine.models import Campaign, CampaignChannel
from engine.pagination import paginate
from engine.services import campaigns

blp = Blueprint("campaigns", __name__, url_prefix="/api/v1/campaigns", description="Campaigns")

CAMPAIGN = "/<uuid:campaign_id>"
CHANNEL = "/<uuid:campaign_id>/channels/<uuid:channel_id>"

_not_found = blp.alt_response(404, schema=ErrorEnvelope, description="not yours, or missing")
_conflict = blp.alt_response(
    409, schema=ErrorEnvelope, description="invalid_transition (with current_status)"
)
_not_editable = blp.alt_response(
    409, schema=ErrorEnvelope, description="campaign_not_editable: not draft, scheduled or paused"
)
_unverified = blp.alt_response(
    403, schema=ErrorEnvelope, description="email_not_verified: verify the account first"
)


def _with_channels(items: Iterable[Campaign]) -> list[Campaign]:
    """Attach each campaign's channels (one query for all) for the response."""
    items = list(items)
    found = campaigns.channels_by_campaign(db.session, (c.id for c in items))
    for campaign in items:
        campaign.channels = found[campaign.id]  # a plain attribute for the response only
    return items


def _one(campaign: Campaign) -> Campaign:
    return _with_channels([campaign])[0]


def _allowed_domains() -> tuple[str, ...]:
    return settings().email_allowed_from_domains


# -- campaigns ----------------------------------------------------------------------


@blp.post("")
@login_required
@blp.arguments(CampaignCreateArgs)
@blp.response(201, CampaignOut)
def create_campaign(args: dict):
    """Create a draft campaign.

    `conversation_id` must be one of your conversations (otherwise 422 "not found").
    """
    return _one(campaigns.create_campaign(db.session, current_user.id, **args))


@blp.get("")
@login_required
@blp.arguments(CampaignListArgs, location="query")
@blp.response(200, CampaignPage)
def list_campaigns(args: dict):
    """Your campaigns, newest first, each with its channels and their counters."""
    page = paginate(
        db.session,
        campaigns.list_campaigns(current_user.id, status=args["status"]),
        Campaign,
        limit=args["limit"],
        cursor=args["cursor"],
    )
    return {"items": _with_channels(page.items), "next_cursor": page.next_cursor}


@blp.get(CAMPAIGN)
@login_required
@blp.response(200, CampaignOut)
@_not_found
def get_campaign(campaign_id: uuid.UUID):
    return _one(campaigns.get_campaign(db.session, current_user.id, campaign_id))


@blp.patch(CAMPAIGN)
@login_required
@blp.arguments(CampaignUpdateArgs)
@blp.response(200, CampaignOut)
@_not_found
@_not_editable
def update_campaign(args: dict, campaign_id: uuid.UUID):
    """Edit name, description, config (replaced whole) or conversation_id.

    Only in draft, scheduled or paused.
    """
    return _one(campaigns.update_campaign(db.session, current_user.id, campaign_id, args))


@blp.delete(CAMPAIGN)
@login_required
@blp.response(204)
@_not_found
@_conflict
def delete_campaign(campaign_id: uuid.UUID):
    """Delete a draft with its channels and audiences; other statuses answer 409."""
    campaigns.delete_campaign(db.session, current_user.id, campaign_id)


@blp.post(f"{CAMPAIGN}/clone")
@login_required
@blp.response(201, CampaignOut)
@_not_found
def clone_campaign(campaign_id: uuid.UUID):
    """A new draft named "<name> (copy)" with the same config, channels and audiences."""
    return _one(campaigns.clone_campaign(db.session, current_user.id, campaign_id))


# -- status machine -----------------------------------------------------------------


@blp.post(f"{CAMPAIGN}/schedule")
@login_required
@blp.arguments(CampaignScheduleArgs)
@blp.response(200, CampaignOut)
@_not_found
@_conflict
@_unverified
def schedule_campaign(args: dict, campaign_id: uuid.UUID):
    """draft → scheduled. Needs a verified account, a channel and an audience (422
    naming `channels` / `audiences`), and `scheduled_at` in the future with an offset."""
    campaign = campaigns.schedule_campaign(
        db.session, current_user, campaign_id, args["scheduled_at"], clock().now()
    )
    return _one(campaign)


@blp.post(f"{CAMPAIGN}/launch")
@login_required
@blp.response(200, CampaignOut)
@_not_found
@_conflict
@_unverified
def launch_campaign(campaign_id: uuid.UUID):
    """draft or scheduled → running now; same preconditions as schedule."""
    return _one(campaigns.launch_campaign(db.session, current_user, campaign_id, clock().now()))


def _change_status(campaign_id: uuid.UUID, action: str) -> Campaign:
    return _one(
        campaigns.change_status(db.session, current_user.id, campaign_id, action, clock().now())
    )


@blp.post(f"{CAMPAIGN}/unschedule")
@login_required
@blp.response(200, CampaignOut)
@_not_found
@_conflict
def unschedule_campaign(campaign_id: uuid.UUID):
    """scheduled → draft; scheduled_at is cleared."""
    return _change_status(campaign_id, "unschedule")


@blp.post(f"{CAMPAIGN}/pause")
@login_required
@blp.response(200, CampaignOut)
@_not_found
@_conflict
def pause_campaign(campaign_id: uuid.UUID):
    """running → paused."""
    return _change_status(campaign_id, "pause")


@blp.post(f"{CAMPAIGN}/resume")
@login_required
@blp.response(200, CampaignOut)
@_not_found
@_conflict
def resume_campaign(campaign_id: uuid.UUID):
    """paused → running."""
    return _change_status(campaign_id, "resume")


@blp.post(f"{CAMPAIGN}/cancel")
@login_required
@blp.response(200, CampaignOut)
@_not_found
@_conflict
def cancel_campaign(campaign_id: uuid.UUID):
    """scheduled, running or paused → cancelled; ended_at is set to now."""
    return _change_status(campaign_id, "cancel")


# -- channels -----------------------------------------------------------------------


@blp.post(f"{CAMPAIGN}/channels")
@login_required
@blp.arguments(ChannelCreateArgs)
@blp.response(201, ChannelOut)
@_not_found
@blp.alt_response(
    409, schema=ErrorEnvelope, description="duplicate_channel, or campaign_not_editable"
)
def create_channel(args: dict, campaign_id: uuid.UUID):
    """Add a channel (one per type). Templates are checked now: 422 names the field."""
    return channels.create_channel(
        db.session,
        current_user.id,
        campaign_id,
        channel_type=args["channel_type"],
        config=args["config"],
        allowed_from_domains=_allowed_domains(),
    )


@blp.get(f"{CAMPAIGN}/channels")
@login_required
@blp.arguments(PageArgs, location="query")
@blp.response(200, ChannelPage)
@_not_found
def list_channels(args: dict, campaign_id: uuid.UUID):
    page = paginate(
        db.session,
        channels.list_channels(db.session, current_user.id, campaign_id),
        CampaignChannel,
        limit=args["limit"],
        cursor=args["cursor"],
    )
    return {"items": page.items, "next_cursor": page.next_cursor}


@blp.get(CHANNEL)
@login_required
@blp.response(200, ChannelOut)
@_not_found
def get_channel(campaign_id: uuid.UUID, channel_id: uuid.UUID):
    return channels.get_channel(db.session, current_user.id, campaign_id, channel_id)


@blp.patch(CHANNEL)
@login_required
@blp.arguments(ChannelUpdateArgs)
@blp.response(200, ChannelOut)
@_not_found
@_not_editable
def update_channel(args: dict, campaign_id: uuid.UUID, channel_id: uuid.UUID):
    """Replace the channel's config; its type cannot change."""
    return channels.update_channel(
        db.session,
        current_user.id,
        campaign_id,
        channel_id,
        config=args["config"],
        allowed_from_domains=_allowed_domains(),
    )


@blp.delete(CHANNEL)
@login_required
@blp.response(204)
@_not_found
@_not_editable
def delete_channel(campaign_id: uuid.UUID, channel_id: uuid.UUID):
    channels.delete_channel(db.session, current_user.id, campaign_id, channel_id)


@blp.post(f"{CHANNEL}/preview")
@login_required
@blp.arguments(ChannelPreviewArgs)
@blp.response(200, ChannelPreviewOut)
@_not_found
def preview_channel(args: dict, campaign_id: uuid.UUID, channel_id: uuid.UUID):
    """Render every template of the channel for one of your contacts."""
    rendered = channels.preview_channel(
        db.session, current_user.id, campaign_id, channel_id, args["contact_id"]
    )
    return {"rendered": rendered}

"""Campaigns: ownership, editability and (later in this module) the status machine."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from engine.errors import Conflict
from engine.models import Campaign
from engine.services.ownership import get_owned

# Content (name, config, channels, audiences) may change only while nothing is being
# sent from it: before it runs, or while it is paused.
EDITABLE_STATUSES = frozenset({"draft", "scheduled", "paused"})


def get_campaign(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID | str) -> Campaign:
    return get_owned(session, Campaign, user_id, campaign_id, what="campaign")


def ensure_content_editable(campaign: Campaign) -> None:
    if campaign.status not in EDITABLE_STATUSES:
        raise Conflict(
            f"a {campaign.status} campaign cannot be edited; pause it first",
            code="campaign_not_editable",
            current_status=campaign.status,
        )

"""Campaigns: ownership, editing, cloning and the status machine's actions.

Content edits lock the campaign row (SELECT … FOR UPDATE) before checking that its
status allows them, so an edit and a launch of the same campaign serialize: either the
edit lands first and is sent, or the launch lands first and the edit answers 409.
Channels are managed in engine.campaigns.channels and audiences by the audiences
service; both get the campaign through here (get_editable_campaign locks and checks in
one call; get_campaign and ensure_content_editable remain for callers that split them).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, exists, select
from sqlalchemy.orm import Session

from engine.campaigns.config import default_campaign_config, validate_campaign_config
from engine.campaigns.transitions import ensure_allowed, side_effects, transition
from engine.errors import Conflict, Forbidden, InvalidTransition, NotFound, ValidationFailed
from engine.models import Audience, Campaign, CampaignChannel, Conversation, User
from engine.services.ownership import get_owned

# Content (name, config, channels, audiences) may change only while nothing is being
# sent from it: before it runs, or while it is paused.
EDITABLE_STATUSES = frozenset({"draft", "scheduled", "paused"})
NAME_MAX = 255
COPY_SUFFIX = " (copy)"


def get_campaign(
    session: Session,
    user_id: uuid.UUID,
    campaign_id: uuid.UUID | str,
    *,
    for_update: bool = False,
) -> Campaign:
    return get_owned(
        session, Campaign, user_id, campaign_id, what="campaign", for_update=for_update
    )


def ensure_content_editable(campaign: Campaign) -> None:
    if campaign.status not in EDITABLE_STATUSES:
        raise Conflict(
            f"a {campaign.status} campaign cannot be edited; pause it first",
            code="campaign_not_editable",
            current_status=campaign.status,
        )


def get_editable_campaign(
    session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID | str
) -> Campaign:
    """The campaign, locked for this transaction and checked to accept content edits."""
    campaign = get_campaign(session, user_id, campaign_id, for_update=True)
    ensure_content_editable(campaign)
    return campaign


# -- create, read, update, delete ---------------------------------------------------


def _check_conversation(
    session: Session, user_id: uuid.UUID, conversation_id: uuid.UUID | None
) -> None:
    # Someone else's conversation is reported exactly like a missing one.
    if conversation_id is None:
        return
    owned = session.scalar(
        select(exists().where(Conversation.id == conversation_id, Conversation.user_id == user_id))
    )
    if not owned:
        raise ValidationFailed("conversation not found", fields={"conversation_id": ["not found"]})


def create_campaign(
    session: Session,
    user_id: uuid.UUID,
    *,
    name: str,
    description: str | None = None,
    config: Mapping[str, Any] | None = None,
    conversation_id: uuid.UUID | None = None,
) -> Campaign:
    stored_config = validate_campaign_config(config) if config else default_campaign_config()
    _check_conversation(session, user_id, conversation_id)
    campaign = Campaign(
        user_id=user_id,
        name=name,
        description=description,
        config=stored_config,
        conversation_id=conversation_id,
        status="draft",
    )
    session.add(campaign)
    session.flush()
    return campaign


UPDATABLE_FIELDS = frozenset({"name", "description", "config", "conversation_id"})


def update_campaign(
    session: Session,
    user_id: uuid.UUID,
    campaign_id: uuid.UUID | str,
    changes: Mapping[str, Any],
) -> Campaign:
    """Apply the given fields; `config` is replaced as a whole (defaults refilled)."""
    unknown = set(changes) - UPDATABLE_FIELDS
    if unknown:
        raise ValidationFailed(
            "unknown fields", fields={key: ["unknown field"] for key in sorted(unknown)}
        )
    campaign = get_editable_campaign(session, user_id, campaign_id)
    if "config" in changes:
        changes = {**changes, "config": validate_campaign_config(changes["config"])}
    if "conversation_id" in changes:
        _check_conversation(session, user_id, changes["conversation_id"])
    for key, value in changes.items():
        setattr(campaign, key, value)
    session.flush()
    return campaign


def delete_campaign(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID) -> None:
    """Delete a draft (with its channels and audiences); anything else has history."""
    # Compare-and-set like the transitions: a launch racing this delete cannot leave a
    # running campaign deleted, nor a deleted one running.
    deleted = session.execute(
        delete(Campaign)
        .where(Campaign.id == campaign_id, Campaign.user_id == user_id, Campaign.status == "draft")
        .returning(Campaign.id)
        .execution_options(synchronize_session=False)
    ).first()
    if deleted is not None:
        return
    current = session.scalar(
        select(Campaign.status).where(Campaign.id == campaign_id, Campaign.user_id == user_id)
    )
    if current is None:
        raise NotFound("campaign not found")
    raise InvalidTransition(current, "delete")


def list_campaigns(user_id: uuid.UUID, *, status: str | None = None) -> Select:
    """A select of the user's campaigns, optionally of one status; the caller pages it."""
    stmt = select(Campaign).where(Campaign.user_id == user_id)
    if status is not None:
        stmt = stmt.where(Campaign.status == status)
    return stmt


def channels_by_campaign(
    session: Session, campaign_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, list[CampaignChannel]]:
    """Each campaign's channels (with counters), for a whole page in one query."""
    ids = list(campaign_ids)
    found: dict[uuid.UUID, list[CampaignChannel]] = {campaign_id: [] for campaign_id in ids}
    if not ids:
        return found
    rows = session.scalars(
        select(CampaignChannel)
        .where(CampaignChannel.campaign_id.in_(ids))
        .order_by(CampaignChannel.campaign_id, CampaignChannel.channel_type)
    )
    for channel in rows:
        found[channel.campaign_id].append(channel)
    return found


def clone_campaign(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID) -> Campaign:
    """A new draft with the same content: channels (counters zero, status pending) and
    audiences. Any campaign can be cloned, a running or finished one included."""
    source = get_campaign(session, user_id, campaign_id)
    clone = Campaign(
        user_id=user_id,
        name=source.name[: NAME_MAX - len(COPY_SUFFIX)] + COPY_SUFFIX,
        description=source.description,
        config=dict(source.config),
        conversation_id=source.conversation_id,
        status="draft",
    )
    session.add(clone)
    session.flush()
    # At most four channels and a handful of audiences: one batched INSERT each.
    channels = session.scalars(
        select(CampaignChannel).where(CampaignChannel.campaign_id == source.id)
    ).all()
    audiences = session.scalars(select(Audience).where(Audience.campaign_id == source.id)).all()
    session.add_all(
        CampaignChannel(campaign_id=clone.id, channel_type=c.channel_type, config=c.config)
        for c in channels
    )
    session.add_all(
        Audience(campaign_id=clone.id, name=a.name, definition=a.definition) for a in audiences
    )
    session.flush()
    return clone


# -- the status machine -------------------------------------------------------------


def _ready_campaign(session: Session, user: User, campaign_id: uuid.UUID, action: str) -> Campaign:
    """The campaign, locked, if its status allows `action` and its owner is verified.

    The row lock makes the content check that follows and the status change one step
    as far as channel edits and deletion are concerned (they lock the same row), so a
    campaign is never launched with its content removed in between; the
    compare-and-set in `transition` still has the last word.
    """
    campaign = get_campaign(session, user.id, campaign_id, for_update=True)
    ensure_allowed(campaign, action)
    if not user.is_verified:
        raise Forbidden(
            "verify your email address before sending campaigns", code="email_not_verified"
        )
    return campaign


def _ensure_content_to_send(session: Session, campaign: Campaign) -> None:
    """Something to send and someone to send it to: a channel and an audience."""
    has_channel = session.scalar(select(exists().where(CampaignChannel.campaign_id == campaign.id)))
    has_audience = session.scalar(select(exists().where(Audience.campaign_id == campaign.id)))
    missing = {}
    if not has_channel:
        missing["channels"] = ["at least one channel is required"]
    if not has_audience:
        missing["audiences"] = ["at least one audience is required"]
    if missing:
        raise ValidationFailed("the campaign is not ready to send", fields=missing)


def schedule_campaign(
    session: Session, user: User, campaign_id: uuid.UUID, scheduled_at: datetime, now: datetime
) -> Campaign:
    """draft → scheduled, to be launched by the beat at `scheduled_at`."""
    campaign = _ready_campaign(session, user, campaign_id, "schedule")
    if scheduled_at.tzinfo is None or scheduled_at.utcoffset() is None:
        raise ValidationFailed(
            "scheduled_at needs a time zone", fields={"scheduled_at": ["must include an offset"]}
        )
    if scheduled_at <= now:
        raise ValidationFailed(
            "scheduled_at is not in the future", fields={"scheduled_at": ["must be in the future"]}
        )
    _ensure_content_to_send(session, campaign)
    return transition(session, user.id, campaign.id, "schedule", scheduled_at=scheduled_at)


def launch_campaign(
    session: Session, user: User, campaign_id: uuid.UUID, now: datetime
) -> Campaign:
    """draft or scheduled → running, now."""
    campaign = _ready_campaign(session, user, campaign_id, "launch")
    _ensure_content_to_send(session, campaign)
    return transition(session, user.id, campaign.id, "launch", **side_effects("launch", now))


def change_status(
    session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, action: str, now: datetime
) -> Campaign:
    """unschedule, pause, resume or cancel: no precondition beyond the current status."""
    if action not in {"unschedule", "pause", "resume", "cancel"}:
        raise ValueError(f"{action} has its own service function")
    return transition(session, user_id, campaign_id, action, **side_effects(action, now))

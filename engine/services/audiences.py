"""A campaign's audiences: stored rule definitions, their estimates, and the campaign's
per-channel recipient counts.

A definition is validated in full before it is stored (structure, limits, and that
every data source it names belongs to the user), so what is stored always compiles.
Writes lock the campaign row: a status change is a compare-and-set on that row, so an
edit cannot slip into a campaign that started running between check and commit.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from engine.audiences.compiler import AudienceCompiler
from engine.audiences.definition import Node, parse_definition, source_ids, source_paths
from engine.audiences.recipients import recipient_counts
from engine.errors import Conflict, NotFound, ValidationFailed
from engine.models import Audience, Campaign, CampaignChannel, DataSource
from engine.services.campaigns import ensure_content_editable, get_campaign
from engine.services.ownership import get_owned

# The recipients query ORs every audience of a campaign into one statement; this keeps
# that statement (at most 200 conditions per definition) a size PostgreSQL plans quickly.
MAX_AUDIENCES_PER_CAMPAIGN = 20


def validate_definition(session: Session, user_id: uuid.UUID, raw: Any) -> Node:
    """The parsed definition, or ValidationFailed naming each bad path (definition.…)."""
    node = parse_definition(raw)
    named = source_ids(node)
    if named:
        owned = set(
            session.scalars(
                select(DataSource.id).where(DataSource.user_id == user_id, DataSource.id.in_(named))
            )
        )
        missing = named - owned
        if missing:
            paths = source_paths(raw)
            fields = {path: ["unknown data source"] for source in missing for path in paths[source]}
            raise ValidationFailed("invalid audience definition", fields=fields)
    return node


def _editable_campaign(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID) -> Campaign:
    campaign = get_owned(session, Campaign, user_id, campaign_id, what="campaign", for_update=True)
    ensure_content_editable(campaign)
    return campaign


def list_audiences(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID) -> Select:
    """A select of the campaign's audiences, for engine.pagination.paginate."""
    campaign = get_campaign(session, user_id, campaign_id)
    return select(Audience).where(Audience.campaign_id == campaign.id)


def get_audience(
    session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, audience_id: uuid.UUID
) -> Audience:
    campaign = get_campaign(session, user_id, campaign_id)
    return _audience_of(session, campaign, audience_id)


def _audience_of(session: Session, campaign: Campaign, audience_id: uuid.UUID) -> Audience:
    audience = session.scalar(
        select(Audience).where(Audience.id == audience_id, Audience.campaign_id == campaign.id)
    )
    if audience is None:
        raise NotFound("audience not found")
    return audience


def create_audience(
    session: Session,
    user_id: uuid.UUID,
    campaign_id: uuid.UUID,
    *,
    name: str,
    definition: dict[str, Any],
) -> Audience:
    campaign = _editable_campaign(session, user_id, campaign_id)
    validate_definition(session, user_id, definition)
    existing = session.scalar(
        select(func.count()).select_from(Audience).where(Audience.campaign_id == campaign.id)
    )
    if existing >= MAX_AUDIENCES_PER_CAMPAIGN:
        raise Conflict(
            f"a campaign has at most {MAX_AUDIENCES_PER_CAMPAIGN} audiences",
            code="too_many_audiences",
        )
    audience = Audience(campaign_id=campaign.id, name=name, definition=definition)
    session.add(audience)
    session.flush()
    return audience


def update_audience(
    session: Session,
    user_id: uuid.UUID,
    campaign_id: uuid.UUID,
    audience_id: uuid.UUID,
    changes: dict[str, Any],
) -> Audience:
    """Apply `changes` (name and/or definition; absent keys stay as they are)."""
    campaign = _editable_campaign(session, user_id, campaign_id)
    audience = _audience_of(session, campaign, audience_id)
    if "definition" in changes:
        validate_definition(session, user_id, changes["definition"])
        audience.definition = changes["definition"]
    if "name" in changes:
        audience.name = changes["name"]
    session.flush()
    return audience


def delete_audience(
    session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, audience_id: uuid.UUID
) -> None:
    campaign = _editable_campaign(session, user_id, campaign_id)
    session.delete(_audience_of(session, campaign, audience_id))
    session.flush()


def estimate_audience(
    session: Session,
    user_id: uuid.UUID,
    campaign_id: uuid.UUID,
    audience_id: uuid.UUID,
    *,
    now: datetime,
) -> int:
    """How many of the user's contacts the audience matches now (one SQL count)."""
    audience = get_audience(session, user_id, campaign_id, audience_id)
    return estimate_definition(session, user_id, parse_definition(audience.definition), now=now)


def estimate_definition(session: Session, user_id: uuid.UUID, node: Node, *, now: datetime) -> int:
    compiler = AudienceCompiler(session.get_bind().dialect.name, user_id, now)
    return session.scalar(compiler.count_select(node)) or 0


def count_recipients(
    session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, *, now: datetime
) -> dict[str, Any]:
    """Recipients per channel type (all four), the union's size, and the counts of the
    channels the campaign has configured."""
    campaign = get_campaign(session, user_id, campaign_id)
    counts = recipient_counts(session, campaign.id, now=now)
    configured = session.scalars(
        select(CampaignChannel.channel_type)
        .where(CampaignChannel.campaign_id == campaign.id)
        .order_by(CampaignChannel.channel_type)
    )
    return {**counts, "channels": {channel: counts[channel] for channel in configured}}

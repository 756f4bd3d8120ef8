"""/api/v1/campaigns/{id}/audiences and recipient counts."""

from __future__ import annotations

import uuid

from flask_jwt_extended import current_user
from flask_smorest import Blueprint

from api.extensions import db
from api.openapi import login_required
from api.runtime import clock
from api.schemas.audiences import (
    AudienceArgs,
    AudienceOut,
    AudiencePage,
    AudiencePatchArgs,
    EstimateOut,
    RecipientCountsOut,
)
from api.schemas.common import ErrorEnvelope, PageArgs
from engine.models import Audience
from engine.pagination import paginate
from engine.services import audiences

blp = Blueprint(
    "audiences", __name__, url_prefix="/api/v1/campaigns", description="Campaign audiences"
)

NOT_EDITABLE = "Campaign is running, completed or cancelled (campaign_not_editable)."


@blp.get("/<uuid:campaign_id>/audiences")
@login_required
@blp.arguments(PageArgs, location="query")
@blp.response(200, AudiencePage)
def list_audiences(args: dict, campaign_id: uuid.UUID):
    """The campaign's audiences, newest first."""
    stmt = audiences.list_audiences(db.session, current_user.id, campaign_id)
    page = paginate(db.session, stmt, Audience, limit=args["limit"], cursor=args["cursor"])
    return {"items": page.items, "next_cursor": page.next_cursor}


@blp.post("/<uuid:campaign_id>/audiences")
@login_required
@blp.arguments(AudienceArgs)
@blp.response(201, AudienceOut)
@blp.alt_response(409, schema=ErrorEnvelope, description=NOT_EDITABLE)
def create_audience(args: dict, campaign_id: uuid.UUID):
    """Add an audience; its definition is validated with the path of every problem."""
    return audiences.create_audience(db.session, current_user.id, campaign_id, **args)


@blp.get("/<uuid:campaign_id>/audiences/<uuid:audience_id>")
@login_required
@blp.response(200, AudienceOut)
def get_audience(campaign_id: uuid.UUID, audience_id: uuid.UUID):
    return audiences.get_audience(db.session, current_user.id, campaign_id, audience_id)


@blp.patch("/<uuid:campaign_id>/audiences/<uuid:audience_id>")
@login_required
@blp.arguments(AudiencePatchArgs)
@blp.response(200, AudienceOut)
@blp.alt_response(409, schema=ErrorEnvelope, description=NOT_EDITABLE)
def update_audience(args: dict, campaign_id: uuid.UUID, audience_id: uuid.UUID):
    """Change the name and/or the definition."""
    return audiences.update_audience(db.session, current_user.id, campaign_id, audience_id, args)


@blp.delete("/<uuid:campaign_id>/audiences/<uuid:audience_id>")
@login_required
@blp.response(204)
@blp.alt_response(409, schema=ErrorEnvelope, description=NOT_EDITABLE)
def delete_audience(campaign_id: uuid.UUID, audience_id: uuid.UUID):
    audiences.delete_audience(db.session, current_user.id, campaign_id, audience_id)


@blp.post("/<uuid:campaign_id>/audiences/<uuid:audience_id>/estimate")
@login_required
@blp.response(200, EstimateOut)
def estimate_audience(campaign_id: uuid.UUID, audience_id: uuid.UUID):
    """How many contacts the audience matches now, whatever the campaign's status."""
    count = audiences.estimate_audience(
        db.session, current_user.id, campaign_id, audience_id, now=clock().now()
    )
    return {"count": count}


@blp.get("/<uuid:campaign_id>/recipients/count")
@login_required
@blp.response(200, RecipientCountsOut)
def count_recipients(campaign_id: uuid.UUID):
    """Recipients per channel type: the union of the audiences, deduplicated, minus
    contacts without consent or an address for the channel, minus suppressed addresses.
    `channels` repeats the counts of the channel types the campaign has configured."""
    return audiences.count_recipients(db.session, current_user.id, campaign_id, now=clock().now())

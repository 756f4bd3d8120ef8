"""/api/v1/suppressions: the addresses a user never sends to again, per channel.

Herald adds them itself (unsubscribe links, STOP, hard bounces, complaints, repeated
soft bounces); a marketer can list them, add their own (e.g. imported from a previous
provider) and remove one to send to that address again.
"""

from __future__ import annotations

import uuid

from flask_jwt_extended import current_user
from flask_smorest import Blueprint

from api.extensions import db
from api.openapi import login_required
from api.schemas.common import ErrorEnvelope
from api.schemas.suppressions import (
    SuppressionIn,
    SuppressionListArgs,
    SuppressionOut,
    SuppressionPage,
)
from engine.models import Suppression
from engine.pagination import paginate
from engine.services import suppressions

blp = Blueprint(
    "suppressions",
    __name__,
    url_prefix="/api/v1/suppressions",
    description="Suppressed addresses",
)

_not_found = blp.alt_response(404, schema=ErrorEnvelope, description="not yours, or missing")


@blp.get("")
@login_required
@blp.arguments(SuppressionListArgs, location="query")
@blp.response(200, SuppressionPage)
def list_suppressions(args: dict):
    """The user's suppressions, newest first; filter by channel and reason."""
    stmt = suppressions.suppressions_query(
        current_user.id, channel=args["channel"], reason=args["reason"]
    )
    page = paginate(db.session, stmt, Suppression, limit=args["limit"], cursor=args["cursor"])
    return {"items": page.items, "next_cursor": page.next_cursor}


@blp.post("")
@login_required
@blp.arguments(SuppressionIn)
@blp.response(201, SuppressionOut)
@blp.alt_response(
    200, schema=SuppressionOut, description="already suppressed: the existing suppression"
)
def create_suppression(args: dict):
    """Suppress an address on a channel (reason `manual` unless given). Idempotent:
    an address already suppressed answers 200 with the existing row, reason unchanged."""
    row, created = suppressions.create_suppression(
        db.session, current_user.id, args["channel"], args["address"], args["reason"]
    )
    return row, 201 if created else 200


@blp.get("/<uuid:suppression_id>")
@login_required
@blp.response(200, SuppressionOut)
@_not_found
def get_suppression(suppression_id: uuid.UUID):
    return suppressions.get_suppression(db.session, current_user.id, suppression_id)


@blp.delete("/<uuid:suppression_id>")
@login_required
@blp.response(204)
@_not_found
def delete_suppression(suppression_id: uuid.UUID):
    """Send to the address again (its soft-bounce count starts over)."""
    suppressions.delete_suppression(db.session, current_user.id, suppression_id)

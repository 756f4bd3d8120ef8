"""/api/v1/campaigns/{id}: the per-message log, stats, retry-failed and test sends."""

from __future__ import annotations

import uuid

from flask import Response, stream_with_context
from flask_jwt_extended import current_user
from flask_smorest import Blueprint

from api.csv_export import csv_lines
from api.extensions import db
from api.openapi import login_required
from api.runtime import settings
from api.schemas.common import ErrorEnvelope
from api.schemas.deliveries import (
    CampaignStatsOut,
    DeliveryListArgs,
    DeliveryPage,
    RetryFailedOut,
    TestSendIn,
    TestSendOut,
)
from engine.models import Delivery
from engine.pagination import paginate_by_id
from engine.services import deliveries, test_send

blp = Blueprint(
    "deliveries",
    __name__,
    url_prefix="/api/v1/campaigns",
    description="Per-message log, stats and retries of a campaign",
)

CAMPAIGN = "/<uuid:campaign_id>"

_not_found = blp.alt_response(404, schema=ErrorEnvelope, description="not yours, or missing")


@blp.get(f"{CAMPAIGN}/deliveries")
@login_required
@blp.arguments(DeliveryListArgs, location="query")
@blp.response(200, DeliveryPage)
@_not_found
@blp.doc(
    responses={
        "200": {
            "description": "a page of the log (JSON), or with format=csv the whole log",
            "content": {
                "application/json": {"schema": DeliveryPage},
                "text/csv": {
                    "schema": {"type": "string"},
                    "example": "id,channel,contact_id,address,status,...\r\n",
                },
            },
        }
    }
)
def list_deliveries(args: dict, campaign_id: uuid.UUID):
    """The campaign's deliveries, newest first (by id), with their errors.

    Filter with `status` and `channel`; page with `limit` and `cursor`. With
    `format=csv` the whole filtered log streams as CSV, oldest first, for spreadsheets.
    """
    stmt = deliveries.deliveries_select(
        db.session, current_user.id, campaign_id, status=args["status"], channel=args["channel"]
    )
    if args["format"] == "csv":
        return _csv_response(stmt, campaign_id)
    page = paginate_by_id(db.session, stmt, Delivery.id, limit=args["limit"], cursor=args["cursor"])
    return {"items": page.items, "next_cursor": page.next_cursor}


def _csv_response(stmt, campaign_id: uuid.UUID) -> Response:
    # Streamed after the view returns, on a session of its own (the request's commits
    # and closes with the request), inside one read-only transaction: a consistent
    # snapshot of the log however long the download takes.
    columns = [c.name for c in stmt.selected_columns]

    def generate():
        with db.factory() as session:
            if session.get_bind().dialect.name == "postgresql":
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            yield from csv_lines(columns, deliveries.iter_deliveries(session, stmt))
            session.rollback()

    return Response(
        stream_with_context(generate()),
        mimetype="text/csv",
        headers={
            "Content-Disposition": f'attachment; filename="campaign-{campaign_id}-deliveries.csv"'
        },
    )


@blp.get(f"{CAMPAIGN}/stats")
@login_required
@blp.response(200, CampaignStatsOut)
@_not_found
def campaign_stats(campaign_id: uuid.UUID):
    """Per channel: deliveries by status, the counters, and the same events counted over
    the deliveries (they agree whenever nothing is being recorded)."""
    return deliveries.campaign_stats(db.session, current_user.id, campaign_id)


@blp.post(f"{CAMPAIGN}/retry-failed")
@login_required
@blp.response(200, RetryFailedOut)
@_not_found
@blp.alt_response(
    409,
    schema=ErrorEnvelope,
    description="invalid_transition: only a completed or paused campaign (current_status)",
)
def retry_failed(campaign_id: uuid.UUID):
    """Re-queue every failed delivery for one more round of attempts; the campaign goes
    back to running. Nothing failed: nothing changes (requeued 0, status unchanged)."""
    return deliveries.retry_failed(db.session, current_user.id, campaign_id)


@blp.post(f"{CAMPAIGN}/test-send")
@login_required
@blp.arguments(TestSendIn)
@blp.response(200, TestSendOut)
@_not_found
@blp.alt_response(
    409, schema=ErrorEnvelope, description="invalid_transition: the campaign is cancelled"
)
def send_test(args: dict, campaign_id: uuid.UUID):
    """Send the campaign's channels now to 1-20 of your contacts, to check them.

    Real messages through the configured providers (email subject prefixed "[TEST] ",
    an unsubscribe link that unsubscribes nobody), outside the campaign: no delivery
    rows, no counters. Contacts without an address, without consent or suppressed on a
    channel are skipped with the reason. Ids that are not your contacts: 422 naming
    `contact_ids[i]`. Any status but cancelled.
    """
    plan = test_send.plan_test_send(
        db.session, current_user.id, campaign_id, args["contact_ids"], settings=settings()
    )
    # Nothing was written: end the read-only transaction before the provider calls, so
    # no connection idles in a transaction while they run.
    db.session.rollback()
    return {"results": test_send.deliver_test_send(plan, settings())}

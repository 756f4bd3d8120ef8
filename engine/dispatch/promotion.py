"""Beat's promotion of due scheduled campaigns to running."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import func, literal, update
from sqlalchemy.orm import Session

from engine.models import Campaign
from engine.models.base import UTCDateTime


def promote_due(session: Session, now: datetime) -> list[uuid.UUID]:
    """Move every scheduled campaign whose time has come to running; return their ids.

    One compare-and-set UPDATE: of two beats (or a beat and a launch) racing on the same
    campaign, PostgreSQL makes the second wait for the first and re-check
    `status = 'scheduled'`, which no longer holds, so each campaign is promoted, and so
    planned, once. `now` is bound from the caller's clock, never the database's now(),
    and the scan uses the partial index of scheduled campaigns.
    """
    stmt = (
        update(Campaign)
        .where(Campaign.status == "scheduled", Campaign.scheduled_at <= now)
        .values(
            status="running",
            started_at=func.coalesce(Campaign.started_at, literal(now, UTCDateTime())),
        )
        .returning(Campaign.id)
        .execution_options(synchronize_session=False)
    )
    return list(session.scalars(stmt))

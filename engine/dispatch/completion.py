"""Completion, worked out from PostgreSQL alone (never from chords or in-memory tallies).

A channel is done when it was planned and none of its deliveries is queued or sending;
a running campaign is completed when every channel is done. Since a channel becomes
planned only in the transaction that inserted its deliveries, a channel that was never
planned (or whose planner died) cannot look finished.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ColumnElement, exists, select, update
from sqlalchemy.orm import Session

from engine.models import Campaign, CampaignChannel, Delivery

UNFINISHED = ("queued", "sending")


def channel_has_work() -> ColumnElement[bool]:
    """EXISTS a queued or sending delivery on the campaign_channels row in scope; served
    by the (campaign_channel_id, status) index."""
    return exists().where(
        Delivery.campaign_channel_id == CampaignChannel.id,
        Delivery.status.in_(UNFINISHED),
    )


def complete_finished(
    session: Session, now: datetime, *, campaign_id: uuid.UUID | None = None
) -> list[uuid.UUID]:
    """Close what is finished among running campaigns (or just `campaign_id`); return
    the ids of the campaigns completed now. Every step is a compare-and-set, so running
    it twice, or from two places at once, completes a campaign once."""
    running = select(Campaign.id).where(Campaign.status == "running")
    if campaign_id is not None:
        running = running.where(Campaign.id == campaign_id)
    in_scope = CampaignChannel.campaign_id.in_(running.scalar_subquery())

    # Failed deliveries re-queued (retry-failed) put work back on a channel closed
    # earlier: reopen it, so "done" keeps meaning "nothing left".
    session.execute(
        update(CampaignChannel)
        .where(in_scope, CampaignChannel.status == "done", channel_has_work())
        .values(status="planned")
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(CampaignChannel)
        .where(in_scope, CampaignChannel.status == "planned", ~channel_has_work())
        .values(status="done")
        .execution_options(synchronize_session=False)
    )
    # Re-checks the deliveries too, not only the channel statuses: a row re-queued by a
    # concurrent transaction since the statements above must keep the campaign running.
    open_channel = exists().where(
        CampaignChannel.campaign_id == Campaign.id,
        (CampaignChannel.status != "done") | channel_has_work(),
    )
    stmt = (
        update(Campaign)
        .where(Campaign.status == "running", ~open_channel)
        .values(status="completed", ended_at=now)
        .returning(Campaign.id)
        .execution_options(synchronize_session=False)
    )
    if campaign_id is not None:
        stmt = stmt.where(Campaign.id == campaign_id)
    return list(session.scalars(stmt))

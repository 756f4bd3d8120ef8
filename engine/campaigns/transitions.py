"""The campaign status machine, and the one statement that moves a campaign along it.

    draft ──schedule──▶ scheduled ──unschedule──▶ draft
    draft | scheduled ──launch──▶ running ◀──resume── paused ◀──pause── running
    scheduled | running | paused ──cancel──▶ cancelled
    (running ──▶ completed is the engine's, when no delivery is left to send)

Every move is a compare-and-set: one UPDATE whose WHERE names the statuses the action is
allowed from. PostgreSQL makes a second, concurrent UPDATE of the same row wait for the
first and then re-check that WHERE against the committed row, so of two racing
requests (two launches, launch and cancel) at most one can match; the loser changes
nothing and is told the status it lost to. No read-then-write window exists.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from engine.errors import InvalidTransition, NotFound
from engine.models import Campaign


@dataclass(frozen=True)
class Transition:
    allowed_from: frozenset[str]
    to: str


TRANSITIONS: dict[str, Transition] = {
    "schedule": Transition(frozenset({"draft"}), "scheduled"),
    "unschedule": Transition(frozenset({"scheduled"}), "draft"),
    "launch": Transition(frozenset({"draft", "scheduled"}), "running"),
    "pause": Transition(frozenset({"running"}), "paused"),
    "resume": Transition(frozenset({"paused"}), "running"),
    "cancel": Transition(frozenset({"scheduled", "running", "paused"}), "cancelled"),
}
ACTIONS = tuple(TRANSITIONS)


def ensure_allowed(campaign: Campaign, action: str) -> None:
    """Fail early with 409 (before checking other preconditions); the compare-and-set
    in `transition` still decides."""
    if campaign.status not in TRANSITIONS[action].allowed_from:
        raise InvalidTransition(campaign.status, action)


def transition(
    session: Session,
    user_id: uuid.UUID,
    campaign_id: uuid.UUID,
    action: str,
    **values: Any,
) -> Campaign:
    """Apply `action` to the user's campaign, also setting `values` in the same UPDATE.

    NotFound if the user has no such campaign; InvalidTransition (with the current
    status) if its status does not allow the action, including when a concurrent
    request changed it first.
    """
    rule = TRANSITIONS[action]
    # The hot statement of the status machine: status is both tested and set here, so
    # the database, not this process, arbitrates between racing requests.
    stmt = (
        update(Campaign)
        .where(
            Campaign.id == campaign_id,
            Campaign.user_id == user_id,
            Campaign.status.in_(sorted(rule.allowed_from)),
        )
        .values(status=rule.to, **values)
        .returning(Campaign)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    campaign = session.scalars(stmt).one_or_none()
    if campaign is not None:
        return campaign
    current = session.scalar(
        select(Campaign.status).where(Campaign.id == campaign_id, Campaign.user_id == user_id)
    )
    if current is None:
        raise NotFound("campaign not found")
    raise InvalidTransition(current, action)


def side_effects(action: str, now: datetime) -> dict[str, Any]:
    """Columns an action sets besides status.

    unschedule forgets the time; cancel records when the campaign ended, since a
    cancelled campaign may never have reached the engine. started_at (and ended_at on
    completion) belong to the dispatch engine, which knows when sending really began.
    """
    if action == "unschedule":
        return {"scheduled_at": None}
    if action == "cancel":
        return {"ended_at": now}
    return {}

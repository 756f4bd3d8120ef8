"""The per-message log seen from the API: listing it, counting it, re-queuing its
failures, and the unsubscribe a delivery's signed link performs.

Everything here is set-based: the counts are one grouped scan of the campaign's
deliveries, and a retry is one UPDATE however many rows failed.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, case, exists, func, select, tuple_, update
from sqlalchemy.orm import Session

from engine.db import insert_ignoring_conflicts
from engine.errors import InvalidTransition, NotFound
from engine.models import Campaign, CampaignChannel, Contact, Delivery, Suppression
from engine.models.enums import CHANNEL_TYPES, DELIVERY_STATUSES
from engine.services.campaigns import get_campaign
from engine.settings import Settings
from engine.unsubscribe import delivery_of

# The events counted per channel: deliveries.<event>_at and campaign_channels.<event>_count.
EVENTS = ("sent", "delivered", "opened", "clicked")

# A retry makes sense once nothing else is sending: the campaign finished, or a person
# (or the error threshold) paused it. A running campaign still has rows in flight.
RETRYABLE_FROM = frozenset({"completed", "paused"})


# -- the per-message log --------------------------------------------------------------


def deliveries_select(
    session: Session,
    user_id: uuid.UUID,
    campaign_id: uuid.UUID,
    *,
    status: str | None = None,
    channel: str | None = None,
) -> Select:
    """The user's campaign's deliveries as plain rows (with `channel`), optionally of one
    status and one channel type; the caller pages it by id. NotFound if not theirs."""
    campaign = get_campaign(session, user_id, campaign_id)
    stmt = (
        select(
            Delivery.id,
            CampaignChannel.channel_type.label("channel"),
            Delivery.contact_id,
            Delivery.address,
            Delivery.status,
            Delivery.attempts,
            Delivery.last_error,
            Delivery.provider_message_id,
            Delivery.next_attempt_at,
            Delivery.sent_at,
            Delivery.delivered_at,
            Delivery.opened_at,
            Delivery.clicked_at,
            Delivery.failed_at,
            Delivery.created_at,
        )
        .join(CampaignChannel, CampaignChannel.id == Delivery.campaign_channel_id)
        .where(CampaignChannel.campaign_id == campaign.id)
    )
    if status is not None:
        stmt = stmt.where(Delivery.status == status)
    if channel is not None:
        stmt = stmt.where(CampaignChannel.channel_type == channel)
    return stmt


def iter_deliveries(
    session: Session, stmt: Select, *, chunk_size: int = 5000
) -> Iterator[Sequence[Any]]:
    """The whole of a deliveries_select, oldest first, in chunks: each chunk is one
    keyset query (id > last id, on the primary key), so an export of millions of rows
    holds one chunk in memory and never re-reads skipped rows as OFFSET would."""
    last_id = 0
    while True:
        rows = session.execute(
            stmt.where(Delivery.id > last_id).order_by(Delivery.id).limit(chunk_size)
        ).all()
        if not rows:
            return
        yield rows
        last_id = rows[-1].id


# -- stats ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelStats:
    channel_id: uuid.UUID
    channel: str
    status: str
    total: int
    by_status: dict[str, int]
    # What campaign_channels says, and the same events counted over the log: at every
    # quiet moment they are equal, and a client can check it.
    counters: dict[str, int]
    from_deliveries: dict[str, int]


@dataclass(frozen=True)
class CampaignStats:
    campaign_id: uuid.UUID
    status: str
    status_reason: str | None
    started_at: datetime | None
    ended_at: datetime | None
    channels: list[ChannelStats]


def campaign_stats(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID) -> CampaignStats:
    campaign = get_campaign(session, user_id, campaign_id)
    channels = session.scalars(
        select(CampaignChannel)
        .where(CampaignChannel.campaign_id == campaign.id)
        .order_by(CampaignChannel.channel_type)
    ).all()
    # One scan of the campaign's deliveries, grouped by channel, answers both questions
    # (how many rows per status, how many rows saw each event) with FILTERed counts,
    # instead of a query per status or per event.
    counted = session.execute(
        select(
            Delivery.campaign_channel_id,
            *(func.count().filter(Delivery.status == s).label(s) for s in DELIVERY_STATUSES),
            *(func.count(getattr(Delivery, f"{e}_at")).label(f"{e}_at") for e in EVENTS),
        )
        .where(Delivery.campaign_channel_id.in_([c.id for c in channels]))
        .group_by(Delivery.campaign_channel_id)
    ).all()
    by_channel: dict[uuid.UUID, Any] = {row.campaign_channel_id: row for row in counted}

    def stats_of(channel: CampaignChannel) -> ChannelStats:
        row = by_channel.get(channel.id)
        by_status = {s: (getattr(row, s) if row else 0) for s in DELIVERY_STATUSES}
        return ChannelStats(
            channel_id=channel.id,
            channel=channel.channel_type,
            status=channel.status,
            total=sum(by_status.values()),
            by_status=by_status,
            counters={e: getattr(channel, f"{e}_count") for e in EVENTS},
            from_deliveries={e: (getattr(row, f"{e}_at") if row else 0) for e in EVENTS},
        )

    return CampaignStats(
        campaign_id=campaign.id,
        status=campaign.status,
        status_reason=campaign.status_reason,
        started_at=campaign.started_at,
        ended_at=campaign.ended_at,
        channels=[stats_of(channel) for channel in channels],
    )


# -- retry failed ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryOutcome:
    requeued: int
    status: str


def retry_failed(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID) -> RetryOutcome:
    """Put the campaign's failed deliveries back to queued for one more round, and the
    campaign back to running.

    - attempts restarts at 0, so the row gets a full round of config.max_attempts
      again (transient errors still back off); last_error stays until a new outcome
      replaces it, so the log keeps saying why it failed the first time.
    - dispatched_at is cleared: no batch task owns these rows yet, and reconciliation
      batches queued rows without a live dispatch. Nothing is enqueued from here.
    - Channels that were done and got rows back return to planned, so completion
      (no queued or sending rows left on planned channels) sees them again.
    - Nothing failed: nothing changes, not even the campaign's status.
    """
    # The row lock orders this with pause, resume and cancel on the same campaign (they
    # are compare-and-set UPDATEs of this row); the CAS below still has the last word.
    campaign = get_campaign(session, user_id, campaign_id, for_update=True)
    if campaign.status not in RETRYABLE_FROM:
        raise InvalidTransition(campaign.status, "retry failed deliveries of")
    channel_ids = select(CampaignChannel.id).where(CampaignChannel.campaign_id == campaign.id)
    requeued = session.execute(
        update(Delivery)
        .where(Delivery.campaign_channel_id.in_(channel_ids), Delivery.status == "failed")
        .values(
            status="queued",
            attempts=0,
            next_attempt_at=None,
            dispatched_at=None,
            lease_expires_at=None,
            failed_at=None,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if not requeued:
        return RetryOutcome(requeued=0, status=campaign.status)
    session.execute(
        update(CampaignChannel)
        .where(
            CampaignChannel.campaign_id == campaign.id,
            CampaignChannel.status == "done",
            exists().where(
                Delivery.campaign_channel_id == CampaignChannel.id, Delivery.status == "queued"
            ),
        )
        .values(status="planned")
        .execution_options(synchronize_session=False)
    )
    # The pause that status_reason explains (e.g. the error threshold) is over.
    running = session.scalars(
        update(Campaign)
        .where(Campaign.id == campaign.id, Campaign.status.in_(sorted(RETRYABLE_FROM)))
        .values(status="running", ended_at=None, status_reason=None)
        .returning(Campaign)
        .execution_options(synchronize_session=False, populate_existing=True)
    ).one_or_none()
    if running is None:  # unreachable while the row lock is held; never half-apply
        current = session.scalar(select(Campaign.status).where(Campaign.id == campaign.id))
        raise InvalidTransition(current or "missing", "retry failed deliveries of")
    return RetryOutcome(requeued=requeued, status=running.status)


# -- unsubscribe -----------------------------------------------------------------------------


@dataclass(frozen=True)
class UnsubscribeTarget:
    """Whom a signed link unsubscribes: its delivery's owner, channel and address.
    `address` is None when the contact was erased since: nothing is left to suppress."""

    delivery_id: int
    user_id: uuid.UUID
    channel: str
    address: str | None
    contact_id: uuid.UUID | None = None


@dataclass(frozen=True)
class ChannelChoice:
    """One line of the unsubscribe page: a channel this contact can be reached on."""

    channel: str
    address: str
    unsubscribed: bool


def _stored_address(channel: str, address: str) -> str:
    # Email suppressions are matched case-insensitively; storing them lower-cased also
    # keeps the unique key meaningful (one row for Ann@x and ann@x).
    return address.lower() if channel == "email" else address


def unsubscribe_target(session: Session, settings: Settings, token: str) -> UnsubscribeTarget:
    """The target of an unsubscribe token, or NotFound for a forged, mangled or stale one
    (its delivery deleted with its campaign)."""
    delivery_id = delivery_of(settings, token)
    row = None
    if delivery_id is not None and 1 <= delivery_id < 2**63:
        row = session.execute(
            select(
                Delivery.id,
                Campaign.user_id,
                CampaignChannel.channel_type,
                Delivery.address,
                Delivery.contact_id,
            )
            .join(CampaignChannel, CampaignChannel.id == Delivery.campaign_channel_id)
            .join(Campaign, Campaign.id == CampaignChannel.campaign_id)
            .where(Delivery.id == delivery_id)
        ).first()
    if row is None:
        raise NotFound("unsubscribe link not found")
    address = row.address or None
    return UnsubscribeTarget(
        delivery_id=row.id,
        user_id=row.user_id,
        channel=row.channel_type,
        address=_stored_address(row.channel_type, address) if address else None,
        contact_id=row.contact_id,
    )


def is_unsubscribed(session: Session, target: UnsubscribeTarget) -> bool:
    if target.address is None:
        return False
    stored = Suppression.address
    if target.channel == "email":
        stored = func.lower(stored)
    return bool(
        session.scalar(
            select(
                exists().where(
                    Suppression.user_id == target.user_id,
                    Suppression.channel == target.channel,
                    stored == target.address,
                )
            )
        )
    )


def channel_choices(session: Session, target: UnsubscribeTarget) -> list[ChannelChoice]:
    """The channels the page offers: the message's own (at the address it went to),
    then every other channel the contact has an address on today, each with whether
    it is unsubscribed already. Addresses are what suppressions store (push: the
    contact id, as planning addresses push)."""
    addresses: dict[str, str] = {}
    if target.address is not None:
        addresses[target.channel] = target.address
    contact = session.get(Contact, target.contact_id) if target.contact_id else None
    if contact is not None:
        current = {
            "email": contact.email,
            "sms": contact.phone,
            "whatsapp": contact.whatsapp,
            "push": str(contact.id) if contact.push_tokens else None,
        }
        for channel in CHANNEL_TYPES:
            if current[channel] and channel not in addresses:
                addresses[channel] = _stored_address(channel, current[channel])
    if not addresses:
        return []
    stored = case(
        (Suppression.channel == "email", func.lower(Suppression.address)),
        else_=Suppression.address,
    )
    suppressed = set(
        session.execute(
            select(Suppression.channel, stored).where(
                Suppression.user_id == target.user_id,
                tuple_(Suppression.channel, stored).in_(list(addresses.items())),
            )
        ).all()
    )
    return [
        ChannelChoice(channel, address, (channel, address) in suppressed)
        for channel, address in addresses.items()
    ]


def unsubscribe(
    session: Session, settings: Settings, token: str, channels: Collection[str] | None = None
) -> tuple[UnsubscribeTarget, list[str]]:
    """Suppress, for the campaign's owner, the token's address on its channel
    (`channels` None: RFC 8058 one-click), or the contact's addresses on the chosen
    `channels` (the page's form; channels the contact has no address on are ignored).
    Returns the target and the channels now unsubscribed by this request's choice.

    Idempotent under any concurrency: the unique key (user_id, channel, address) with
    ON CONFLICT DO NOTHING means repeated or simultaneous clicks leave one row each.
    """
    target = unsubscribe_target(session, settings, token)
    if channels is None:
        chosen = {target.channel: target.address} if target.address is not None else {}
    else:
        offered = {c.channel: c.address for c in channel_choices(session, target)}
        chosen = {c: offered[c] for c in CHANNEL_TYPES if c in channels and c in offered}
    if chosen:
        insert_ignoring_conflicts(
            session,
            Suppression.__table__,
            [
                {
                    "id": uuid.uuid4(),
                    "user_id": target.user_id,
                    "channel": channel,
                    "address": address,
                    "reason": "unsubscribe",
                }
                for channel, address in chosen.items()
            ],
            index_elements=["user_id", "channel", "address"],
        )
    return target, list(chosen)

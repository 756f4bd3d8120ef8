"""The per-message log seen from the API: listing it, counting it, re-queuing its
failures, and the unsubscribe a delivery's signed link performs.

Everything here is set-based: the counts are one grouped scan of the campaign's
deliveries, and a retry is one UPDATE however many rows failed.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Select,
    and_,
    case,
    distinct,
    exists,
    false,
    func,
    literal,
    select,
    true,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.orm import Session

from engine.db import insert_ignoring_conflicts
from engine.errors import InvalidTransition, NotFound
from engine.models import (
    Campaign,
    CampaignChannel,
    CampaignLink,
    Contact,
    Delivery,
    DeliveryEvent,
    Suppression,
)
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

# What open and click rates are taken over, per channel: delivered where the provider
# always reports delivery (Twilio's carrier receipts, WhatsApp), sent where delivery
# depends on the deployment (an email relay's webhook, the app's push reports), so a
# rate is not inflated by a missing delivery report.
RATE_BASE = {"sms": "delivered", "whatsapp": "delivered", "email": "sent", "push": "sent"}


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
class LinkStats:
    link_id: int
    url: str  # as written; a dynamic link's template text
    dynamic: bool
    unique_clicks: int  # people: deliveries with a human click on it
    total_clicks: int  # people's clicks, repeats included
    machine_clicks: int  # scanners, previews, bots


@dataclass(frozen=True)
class HourStats:
    hour: datetime  # the hour's start, UTC
    sent: int
    delivered: int
    opened: int
    clicked: int


@dataclass(frozen=True)
class ChannelEngagement:
    """What recipients (and machines) did with one channel's messages."""

    channel_id: uuid.UUID
    channel: str
    rate_base: str  # "delivered" or "sent": what open and click rates divide by
    rates: dict[str, float | None]  # delivery, open, click; None when dividing by 0
    humans: dict[str, int]  # opened, clicked (unique deliveries), clicks (total)
    machines: dict[str, int]  # the same for machine events
    bounces: dict[str, int]  # hard, soft: deliveries that bounced
    complaints: int
    failed: int  # deliveries that failed after the provider accepted them
    unsubscribes: int
    links: list[LinkStats]
    timeline: list[HourStats]


@dataclass(frozen=True)
class CampaignStats:
    campaign_id: uuid.UUID
    status: str
    status_reason: str | None
    started_at: datetime | None
    ended_at: datetime | None
    channels: list[ChannelStats]
    engagement: list[ChannelEngagement]
    timeline: list[HourStats]  # every channel together


def campaign_stats(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID) -> CampaignStats:
    """Everything is counted set-based: a handful of grouped queries whatever the size
    of the campaign, never a query (or a Python loop) per delivery."""
    campaign = get_campaign(session, user_id, campaign_id)
    channels = session.scalars(
        select(CampaignChannel)
        .where(CampaignChannel.campaign_id == campaign.id)
        .order_by(CampaignChannel.channel_type)
    ).all()
    ids = [c.id for c in channels]
    # One scan of the campaign's deliveries, grouped by channel, answers both questions
    # (how many rows per status, how many rows saw each event) with FILTERed counts,
    # instead of a query per status or per event.
    counted = session.execute(
        select(
            Delivery.campaign_channel_id,
            *(func.count().filter(Delivery.status == s).label(s) for s in DELIVERY_STATUSES),
            *(func.count(getattr(Delivery, f"{e}_at")).label(f"{e}_at") for e in EVENTS),
            func.count(Delivery.failed_at).label("failed_at"),
        )
        .where(Delivery.campaign_channel_id.in_(ids))
        .group_by(Delivery.campaign_channel_id)
    ).all()
    by_channel: dict[uuid.UUID, Any] = {row.campaign_channel_id: row for row in counted}
    events = _event_counts(session, ids)
    links = _link_counts(session, ids)
    unsubscribes = _unsubscribes(session, campaign.user_id, ids)
    timelines = _timelines(session, ids)

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

    def engagement_of(channel: CampaignChannel) -> ChannelEngagement:
        row = by_channel.get(channel.id)
        facts = {e: (getattr(row, f"{e}_at") if row else 0) for e in (*EVENTS, "failed")}
        counts = events.get(channel.id, {})
        base = RATE_BASE[channel.channel_type]
        return ChannelEngagement(
            channel_id=channel.id,
            channel=channel.channel_type,
            rate_base=base,
            rates={
                "delivery": _rate(facts["delivered"], facts["sent"]),
                "open": _rate(facts["opened"], facts[base]),
                "click": _rate(facts["clicked"], facts[base]),
            },
            # Human opens and clicks are the deliveries' facts (a machine never sets
            # them); total clicks and machine activity come from the event log.
            humans={
                "opened": facts["opened"],
                "clicked": facts["clicked"],
                "clicks": counts.get(("clicked", False, None), (0, 0))[0],
            },
            machines={
                "opened": counts.get(("opened", True, None), (0, 0))[1],
                "clicked": counts.get(("clicked", True, None), (0, 0))[1],
                "clicks": counts.get(("clicked", True, None), (0, 0))[0],
            },
            bounces={
                kind: counts.get(("failed", False, kind), (0, 0))[1] for kind in ("hard", "soft")
            },
            complaints=counts.get(("complained", False, None), (0, 0))[1],
            failed=facts["failed"],
            unsubscribes=unsubscribes.get(channel.id, 0),
            links=links.get(channel.id, []),
            timeline=timelines.get(channel.id, []),
        )

    return CampaignStats(
        campaign_id=campaign.id,
        status=campaign.status,
        status_reason=campaign.status_reason,
        started_at=campaign.started_at,
        ended_at=campaign.ended_at,
        channels=[stats_of(channel) for channel in channels],
        engagement=[engagement_of(channel) for channel in channels],
        timeline=_summed(timelines.values()),
    )


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _event_counts(
    session: Session, channel_ids: list[uuid.UUID]
) -> dict[uuid.UUID, dict[tuple[str, bool, str | None], tuple[int, int]]]:
    """Per channel, (kind, machine, bounce type) → (events, distinct deliveries), from
    one grouped scan of the channels' events (the (campaign_channel_id, occurred_at)
    index). Orphans (no delivery yet) have no channel and are not counted."""
    failure = case(
        (DeliveryEvent.kind == "failed", DeliveryEvent.detail["failure"].as_string()),
        else_=None,
    )
    rows = session.execute(
        select(
            DeliveryEvent.campaign_channel_id,
            DeliveryEvent.kind,
            DeliveryEvent.machine,
            failure.label("failure"),
            func.count().label("events"),
            func.count(distinct(DeliveryEvent.delivery_id)).label("deliveries"),
        )
        .where(
            DeliveryEvent.campaign_channel_id.in_(channel_ids),
            DeliveryEvent.kind.in_(("opened", "clicked", "failed", "complained")),
        )
        .group_by(
            DeliveryEvent.campaign_channel_id, DeliveryEvent.kind, DeliveryEvent.machine, failure
        )
    ).all()
    counts: dict[uuid.UUID, dict[tuple[str, bool, str | None], tuple[int, int]]] = {}
    for row in rows:
        counts.setdefault(row.campaign_channel_id, {})[
            (row.kind, bool(row.machine), row.failure)
        ] = (row.events, row.deliveries)
    return counts


def _link_counts(
    session: Session, channel_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[LinkStats]]:
    """Each link's unique and total clicks: the channels' links joined with their click
    events (the link id is in each click's detail), grouped by link, in one query."""
    human = DeliveryEvent.machine == false()
    rows = session.execute(
        select(
            CampaignLink.campaign_channel_id,
            CampaignLink.id,
            CampaignLink.url,
            CampaignLink.dynamic,
            func.count(distinct(case((human, DeliveryEvent.delivery_id)))).label("unique"),
            func.count(case((human, DeliveryEvent.id))).label("total"),
            func.count(case((DeliveryEvent.machine == true(), DeliveryEvent.id))).label("machine"),
        )
        .outerjoin(
            DeliveryEvent,
            and_(
                DeliveryEvent.campaign_channel_id == CampaignLink.campaign_channel_id,
                DeliveryEvent.kind == "clicked",
                DeliveryEvent.detail["link"].as_integer() == CampaignLink.id,
            ),
        )
        .where(CampaignLink.campaign_channel_id.in_(channel_ids))
        .group_by(
            CampaignLink.campaign_channel_id,
            CampaignLink.id,
            CampaignLink.url,
            CampaignLink.dynamic,
        )
        .order_by(CampaignLink.id)
    ).all()
    links: dict[uuid.UUID, list[LinkStats]] = {}
    for row in rows:
        links.setdefault(row.campaign_channel_id, []).append(
            LinkStats(row.id, row.url, row.dynamic, row.unique, row.total, row.machine)
        )
    return links


def _unsubscribes(
    session: Session, user_id: uuid.UUID, channel_ids: list[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """Deliveries of these channels whose address the recipient unsubscribed after the
    message was sent (the link in it, RFC 8058 one-click, STOP, a provider's opt-out):
    suppressions do not name a delivery, so this is the attribution. One join of the
    channels' sent deliveries with the user's unsubscribe suppressions (email compared
    lower-cased, as suppressions store it)."""
    address = case(
        (CampaignChannel.channel_type == "email", func.lower(Delivery.address)),
        else_=Delivery.address,
    )
    rows = session.execute(
        select(Delivery.campaign_channel_id, func.count(distinct(Delivery.id)))
        .join(CampaignChannel, CampaignChannel.id == Delivery.campaign_channel_id)
        .join(
            Suppression,
            and_(
                Suppression.user_id == user_id,
                Suppression.channel == CampaignChannel.channel_type,
                Suppression.address == address,
                Suppression.reason == "unsubscribe",
                Suppression.created_at >= Delivery.sent_at,
            ),
        )
        .where(Delivery.campaign_channel_id.in_(channel_ids), Delivery.sent_at.is_not(None))
        .group_by(Delivery.campaign_channel_id)
    ).all()
    return {channel_id: count for channel_id, count in rows}


_TIMELINE = ("sent", "delivered", "opened", "clicked")


def _timelines(session: Session, channel_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[HourStats]]:
    """Per channel and hour, the deliveries sent, delivered, opened and clicked (human:
    the deliveries' facts) in that hour: one UNION ALL of four grouped index range scans
    of the channels' deliveries, one per fact, each a handful of rows per hour."""
    dialect = session.get_bind().dialect.name
    parts = []
    for fact in _TIMELINE:
        column = getattr(Delivery, f"{fact}_at")
        hour = _hour(column, dialect)
        parts.append(
            select(
                Delivery.campaign_channel_id.label("channel_id"),
                hour.label("hour"),
                literal(fact).label("fact"),
                func.count().label("count"),
            )
            .where(Delivery.campaign_channel_id.in_(channel_ids), column.is_not(None))
            .group_by(Delivery.campaign_channel_id, hour)
        )
    rows = session.execute(union_all(*parts)).all()
    hours: dict[uuid.UUID, dict[datetime, dict[str, int]]] = {}
    for row in rows:
        at = _as_hour(row.hour)
        slot = hours.setdefault(row.channel_id, {}).setdefault(at, dict.fromkeys(_TIMELINE, 0))
        slot[row.fact] += row.count
    return {
        channel_id: [HourStats(at, **slots[at]) for at in sorted(slots)]
        for channel_id, slots in hours.items()
    }


def _hour(column, dialect: str):
    if dialect == "postgresql":
        return func.date_trunc("hour", column)
    return func.strftime("%Y-%m-%d %H:00:00", column)  # SQLite, the embedded default


def _as_hour(value: Any) -> datetime:
    # Stored as UTC without a zone: PostgreSQL hands back a naive datetime, SQLite text.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC)


def _summed(timelines) -> list[HourStats]:
    total: dict[datetime, dict[str, int]] = {}
    for timeline in timelines:
        for entry in timeline:
            slot = total.setdefault(entry.hour, dict.fromkeys(_TIMELINE, 0))
            for fact in _TIMELINE:
                slot[fact] += getattr(entry, fact)
    return [HourStats(at, **total[at]) for at in sorted(total)]


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

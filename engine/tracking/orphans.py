"""Events that arrived before their delivery could be found.

The sender records a message's provider id (Twilio's MessageSid, WhatsApp's wamid) at
its next checkpoint, up to 50 messages after the call; a fast status callback can beat
it. Answering with an error would only make the provider retry (or, for Twilio, drop
the callback), so such an event is stored with delivery_id NULL and adopted here once
the id is on its delivery: by the next callback about the same message, or by
`adopt_orphans`, which beat's reconciliation should run (see the tracking README
section). Orphans nobody claims within ORPHAN_TTL are dropped: they were about messages
Herald did not send (another system on the same Twilio account).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from engine.models import CampaignChannel, Delivery, DeliveryEvent
from engine.settings import Settings
from engine.tracking import suppression
from engine.tracking.recording import Event, Recorded, apply_facts
from engine.tracking.targets import Target, by_provider_message_id

ORPHAN_TTL = timedelta(days=7)
ADOPT_LIMIT = 1000
# Which channel each source's provider message ids belong to.
CHANNEL_OF_SOURCE = {"twilio": "sms", "whatsapp": "whatsapp"}


def adopt_for(
    session: Session,
    settings: Settings,
    target: Target,
    source: str,
    provider_message_id: str | None,
    now: datetime,
) -> int:
    """Adopt the orphans of one message into its delivery (found meanwhile); how many.
    Called before a new event of the same message is recorded, so they apply in the
    order they arrived."""
    if not provider_message_id:
        return 0
    rows = session.scalars(
        select(DeliveryEvent)
        .where(
            DeliveryEvent.delivery_id.is_(None),
            DeliveryEvent.source == source,
            DeliveryEvent.provider_message_id == provider_message_id,
        )
        .order_by(DeliveryEvent.id)
        .with_for_update(skip_locked=True)
    ).all()
    for row in rows:
        _adopt(session, settings, row, target, now)
    return len(rows)


def adopt_orphans(session: Session, settings: Settings, now: datetime) -> int:
    """Adopt every orphan whose delivery is now known, and drop those older than
    ORPHAN_TTL; how many were adopted. Repeatable: a second run finds nothing."""
    session.execute(
        delete(DeliveryEvent)
        .where(DeliveryEvent.delivery_id.is_(None), DeliveryEvent.received_at < now - ORPHAN_TTL)
        .execution_options(synchronize_session=False)
    )
    adopted = 0
    for source, channel in CHANNEL_OF_SOURCE.items():
        rows = session.scalars(
            select(DeliveryEvent)
            .join(Delivery, Delivery.provider_message_id == DeliveryEvent.provider_message_id)
            .join(CampaignChannel, CampaignChannel.id == Delivery.campaign_channel_id)
            .where(
                DeliveryEvent.delivery_id.is_(None),
                DeliveryEvent.source == source,
                CampaignChannel.channel_type == channel,
            )
            .order_by(DeliveryEvent.id)
            .limit(ADOPT_LIMIT)
            .with_for_update(of=DeliveryEvent, skip_locked=True)
        ).all()
        for row in rows:
            target = by_provider_message_id(session, channel, row.provider_message_id or "")
            if target is not None:
                _adopt(session, settings, row, target, now)
                adopted += 1
    return adopted


def _adopt(
    session: Session, settings: Settings, row: DeliveryEvent, target: Target, now: datetime
) -> None:
    channel_id = session.scalar(
        select(Delivery.campaign_channel_id).where(Delivery.id == target.delivery_id)
    )
    session.execute(
        update(DeliveryEvent)
        .where(DeliveryEvent.id == row.id, DeliveryEvent.delivery_id.is_(None))
        .values(delivery_id=target.delivery_id, campaign_channel_id=channel_id)
        .execution_options(synchronize_session=False)
    )
    detail = row.detail or {}
    event = Event(
        kind=row.kind,
        source=row.source,
        occurred_at=row.occurred_at,
        provider_event_id=row.provider_event_id,
        provider_message_id=row.provider_message_id,
        detail=detail,
        machine=row.machine,
        error=detail.get("error"),
        failure=detail.get("failure"),
    )
    new_facts = apply_facts(session, target.delivery_id, event)
    suppression.after_event(
        session, settings, target, event, Recorded(stored=True, new_facts=new_facts), now
    )

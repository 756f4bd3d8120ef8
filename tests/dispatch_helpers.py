"""Helpers for dispatch tests: bulk test data and the counter invariant.

`assert_counters_match(session)` is the invariant every dispatch scenario ends with:
each campaign_channels counter equals the count of its deliveries whose matching
timestamp is set. Reuse it after any scenario that sends or records events.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from engine.models import CampaignChannel, Delivery

COUNTED = {
    "sent_count": Delivery.sent_at,
    "delivered_count": Delivery.delivered_at,
    "opened_count": Delivery.opened_at,
    "clicked_count": Delivery.clicked_at,
}


def counter_mismatches(session: Session) -> list[dict]:
    """Every (channel, counter) whose stored value differs from the deliveries' count."""
    counts = (
        select(
            Delivery.campaign_channel_id.label("channel_id"),
            *[func.count(column).label(name) for name, column in COUNTED.items()],
        )
        .group_by(Delivery.campaign_channel_id)
        .subquery()
    )
    rows = session.execute(
        select(
            CampaignChannel.id,
            *[getattr(CampaignChannel, name) for name in COUNTED],
            *[func.coalesce(counts.c[name], 0) for name in COUNTED],
        ).outerjoin(counts, counts.c.channel_id == CampaignChannel.id)
    ).all()
    mismatches = []
    width = len(COUNTED)
    for row in rows:
        stored, actual = row[1 : 1 + width], row[1 + width :]
        for name, have, want in zip(COUNTED, stored, actual, strict=True):
            if have != want:
                mismatches.append(
                    {"channel_id": row[0], "counter": name, "stored": have, "deliveries": want}
                )
    return mismatches


def assert_counters_match(session: Session) -> None:
    """Each counter equals count(*) WHERE <event>_at IS NOT NULL over its deliveries."""
    session.expire_all()
    mismatches = counter_mismatches(session)
    assert not mismatches, f"counters disagree with the deliveries: {mismatches}"


def insert_contacts(
    session: Session,
    user_id: uuid.UUID,
    count: int,
    *,
    prefix: str = "c",
    channels: tuple[str, ...] = ("email", "sms", "push", "whatsapp"),
) -> None:
    """`count` contacts reachable (address and consent) on `channels`, in one INSERT …
    SELECT generate_series; addresses are {prefix}{n}@example.com, +1555{n:07}, and
    one push token push-{prefix}{n}. Commits."""
    session.execute(
        text(
            """
            INSERT INTO contacts (id, user_id, email, phone, whatsapp, push_tokens,
                                  first_name, consent_email, consent_sms, consent_push,
                                  consent_whatsapp, attributes)
            SELECT gen_random_uuid(), :user_id,
                   :prefix || n || '@example.com',
                   '+1555' || lpad(n::text, 7, '0'),
                   '+1555' || lpad(n::text, 7, '0'),
                   jsonb_build_array('push-' || :prefix || n),
                   'Name' || n, :email, :sms, :push, :whatsapp, '{}'::jsonb
            FROM generate_series(1, :count) AS n
            """
        ),
        {
            "user_id": user_id,
            "prefix": prefix,
            "count": count,
            "email": "email" in channels,
            "sms": "sms" in channels,
            "push": "push" in channels,
            "whatsapp": "whatsapp" in channels,
        },
    )
    session.commit()


def record_sent(session: Session, delivery_ids: list[int], now: datetime) -> int:
    """Mark rows sent the way the sending step must: compare-and-set on the status, and
    the channel counter bumped by exactly the rows that changed, in one transaction.
    For tests that need finished rows without running a worker. Commits."""
    changed = (
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(delivery_ids), Delivery.status.in_(("queued", "sending")))
            .values(status="sent", sent_at=now, lease_expires_at=None)
            .returning(Delivery.campaign_channel_id)
        )
        .scalars()
        .all()
    )
    for channel_id in set(changed):
        session.execute(
            update(CampaignChannel)
            .where(CampaignChannel.id == channel_id)
            .values(sent_count=CampaignChannel.sent_count + changed.count(channel_id))
        )
    session.commit()
    return len(changed)

"""Audience estimate time on 100,000 contacts and 1,000,000 events, against a baseline
measured in the same run.

Loads one user's contacts (attributes of mixed types, random consents) and events
(five types, numeric and text payloads, spread over a year) with INSERT … SELECT
generate_series, then times realistic definitions through the same service the API's
POST …/estimate calls (engine.services.audiences.estimate_audience), and the per-channel
recipient count of a campaign holding all of them. The baseline is the cheapest honest
count: SELECT count(*) FROM contacts WHERE user_id = …. The user and all its rows are
deleted at the end unless --keep.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/herald_bench \\
        .venv/bin/alembic upgrade head
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/herald_bench \\
        .venv/bin/python -m bench.audience_estimate [--contacts N] [--events N] [--gin]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from datetime import UTC, datetime

os.environ.setdefault("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/herald_bench")

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from engine.db import make_engine, make_session_factory
from engine.models import Campaign, Contact, User
from engine.services import audiences
from engine.settings import Settings

DEFINITIONS = {
    "attribute eq": {"field": "attributes.tier", "op": "eq", "value": "gold"},
    "attribute numeric range": {
        "all": [
            {"field": "attributes.score", "op": "gte", "value": 40},
            {"field": "attributes.score", "op": "lt", "value": 60},
        ]
    },
    "consent": {"consent": "email"},
    "event where+within+min_count": {
        "event": "order_placed",
        "where": [{"field": "value", "op": "gte", "value": 50}],
        "min_count": 2,
        "within_days": 30,
    },
    "did not perform (90 days)": {"event": "page_view", "within_days": 90, "performed": False},
    "issue example (nested all/any/not)": {
        "all": [
            {"field": "attributes.tier", "op": "eq", "value": "gold"},
            {"consent": "email"},
            {
                "event": "order_placed",
                "where": [{"field": "value", "op": "gte", "value": 50}],
                "min_count": 1,
                "within_days": 30,
            },
            {"not": {"field": "attributes.country", "op": "in", "value": ["FR", "BE"]}},
            {
                "any": [
                    {"field": "attributes.tags", "op": "contains", "value": "newsletter"},
                    {"field": "email", "op": "contains", "value": "7@"},
                ]
            },
        ]
    },
    "deep any/not of events": {
        "any": [
            {"not": {"all": [{"consent": "sms"}, {"event": "cart_abandoned", "max_count": 0}]}},
            {
                "all": [
                    {"event": "order_placed", "min_count": 3},
                    {"not": {"event": "refund", "within_days": 60}},
                ]
            },
        ]
    },
}

LOAD_CONTACTS = """
INSERT INTO contacts (id, user_id, external_id, email, phone, push_tokens, first_name,
                      locale, attributes, consent_email, consent_sms, consent_push,
                      consent_whatsapp)
SELECT gen_random_uuid(), :user_id, 'ext-' || g, 'person' || g || '@example.com',
       CASE WHEN g % 3 = 0 THEN '+3361' || lpad(g::text, 7, '0') END,
       CASE WHEN g % 4 = 0 THEN '["token-' || g || '"]' ELSE '[]' END::jsonb,
       'Name' || (g % 1000), (ARRAY['fr', 'en', 'de'])[1 + g % 3],
       jsonb_strip_nulls(jsonb_build_object(
           'tier', (ARRAY['gold', 'silver', 'bronze', 'none'])[1 + (g * 7) % 4],
           'country', (ARRAY['FR', 'BE', 'DE', 'US', 'GB'])[1 + (g * 13) % 5],
           'score', CASE WHEN g % 10 = 0 THEN to_jsonb('n/a'::text)
                         ELSE to_jsonb((g * 37) % 100) END,
           'tags', CASE WHEN g % 5 = 0 THEN '["newsletter", "vip"]'::jsonb
                        WHEN g % 5 = 1 THEN '["newsletter"]'::jsonb END)),
       random() < 0.7, random() < 0.5, random() < 0.4, random() < 0.2
FROM generate_series(1, :n) AS g
"""

LOAD_EVENTS = """
WITH numbered AS (
    SELECT id, row_number() OVER (ORDER BY id) AS rn FROM contacts WHERE user_id = :user_id
)
INSERT INTO data_events (id, data_source_id, contact_id, event_type, payload, occurred_at)
SELECT gen_random_uuid(), :source_id, numbered.id,
       (ARRAY['page_view', 'page_view', 'order_placed', 'cart_abandoned', 'refund'])[1 + g % 5],
       jsonb_build_object('value', round((random() * 200)::numeric, 2),
                          'sku', 'sku-' || (g % 500)),
       (now() AT TIME ZONE 'UTC') - random() * interval '365 days'
FROM generate_series(1, :n) AS g
JOIN numbered ON numbered.rn = 1 + (hashint4(g)::bigint + 2147483648) % :contacts
"""


def timed(call, repeat: int) -> tuple[float, object]:
    """Median wall time over `repeat` runs (after one warm-up) and the last result."""
    result = call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def load(session: Session, user_id: uuid.UUID, contacts: int, events: int) -> uuid.UUID:
    source_id = session.scalar(
        text(
            "INSERT INTO data_sources (user_id, name, source_type)"
            " VALUES (:user_id, 'bench shop', 'shopify') RETURNING id"
        ),
        {"user_id": user_id},
    )
    started = time.perf_counter()
    session.execute(text(LOAD_CONTACTS), {"user_id": user_id, "n": contacts})
    session.execute(
        text(LOAD_EVENTS),
        {"user_id": user_id, "source_id": source_id, "n": events, "contacts": contacts},
    )
    session.commit()
    loaded = time.perf_counter() - started
    print(f"loaded {contacts:,} contacts and {events:,} events in {loaded:.1f} s")
    return source_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--gin", action="store_true", help="measure with a GIN index on contacts.attributes"
    )
    parser.add_argument("--keep", action="store_true", help="keep the loaded rows")
    args = parser.parse_args()

    settings = Settings.from_env()
    engine = make_engine(settings)
    if engine.dialect.name != "postgresql":
        raise SystemExit("the estimate bench needs PostgreSQL (DATABASE_URL)")
    factory = make_session_factory(engine)
    session = factory()
    user = User(email=f"bench-{uuid.uuid4().hex[:8]}@example.com", password_hash="-")
    session.add(user)
    session.commit()
    try:
        load(session, user.id, args.contacts, args.events)
        if args.gin:
            session.execute(
                text(
                    "CREATE INDEX IF NOT EXISTS bench_contacts_attributes_gin"
                    " ON contacts USING gin (attributes jsonb_path_ops)"
                )
            )
        session.commit()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE contacts, data_events, contact_sources"))
        run(session, user.id, args.repeat)
    finally:
        session.rollback()
        if args.gin:
            session.execute(text("DROP INDEX IF EXISTS bench_contacts_attributes_gin"))
        if not args.keep:
            session.execute(delete(User).where(User.id == user.id))  # cascades to its rows
        session.commit()
        session.close()
        engine.dispose()


def run(session: Session, user_id: uuid.UUID, repeat: int) -> None:
    campaign = Campaign(user_id=user_id, name="bench")
    session.add(campaign)
    session.flush()
    created = {
        label: audiences.create_audience(
            session, user_id, campaign.id, name=label, definition=definition
        )
        for label, definition in DEFINITIONS.items()
    }
    session.commit()
    now = datetime.now(UTC)

    def baseline() -> int:
        return session.scalar(
            select(func.count()).select_from(Contact).where(Contact.user_id == user_id)
        )

    base_time, base_count = timed(baseline, repeat)
    print(f"{'baseline: count(*) of the user contacts':<44} {base_time * 1000:8.1f} ms")
    print(f"{'':<44} {'':>8}    {base_count:>7,} contacts")
    worst = 0.0
    for label, audience in created.items():
        elapsed, count = timed(
            lambda a=audience: audiences.estimate_audience(
                session, user_id, campaign.id, a.id, now=now
            ),
            repeat,
        )
        worst = max(worst, elapsed)
        print(
            f"{label:<44} {elapsed * 1000:8.1f} ms  {count:>9,} matched"
            f"  ({elapsed / base_time:5.1f}x baseline)"
        )
    elapsed, counts = timed(
        lambda: audiences.count_recipients(session, user_id, campaign.id, now=now), repeat
    )
    print(
        f"{'recipients/count (all audiences, 4 channels)':<44} {elapsed * 1000:8.1f} ms"
        f"  {counts['total']:>9,} total  ({elapsed / base_time:5.1f}x baseline)"
    )
    print(f"slowest estimate: {worst * 1000:.1f} ms (target < 1000 ms)")


if __name__ == "__main__":
    main()

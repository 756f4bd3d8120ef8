"""The acceptance journal: what a provider accepted, durable before the next call.

A batch records its outcomes in PostgreSQL at checkpoints (every 50 messages), so a
worker killed between two checkpoints used to leave up to 50 accepted-but-unrecorded
messages, all resent once reconciliation took the rows back. Here each acceptance is
written to Redis before the next call: in the same round trip that takes the next
message's rate token (see engine.ratelimit: the Lua script writes the entry, then
debits the buckets), or, with no rate to wait for, written to the socket just before
the call (held by the kernel until the call is out) and its reply read while the call
is out (RateLimiter.hand_over). Either way a kill leaves at most the one call whose
answer had not come back: the issue's "in flight".

    key    herald:journal:<campaign_channel_id>   (a hash; expires when left alone)
    field  <delivery id>:<attempt number>
    value  the provider's message id ("" when it gave none)

The attempt number is the claim's compare-and-set token: an entry only ever speaks for
the claim that made it, so a stale entry (Redis kept it, PostgreSQL moved on) matches
nothing. Entries are forgotten once their checkpoint has committed; reconciliation
reads what is left for rows whose lease ran out (engine.dispatch.reconciliation) and
records them as sent instead of sending them again.

Redis keeps nothing on disk, so a Redis restart loses the journal with the queues. The
batch that was running then fails its next round trip and records what it holds in
PostgreSQL on the way out; only a kill of that worker during the outage would resend
(at most a checkpoint's worth). Without Redis (the embedded default) there is no
journal and the checkpoint bounds resends.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

KEY_PREFIX = "herald:journal:"
# Far longer than any lease plus reconciliation delay; renewed by every write, so an
# active channel's journal never expires, and an abandoned one goes away by itself.
TTL_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class JournalEntry:
    """One acceptance, as the rate limiter's script writes it."""

    key: str
    field: str
    value: str
    ttl_ms: int = TTL_MS


def journal_key(channel_id: uuid.UUID) -> str:
    return f"{KEY_PREFIX}{channel_id}"


def _field(delivery_id: int, attempts: int) -> str:
    return f"{delivery_id}:{attempts}"


def acceptance(
    channel_id: uuid.UUID, delivery_id: int, attempts: int, provider_message_id: str | None
) -> JournalEntry:
    return JournalEntry(
        journal_key(channel_id), _field(delivery_id, attempts), provider_message_id or ""
    )


class AcceptanceJournal:
    """Reads and forgets journal entries (writes go through RateLimiter.take)."""

    def __init__(self, redis_client) -> None:
        self.redis = redis_client

    def forget(self, channel_id: uuid.UUID, rows: Iterable[tuple[int, int]]) -> None:
        """Drop the entries of (delivery id, attempts) rows now recorded in PostgreSQL."""
        fields = [_field(delivery_id, attempts) for delivery_id, attempts in rows]
        if fields:
            self.redis.hdel(journal_key(channel_id), *fields)

    def accepted(
        self, channel_id: uuid.UUID, rows: Sequence[tuple[int, int]]
    ) -> dict[int, str | None]:
        """{delivery id: provider message id or None} for the rows the journal says a
        provider accepted on exactly that attempt."""
        if not rows:
            return {}
        values = self.redis.hmget(journal_key(channel_id), [_field(i, a) for i, a in rows])
        return {
            delivery_id: (value.decode() or None)
            for (delivery_id, _), value in zip(rows, values, strict=True)
            if value is not None
        }

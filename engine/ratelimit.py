"""Global send rates: token buckets shared by every worker, kept in Redis.

Celery's `rate_limit` is per worker process, so N workers would send N times the limit.
Here every worker takes its tokens from the same Redis keys, in one Lua script, so the
check and the take are atomic across workers: several buckets (the provider's and the
campaign's) are debited together or not at all, and a denied take changes nothing.

Refill is computed from the `now` the caller passes (the injectable clock), not from
Redis TIME, so tests drive time explicitly and never sleep. Workers' clocks may differ
by a little; a `now` older than a bucket's last update simply refills nothing.

A bucket holds at most one second's worth of tokens (max(1, rate)): after an idle
spell a burst is at most one second of traffic, so any window of T seconds grants at
most rate * T + capacity. A bucket that does not exist yet starts EMPTY, not full: a
campaign launched onto idle workers would otherwise open with a one-second burst, and
its first 10 s would run 10 % over the limit. Under steady load a bucket never fills
(every token is taken as it comes), so the rate over any 10 s window stays at the
limit; it fills only while nobody asks, and then pays back the lull. Idle keys expire
on their own: an expired bucket starts empty again, the cautious choice.

Without Redis (the embedded default, one worker) the same arithmetic runs in memory.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from engine.clock import Clock, system_clock

if TYPE_CHECKING:
    from engine.dispatch.journal import JournalEntry

KEY_PREFIX = "herald:rate:"
# A bucket refills completely within one second, so after this long idle its key can go.
IDLE_EXPIRE_MS = 10_000
# Float arithmetic on refills leaves 0.9999999… where 1 was meant; close enough is a token.
EPSILON = 1e-6
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

# KEYS: the buckets, then (optionally) an acceptance journal hash. ARGV[1]: now in
# integer microseconds (exact in a double, unlike seconds since 1970 as a float, which
# leaves ~1e-7 s of noise in every refill); ARGV[2]: the idle expiry in ms; ARGV[3]: n,
# the number of buckets; ARGV[4..n+3]: each bucket's rate per second; then, when the
# journal key is there, its field, value and expiry in ms. The journal entry is written
# whether or not the take is granted: it records the previous call's acceptance, which
# must be durable before the next call (engine.dispatch.journal), and this saves it a
# round trip of its own.
# Each bucket is a hash {tokens, ts}. Returns "0" when granted, else the seconds to wait
# (as a string: Redis would truncate a Lua number to an integer).
_TAKE_SCRIPT = """
local now = tonumber(ARGV[1])
local expire = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
if #KEYS > n then
  redis.call('HSET', KEYS[n + 1], ARGV[n + 4], ARGV[n + 5])
  redis.call('PEXPIRE', KEYS[n + 1], tonumber(ARGV[n + 6]))
end
local tokens = {}
local stamps = {}
local born = {}
local wait = 0
for i = 1, n do
  local key = KEYS[i]
  local rate = tonumber(ARGV[i + 3])
  local capacity = math.max(1, rate)
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local level = tonumber(state[1])
  local ts = tonumber(state[2])
  if level == nil or ts == nil then
    level = 0
    ts = now
    born[i] = true
  end
  if now > ts then
    level = math.min(capacity, level + (now - ts) / 1e6 * rate)
    ts = now
  end
  tokens[i] = level
  stamps[i] = ts
  if level < 1 - 1e-6 then
    wait = math.max(wait, (1 - level) / rate)
  end
end
if wait > 0 then
  -- Denied: nothing is debited, but a bucket met for the first time starts filling
  -- from now (else every ask would find it new, and empty, again).
  for i = 1, n do
    if born[i] then
      redis.call('HSET', KEYS[i], 'tokens', '0', 'ts', string.format('%.17g', now))
      redis.call('PEXPIRE', KEYS[i], expire)
    end
  end
  return string.format('%.17g', wait)
end
for i = 1, n do
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', tokens[i] - 1),
             'ts', string.format('%.17g', stamps[i]))
  redis.call('PEXPIRE', KEYS[i], expire)
end
return '0'
"""


class RateLimiter:
    """take([(key, rate_per_second), …]) -> 0.0 when one token was taken from every
    bucket, else the seconds to wait before asking again (nothing was taken).
    A rate <= 0 means unlimited: that bucket is skipped."""

    def __init__(self, redis_client=None, clock: Clock = system_clock) -> None:
        # One connection of its own, held: a take is on every message's path, and
        # borrowing from the pool and handing back costs about as much client CPU as
        # the command itself. The client reconnects it after a Redis restart.
        self.redis = redis_client.client() if redis_client is not None else None
        self.clock = clock
        self._script = self.redis.register_script(_TAKE_SCRIPT) if self.redis else None
        self._memory: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    @property
    def durable(self) -> bool:
        """Whether journal entries passed to take() are kept (in Redis)."""
        return self._script is not None

    def take(
        self, buckets: Sequence[tuple[str, float]], journal: JournalEntry | None = None
    ) -> float:
        """Take one token from every bucket; with `journal`, first write that entry in
        the same round trip (without Redis there is nowhere durable to write it, and it
        is dropped: see engine.dispatch.journal)."""
        active = [(key, float(rate)) for key, rate in buckets if rate and rate > 0]
        if self._script is None or (not active and journal is None):
            if not active:
                return 0.0  # nothing limited, nothing to record: no round trip at all
            return self._take_in_memory(active, (self.clock.now() - _EPOCH) // _MICROSECOND)
        # Only the journal entry (no bucket) goes through the same script with n = 0:
        # one command is cheaper for the client than a pipeline of HSET and PEXPIRE.
        now = (self.clock.now() - _EPOCH) // _MICROSECOND
        keys = [KEY_PREFIX + key for key, _ in active]
        args = [now, IDLE_EXPIRE_MS, len(active), *(repr(rate) for _, rate in active)]
        if journal is not None:
            keys.append(journal.key)
            args += [journal.field, journal.value, journal.ttl_ms]
        return float(self._script(keys=keys, args=args))

    def _take_in_memory(self, active: list[tuple[str, float]], now: int) -> float:
        """The Lua script's arithmetic, for a single process without Redis."""
        with self._lock:
            levels: list[tuple[str, float, int]] = []
            wait = 0.0
            for key, rate in active:
                capacity = max(1.0, rate)
                level, ts = self._memory.setdefault(key, (0.0, now))
                if now > ts:
                    level, ts = min(capacity, level + (now - ts) / 1e6 * rate), now
                levels.append((key, level, ts))
                if level < 1 - EPSILON:
                    wait = max(wait, (1 - level) / rate)
            if wait > 0:
                return wait
            for key, level, ts in levels:
                self._memory[key] = (level - 1, ts)
            return 0.0


def wait_seconds(wait: float) -> float:
    """A wait rounded up to the microsecond, so a caller that sleeps exactly this long
    (or advances a test clock by it) is never a hair short of the next token."""
    return math.ceil(wait * 1e6) / 1e6

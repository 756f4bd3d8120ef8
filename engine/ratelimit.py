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

import contextlib
import hashlib
import math
import socket
import ssl
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


# What EVALSHA names the script by: Redis computes the same SHA-1 when it loads it.
_TAKE_SHA = hashlib.sha1(_TAKE_SCRIPT.encode()).hexdigest()


_EVALSHA_HEAD = b"$7\r\nEVALSHA\r\n$40\r\n%b\r\n" % _TAKE_SHA.encode()


def _evalsha_command(keys: list[str], args: list) -> bytes:
    """EVALSHA of the script as RESP, the bytes redis-py's pack_command writes for
    these plain str and int arguments. Packed here because the hand-over is written
    between a provider's answer and the next call, on every message's path, and
    redis-py's general packer (a type dispatch and an encoder call per argument) was
    most of the hand-over's time: py-spy, GIL samples of a latency-bound SMS worker."""
    parts = [str(part).encode() for part in (len(keys), *keys, *args)]
    return b"".join(
        [b"*%d\r\n" % (len(parts) + 2), _EVALSHA_HEAD]
        + [b"$%d\r\n%b\r\n" % (len(part), part) for part in parts]
    )


class RateLimiter:
    """take([(key, rate_per_second), …]) -> 0.0 when one token was taken from every
    bucket, else the seconds to wait before asking again (nothing was taken).
    A rate <= 0 means unlimited: that bucket is skipped."""

    def __init__(self, redis_client=None, clock: Clock = system_clock) -> None:
        self.redis = redis_client
        self.clock = clock
        self._connection = None  # the limiter's own, opened on first use
        # A journal write sent on it whose reply is not read yet (see hand_over), and
        # whether the kernel still holds it back.
        self._unconfirmed: tuple[list[str], list] | None = None
        self._held = False
        self._checked_socket, self._socket_holds = None, False
        self._memory: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    @property
    def durable(self) -> bool:
        """Whether journal entries passed to take() are kept (in Redis)."""
        return self.redis is not None

    def close(self) -> None:
        with self._lock:
            self._unconfirmed = None
            self._held = False  # closing the socket sends what it holds
            if self._connection is not None:
                self._connection.disconnect()
                self._connection = None

    def hand_over(self, journal: JournalEntry) -> None:
        """Give a journal entry to the kernel for Redis, without waiting; push() lets it
        go once the provider call is written, confirm() reads Redis's reply.

        For a call with no rate token to wait for, so that no round trip stands between
        two calls. The entry is written to the socket with MSG_MORE: the kernel holds
        it (Nagle's "more is coming") instead of sending it at once, because sending
        wakes Redis, and on a busy host the woken Redis ran first, in the gap between
        a provider's answer and the next call (~50 µs of every SMS's turn: gap trace
        of a latency-bound worker). Held is as durable as sent against the worker's
        death: the bytes belong to the kernel, and a SIGKILL closes the socket, which
        sends them before its FIN (nothing unread is in it to turn that into a reset:
        every earlier reply was read before this write). What the reply adds is Redis's
        word that it applied the entry; if it says otherwise (a restart lost the
        script, the connection broke), confirm writes the entry again, waiting this
        time, or raises. (Left alone, a held write still goes: here the kernel sent it
        after ~200 ms.)"""
        if self.redis is None:
            return  # nowhere durable to write it (see take)
        keys, args = self._script_args([], journal)
        with self._lock:
            self._confirm_locked()
            connection = self._own_connection()
            try:
                self._held = self._write_held(connection, _evalsha_command(keys, args))
            except (OSError, RedisConnectionError, RedisTimeoutError):
                connection.disconnect()  # once more, waiting, as any take would
                self._retried(keys, args, self._round_trip)
                return
            self._unconfirmed = (keys, args)

    def push(self) -> None:
        """Send a held hand-over on to Redis now (see hand_over)."""
        with self._lock:
            self._push_locked()

    def confirm(self) -> None:
        """Read the reply to the entry hand_over sent, if any; see there."""
        with self._lock:
            self._confirm_locked()

    def take(
        self, buckets: Sequence[tuple[str, float]], journal: JournalEntry | None = None
    ) -> float:
        """Take one token from every bucket; with `journal`, first write that entry in
        the same round trip (without Redis there is nowhere durable to write it, and it
        is dropped: see engine.dispatch.journal)."""
        active = [(key, float(rate)) for key, rate in buckets if rate and rate > 0]
        if self.redis is None or (not active and journal is None):
            if not active:
                return 0.0  # nothing limited, nothing to record: no round trip at all
            return self._take_in_memory(active, (self.clock.now() - _EPOCH) // _MICROSECOND)
        return float(self._evalsha(*self._script_args(active, journal)))

    def _script_args(
        self, active: list[tuple[str, float]], journal: JournalEntry | None
    ) -> tuple[list[str], list]:
        # Only the journal entry (no bucket) goes through the same script with n = 0:
        # one command is cheaper for the client than a pipeline of HSET and PEXPIRE.
        # With no bucket the script reads no time, and the clock is not asked.
        now = (self.clock.now() - _EPOCH) // _MICROSECOND if active else 0
        keys = [KEY_PREFIX + key for key, _ in active]
        args = [now, IDLE_EXPIRE_MS, len(active), *(repr(rate) for _, rate in active)]
        if journal is not None:
            keys.append(journal.key)
            args += [journal.field, journal.value, journal.ttl_ms]
        return keys, args

    def _evalsha(self, keys: list[str], args: list) -> bytes:
        """EVALSHA on the limiter's own connection: one write, one read.

        A take is on every message's path, and redis-py's command path (a pool checkout
        and hand-back, its retry wrapper, its metrics hooks) cost the worker more CPU
        than the round trip itself (py-spy: a quarter of a latency-bound worker's CPU).
        A script Redis has forgotten (a restart, SCRIPT FLUSH) is loaded again, and a
        connection lost to a Redis restart is reopened, each followed by one more try;
        anything else raises. A take that ran before its reply was lost and is tried
        again is harmless: the journal entry is the same, and one token too many only
        slows the rate by that token."""
        with self._lock:
            self._confirm_locked()  # a reply still due comes first on this connection
            self._own_connection()
            return self._retried(keys, args, self._round_trip)

    def _retried(self, keys: list[str], args: list, first_try) -> bytes:
        try:
            return first_try(keys, args)
        except NoScriptError:
            self.redis.script_load(_TAKE_SCRIPT)
        except (RedisConnectionError, RedisTimeoutError):
            self._connection.disconnect()  # the next send reconnects
        return self._round_trip(keys, args)

    def _write_held(self, connection, command: bytes) -> bool:
        """Write `command`, held back by the kernel where the socket allows it; says
        whether it is held. Through redis-py's socket (`_sock`): its API passes no send
        flags. Whether the socket can hold is asked once per socket (its family is a
        property that costs more than the write)."""
        if connection._sock is None:
            connection.connect()
        sock = connection._sock
        if sock is not self._checked_socket:
            self._checked_socket, self._socket_holds = sock, _can_hold(sock)
        if not self._socket_holds:
            connection.send_packed_command([command])
            return False
        sock.sendall(command, socket.MSG_MORE)
        return True

    def _push_locked(self) -> None:
        if not self._held:
            return
        self._held = False
        sock = self._connection._sock if self._connection is not None else None
        if sock is not None:
            # Setting TCP_NODELAY (again) sends what the socket holds, at once.
            with contextlib.suppress(OSError):  # broken: confirm finds out, and retries
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _confirm_locked(self) -> None:
        self._push_locked()  # else the reply waits for the kernel to let the write go
        if self._unconfirmed is None:
            return
        keys, args = self._unconfirmed
        self._unconfirmed = None
        self._retried(keys, args, lambda *_: self._connection.read_response())

    def _own_connection(self):
        if self._connection is None:
            pool = self.redis.connection_pool
            self._connection = pool.connection_class(**pool.connection_kwargs)
        return self._connection

    def _round_trip(self, keys: list[str], args: list) -> bytes:
        self._connection.send_packed_command([_evalsha_command(keys, args)])
        return self._connection.read_response()

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


def _can_hold(sock) -> bool:
    """Whether writes on `sock` can be held back with MSG_MORE: TCP only (a TLS socket
    takes no send flags, and a Unix socket sends at once anyway)."""
    return not isinstance(sock, ssl.SSLSocket) and sock.family in (
        socket.AF_INET,
        socket.AF_INET6,
    )


def wait_seconds(wait: float) -> float:
    """A wait rounded up to the microsecond, so a caller that sleeps exactly this long
    (or advances a test clock by it) is never a hair short of the next token."""
    return math.ceil(wait * 1e6) / 1e6

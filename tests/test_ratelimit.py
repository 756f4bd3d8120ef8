"""The global token bucket, on the real Redis and in memory, driven by a FixedClock."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis

from engine.clock import FixedClock
from engine.dispatch.journal import TTL_MS, AcceptanceJournal, acceptance, journal_key
from engine.ratelimit import RateLimiter, wait_seconds
from tests.conftest import TEST_REDIS_URL

START = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def redis_client():
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(params=["redis", "memory"])
def make_limiter(request, redis_client):
    """Build limiters sharing one store: Redis (like several workers) or one process."""
    shared = RateLimiter(None)

    def make(clock: FixedClock) -> RateLimiter:
        if request.param == "redis":
            return RateLimiter(redis_client, clock)
        shared.clock = clock
        return shared

    return make


def advance(clock: FixedClock, seconds: float) -> None:
    clock.set(clock.now() + timedelta(seconds=seconds))


def primed(limiter: RateLimiter, clock: FixedClock, *buckets) -> RateLimiter:
    """Meet the buckets, then stay idle long enough for them to fill: one second's worth."""
    limiter.take(list(buckets))
    advance(clock, 60)
    return limiter


def test_a_new_bucket_starts_empty_so_a_launch_does_not_burst(make_limiter):
    clock = FixedClock(START)
    limiter = make_limiter(clock)
    bucket = [("provider:sms", 10.0)]
    assert limiter.take(bucket) == pytest.approx(0.1)
    advance(clock, 0.1)  # the denied first ask started the bucket filling
    assert limiter.take(bucket) == 0.0
    assert limiter.take(bucket) == pytest.approx(0.1)


def test_capacity_is_one_second_then_the_wait_is_one_token(make_limiter):
    clock = FixedClock(START)
    bucket = [("provider:sms", 10.0)]
    limiter = primed(make_limiter(clock), clock, *bucket)
    assert [limiter.take(bucket) for _ in range(10)] == [0.0] * 10
    assert limiter.take(bucket) == pytest.approx(0.1)
    advance(clock, 0.05)
    assert limiter.take(bucket) == pytest.approx(0.05)  # half refilled, nothing taken
    advance(clock, 0.05)
    assert limiter.take(bucket) == 0.0
    assert limiter.take(bucket) == pytest.approx(0.1)


def test_refill_never_exceeds_capacity(make_limiter):
    clock = FixedClock(START)
    bucket = [("provider:email", 5.0)]
    limiter = primed(make_limiter(clock), clock, *bucket)
    for _ in range(5):
        assert limiter.take(bucket) == 0.0
    advance(clock, 60)  # a long idle spell refills one second's worth, not sixty
    granted = sum(1 for _ in range(20) if limiter.take(bucket) == 0.0)
    assert granted == 5


def test_slow_rate_still_holds_one_token(make_limiter):
    clock = FixedClock(START)
    bucket = [("campaign:slow", 0.5)]
    limiter = primed(make_limiter(clock), clock, *bucket)
    assert limiter.take(bucket) == 0.0
    assert limiter.take(bucket) == pytest.approx(2.0)


def test_buckets_are_taken_together_or_not_at_all(make_limiter):
    clock = FixedClock(START)
    provider, campaign = ("provider:email", 100.0), ("campaign:c1", 2.0)
    limiter = primed(make_limiter(clock), clock, provider, campaign)
    assert limiter.take([provider, campaign]) == 0.0
    assert limiter.take([provider, campaign]) == 0.0
    # The campaign bucket is empty: the provider bucket must not be debited either.
    assert limiter.take([provider, campaign]) == pytest.approx(0.5)
    granted_alone = sum(1 for _ in range(200) if limiter.take([provider]) == 0.0)
    assert granted_alone == 98  # 100 capacity, 2 taken by the two granted pairs


def test_unlimited_buckets_are_skipped(make_limiter):
    limiter = make_limiter(FixedClock(START))
    assert all(limiter.take([("provider:push", 0.0)]) == 0.0 for _ in range(1000))
    assert limiter.take([]) == 0.0


@pytest.mark.parametrize("rate", [7.0, 50.0, 1000.0])
def test_ten_second_window_stays_within_five_percent(make_limiter, rate):
    """Two workers (two limiters on one store) ask as fast as they may for 10 s of
    simulated time; together they get rate * 10: no opening burst, since a new bucket
    starts empty."""
    clock = FixedClock(START)
    workers = [make_limiter(clock), make_limiter(clock)]
    end = START + timedelta(seconds=10)
    granted = 0
    turn = 0
    while clock.now() < end:
        wait = workers[turn % 2].take([("provider:sms", rate)])
        turn += 1
        if wait == 0.0:
            granted += 1
        else:
            advance(clock, wait_seconds(wait))
    expected = rate * 10
    assert abs(granted - expected) <= 0.05 * expected
    assert granted <= expected + 1


def test_threads_sharing_a_redis_bucket_never_exceed_its_budget(redis_client):
    clock = FixedClock(START)
    primed(RateLimiter(redis_client, clock), clock, ("provider:email", 25.0))
    granted = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        limiter = RateLimiter(redis.Redis.from_url(TEST_REDIS_URL), clock)
        barrier.wait()
        mine = sum(1 for _ in range(50) if limiter.take([("provider:email", 25.0)]) == 0.0)
        with lock:
            granted.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 25  # 400 asks, one second's worth of tokens, time frozen


def test_idle_keys_expire(redis_client):
    clock = FixedClock(START)
    limiter = primed(RateLimiter(redis_client, clock), clock, ("campaign:idle", 3.0))
    assert limiter.take([("campaign:idle", 3.0)]) == 0.0
    ttl = redis_client.pttl("herald:rate:campaign:idle")
    assert 0 < ttl <= 10_000


def test_a_journal_entry_rides_on_the_take_granted_or_not(redis_client):
    clock = FixedClock(START)
    bucket = [("provider:sms", 1.0)]
    limiter = primed(RateLimiter(redis_client, clock), clock, *bucket)
    channel = uuid.uuid4()
    assert limiter.take(bucket, journal=acceptance(channel, 7, 1, "SM7")) == 0.0
    # Denied (the bucket is empty): the entry is written all the same.
    assert limiter.take(bucket, journal=acceptance(channel, 8, 1, None)) > 0
    # No bucket limited at all: still one round trip, for the entry.
    assert limiter.take([("provider:sms", 0.0)], journal=acceptance(channel, 9, 2, "SM9")) == 0.0
    assert redis_client.hgetall(journal_key(channel)) == {
        b"7:1": b"SM7",
        b"8:1": b"",
        b"9:2": b"SM9",
    }
    assert 0 < redis_client.pttl(journal_key(channel)) <= TTL_MS
    journal = AcceptanceJournal(redis_client)
    assert journal.accepted(channel, [(7, 1), (8, 1), (9, 1), (10, 1)]) == {7: "SM7", 8: None}
    journal.forget(channel, [(7, 1), (8, 1), (9, 2)])
    assert redis_client.exists(journal_key(channel)) == 0


def _in_redis_soon(client, key: str, field: str) -> bytes | None:
    """The field once Redis has it (it applies writes on its own time), or None."""
    deadline = time.monotonic() + 5
    while (value := client.hget(key, field)) is None and time.monotonic() < deadline:
        time.sleep(0.001)  # waiting on another process, not pacing
    return value


def test_a_handed_over_entry_goes_on_when_pushed_and_its_reply_is_read_later(redis_client):
    """hand_over gives the entry to the kernel, push lets it go: Redis applies it
    whether or not the reply is ever read (another connection sees it). confirm reads
    the reply, pushing first; so does anything else the limiter sends next on its
    connection."""
    limiter = RateLimiter(redis_client, FixedClock(START))
    channel = uuid.uuid4()
    key = journal_key(channel)
    limiter.hand_over(acceptance(channel, 1, 1, "SM1"))
    limiter.push()
    assert _in_redis_soon(redis_client, key, "1:1") == b"SM1"  # no reply read yet
    limiter.confirm()
    limiter.confirm()  # nothing due: nothing read
    limiter.hand_over(acceptance(channel, 2, 1, "SM2"))
    limiter.hand_over(acceptance(channel, 3, 1, None))  # pushes 2, reads its reply, writes
    assert limiter.take([("provider:sms", 5.0)]) > 0  # pushes 3, reads its reply, then its own
    assert redis_client.hgetall(key) == {b"1:1": b"SM1", b"2:1": b"SM2", b"3:1": b""}
    assert 0 < redis_client.pttl(key) <= TTL_MS
    limiter.hand_over(acceptance(channel, 4, 1, "SM4"))
    limiter.confirm()  # never pushed: confirm pushes it, then reads its reply
    assert redis_client.hget(key, "4:1") == b"SM4"
    limiter.close()


def _hand_over_and_die(channel: uuid.UUID) -> None:
    limiter = RateLimiter(redis.Redis.from_url(TEST_REDIS_URL), FixedClock(START))
    limiter.take([], journal=acceptance(channel, 1, 1, "SM1"))  # connected, script loaded
    limiter.hand_over(acceptance(channel, 2, 1, "SM2"))
    os._exit(17)  # like SIGKILL: no push, no confirm, no close


def test_an_entry_held_by_a_worker_that_dies_still_reaches_redis(redis_client):
    """A worker killed between hand_over and push (its provider call written, the entry
    still held back by the kernel): closing the dead process's socket sends what it
    holds, and Redis applies the entry."""
    channel = uuid.uuid4()
    child = multiprocessing.get_context("fork").Process(target=_hand_over_and_die, args=(channel,))
    child.start()
    child.join(30)
    assert child.exitcode == 17
    assert _in_redis_soon(redis_client, journal_key(channel), "2:1") == b"SM2"


def test_entries_are_written_byte_for_byte_whatever_their_characters(redis_client):
    """The limiter packs its commands itself (RESP lengths count bytes, not
    characters): entries with non-ASCII text and a bucket rate with decimals reach
    Redis as given, by hand-over and by take alike."""
    limiter = RateLimiter(redis_client, FixedClock(START))
    channel = uuid.uuid4()
    key = journal_key(channel)
    limiter.hand_over(acceptance(channel, 1, 1, "<d1.é€@exämple.com>"))
    assert limiter.take([("provider:sms", 2.5)], journal=acceptance(channel, 2, 1, "ß" * 300)) > 0
    limiter.confirm()
    assert redis_client.hgetall(key) == {
        b"1:1": "<d1.é€@exämple.com>".encode(),
        b"2:1": ("ß" * 300).encode(),
    }
    limiter.close()


def test_a_hand_over_that_redis_refused_is_written_again_on_confirm(redis_client):
    """A Redis restart between two calls forgets the script (NOSCRIPT) or kills the
    connection: the entry did not land, so confirm loads the script or reconnects and
    writes it again, waiting this time."""
    name = f"limiter-{uuid.uuid4().hex[:8]}"  # its connection's CLIENT SETNAME
    named = redis.Redis.from_url(TEST_REDIS_URL, client_name=name)
    limiter = RateLimiter(named, FixedClock(START))
    channel = uuid.uuid4()
    limiter.take([], journal=acceptance(channel, 1, 1, "SM1"))  # connected, script loaded
    redis_client.script_flush()
    limiter.hand_over(acceptance(channel, 2, 1, "SM2"))  # answered NOSCRIPT
    limiter.confirm()
    assert redis_client.hget(journal_key(channel), "2:1") == b"SM2"

    (own,) = [c for c in redis_client.client_list() if c["name"] == name and c["cmd"] == "evalsha"]
    assert redis_client.client_kill_filter(_id=own["id"]) == 1
    limiter.hand_over(acceptance(channel, 3, 1, "SM3"))  # onto the dead socket, or refused
    limiter.confirm()
    assert redis_client.hget(journal_key(channel), "3:1") == b"SM3"
    limiter.close()
    named.close()


def test_a_hand_over_that_cannot_be_written_is_written_again_at_once(redis_client):
    """The write itself fails (the limiter's socket is gone) after a Redis restart that
    also forgot the script: the hand-over reconnects, loads the script and writes the
    entry, waiting, before it returns."""
    limiter = RateLimiter(redis_client, FixedClock(START))
    channel = uuid.uuid4()
    limiter.take([], journal=acceptance(channel, 1, 1, "SM1"))  # connected, script loaded
    redis_client.script_flush()
    limiter._connection._sock.close()  # as a restart would leave it, seen from our side
    limiter.hand_over(acceptance(channel, 2, 1, "SM2"))
    assert redis_client.hget(journal_key(channel), "2:1") == b"SM2"  # before any confirm
    limiter.confirm()  # nothing left to read
    limiter.close()


def test_without_redis_journal_entries_are_not_kept():
    limiter = RateLimiter(None, FixedClock(START))
    assert not limiter.durable
    assert limiter.take([], journal=acceptance(uuid.uuid4(), 1, 1, "x")) == 0.0
    limiter.hand_over(acceptance(uuid.uuid4(), 2, 1, "y"))
    limiter.confirm()


def test_a_forgotten_script_and_a_dropped_connection_are_recovered_once(redis_client):
    """The limiter talks to Redis on a connection of its own. After a Redis restart its
    socket is dead and the script is gone; the next take reconnects, loads the script
    again and is answered, as if nothing happened."""
    clock = FixedClock(START)
    name = f"limiter-{uuid.uuid4().hex[:8]}"  # its connection's CLIENT SETNAME
    named = redis.Redis.from_url(TEST_REDIS_URL, client_name=name)
    limiter = RateLimiter(named, clock)
    bucket = [("provider:sms", 10.0)]
    limiter.take(bucket)  # meets the bucket: empty, starts filling
    advance(clock, 1)

    redis_client.script_flush()
    assert limiter.take(bucket) == 0.0  # NOSCRIPT, loaded again, taken

    # The limiter's own connection; the pool's (which loaded the script) has the name too.
    (own,) = [c for c in redis_client.client_list() if c["name"] == name and c["cmd"] == "evalsha"]
    assert redis_client.client_kill_filter(_id=own["id"]) == 1
    assert limiter.take(bucket) == 0.0  # reconnected, taken
    limiter.close()
    named.close()


def test_a_redis_that_stays_down_is_an_error_not_a_grant():
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    limiter = RateLimiter(down, FixedClock(START))
    with pytest.raises(redis.ConnectionError):
        limiter.take([("provider:sms", 10.0)])

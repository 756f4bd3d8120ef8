"""The global send rate, as the provider sees it, with several workers sharing it.

Issue 4: "With two or more workers, the rate over any 10 s window stays within 5% of
the limit." This starts real `celery worker` processes (default 2 workers x 2 pool
processes = 4 concurrent senders) and one real `celery beat`, all sending one SMS
campaign through the Twilio REST protocol to a loopback Twilio sink
(tests/providers/http_sinks.py, a real HTTP server in this process) that stamps every
accepted message on arrival. Then it slides a 10 s window over the arrival times.

Two runs in the same process, same workers' configuration, same data:

* baseline: no limit, to show what the same workers do unthrottled (so the limit is
  what holds them back, not the machine);
* limited: SMS_RATE_PER_SECOND=R, the Redis token bucket every worker shares.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/herald_bench_rate \\
    REDIS_URL=redis://127.0.0.1:6379/14 .venv/bin/python -m bench.rate_limit --rate 200

The database is created and migrated if missing; the Redis database is flushed first.
"""

from __future__ import annotations

import os

os.environ.setdefault("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/herald_bench_rate")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")

import argparse
import bisect
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import create_engine, func, select, text

from engine.campaigns.transitions import transition
from engine.db import make_engine, make_session_factory, session_scope
from engine.models import Audience, Campaign, CampaignChannel, Delivery, User
from engine.settings import QUEUES, Settings, get_settings
from tests.providers.http_sinks import TwilioSink

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(ROOT / ".venv" / "bin" / "celery")
WINDOW = 10.0
SMS_CONFIG = {"body": "Hi {{ contact.first_name }}, spring sale: 20% off."}


def ensure_database(url: str) -> None:
    """Create the bench database if it is missing, then migrate it to head."""
    from alembic import command
    from alembic.config import Config

    settings = Settings(database_url=url)
    sa_url = settings.sqlalchemy_url
    name = sa_url.rsplit("/", 1)[1]
    admin = create_engine(sa_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if not conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}):
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", sa_url)
    command.upgrade(config, "head")


def create_campaign(factory, recipients: int) -> tuple[uuid.UUID, uuid.UUID]:
    with session_scope(factory) as session:
        user = User(email=f"rate-{uuid.uuid4().hex[:8]}@example.com", password_hash="x")
        session.add(user)
        session.flush()
        session.execute(
            text(
                "INSERT INTO contacts (id, user_id, phone, first_name, consent_sms,"
                " push_tokens, attributes)"
                " SELECT gen_random_uuid(), :user_id, '+1555' || lpad(n::text, 7, '0'),"
                " 'Name' || n, true, '[]'::jsonb, '{}'::jsonb"
                " FROM generate_series(1, :n) AS n"
            ),
            {"user_id": user.id, "n": recipients},
        )
        campaign = Campaign(user_id=user.id, name="rate bench", config={})
        session.add(campaign)
        session.flush()
        session.add(Audience(campaign_id=campaign.id, name="all", definition={"all": []}))
        session.add(CampaignChannel(campaign_id=campaign.id, channel_type="sms", config=SMS_CONFIG))
        return user.id, campaign.id


@dataclass
class Windows:
    sent: int
    elapsed: float
    lowest: float  # messages per second in the slowest / fastest full 10 s window
    highest: float
    windows: int

    def deviation(self, limit: float) -> float:
        """The worst relative distance of any full window's rate from the limit."""
        return max(abs(self.lowest - limit), abs(self.highest - limit)) / limit


def slide(times: list[float], window: float = WINDOW) -> Windows:
    """Every window [t, t + 10 s) that starts at an arrival and ends before the last
    one, so each is full of traffic: the count in it, divided by 10 s."""
    times = sorted(times)
    rates = []
    for i, start in enumerate(times):
        if start + window > times[-1]:
            break
        rates.append((bisect.bisect_left(times, start + window) - i) / window)
    if not rates:
        raise SystemExit(f"the run lasted less than {window:.0f} s: raise --seconds")
    return Windows(len(times), times[-1] - times[0], min(rates), max(rates), len(rates))


def run_once(args, sink: TwilioSink, factory, rate: float, recipients: int) -> list[float]:
    """Send one campaign of `recipients` SMS; the sink's arrival times of each accepted
    message."""
    user_id, campaign_id = create_campaign(factory, recipients)
    env = {
        **os.environ,
        **sink.env(),
        "SMS_RATE_PER_SECOND": str(rate),
        "HERALD_RECONCILE_INTERVAL": "1",
        "HERALD_ENV": "development",
        "PYTHONPATH": str(ROOT),
    }
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i in range(args.workers):
                procs.append(
                    subprocess.Popen(
                        [CELERY, "-A", "workers", "worker", "-Q", ",".join(QUEUES),
                         "--concurrency", str(args.concurrency), "-P", "prefork",
                         "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                         "-n", f"rate{i}-{uuid.uuid4().hex[:6]}@%h"],
                        cwd=ROOT, env=env, start_new_session=True,
                        stdout=subprocess.DEVNULL,
                    )
                )  # fmt: skip
            procs.append(
                subprocess.Popen(
                    [CELERY, "-A", "workers", "beat", "--loglevel", "WARNING",
                     "-s", str(Path(tmp) / "celerybeat-schedule")],
                    cwd=ROOT, env=env, start_new_session=True,
                    stdout=subprocess.DEVNULL,
                )
            )  # fmt: skip
            time.sleep(3)  # let the workers come up before the clock starts
            sink.requests.clear()
            sink.accepted_count = 0
            with session_scope(factory) as session:
                transition(session, user_id, campaign_id, "launch")
            deadline = time.monotonic() + args.timeout
            while sink.accepted_count < recipients:
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out at {sink.accepted_count} of {recipients}")
                time.sleep(0.2)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)  # the parent: a warm shutdown
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    accepted = sink.accepted()
    with session_scope(factory) as session:
        channel = session.scalar(
            select(CampaignChannel).where(CampaignChannel.campaign_id == campaign_id)
        )
        sent_rows = session.scalar(
            select(func.count()).where(
                Delivery.campaign_channel_id == channel.id, Delivery.status == "sent"
            )
        )
        recorded = channel.sent_count
    keys = {r.header("I-Twilio-Idempotency-Token") for r in accepted}
    print(
        f"  accepted {len(accepted):,} ({len(keys):,} distinct deliveries);"
        f" sent rows {sent_rows:,}, sent_count {recorded:,}"
    )
    return [r.received_at for r in accepted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of the limited run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    ensure_database(os.environ["DATABASE_URL"])
    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()
    factory = make_session_factory(make_engine(get_settings()))
    recipients = int(args.rate * args.seconds)
    senders = args.workers * args.concurrency
    print(
        f"{args.workers} workers x {args.concurrency} processes = {senders} senders,"
        f" {recipients:,} SMS to a loopback Twilio API"
    )
    with TwilioSink() as sink:
        print("baseline, no limit:")
        times = run_once(args, sink, factory, 0.0, recipients)
        unthrottled = len(times) / (max(times) - min(times))
        print(f"  {unthrottled:,.0f} msg/s first to last arrival")
        print(f"limited to {args.rate:g} msg/s, shared by all workers:")
        limited = slide(run_once(args, sink, factory, args.rate, recipients))
    print(
        f"  {limited.sent / limited.elapsed:,.1f} msg/s on average over {limited.elapsed:.1f} s;"
        f" {limited.windows:,} full 10 s windows: {limited.lowest:.1f} to {limited.highest:.1f}"
        f" msg/s; worst deviation from the limit {100 * limited.deviation(args.rate):.2f} %"
        " (target: within 5 %)"
    )
    print(
        f"  the limit held the same workers to {100 * args.rate / unthrottled:.1f} %"
        " of their unthrottled rate"
    )


if __name__ == "__main__":
    main()

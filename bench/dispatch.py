"""Dispatch throughput: the batch engine against one Celery task per recipient, same run.

Creates N contacts (email + phone, consent on both) for a fresh bench user, a campaign
with an email and an SMS channel and one audience {"all": []}, on the null provider,
then starts real `celery worker` processes and measures:

* planning: launch → both channels planned (INSERT … SELECT of every delivery);
* launch → completed, and messages per second = deliveries sent / elapsed;
* the naive design on a sample of the same contacts: one task per recipient and
  channel, each loading its campaign, rendering, sending, inserting its delivery and
  bumping the counter in its own transaction;
* the ratio between the two, and the peak RSS (VmHWM) of every worker process.

This process plays beat: it sends herald.reconcile every RECONCILE_INTERVAL (5 s, as
beat does), because completion is noticed by reconciliation.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/herald_bench \\
    REDIS_URL=redis://127.0.0.1:6379/14 .venv/bin/python -m bench.dispatch --contacts 100000

Run `DATABASE_URL=… .venv/bin/alembic upgrade head` first. The Redis database is purged
of Herald's queues at the start; the bench user (and everything it owns) is deleted at
the end unless --keep is given. Worker processes are always stopped.

The naive worker imports this module (`celery -A bench.dispatch worker`), which is why
the module builds a Celery app and registers the naive task at import time.
"""

from __future__ import annotations

import os

# Before anything reads the settings (importing `workers` builds the Celery app from them).
os.environ.setdefault("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/herald_bench")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")

import argparse
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from celery import shared_task
from sqlalchemy import func, select, text, update

import workers
from engine.campaigns.rendering import CompiledChannel
from engine.campaigns.transitions import transition
from engine.channels import OutboundMessage, channel_for
from engine.clock import system_clock
from engine.db import make_engine, make_session_factory, session_scope
from engine.models import Audience, Campaign, CampaignChannel, Contact, Delivery, User
from engine.models.base import UTCDateTime
from engine.settings import QUEUES, get_settings
from workers.db import task_session

# The worker app (built at import of `workers`, from these settings); the naive worker
# runs `celery -A bench.dispatch`, which finds it here with the naive task registered.
app = workers.app

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(ROOT / ".venv" / "bin" / "celery")
NAIVE_TASK = "herald.bench.naive_send"  # herald.* → the default queue
# Beat's own interval: a shorter one piles reconcile tasks up behind the sends.
RECONCILE_TICK = get_settings().reconcile_interval
# The observer shares the two CPUs with what it measures, so each poll must cost little:
# one prepared statement on a kept connection. The workers' /proc files are read every
# SAMPLE_EVERY seconds and once at the end: VmHWM (peak RSS) and the CPU times are the
# kernel's own running totals, so only PSS (a walk of every page) depends on how often
# it is sampled. Polled through the ORM with every /proc file read each time, it used
# ~11 % of the machine during a run (perf, 7 Dec 2026), all of it taken from the workers
# and PostgreSQL. Completion is timed from campaigns.ended_at, so POLL only bounds how
# late the observer notices it, not the figure.
POLL = 0.05
SAMPLE_EVERY = 1.0

EMAIL_CONFIG = {
    "subject": "Hello {{ contact.first_name }}",
    "html": "<p>Hi {{ contact.first_name }}, spring is here.</p>",
    "text": "Hi {{ contact.first_name }}, spring is here.",
    "from_email": "news@example.com",
}
SMS_CONFIG = {"body": "Hi {{ contact.first_name }}, {{ campaign.name }}"}
CONFIGS = {"email": EMAIL_CONFIG, "sms": SMS_CONFIG}


# -- the naive design ------------------------------------------------------------------

_naive_channels: dict = {}


@shared_task(name=NAIVE_TASK)
def naive_send(channel_id: str, contact_id: str, address: str) -> None:
    """One recipient on one channel, the way a per-recipient design does it: load the
    campaign, render, send, insert the delivery, bump the counter, commit."""
    now = system_clock.now()
    with task_session() as session:
        channel_row, campaign = session.execute(
            select(CampaignChannel, Campaign)
            .join(Campaign, Campaign.id == CampaignChannel.campaign_id)
            .where(CampaignChannel.id == uuid.UUID(channel_id))
        ).one()
        contact = session.get(Contact, uuid.UUID(contact_id))
        kind = channel_row.channel_type
        compiled = CompiledChannel.compile(kind, channel_row.config, campaign)
        if kind not in _naive_channels:
            _naive_channels[kind] = channel_for(kind, get_settings())
        inserted = session.execute(
            text(
                "INSERT INTO deliveries (campaign_channel_id, contact_id, address, status,"
                " attempts, created_at) VALUES (:ch, :co, :ad, 'sending', 1, :now)"
                " ON CONFLICT (campaign_channel_id, contact_id) DO NOTHING RETURNING id"
            ),
            {"ch": channel_row.id, "co": contact.id, "ad": address, "now": now},
        ).scalar()
        if inserted is None:  # a redelivered task: already sent
            return
        content = compiled.render(contact)
        result = _naive_channels[kind].send(
            OutboundMessage(
                delivery_id=inserted,
                idempotency_key=f"d{inserted}",
                address=address,
                content=content,
            )
        )
        session.execute(
            update(Delivery)
            .where(Delivery.id == inserted)
            .values(status="sent", sent_at=now, provider_message_id=result.provider_message_id)
        )
        session.execute(
            update(CampaignChannel)
            .where(CampaignChannel.id == channel_row.id)
            .values(sent_count=CampaignChannel.sent_count + 1)
        )


# -- workers -----------------------------------------------------------------------------


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=os.environ["DATABASE_URL"],
        REDIS_URL=os.environ["REDIS_URL"],
        EMAIL_PROVIDER="null",
        SMS_PROVIDER="null",
        PUSH_PROVIDER="null",
        WHATSAPP_PROVIDER="null",
        HERALD_ENV="development",
        PYTHONPATH=str(ROOT),
    )
    return env


@dataclass
class Workers:
    """`count` celery worker processes (each a parent plus `concurrency` children)."""

    app_name: str
    count: int
    concurrency: int
    pool: str = "prefork"
    procs: list[subprocess.Popen] = field(default_factory=list)
    peak_kb: dict[int, tuple[str, int]] = field(default_factory=dict)
    peak_pss_kb: dict[int, int] = field(default_factory=dict)
    cpu_s: dict[int, float] = field(default_factory=dict)
    sampled_at: float = float("-inf")

    def start(self) -> None:
        for i in range(self.count):
            self.procs.append(
                subprocess.Popen(
                    [
                        CELERY, "-A", self.app_name, "worker",
                        "-Q", ",".join(QUEUES), "--concurrency", str(self.concurrency),
                        "--loglevel", "WARNING", "-P", self.pool, "--without-gossip",
                        "--without-mingle", "-n", f"bench{i}-{uuid.uuid4().hex[:6]}@%h",
                    ],
                    cwd=ROOT, env=worker_env(), start_new_session=True,
                )
            )  # fmt: skip

    def wait_ready(self, timeout: float = 60) -> None:
        # A solo pool runs tasks in the worker process itself: no children to wait for.
        wanted = 0 if self.pool == "solo" else self.concurrency
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(children(p.pid)) >= wanted for p in self.procs):
                if wanted == 0:
                    time.sleep(3)  # no child to show the worker has booted
                return
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a worker exited during startup")
            time.sleep(0.2)
        raise RuntimeError("workers did not start in time")

    def sample(self, *, now: bool = False) -> None:
        """Record VmHWM (the kernel's own peak RSS), PSS and CPU time of every worker
        process seen so far: at most every SAMPLE_EVERY seconds, unless `now`."""
        at = time.monotonic()
        if not now and at - self.sampled_at < SAMPLE_EVERY:
            return
        self.sampled_at = at
        for proc in self.procs:
            for pid, role in [(proc.pid, "parent"), *((c, "child") for c in children(proc.pid))]:
                hwm = vm_hwm_kb(pid)
                if hwm is not None:
                    self.peak_kb[pid] = (role, max(hwm, self.peak_kb.get(pid, ("", 0))[1]))
                pss = pss_kb(pid)
                if pss is not None:
                    self.peak_pss_kb[pid] = max(pss, self.peak_pss_kb.get(pid, 0))
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    self.cpu_s[pid] = max(cpu, self.cpu_s.get(pid, 0.0))

    def cpu_since_ready(self, baseline: dict[int, float]) -> float:
        """CPU seconds the worker processes used since `baseline` (a copy of cpu_s)."""
        return sum(cpu - baseline.get(pid, 0.0) for pid, cpu in self.cpu_s.items())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # warm shutdown
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the thread or process just ended
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _proc_kb(path: Path, field: str) -> int | None:
    """A "<field>: <n> kB" line of a /proc file, or None if the process is gone."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def database_cpu(factory) -> dict[int, float]:
    """CPU seconds of every PostgreSQL backend connected to the bench database, by pid
    (the server runs on this host). Backends of one private database are this run's."""
    with session_scope(factory) as session:
        pids = session.scalars(
            text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        ).all()
    return {pid: cpu for pid in pids if (cpu := cpu_seconds(pid)) is not None}


def pss_kb(pid: int) -> int | None:
    """Proportional set size: RSS with pages shared after fork split between sharers."""
    return _proc_kb(Path(f"/proc/{pid}/smaps_rollup"), "Pss")


def vm_hwm_kb(pid: int) -> int | None:
    return _proc_kb(Path(f"/proc/{pid}/status"), "VmHWM")


# -- data --------------------------------------------------------------------------------


def vacuum(engine) -> None:
    """VACUUM ANALYZE what the bench writes. This server runs with autovacuum off, so
    every earlier run's deleted rows would otherwise stay in the tables and indexes
    (gigabytes after a few runs) and slow this one down; with autovacuum on, a
    production database is kept about this clean."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in ("deliveries", "contacts", "campaign_channels", "campaigns"):
            conn.execute(text(f"VACUUM ANALYZE {table}"))


def create_user_and_contacts(factory, n: int) -> uuid.UUID:
    with session_scope(factory) as session:
        user = User(
            email=f"bench-{uuid.uuid4().hex[:8]}@example.com",
            password_hash="not-a-real-hash",
            is_verified=True,
        )
        session.add(user)
        session.flush()
        # One INSERT … SELECT generate_series: the fastest way to a million contacts.
        session.execute(
            text(
                """
                INSERT INTO contacts (id, user_id, email, phone, first_name, consent_email,
                                      consent_sms, push_tokens, attributes)
                SELECT gen_random_uuid(), :user_id, 'user' || n || '@example.com',
                       '+1555' || lpad(n::text, 7, '0'), 'Name' || n, true, true,
                       '[]'::jsonb, '{}'::jsonb
                FROM generate_series(1, :n) AS n
                """
            ),
            {"user_id": user.id, "n": n},
        )
        user_id = user.id
    # Contacts normally exist long before a campaign, and autovacuum has analyzed them by
    # then. On a server with stale statistics (autovacuum off, as on the bench machine)
    # the planner believes the table is empty, and the sender's contact lookup by
    # primary key turns into a full scan of another index: ~1 s per batch instead of ms.
    with factory().connection() as conn:
        conn.execute(text("ANALYZE contacts"))
        conn.commit()
    return user_id


def create_campaign(factory, user_id: uuid.UUID, name: str) -> tuple[uuid.UUID, dict]:
    with session_scope(factory) as session:
        campaign = Campaign(user_id=user_id, name=name, config={})
        session.add(campaign)
        session.flush()
        session.add(Audience(campaign_id=campaign.id, name="everyone", definition={"all": []}))
        channels = {}
        for kind, config in CONFIGS.items():
            row = CampaignChannel(campaign_id=campaign.id, channel_type=kind, config=config)
            session.add(row)
            session.flush()
            channels[kind] = row.id
        return campaign.id, channels


# -- the runs ----------------------------------------------------------------------------


@dataclass
class Run:
    sent: int
    planning_s: float | None
    completed_s: float
    last_sent_s: float
    peak_kb: dict[int, tuple[str, int]]
    peak_pss_kb: dict[int, int]
    # Seconds from launch until each channel was planned (batch engine only).
    channel_planned_s: dict[str, float] = field(default_factory=dict)
    # CPU seconds used during the timed part: worker processes, PostgreSQL backends.
    worker_cpu_s: float = 0.0
    db_cpu_s: float = 0.0
    # Per worker process: CPU seconds used during the timed part.
    cpu_s: dict[int, float] = field(default_factory=dict)
    # CPU seconds this process spent watching (taken from the same two CPUs).
    observer_cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.sent / self.completed_s

    @property
    def send_rate(self) -> float:
        return self.sent / self.last_sent_s


# Everything one poll needs, in one round trip.
OBSERVE = text(
    """
SELECT c.status AS campaign_status, c.ended_at, cc.channel_type, cc.status AS channel_status
FROM campaigns AS c JOIN campaign_channels AS cc ON cc.campaign_id = c.id
WHERE c.id = :campaign_id
"""
).columns(ended_at=UTCDateTime())


def run_engine(factory, args, user_id: uuid.UUID) -> tuple[Run, uuid.UUID]:
    campaign_id, channels = create_campaign(factory, user_id, "bench batch")
    workers = Workers("workers", args.workers, args.concurrency, args.pool)
    channel_planned_s: dict[str, float] = {}
    observer = factory.kw["bind"].connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        workers.start()
        workers.wait_ready()
        workers.sample(now=True)
        worker_cpu_before = dict(workers.cpu_s)
        db_cpu_before = database_cpu(factory)
        observer_pid = observer.scalar(text("SELECT pg_backend_pid()"))
        observer_cpu_before = cpu_seconds(os.getpid())
        with session_scope(factory) as session:
            transition(session, user_id, campaign_id, "launch")
        launched = time.perf_counter()
        launched_at = system_clock.now()
        app.send_task("herald.plan_campaign", kwargs={"campaign_id": str(campaign_id)})
        planning_s = None
        next_reconcile = launched + RECONCILE_TICK
        deadline = launched + args.timeout
        while True:
            now = time.perf_counter()
            if now > deadline:
                raise RuntimeError("engine run timed out")
            rows = observer.execute(OBSERVE, {"campaign_id": campaign_id}).all()
            status, ended_at = rows[0].campaign_status, rows[0].ended_at
            for row in rows:
                if row.channel_status in ("planned", "done"):
                    channel_planned_s.setdefault(row.channel_type, time.perf_counter() - launched)
            if planning_s is None and len(channel_planned_s) == len(rows):
                planning_s = max(channel_planned_s.values())
                if args.plan_only:
                    print(f"planning only: {args.contacts:,} x 2 channels in {planning_s:.2f} s")
                    for kind, seconds in sorted(channel_planned_s.items(), key=lambda i: i[1]):
                        print(f"  {kind} planned at {seconds:.2f} s after launch")
                    raise SystemExit(0)
            if status == "completed":
                # The engine's own timestamp: exact whatever the polling interval.
                completed_s = (ended_at - launched_at).total_seconds()
                db_cpu_after = database_cpu(factory)  # before the workers' backends go
                observer_cpu_s = cpu_seconds(os.getpid()) - observer_cpu_before
                break
            if status != "running":
                raise RuntimeError(f"campaign became {status}")
            if now >= next_reconcile:  # playing beat
                app.send_task("herald.reconcile")
                next_reconcile = now + RECONCILE_TICK
            workers.sample()
            time.sleep(POLL)
        workers.sample(now=True)
    finally:
        workers.stop()
        observer.close()
    with session_scope(factory) as session:
        sent, last_sent = session.execute(
            select(func.count(Delivery.sent_at), func.max(Delivery.sent_at)).where(
                Delivery.campaign_channel_id.in_(list(channels.values()))
            )
        ).one()
    return (
        Run(
            sent=sent,
            planning_s=planning_s,
            completed_s=completed_s,
            last_sent_s=(last_sent - launched_at).total_seconds(),
            peak_kb=workers.peak_kb,
            peak_pss_kb=workers.peak_pss_kb,
            channel_planned_s=channel_planned_s,
            worker_cpu_s=workers.cpu_since_ready(worker_cpu_before),
            cpu_s={
                pid: cpu - worker_cpu_before.get(pid, 0.0) for pid, cpu in workers.cpu_s.items()
            },
            db_cpu_s=sum(
                cpu - db_cpu_before.get(pid, 0.0)
                for pid, cpu in db_cpu_after.items()
                if pid != observer_pid
            ),
            observer_cpu_s=observer_cpu_s,
        ),
        campaign_id,
    )


def run_naive(factory, args, user_id: uuid.UUID) -> tuple[Run, uuid.UUID]:
    """The same contacts (the first `sample` of them), one task per recipient and channel.

    Timed from the first enqueue (the naive planner's loop is part of the design) to
    the last counter bump."""
    campaign_id, channels = create_campaign(factory, user_id, "bench naive")
    with session_scope(factory) as session:
        transition(session, user_id, campaign_id, "launch")
        sample = session.execute(
            select(Contact.id, Contact.email, Contact.phone)
            .where(Contact.user_id == user_id)
            .order_by(Contact.id)
            .limit(args.naive_sample)
        ).all()
    expected = len(sample) * len(channels)
    workers = Workers("bench.dispatch", args.workers, args.concurrency, args.pool)
    try:
        workers.start()
        workers.wait_ready()
        started = time.perf_counter()
        started_at = system_clock.now()
        for contact_id, email, phone in sample:
            for kind, address in (("email", email), ("sms", phone)):
                app.send_task(
                    NAIVE_TASK,
                    kwargs={
                        "channel_id": str(channels[kind]),
                        "contact_id": str(contact_id),
                        "address": address,
                    },
                )
        enqueued_s = time.perf_counter() - started
        deadline = started + args.timeout
        while True:
            if time.perf_counter() > deadline:
                raise RuntimeError("naive run timed out")
            with session_scope(factory) as session:
                counted = session.scalar(
                    select(func.sum(CampaignChannel.sent_count)).where(
                        CampaignChannel.campaign_id == campaign_id
                    )
                )
            workers.sample()
            if counted >= expected:
                completed_s = time.perf_counter() - started
                break
            time.sleep(POLL)
        workers.sample(now=True)
    finally:
        workers.stop()
    with session_scope(factory) as session:
        sent, last_sent = session.execute(
            select(func.count(Delivery.sent_at), func.max(Delivery.sent_at)).where(
                Delivery.campaign_channel_id.in_(list(channels.values()))
            )
        ).one()
    print(f"naive: {expected:,} tasks enqueued in {enqueued_s:.1f} s by this process")
    return (
        Run(
            sent=sent,
            planning_s=None,
            completed_s=completed_s,
            last_sent_s=(last_sent - started_at).total_seconds(),
            peak_kb=workers.peak_kb,
            peak_pss_kb=workers.peak_pss_kb,
        ),
        campaign_id,
    )


def verify(factory, campaign_id: uuid.UUID, recipients: int) -> list[str]:
    """Counters equal deliveries; each recipient has exactly one delivery per channel."""
    problems = []
    with session_scope(factory) as session:
        rows = session.execute(
            select(
                CampaignChannel.channel_type,
                CampaignChannel.sent_count,
                func.count(Delivery.id),
                func.count(Delivery.sent_at),
                func.count(func.distinct(Delivery.contact_id)),
            )
            .outerjoin(Delivery, Delivery.campaign_channel_id == CampaignChannel.id)
            .where(CampaignChannel.campaign_id == campaign_id)
            .group_by(CampaignChannel.channel_type, CampaignChannel.sent_count)
        ).all()
    for kind, sent_count, rows_n, sent_n, contacts_n in rows:
        if sent_count != sent_n:
            problems.append(f"{kind}: sent_count {sent_count} != {sent_n} sent deliveries")
        if not (rows_n == contacts_n == recipients == sent_n):
            problems.append(
                f"{kind}: {rows_n} deliveries, {contacts_n} distinct contacts, "
                f"{sent_n} sent, expected {recipients} each"
            )
    return problems


def rss_lines(label: str, run: Run) -> list[str]:
    return [
        f"  {label:6} pid {pid:>7} ({role:6})  peak RSS {kb / 1024:6.1f} MB"
        f"  peak PSS {run.peak_pss_kb.get(pid, 0) / 1024:6.1f} MB"
        + (f"  CPU {run.cpu_s[pid]:5.1f} s" if pid in run.cpu_s else "")
        for pid, (role, kb) in sorted(run.peak_kb.items())
    ]


def purge_queues() -> None:
    with app.connection_for_write() as conn:
        for queue in QUEUES:
            conn.default_channel.queue_purge(queue)


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--naive-sample", type=int, default=10_000, help="naive recipients")
    parser.add_argument("--workers", type=int, default=1, help="celery worker processes")
    parser.add_argument("--concurrency", type=int, default=2, help="children per worker")
    parser.add_argument("--pool", default="prefork", help="celery worker pool (-P)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true", help="keep the bench user's rows")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--plan-only", action="store_true", help="stop once planned")
    args = parser.parse_args()

    # Stopped by SIGTERM (or SIGINT, which a shell ignores in background jobs), run the
    # `finally` blocks anyway: they stop the workers and delete the bench user.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    engine = make_engine(get_settings())
    factory = make_session_factory(engine)
    purge_queues()
    vacuum(engine)
    started = time.perf_counter()
    user_id = create_user_and_contacts(factory, args.contacts)
    print(f"{args.contacts:,} contacts created in {time.perf_counter() - started:.1f} s")
    try:
        batch, batch_campaign = run_engine(factory, args, user_id)
        problems = verify(factory, batch_campaign, args.contacts)
        naive = None
        if not args.skip_naive:
            naive, naive_campaign = run_naive(factory, args, user_id)
            problems += [
                f"naive {p}"
                for p in verify(factory, naive_campaign, min(args.naive_sample, args.contacts))
            ]

        n = args.contacts
        print()
        print(f"Dispatch bench: {n:,} recipients x 2 channels (email, sms), null provider,")
        print(
            f"{args.workers} worker(s) x concurrency {args.concurrency} ({args.pool}),"
            f" {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
        )
        print(f"{'':34}{'messages':>10}{'seconds':>10}{'msg/s':>10}")
        print(f"{'batch: planning (launch→planned)':34}{2 * n:>10,}{batch.planning_s:>10.2f}")
        for kind, seconds in sorted(batch.channel_planned_s.items(), key=lambda i: i[1]):
            print(f"{f'  {kind} planned at':34}{n:>10,}{seconds:>10.2f}")
        print(
            f"{'batch: launch → completed':34}{batch.sent:>10,}"
            f"{batch.completed_s:>10.2f}{batch.rate:>10,.0f}"
        )
        print(
            f"{'batch: launch → last sent_at':34}{batch.sent:>10,}"
            f"{batch.last_sent_s:>10.2f}{batch.send_rate:>10,.0f}"
        )
        cpu = batch.worker_cpu_s + batch.db_cpu_s
        print(
            f"batch CPU, launch → completed: workers {batch.worker_cpu_s:.1f} s,"
            f" PostgreSQL {batch.db_cpu_s:.1f} s = {1e6 * cpu / batch.sent:.0f} µs per message;"
            f" at {os.cpu_count()} busy CPUs that is {batch.sent * os.cpu_count() / cpu:,.0f} msg/s"
        )
        print(f"bench observer (this process) meanwhile: {batch.observer_cpu_s:.2f} s CPU")
        if naive:
            print(
                f"{'naive: enqueue → last counter':34}{naive.sent:>10,}"
                f"{naive.completed_s:>10.2f}{naive.rate:>10,.0f}"
            )
            print(f"ratio batch/naive (msg/s, launch→completed): {batch.rate / naive.rate:.1f}x")
        print("worker memory (RSS peak = VmHWM; PSS = max sampled, shared pages split):")
        for line in rss_lines("batch", batch):
            print(line)
        if naive:
            for line in rss_lines("naive", naive):
                print(line)
        print("invariants:", problems or "OK")
        if problems:
            sys.exit(1)
    finally:
        if not args.keep:
            with session_scope(factory) as session:
                session.execute(text("DELETE FROM users WHERE id = :id"), {"id": user_id})
        engine.dispose()


if __name__ == "__main__":
    main()

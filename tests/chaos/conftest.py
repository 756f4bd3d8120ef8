"""Fixtures of the chaos tests: a private PostgreSQL cluster (one per session, emptied
between tests), a private redis-server and loopback providers per test, and a
`chaos` harness that starts real `celery worker` / `celery beat` processes pointed at
them and always kills them afterwards, pass or fail.

Timings are shortened through the settings that exist for it (lease 6 s, dispatch
grace 2 s, reconciliation every 0.5 s, beat tick 0.5 s), so a lost batch is found again
in seconds, not minutes. The lease stays well above the time a checkpoint's 50
messages take even on a loaded machine (~1 s): a lease that ran out under a live batch
would have its rows sent twice, which is a misconfiguration, not a chaos scenario.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from engine.db import make_engine, make_session_factory, session_scope
from engine.models import Campaign, CampaignChannel, Contact, Delivery, User
from engine.settings import Settings
from tests.campaigns_fixtures import insert_campaign
from tests.chaos.services import (
    PG_BIN,
    ROOT,
    Beat,
    CeleryProcess,
    PostgresCluster,
    RedisServer,
    Worker,
    tail,
    wait_until,
)
from tests.chaos.sinks import ChaosSmtpServer, ChaosTwilioSink
from tests.dispatch_helpers import assert_counters_match, insert_contacts

CHANNELS = ("email", "sms")
DATABASE = "herald"
# The engine's timings, shortened (see the module docstring).
TIMINGS = {
    "HERALD_LEASE_SECONDS": "6",
    "HERALD_DISPATCH_GRACE": "2",
    "HERALD_RECONCILE_INTERVAL": "0.5",
    "HERALD_BEAT_TICK": "0.5",
}
# Added per message by each sink, so a campaign lasts seconds (time to hit it mid-way)
# and both channels go at about the same pace: an email already costs a pool process
# ~10 ms of building and SMTP round trips on this machine, an SMS ~5 ms.
EMAIL_LATENCY = 0.0
SMS_LATENCY = 0.005


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.chaos_failed = report.failed
    return report


@pytest.fixture(scope="session")
def pg_cluster():
    """A cluster of our own, with Herald's database at Alembic head."""
    from alembic import command
    from alembic.config import Config

    missing = [
        name
        for name, found in (
            (str(PG_BIN / "initdb"), (PG_BIN / "initdb").exists()),
            ("redis-server", shutil.which("redis-server") is not None),
        )
        if not found
    ]
    if missing:
        pytest.skip(f"chaos tests need {' and '.join(missing)} (set HERALD_PG_BIN)")
    cluster = PostgresCluster()
    try:
        previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        cluster.init()
        cluster.start()
        admin = create_engine(
            Settings(database_url=cluster.url()).sqlalchemy_url, isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {DATABASE}"))
        admin.dispose()
        config = Config(str(ROOT / "alembic.ini"))
        config.set_main_option("script_location", str(ROOT / "migrations"))
        config.set_main_option(
            "sqlalchemy.url", Settings(database_url=cluster.url(DATABASE)).sqlalchemy_url
        )
        command.upgrade(config, "head")
        yield cluster
    finally:
        cluster.destroy()
        signal.signal(signal.SIGTERM, previous_sigterm)


def _interrupt(signum, frame):
    """SIGTERM (a CI timeout, `kill`) would end pytest without running finalizers,
    leaving this cluster and the tests' redis-server and workers running; raised as
    KeyboardInterrupt it unwinds through them, as Ctrl-C does."""
    raise KeyboardInterrupt(f"signal {signum}")


def _empty_tables(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        tables = session.scalars(
            text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename <> 'alembic_version'"
            )
        ).all()
        session.execute(text(f"TRUNCATE {', '.join(tables)} CASCADE"))


@dataclass(frozen=True)
class CampaignRun:
    user_id: uuid.UUID
    campaign_id: uuid.UUID
    recipients: int

    @property
    def messages(self) -> int:
        return self.recipients * len(CHANNELS)


@dataclass
class Outcome:
    """What the sinks saw for a completed campaign, checked against the deliveries."""

    accepted: dict[str, int]  # channel → messages accepted by its sink
    resends: dict[str, int]  # channel → accepted messages beyond one per delivery
    resent_keys: dict[str, Counter[str]] = field(default_factory=dict)

    @property
    def total_resends(self) -> int:
        return sum(self.resends.values())


class Harness:
    """The private services of one test, and the Herald processes started on them."""

    def __init__(self, cluster: PostgresCluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.factory = make_session_factory(
            make_engine(Settings(database_url=cluster.url(DATABASE)))
        )
        self.redis = RedisServer(workdir)
        self.smtp = ChaosSmtpServer(latency=EMAIL_LATENCY)
        self.twilio = ChaosTwilioSink(latency=SMS_LATENCY)
        self.processes: list[CeleryProcess] = []
        self._numbers = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        _empty_tables(self.factory)
        self.redis.start()
        self.smtp.start()
        self.twilio.start()

    def close(self) -> None:
        for process in self.processes:
            process.signal_group(signal.SIGKILL)
        for process in self.processes:
            process.reap()
        self.twilio.stop()
        self.smtp.stop()
        self.redis.stop()
        self.factory.kw["bind"].dispose()

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HERALD_", "SMTP_", "TWILIO_", "EMAIL_", "SMS_", "PUSH_"))
            and k not in ("DATABASE_URL", "REDIS_URL", "WHATSAPP_PROVIDER", "FCM_API_BASE")
        }
        env.update(
            HERALD_ENV="test",
            HERALD_VAR_DIR=str(self.workdir / "var"),
            DATABASE_URL=self.cluster.url(DATABASE),
            REDIS_URL=self.redis.url(),
            PUBLIC_BASE_URL="http://herald.test",
            EMAIL_FROM="Herald <campaigns@herald.test>",
            PUSH_PROVIDER="null",
            WHATSAPP_PROVIDER="null",
            PYTHONPATH=str(ROOT),
            **self.smtp.env(),
            **self.twilio.env(),
            **TIMINGS,
        )
        return env

    def worker(self, concurrency: int = 2, *, wait: bool = True) -> Worker:
        """A `celery worker`; wait=False returns at once (start beat meanwhile: each
        takes seconds to import), and the caller waits with `wait_ready()`."""
        name = f"chaos{next(self._numbers)}"
        worker = Worker(name, self.env(), self.workdir / f"{name}.log", concurrency)
        self.processes.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def beat(self) -> Beat:
        name = f"beat{next(self._numbers)}"
        beat = Beat(
            name, self.env(), self.workdir / f"{name}.log", self.workdir / f"{name}-schedule"
        )
        self.processes.append(beat)
        return beat

    # -- the campaign ------------------------------------------------------------------

    def campaign(
        self, recipients: int, *, config: dict | None = None, start_in: float = 1.0
    ) -> CampaignRun:
        """Contacts reachable by email and SMS, and a campaign to all of them on both,
        scheduled `start_in` seconds ahead: beat promotes it."""
        session = self.factory()
        try:
            user = User(
                email=f"chaos-{uuid.uuid4().hex[:8]}@example.com",
                password_hash="not-a-real-hash",
                is_verified=True,
            )
            session.add(user)
            session.commit()
            insert_contacts(session, user.id, recipients, channels=CHANNELS)
            session.execute(text("ANALYZE contacts"))
            campaign = insert_campaign(session, user.id, status="scheduled", channels=CHANNELS)
            session.execute(
                update(Campaign)
                .where(Campaign.id == campaign.id)
                .values(
                    config={"max_attempts": 3, **(config or {})},
                    scheduled_at=datetime.now(UTC) + timedelta(seconds=start_in),
                )
            )
            session.commit()
            return CampaignRun(user.id, campaign.id, recipients)
        finally:
            session.close()

    def accepted(self) -> int:
        """Messages the sinks accepted so far, both channels."""
        return self.smtp.accepted_count + self.twilio.accepted_count

    def wait_accepted(self, count: int, timeout: float = 60) -> None:
        wait_until(lambda: self.accepted() >= count, timeout, f"{count} accepted messages")

    def status(self, run: CampaignRun) -> str | None:
        try:
            with session_scope(self.factory) as session:
                return session.scalar(select(Campaign.status).where(Campaign.id == run.campaign_id))
        except OperationalError:  # PostgreSQL restarting under the test: ask again
            return None

    def wait_completed(self, run: CampaignRun, timeout: float = 90) -> float:
        """Seconds until the campaign completed; fails with the state it was stuck in."""
        started = time.monotonic()
        try:
            wait_until(lambda: self.status(run) == "completed", timeout, "completion", 0.1)
        except TimeoutError:
            raise AssertionError(
                f"campaign still {self.status(run)} after {timeout} s;"
                f" deliveries by status: {self.deliveries_by_status(run)};"
                f" accepted: email {self.smtp.accepted_count}, sms {self.twilio.accepted_count}"
            ) from None
        return time.monotonic() - started

    def deliveries_by_status(self, run: CampaignRun) -> dict[tuple[str, str], int]:
        with session_scope(self.factory) as session:
            rows = session.execute(
                select(CampaignChannel.channel_type, Delivery.status, func.count())
                .join(CampaignChannel, CampaignChannel.id == Delivery.campaign_channel_id)
                .where(CampaignChannel.campaign_id == run.campaign_id)
                .group_by(CampaignChannel.channel_type, Delivery.status)
            ).all()
        return {(kind, status): n for kind, status, n in rows}

    # -- the verdict -------------------------------------------------------------------

    def verify(self, run: CampaignRun) -> Outcome:
        """Nothing lost, counters exact, every accepted message is one of this campaign's
        deliveries sent to its own address with its own key; returns the resends."""
        with session_scope(self.factory) as session:
            campaign = session.get(Campaign, run.campaign_id)
            assert campaign.status == "completed", campaign.status
            contacts = set(
                session.scalars(select(Contact.id).where(Contact.user_id == run.user_id))
            )
            assert len(contacts) == run.recipients
            rows = session.execute(
                select(
                    CampaignChannel.channel_type,
                    CampaignChannel.sent_count,
                    Delivery.id,
                    Delivery.contact_id,
                    Delivery.address,
                    Delivery.status,
                )
                .join(CampaignChannel, CampaignChannel.id == Delivery.campaign_channel_id)
                .where(CampaignChannel.campaign_id == run.campaign_id)
            ).all()
            assert_counters_match(session)
        sinks = {"email": self.smtp, "sms": self.twilio}
        accepted, resends, resent_keys = {}, {}, {}
        for kind, sink in sinks.items():
            mine = [row for row in rows if row.channel_type == kind]
            statuses = Counter(row.status for row in mine)
            assert statuses == {"sent": run.recipients}, f"{kind} deliveries: {dict(statuses)}"
            assert {row.contact_id for row in mine} == contacts, f"{kind}: a recipient missed"
            assert {row.sent_count for row in mine} == {run.recipients}, f"{kind} sent_count"
            keys = sink.accepted_keys()
            addresses = sink.addresses_by_key()
            expected = {f"d{row.id}": row.address for row in mine}
            lost = sorted(set(expected) - set(keys))
            assert not lost, f"{kind}: {len(lost)} deliveries never reached the sink: {lost[:5]}"
            strays = sorted(set(keys) - set(expected))
            assert not strays, f"{kind}: the sink got keys of no delivery: {strays[:5]}"
            wrong = {k: a for k, a in addresses.items() if a != {expected[k]}}
            assert not wrong, f"{kind}: a key went to another address: {list(wrong.items())[:3]}"
            accepted[kind] = sum(keys.values())
            resent_keys[kind] = Counter({k: n - 1 for k, n in keys.items() if n > 1})
            resends[kind] = sum(resent_keys[kind].values())
        return Outcome(accepted, resends, resent_keys)

    def logs(self) -> str:
        parts = [f"--- {p.name} (pid {p.pid}) ---\n{tail(p.log)}" for p in self.processes]
        parts.append(f"--- postgres ---\n{tail(self.cluster.log, 20)}")
        parts.append(f"--- redis ---\n{tail(self.redis.log, 20)}")
        return "\n".join(parts)


@pytest.fixture
def chaos(pg_cluster, tmp_path, request):
    harness = Harness(pg_cluster, tmp_path)
    try:
        harness.start()
        yield harness
    finally:
        if getattr(request.node, "chaos_failed", False):
            print(f"\nlogs of the failed chaos test (full logs in {tmp_path}):\n{harness.logs()}")
        harness.close()

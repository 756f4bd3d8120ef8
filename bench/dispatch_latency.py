"""Dispatch over real protocols: Herald's workers against a direct client, same sinks.

The second mode of issue 4's benchmark. Loopback sinks (bench.sinks, each in its own
process) speak SMTP and Twilio's REST API and answer every message after a fixed
latency. For each channel, in the same run:

* Herald: a campaign with that one channel and N recipients, launched and sent by real
  `celery -A workers worker -P prefork` processes whose providers point at the sinks
  (EMAIL_PROVIDER=smtp, SMS_PROVIDER=twilio). One provider connection per pool
  process, so W workers x C concurrency = K connections. This process plays beat
  (herald.reconcile every RECONCILE_INTERVAL, as bench.dispatch does).
* Direct: K client processes, one connection each (smtplib; http.client on a kept-alive
  connection, the library under Herald's Twilio channel, or httpx with --direct-http),
  sending N similar messages split evenly between them, as fast as the sink answers.
  The sink offers PIPELINING, which Herald uses; smtplib's sendmail does not, so
  --direct-smtp pipelined gives the direct client the same two round trips per
  message, to show how much of Herald's rate is the protocol rather than the engine.

Both sides are timed to the sink's last acceptance (CLOCK_MONOTONIC, shared across
processes): Herald from the launch, so planning, queueing and the claim are included;
the direct client from the moment its connected processes are let go. Herald's target
is at least 90 % of the direct client's rate. The sinks count each idempotency key, so
the run also checks that every delivery was received exactly once, and that
sent_count equals the deliveries marked sent. CPU use of every party (workers or
direct clients, sinks, PostgreSQL, Redis, the machine) is read from /proc over each
timed window, to show whether a side was bound by the latency or by the CPU.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/herald_bench \\
    REDIS_URL=redis://127.0.0.1:6379/14 .venv/bin/python -m bench.dispatch_latency \\
        --contacts 10000 --latency-ms 2 --workers 1 --concurrency 2

--profile then sends a few batches per channel in this process, through
engine.dispatch.sending.send_batch with the workers' own channel, rate limiter and
acceptance journal, timing each part of the per-message cycle (see `profile_cycle`).

Run `DATABASE_URL=… .venv/bin/alembic upgrade head` first. Herald's queues in that Redis
database are purged at the start; the bench user is deleted at the end (unless
--keep); workers and sinks are always stopped.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import http.client
import json
import multiprocessing
import os
import re
import signal
import smtplib
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from urllib.parse import urlencode

from sqlalchemy import func, select, text

# Sets DATABASE_URL / REDIS_URL defaults before the settings are read.
from bench.dispatch import (
    CELERY,
    CONFIGS,
    RECONCILE_TICK,
    ROOT,
    Workers,
    app,
    children,
    create_user_and_contacts,
    purge_queues,
    worker_env,
)
from bench.sinks import (
    LONG_GAP,
    TWILIO_FROM,
    TWILIO_SID,
    TWILIO_TOKEN,
    SinkProcess,
    SinkStats,
)
from engine.campaigns.transitions import transition
from engine.db import make_engine, make_session_factory, session_scope
from engine.dispatch.planning import BATCH_SIZE
from engine.models import Audience, Campaign, CampaignChannel, Delivery
from engine.settings import QUEUES, get_settings

SINK_OF = {"email": "smtp", "sms": "twilio"}
POLL = 0.02  # seconds between two looks at the sink while a phase runs
DB_POLL = 0.1  # … and at the campaign's row: cheaper for PostgreSQL, which is measured
WARM_UP_BATCHES = 2  # per pool process, before the timed rounds
CLK_TCK = os.sysconf("SC_CLK_TCK")
# What the direct client sends: the same shape as Herald's messages (bench.dispatch's
# channel configs, rendered for contact n as create_user_and_contacts names it).
EMAIL_FROM = CONFIGS["email"]["from_email"]
CAMPAIGN_NAME = {"email": "bench latency email", "sms": "bench latency sms"}


# -- CPU accounting --------------------------------------------------------------------------


def _ticks(pid: int) -> int | None:
    """utime + stime of one process, in clock ticks (None if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _backends_of(database: str) -> list[int]:
    """PostgreSQL backends connected to `database` (their title names it): this run's
    share of the server, not other databases' on the same cluster."""
    found = []
    marker = f" {database} "
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if title.startswith("postgres:") and marker in title:
                found.append(int(entry.name))
    return found


def _pids_named(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _machine() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class CpuWindow:
    seconds: float
    machine_busy: float  # share of all CPUs, 0..1
    cores: dict[str, float]  # CPU-seconds per party over the window

    def per_message_us(self, party: str, messages: int) -> float:
        return 1e6 * self.cores.get(party, 0.0) / messages if messages else 0.0

    @property
    def others(self) -> float:
        """Cores busy outside this run's processes: other work on a shared host."""
        mine = sum(self.cores.values()) / self.seconds if self.seconds else 0.0
        return max(0.0, self.machine_busy * (os.cpu_count() or 1) - mine)


class CpuMeter:
    """CPU ticks of named groups of processes, between two snapshots."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups

    def snapshot(self) -> tuple[float, tuple[int, int], dict[str, dict[int, int]]]:
        per_group = {}
        for name, pids in self.groups.items():
            ticks = {}
            for pid in pids():
                value = _ticks(pid)
                if value is not None:
                    ticks[pid] = value
            per_group[name] = ticks
        return time.monotonic(), _machine(), per_group

    @staticmethod
    def window(before, after, extra: dict[str, float] | None = None) -> CpuWindow:
        (t0, (busy0, total0), groups0), (t1, (busy1, total1), groups1) = before, after
        cores = {}
        for name, ticks in groups1.items():
            # Only processes alive at both ends; a process born in between counts from 0.
            spent = sum(v - groups0.get(name, {}).get(pid, 0) for pid, v in ticks.items())
            cores[name] = spent / CLK_TCK
        cores.update(extra or {})
        return CpuWindow(t1 - t0, (busy1 - busy0) / max(1, total1 - total0), cores)


# -- Herald's side ---------------------------------------------------------------------------


@dataclass
class SinkWorkers(Workers):
    """bench.dispatch's worker processes, with providers pointed at the sinks.

    `count` channel workers of `concurrency` pool processes each (the K connections)
    serve the channel queues; one more worker, of one process, serves `default`
    (planning, reconciliation) and `sync`, as the channel workers are deployed apart
    in Herald's design. With every queue on the channel workers, each reconciliation
    (every RECONCILE_TICK) took a sending process away between two batches."""

    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        channels = [queue for queue in QUEUES if queue not in ("default", "sync")]
        for i in range(self.count):
            self.procs.append(self._worker(f"latency{i}", channels, self.concurrency))
        self.procs.append(self._worker("planner", ["default", "sync"], 1))

    def _worker(self, name: str, queues: list[str], concurrency: int) -> subprocess.Popen:
        return subprocess.Popen(
            [
                CELERY, "-A", self.app_name, "worker",
                "-Q", ",".join(queues), "--concurrency", str(concurrency),
                "--loglevel", "WARNING", "-P", "prefork", "--without-gossip",
                "--without-mingle", "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h",
            ],
            cwd=ROOT, env=self.env, start_new_session=True,
            stdout=subprocess.DEVNULL,  # the banner; warnings go to stderr
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60) -> None:
        wanted = [self.concurrency] * self.count + [1]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(children(p.pid)) >= n for p, n in zip(self.procs, wanted, strict=True)):
                return
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a worker exited during startup")
            time.sleep(0.2)
        raise RuntimeError("workers did not start in time")

    def pids(self) -> list[int]:
        found = []
        for proc in self.procs:
            found += [proc.pid, *children(proc.pid)]
        return found


def herald_env(args, sinks: dict[str, SinkProcess]) -> dict[str, str]:
    env = worker_env()  # bench.dispatch's: every provider null, this run's URLs
    for sink in sinks.values():
        env.update(sink.env())
    env["EMAIL_FROM"] = f"Bench <{EMAIL_FROM}>"
    if args.provider_rate:
        for kind in SINK_OF:
            env[f"{kind.upper()}_RATE_PER_SECOND"] = str(args.provider_rate)
    return env


def herald_settings(args, sinks: dict[str, SinkProcess]):
    """This process's settings with the providers the workers get from herald_env."""
    values: dict = {"email_from": f"Bench <{EMAIL_FROM}>"}
    if "smtp" in sinks:
        values.update(email_provider="smtp", smtp_host="127.0.0.1", smtp_port=sinks["smtp"].port)
    if "twilio" in sinks:
        values.update(
            sms_provider="twilio",
            twilio_api_base=f"http://127.0.0.1:{sinks['twilio'].port}",
            twilio_account_sid=TWILIO_SID,
            twilio_auth_token=TWILIO_TOKEN,
            twilio_from=TWILIO_FROM,
        )
    if args.provider_rate:
        rates = dict(get_settings().rate_per_second)
        rates.update({kind: args.provider_rate for kind in SINK_OF})
        values["rate_per_second"] = rates
    return dataclasses.replace(get_settings(), **values)


def create_campaign(factory, user_id: uuid.UUID, kind: str) -> tuple[uuid.UUID, uuid.UUID]:
    """A launched campaign with one channel of `kind` and every contact in its audience."""
    with session_scope(factory) as session:
        campaign = Campaign(user_id=user_id, name=CAMPAIGN_NAME[kind], config={})
        session.add(campaign)
        session.flush()
        session.add(Audience(campaign_id=campaign.id, name="everyone", definition={"all": []}))
        channel = CampaignChannel(campaign_id=campaign.id, channel_type=kind, config=CONFIGS[kind])
        session.add(channel)
        session.flush()
        campaign_id, channel_id = campaign.id, channel.id
    with session_scope(factory) as session:
        transition(session, user_id, campaign_id, "launch")
    return campaign_id, channel_id


@dataclass
class Phase:
    side: str  # "herald" or "direct"
    kind: str
    messages: int
    connections: int  # open at the sink when the phase ended
    started: float  # monotonic: launch, or the direct client's go
    sink: SinkStats
    cpu: CpuWindow
    recorded_s: float | None = None  # Herald: launch → sent_count == N seen
    completed_s: float | None = None  # Herald: launch → campaign completed seen
    problems: list[str] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        """Start → the sink's last acceptance."""
        return (self.sink.last or self.started) - self.started

    @property
    def rate(self) -> float:
        return self.sink.accepted / self.elapsed if self.elapsed else 0.0

    @property
    def window_rate(self) -> float:
        """First → last acceptance: the steady rate, without start-up."""
        return (self.sink.accepted - 1) / self.sink.window if self.sink.window else 0.0


def run_herald(factory, args, user_id, kind: str, sink: SinkProcess, meter: CpuMeter) -> Phase:
    n = args.contacts
    campaign_id, channel_id = create_campaign(factory, user_id, kind)
    sink.reset()
    before = meter.snapshot()
    started = time.monotonic()
    app.send_task("herald.plan_campaign", kwargs={"campaign_id": str(campaign_id)})
    next_reconcile = started + RECONCILE_TICK
    next_db = started
    deadline = started + args.timeout
    after = recorded_s = completed_s = None
    while completed_s is None:
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"herald {kind} run timed out ({sink.stats().accepted} of {n})")
        if after is None and sink.stats().accepted >= n:
            after = meter.snapshot()
        if now >= next_db:
            with session_scope(factory) as session:
                status, sent_count = session.execute(
                    select(Campaign.status, CampaignChannel.sent_count)
                    .join(CampaignChannel, CampaignChannel.campaign_id == Campaign.id)
                    .where(CampaignChannel.id == channel_id)
                ).one()
            if recorded_s is None and sent_count >= n:
                recorded_s = time.monotonic() - started
            if status == "completed":
                completed_s = time.monotonic() - started
            elif status != "running":
                raise RuntimeError(f"campaign became {status}")
            next_db = now + DB_POLL
        if now >= next_reconcile:  # playing beat
            app.send_task("herald.reconcile")
            next_reconcile = now + RECONCILE_TICK
        time.sleep(POLL)
    stats = sink.stats()
    phase = Phase(
        "herald", kind, n, stats.open_connections, started, stats,
        CpuMeter.window(before, after or meter.snapshot()), recorded_s, completed_s,
    )  # fmt: skip
    phase.problems = verify_herald(factory, campaign_id, channel_id, n, sink)
    return phase


def warm_up(factory, args, user_id, kind: str) -> None:
    """An untimed campaign (WARM_UP_BATCHES per pool process), waited for until done."""
    campaign_id, _ = create_campaign(factory, user_id, kind)
    app.send_task("herald.plan_campaign", kwargs={"campaign_id": str(campaign_id)})
    deadline = time.monotonic() + args.timeout
    next_reconcile = time.monotonic() + RECONCILE_TICK
    while True:
        with session_scope(factory) as session:
            status = session.scalar(select(Campaign.status).where(Campaign.id == campaign_id))
        if status == "completed":
            return
        if status != "running" or time.monotonic() > deadline:
            raise RuntimeError(f"warm-up {kind} campaign is {status}")
        if time.monotonic() >= next_reconcile:  # playing beat, as run_herald does
            app.send_task("herald.reconcile")
            next_reconcile = time.monotonic() + RECONCILE_TICK
        time.sleep(DB_POLL)


def verify_herald(factory, campaign_id, channel_id, n: int, sink: SinkProcess) -> list[str]:
    """Every delivery received exactly once under its own key; the counter equals the
    deliveries marked sent; one delivery per contact."""
    problems = []
    with session_scope(factory) as session:
        sent_count = session.scalar(
            select(CampaignChannel.sent_count).where(CampaignChannel.id == channel_id)
        )
        rows, sent, contacts = session.execute(
            select(
                func.count(Delivery.id),
                func.count(Delivery.sent_at),
                func.count(func.distinct(Delivery.contact_id)),
            ).where(Delivery.campaign_channel_id == channel_id)
        ).one()
        ids = session.scalars(
            select(Delivery.id).where(Delivery.campaign_channel_id == channel_id)
        ).all()
    if sent_count != sent:
        problems.append(f"sent_count {sent_count} != {sent} deliveries sent")
    if not rows == sent == contacts == n:
        problems.append(f"{rows} deliveries, {sent} sent, {contacts} contacts; expected {n}")
    problems += _check_keys(sink.keys(), {f"d{i}" for i in ids})
    return problems


def _check_keys(received: dict[str, int], expected: set[str]) -> list[str]:
    problems = []
    twice = {k: c for k, c in received.items() if c > 1}
    if twice:
        sample = ", ".join(f"{k} x{c}" for k, c in list(twice.items())[:5])
        problems.append(f"{len(twice)} key(s) received more than once: {sample}")
    missing = expected - received.keys()
    if missing:
        problems.append(f"{len(missing)} key(s) never received, e.g. {sorted(missing)[:3]}")
    unexpected = received.keys() - expected
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {sorted(unexpected)[:3]}")
    return problems


# -- the direct client ----------------------------------------------------------------------

_BOUNDARY = "===============bench{n:019d}=="
_EMAIL = (
    "From: {sender}\r\n"
    "To: {address}\r\n"
    "Subject: Hello Name{n}\r\n"
    "Date: {date}\r\n"
    "Message-ID: <herald.x{n}@example.com>\r\n"
    "List-Unsubscribe:\r\n <http://127.0.0.1:5000/u/{token}>\r\n"
    "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    "MIME-Version: 1.0\r\n"
    'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n'
    "\r\n"
    "--{boundary}\r\n"
    'Content-Type: text/plain; charset="utf-8"\r\n'
    "Content-Transfer-Encoding: 7bit\r\n"
    "\r\n"
    "Hi Name{n}, spring is here.\r\n"
    "\r\n"
    "--{boundary}\r\n"
    'Content-Type: text/html; charset="utf-8"\r\n'
    "Content-Transfer-Encoding: 7bit\r\n"
    "MIME-Version: 1.0\r\n"
    "\r\n"
    "<p>Hi Name{n}, spring is here.</p>\r\n"
    "\r\n"
    "--{boundary}--\r\n"
)


def _template_email(n: int) -> tuple[str, bytes]:
    """Contact n's message the way a blaster makes it: one string template, the same
    headers, parts and size as Herald's (the unsubscribe token is a same-length filler,
    not a signature)."""
    address = f"user{n}@example.com"
    data = _EMAIL.format(
        sender=EMAIL_FROM,
        address=address,
        n=n,
        date=formatdate(usegmt=True),
        token=f"{n:0>8}.{'x' * 27}",
        boundary=_BOUNDARY.format(n=n),
    )
    return address, data.encode()


def _stdlib_email() -> Callable[[int], tuple[str, bytes]]:
    """Contact n's message built by Herald's own SMTP channel code (the email package,
    policy SMTP), i.e. the client pays what Herald pays to make a MIME message."""
    from engine.channels.base import OutboundMessage
    from engine.channels.smtp import SmtpChannel

    channel = SmtpChannel(dataclasses.replace(get_settings(), email_from=EMAIL_FROM))

    def build(n: int) -> tuple[str, bytes]:
        address = f"user{n}@example.com"
        content = {
            "subject": f"Hello Name{n}",
            "html": f"<p>Hi Name{n}, spring is here.</p>",
            "text": f"Hi Name{n}, spring is here.",
            "from_email": EMAIL_FROM,
            "headers": {
                "List-Unsubscribe": f"<http://127.0.0.1:5000/u/{n:0>8}.{'x' * 27}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
        }
        message = OutboundMessage(
            delivery_id=n, idempotency_key=f"x{n}", address=address, content=content
        )
        _, email = channel.build_email(message)
        return address, email.as_bytes(policy=email.policy)

    return build


def _pipelined_sendmail(smtp: smtplib.SMTP, address: str, data: bytes) -> None:
    """sendmail with RFC 2920 PIPELINING, as Herald's channel does where the relay offers
    it: MAIL, RCPT and DATA in one write, then the message."""
    smtp.send(f"MAIL FROM:<{EMAIL_FROM}>\r\nRCPT TO:<{address}>\r\nDATA\r\n".encode())
    replies = [smtp.getreply()[0] for _ in range(3)]
    if replies != [250, 250, 354]:
        raise smtplib.SMTPException(f"refused: {replies}")
    payload = re.sub(rb"(?m)^\.", b"..", data)
    smtp.send(payload + (b"" if payload.endswith(b"\r\n") else b"\r\n") + b".\r\n")
    if smtp.getreply()[0] != 250:
        raise smtplib.SMTPException("end of DATA refused")


def _direct_smtp(port: int, numbers: range, how: tuple[str, ...], go, ready, results) -> None:
    build, protocol, _ = how
    make = _template_email if build == "template" else _stdlib_email()
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=15)
    smtp.ehlo()
    ready.put(os.getpid())
    go.wait()
    cpu = time.process_time()
    sent = failed = 0
    for n in numbers:
        address, data = make(n)
        try:
            if protocol == "pipelined":
                _pipelined_sendmail(smtp, address, data)
            else:
                smtp.sendmail(EMAIL_FROM, [address], data)  # MAIL, RCPT, DATA one by one
            sent += 1
        except smtplib.SMTPException:
            failed += 1
    cpu = time.process_time() - cpu
    smtp.quit()
    results.put((sent, failed, cpu))


def _direct_twilio(port: int, numbers: range, how: tuple[str, ...], go, ready, results) -> None:
    path = f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json"
    callback = f"{get_settings().public_base_url}/webhooks/twilio/status"
    post = _httpx_post(port, path) if how[2] == "httpx" else _stdlib_post(port, path)
    ready.put(os.getpid())
    go.wait()
    cpu = time.process_time()
    sent = failed = 0
    for n in numbers:
        form = {
            "To": f"+1555{n:07d}",
            "Body": f"Hi Name{n}, {CAMPAIGN_NAME['sms']}",
            "StatusCallback": callback,
            "From": TWILIO_FROM,
        }
        try:
            if post(form, f"x{n}"):
                sent += 1
            else:
                failed += 1
        except (OSError, ValueError, http.client.HTTPException):  # httpx.HTTPError: OSError
            failed += 1
    cpu = time.process_time() - cpu
    results.put((sent, failed, cpu))


def _stdlib_post(port: int, path: str) -> Callable[[dict, str], bool]:
    """http.client on one kept-alive connection: what Herald's Twilio channel uses
    (engine.channels.split_http), without the split."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    credentials = base64.b64encode(f"{TWILIO_SID}:{TWILIO_TOKEN}".encode()).decode()
    headers = {
        "Authorization": f"Basic {credentials}",
        "Accept": "application/json",
        "Content-Type": "application/x-www-form-urlencoded",
    }

    def post(form: dict, key: str) -> bool:
        body = urlencode(form).encode()
        connection.request("POST", path, body, {**headers, "I-Twilio-Idempotency-Token": key})
        response = connection.getresponse()
        answer = response.read()
        return response.status == 201 and bool(json.loads(answer).get("sid"))

    return post


def _httpx_post(port: int, path: str) -> Callable[[dict, str], bool]:
    import httpx

    client = httpx.Client(auth=(TWILIO_SID, TWILIO_TOKEN), timeout=15)
    url = f"http://127.0.0.1:{port}{path}"

    def post(form: dict, key: str) -> bool:
        try:
            response = client.post(url, data=form, headers={"I-Twilio-Idempotency-Token": key})
        except httpx.HTTPError as exc:
            raise OSError(str(exc)) from exc
        return response.status_code == 201 and bool(response.json().get("sid"))

    return post


def run_direct(args, kind: str, sink: SinkProcess, connections: int, meter: CpuMeter) -> Phase:
    """`connections` processes (forked: no GIL shared between them, like Herald's pool),
    one connection each, contacts 1..N split evenly between them."""
    n = args.contacts
    sink.reset()
    ctx = multiprocessing.get_context("fork")
    go, ready, results = ctx.Event(), ctx.Queue(), ctx.Queue()
    target = _direct_smtp if kind == "email" else _direct_twilio
    procs = [
        ctx.Process(
            target=target,
            args=(
                sink.port,
                range(1 + k, n + 1, connections),
                (args.direct_build, args.direct_smtp, args.direct_http),
                go,
                ready,
                results,
            ),
            daemon=True,
        )
        for k in range(connections)
    ]
    for proc in procs:
        proc.start()
    pids = [ready.get(timeout=60) for _ in procs]
    meter.groups["direct"] = lambda: pids
    before = meter.snapshot()
    started = time.monotonic()
    go.set()
    stats = sink.wait_for(n, args.timeout)
    after = meter.snapshot()  # the clients' own CPU comes from them: they exit next
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
    del meter.groups["direct"]
    cpu = CpuMeter.window(before, after)
    cpu.cores["direct"] = sum(c for _, _, c in outcomes)
    stats = sink.stats()
    phase = Phase("direct", kind, n, connections, started, stats, cpu)
    failed = sum(f for _, f, _ in outcomes)
    if failed:
        phase.problems.append(f"{failed} direct send(s) failed")
    phase.problems += _check_keys(sink.keys(), {f"x{i}" for i in range(1, n + 1)})
    return phase


# -- in-process profile ----------------------------------------------------------------------


class Timers:
    """Wall and CPU time per named part, by wrapping callables (instrumentation of
    this process only, a couple of microseconds per call; nothing else changes)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        self.wall.setdefault(name, 0.0)
        self.cpu.setdefault(name, 0.0)
        self.calls.setdefault(name, 0)

        def timed(*a, **kw):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.wall[name] += time.perf_counter() - wall
                self.cpu[name] += time.process_time() - cpu
                self.calls[name] += 1

        return timed


def _gap_line(stats: SinkStats) -> str:
    """The client's turn per message, as the sink saw it: reply out → next byte in."""
    return (
        f"mean {1e6 * stats.gap_mean:.0f} µs, median {1e6 * stats.gap_p50:.0f} µs, "
        f"p99 {1e6 * stats.gap_p99:.0f} µs; in gaps over {1e3 * LONG_GAP:.0f} ms: "
        f"{stats.gap_long:.2f} s in all"
    )


def profile_cycle(factory, args, user_id, kind: str, sinks: dict[str, SinkProcess]) -> None:
    """Send --profile-batches batches of a fresh campaign in this process, one
    connection, through send_batch with the workers' own parts (channel, Redis rate
    limiter, acceptance journal), and print where the wall time of the cycle goes."""
    import redis

    from engine.channels import channel_for
    from engine.clock import system_clock
    from engine.dispatch import background_recording, claiming, sending
    from engine.dispatch.journal import AcceptanceJournal
    from engine.dispatch.planning import plan_channel
    from engine.ratelimit import RateLimiter

    settings = herald_settings(args, sinks)
    campaign_id, channel_id = create_campaign(factory, user_id, kind)
    with session_scope(factory) as session:
        batches = plan_channel(session, channel_id, system_clock.now())
    batches = batches[: args.profile_batches]
    client = redis.Redis.from_url(settings.redis_url)
    limiter = RateLimiter(client, system_clock)
    journal = AcceptanceJournal(client)
    channel = channel_for(kind, settings)
    timers = Timers()  # wrapped in the order of the cycle, which is the print order
    patches = {sending: {"_message": timers.wrap("render + unsubscribe link", sending._message)}}
    channel.prepare = timers.wrap("channel.prepare (the MIME message)", channel.prepare)
    # begin includes the journal and token round trip (`cleared`, timed on its own):
    # SMTP runs it while the relay answers the envelope.
    begin = timers.wrap("provider call: begin (request out)", channel.begin)
    limiter.take = timers.wrap("  within begin: rate token + journal (Redis)", limiter.take)
    limiter.hand_over = timers.wrap("  within begin: journal write (no rate)", limiter.hand_over)
    limiter.confirm = timers.wrap("journal reply (read while the call is out)", limiter.confirm)
    channel.begin = lambda message, cleared: timers.wrap(
        "provider call: answer (rest of wait)", begin(message, cleared)
    )
    # The rest of a batch is claimed, and acceptances recorded, on the helper thread
    # (engine.dispatch.claiming, background_recording): those parts' wall time overlaps
    # the calls, so they are indented, shown but not counted in the cycle.
    for module, name, label in (
        (sending, "load_batch_run", "db: load campaign, compile templates"),
        (sending, "claim", "db: claim the first chunk (in line)"),
        (claiming, "_claim_rows", "  db: claim (first chunk, and the rest ahead)"),
        (claiming, "_suppress", "  db: suppressions"),
        (claiming, "_contacts", "  db: contacts"),
        (sending, "record_outcomes", "db: record failures (in line)"),
        (background_recording, "record_outcomes", "  db: record acceptances (helper thread)"),
        (sending, "_checkpoint", "db: renew lease, re-check status (per checkpoint)"),
        (sending, "_settle", "db: final settle (per batch)"),
    ):
        patches.setdefault(module, {})[name] = timers.wrap(label, getattr(module, name))
    journal.forget = timers.wrap("journal forget (Redis, per checkpoint)", journal.forget)
    sink = sinks[SINK_OF[kind]]
    sink.reset()
    with ExitStack() as patched:
        for module, values in patches.items():
            patched.enter_context(_patched_all(module, values))
        started = time.perf_counter()
        cpu = time.process_time()
        sent = 0
        for batch in batches:
            report = sending.send_batch(
                factory,
                channel_id=channel_id,
                first_id=batch.first_id,
                last_id=batch.last_id,
                settings=settings,
                clock=system_clock,
                rate_limiter=limiter,
                channel=channel,
                journal=journal,
            )
            sent += report.sent
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu
    channel.close()
    client.close()
    stats = sink.stats()
    per = 1e6 / max(1, sent)
    print(
        f"\nprofile, {kind}: {sent:,} messages in {len(batches)} batch(es) of this process, "
        f"one connection: {wall:.2f} s, {sent / wall:,.0f} msg/s; per message "
        f"{1e3 * wall / max(1, sent):.2f} ms wall, {1e3 * cpu / max(1, sent):.2f} ms CPU "
        f"(sink waited {1e3 * stats.latency_mean:.2f} ms)"
    )
    # The next message is rendered and prepared between a call's begin and its answer,
    # so the answer's wall time is what is left of the provider's latency after that.
    rows = [(name, timers.wall[name], timers.cpu[name], timers.calls[name]) for name in timers.wall]
    top = [r for r in rows if not r[0].startswith("  ")]
    rows.append(
        (
            "rest (transactions, bookkeeping)",
            wall - sum(r[1] for r in top),
            cpu - sum(r[2] for r in top),
            0,
        )
    )
    print(f"  {'part':50} {'wall µs/msg':>12} {'share':>6} {'CPU µs/msg':>11} {'calls':>7}")
    for name, w, c, calls in rows:
        print(
            f"  {name:50} {w * per:12,.0f} {100 * w / wall:5.1f}% {c * per:11,.0f} "
            f"{f'{calls:,}' if calls else '':>7}"
        )
    # The campaign's other batches stay queued; the bench user's deletion removes them.
    with session_scope(factory) as session:
        transition(session, user_id, campaign_id, "cancel")


@contextmanager
def _patched_all(module, values: dict) -> Iterator[None]:
    olds = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in olds.items():
            setattr(module, name, value)


# -- the run -----------------------------------------------------------------------------------


def _cpu_line(phase: Phase, party: str) -> str:
    w = phase.cpu
    parts = [
        f"machine {100 * w.machine_busy:3.0f}% of {os.cpu_count()} CPUs "
        f"(other work {w.others:4.2f} cores)"
    ]
    labels = ((party, party), ("sink", "sink"), ("postgres", "pg"), ("redis", "redis*"))
    for name, label in labels:
        cores = w.cores.get(name, 0.0)
        if cores:
            parts.append(
                f"{label} {cores / w.seconds:4.2f} cores "
                f"({w.per_message_us(name, phase.messages):,.0f} µs/msg)"
            )
    return ", ".join(parts)


def report(args, phases: list[Phase]) -> bool:
    k = args.workers * args.concurrency
    print()
    print(
        f"Latency bench: {args.contacts:,} recipients per channel, sink latency "
        f"{args.latency_ms:g} ms asked, {k} connection(s) a side "
        f"({args.workers} channel worker(s) x concurrency {args.concurrency}, planning and "
        f"reconciliation on one more process), "
        f"direct email built by {args.direct_build}, sent by {args.direct_smtp}, direct sms "
        f"by {args.direct_http}, provider rate "
        f"{args.provider_rate or 'unlimited'}, {os.cpu_count()} CPUs"
    )
    ok = True
    ratios: dict[str, list[float]] = {}
    for phase in phases:
        party = "herald" if phase.side == "herald" else "direct"
        extra = ""
        if phase.side == "herald":
            extra = f", all recorded {phase.recorded_s:.2f} s, completed {phase.completed_s:.2f} s"
        print(
            f"{phase.kind:5} {phase.side:6} {phase.sink.accepted:>7,} msgs  "
            f"start → last accepted {phase.elapsed:6.2f} s {phase.rate:7,.0f} msg/s  "
            f"(steady {phase.window_rate:7,.0f} msg/s)  "
            f"{phase.connections} conn, sink waited {1e3 * phase.sink.latency_mean:.2f} ms"
            f"{extra}"
        )
        print(f"      cpu: {_cpu_line(phase, party)}")
        print(f"      client gap: {_gap_line(phase.sink)}")
        if phase.problems:
            ok = False
            print(f"      PROBLEMS: {'; '.join(phase.problems)}")
        else:
            print(
                f"      checks: each of {phase.messages:,} keys received once"
                + (", sent_count == sent rows == N" if phase.side == "herald" else "")
            )
    for kind in args.channels:
        herald = [p for p in phases if p.kind == kind and p.side == "herald"]
        direct = [p for p in phases if p.kind == kind and p.side == "direct"]
        for h, d in zip(herald, direct, strict=True):
            ratios.setdefault(kind, []).append(h.rate / d.rate)
            ratios.setdefault(kind + " steady", []).append(h.window_rate / d.window_rate)
    for kind, values in ratios.items():
        verdict = ""
        if not kind.endswith("steady"):
            verdict = " — target ≥ 90 %: " + ("met" if min(values) >= 0.9 else "MISSED")
        print(
            f"ratio herald/direct {kind:12} "
            + ", ".join(f"{100 * v:.1f} %" for v in values)
            + (f" (median {100 * statistics.median(values):.1f} %)" if len(values) > 1 else "")
            + verdict
        )
    print("(pg: this database's backends; redis*: the whole server, shared with other work)")
    print("invariants:", "OK" if ok else "PROBLEMS (above)")
    return ok


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=10_000, help="recipients per channel")
    parser.add_argument("--latency-ms", type=float, default=2.0, help="sink latency per message")
    parser.add_argument("--workers", type=int, default=1, help="celery worker processes")
    parser.add_argument(
        "--concurrency", type=int, default=2, help="pool processes per worker (= connections)"
    )
    parser.add_argument(
        "--channels", default="email,sms", type=lambda s: [c for c in s.split(",") if c]
    )
    parser.add_argument("--rounds", type=int, default=1, help="herald/direct pairs per channel")
    parser.add_argument(
        "--direct-build",
        choices=("template", "stdlib"),
        default="template",
        help="how the direct client makes each email: a string template (a blaster), or "
        "Herald's own SMTP channel code (the email package)",
    )
    parser.add_argument(
        "--direct-smtp",
        choices=("sendmail", "pipelined"),
        default="sendmail",
        help="how the direct client talks SMTP: smtplib's sendmail (MAIL, RCPT, DATA one "
        "by one), or RFC 2920 pipelining as Herald does where the relay offers it",
    )
    parser.add_argument(
        "--direct-http",
        choices=("stdlib", "httpx"),
        default="stdlib",
        help="the direct client's HTTP library: http.client, as Herald's Twilio channel "
        "uses, or httpx (which Herald's Twilio channel used before it split its calls)",
    )
    parser.add_argument(
        "--provider-rate",
        type=float,
        default=0.0,
        help="EMAIL/SMS_RATE_PER_SECOND for the workers (0: unlimited)",
    )
    parser.add_argument("--profile", action="store_true", help="then profile in-process")
    parser.add_argument("--profile-batches", type=int, default=4)
    parser.add_argument(
        "--profile-only", action="store_true", help="only the in-process profile, no workers"
    )
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--keep", action="store_true", help="keep the bench user's rows")
    args = parser.parse_args()
    unknown = set(args.channels) - set(SINK_OF)
    if unknown:
        parser.error(f"unknown channel(s): {', '.join(sorted(unknown))}")

    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    engine = make_engine(get_settings())
    factory = make_session_factory(engine)
    database = engine.url.database
    purge_queues()
    latency = args.latency_ms / 1000
    sinks = {SINK_OF[kind]: SinkProcess(SINK_OF[kind], latency) for kind in args.channels}
    workers = None
    user_id = warm_user_id = None
    try:
        for sink in sinks.values():
            sink.start()
        started = time.perf_counter()
        user_id = create_user_and_contacts(factory, args.contacts)
        print(f"{args.contacts:,} contacts created in {time.perf_counter() - started:.1f} s")
        if args.profile_only:
            for kind in args.channels:
                profile_cycle(factory, args, user_id, kind, sinks)
            return
        workers = SinkWorkers(
            "workers", args.workers, args.concurrency, env=herald_env(args, sinks)
        )
        workers.start()
        workers.wait_ready()
        # The direct clients connect before their clock starts; Herald's pool processes
        # open their provider, PostgreSQL and Redis connections (and compile what they
        # cache) on their first batch. One untimed campaign per channel does that first.
        warm_user_id = create_user_and_contacts(
            factory, WARM_UP_BATCHES * BATCH_SIZE * args.workers * args.concurrency
        )
        for kind in args.channels:
            warm_up(factory, args, warm_user_id, kind)
        # The contacts and warm-up rows just written would otherwise be vacuumed and
        # analysed by autovacuum during the first timed round, and only that one.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM (ANALYZE) contacts, deliveries"))
        meter = CpuMeter(
            {
                "herald": workers.pids,
                "sink": lambda: [s.pid for s in sinks.values() if s.pid],
                "postgres": lambda: _backends_of(database),
                "redis": lambda: _pids_named("redis-server"),
                "bench": lambda: [os.getpid()],
            }
        )
        phases: list[Phase] = []
        for round_no in range(args.rounds):
            for kind in args.channels:
                sink = sinks[SINK_OF[kind]]
                phases.append(run_herald(factory, args, user_id, kind, sink, meter))
                print(f"round {round_no + 1} {kind} herald: {phases[-1].rate:,.0f} msg/s")
                phases.append(run_direct(args, kind, sink, args.workers * args.concurrency, meter))
                print(f"round {round_no + 1} {kind} direct: {phases[-1].rate:,.0f} msg/s")
        workers.stop()
        workers = None
        ok = report(args, phases)
        if args.profile:
            for kind in args.channels:
                profile_cycle(factory, args, user_id, kind, sinks)
        if not ok:
            sys.exit(1)
    finally:
        if workers is not None:
            workers.stop()
        for sink in sinks.values():
            sink.stop()
        for owner in (user_id, warm_user_id):
            if owner is not None and not args.keep:
                with session_scope(factory) as session:
                    session.execute(text("DELETE FROM users WHERE id = :id"), {"id": owner})
        engine.dispose()


if __name__ == "__main__":
    main()

"""Tracking: what a tracked message costs the sender, and what the endpoints serve.

Two parts, each against a baseline measured in the same run:

* **rewrite** (in this process): µs per message to render a channel from its marked
  config and fill in the tracked links and pixel (engine.tracking.links.Tracking),
  next to rendering the stored config alone, for a realistic HTML+text email (5 KB,
  5 links twice over, a dynamic link, the unsubscribe link) and a one-link SMS.
* **endpoints**: a real gunicorn (gthread workers, keep-alive) on loopback serving
  Herald, and a load generator in a separate process (threads, one persistent
  http.client connection each) hitting, for `--seconds` each: GET /healthz (a no-op of
  the same app), the open pixel, and tracked links, spread over `--deliveries`
  deliveries of one campaign (a person's browser user agent, so opens and clicks count).
  Prints hits/s for each and the ratio to the no-op, then checks every counter equals
  its deliveries.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/herald_bench_e \\
        .venv/bin/python -m bench.tracking [--workers 4 --threads 4 --connections 16]

The database is created and migrated if missing; the bench user is deleted at the end.
"""

from __future__ import annotations

import os

os.environ.setdefault("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/herald_bench_e")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/9")

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy import delete, func, select, text

from engine.campaigns.rendering import CompiledChannel
from engine.db import make_engine, make_session_factory, session_scope
from engine.models import Campaign, CampaignChannel, Contact, Delivery, User
from engine.settings import Settings, get_settings
from engine.tracking.links import (
    Link,
    Tracking,
    click_token,
    ensure_links,
    links_of,
    utm_parameters,
    with_utm,
)
from engine.tracking.opens import open_token

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(ROOT / ".venv" / "bin" / "gunicorn")
BROWSER = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.0 Safari/605.1.15"
)

_PARAGRAPH = (
    '<p style="font-family:Arial,sans-serif;font-size:14px;color:#333">Lorem ipsum dolor sit'
    " amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore.</p>\n"
)
EMAIL = {
    "subject": "Spring sale, {{ contact.first_name }}",
    "html": "<html><head><style>p{margin:0}</style></head><body><table><tr><td>"
    "<p>Hi {{ contact.first_name }},</p>\n"
    + "".join(
        _PARAGRAPH + f'<a href="https://shop.example/item/{i}?ref=mail&amp;v=2" style="color:#06c">'
        f'Item {i}</a> <img src="https://cdn.example/{i}.png" width="120" alt="">\n'
        for i in range(5)
    )
    * 2
    + '<p><a href="https://shop.example/you/{{ contact.id }}">Your picks</a></p>'
    '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p></td></tr></table></body></html>',
    "text": "Hi {{ contact.first_name }},\n"
    + "".join(f"Item {i}: https://shop.example/item/{i}?ref=mail&v=2\n" for i in range(5))
    + "Unsubscribe: {{ unsubscribe_url }}\n",
    "utm": {"source": "newsletter", "medium": "email", "campaign": "spring"},
}
SMS = {"body": "Hi {{ contact.first_name }}, spring sale: https://shop.example/s. STOP to end"}


# -- part 1: rewriting ---------------------------------------------------------------------


def per_message(render, messages: int, repeats: int = 7) -> float:
    """Median CPU µs per message over `repeats` runs of `messages` renders. CPU time of
    this process, not wall time: on a shared machine the wall clock also counts the
    time other processes had the core."""
    runs = []
    for _ in range(repeats):
        started = time.process_time()
        for delivery_id in range(1, messages + 1):
            render(delivery_id)
        runs.append((time.process_time() - started) / messages * 1e6)
    return statistics.median(runs)


def rewrite_part(settings: Settings, messages: int) -> None:
    print(f"rewrite: {messages:,} messages per run, median of 7 runs (CPU µs per message)")
    for channel_type, config in (("email", EMAIL), ("sms", SMS)):
        _measure(settings, channel_type, config, messages)


def _measure(settings: Settings, channel_type: str, config: dict, messages: int) -> None:
    campaign = SimpleNamespace(id=uuid.UUID(int=1), name="Spring", description=None)
    contact = SimpleNamespace(id=uuid.UUID(int=42), first_name="Ann", attributes={})
    unsubscribe = f"{settings.public_base_url}/u/1.token"
    utm = utm_parameters(config)
    links = [
        Link(index, url, None if dynamic else with_utm(url, utm), dynamic)
        for index, (url, dynamic) in enumerate(
            links_of(channel_type, config, settings.public_base_url), start=1
        )
    ]
    tracking = Tracking(settings, channel_type, config, links)
    plain = CompiledChannel.compile(channel_type, config, campaign)
    marked = CompiledChannel.compile(channel_type, tracking.config, campaign)
    rendered = marked.render(contact, unsubscribe_url=unsubscribe)

    base = per_message(lambda _d: plain.render(contact, unsubscribe_url=unsubscribe), messages)
    tracked = per_message(
        lambda d: tracking.fill(marked.render(contact, unsubscribe_url=unsubscribe), d), messages
    )
    fill = per_message(lambda d: tracking.fill(rendered, d), messages)
    size = sum(len(v) for v in rendered.values() if isinstance(v, str))
    print(
        f"  {channel_type:5} ({size:,} chars, {len(links)} links): render {base:6.1f}"
        f" | render + track {tracked:6.1f} | track alone {fill:5.1f}"
        f" | added {tracked - base:5.1f}"
    )


# -- part 2: endpoints ---------------------------------------------------------------------


def ensure_database(settings: Settings) -> None:
    """Create the bench database if it is missing, then migrate it to head."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    url = settings.sqlalchemy_url
    name = url.rsplit("/", 1)[1]
    admin = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if not conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}):
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")


def create_campaign(factory, settings: Settings, deliveries: int) -> tuple[uuid.UUID, list, list]:
    """A running campaign with one email channel and `deliveries` deliveries sent a day
    ago (so no click is 'too soon'); the open-pixel and click paths of each."""
    sent_at = datetime.now(UTC) - timedelta(days=1)
    with session_scope(factory) as session:
        user = User(email=f"track-{uuid.uuid4().hex[:8]}@example.com", password_hash="x")
        session.add(user)
        session.flush()
        campaign = Campaign(user_id=user.id, name="tracking bench", status="running", config={})
        session.add(campaign)
        session.flush()
        channel = CampaignChannel(
            campaign_id=campaign.id, channel_type="email", config=EMAIL, status="done"
        )
        session.add(channel)
        session.flush()
        session.execute(
            text(
                "INSERT INTO contacts (id, user_id, email, first_name, consent_email,"
                " push_tokens, attributes)"
                " SELECT gen_random_uuid(), :user_id, 't' || n || '@example.com', 'N' || n,"
                " true, '[]'::jsonb, '{}'::jsonb FROM generate_series(1, :n) AS n"
            ),
            {"user_id": user.id, "n": deliveries},
        )
        session.execute(
            text(
                "INSERT INTO deliveries (campaign_channel_id, contact_id, address, status,"
                " attempts, sent_at) SELECT :channel_id, id, email, 'sent', 1, :sent_at"
                " FROM contacts WHERE user_id = :user_id"
            ),
            {"channel_id": channel.id, "user_id": user.id, "sent_at": sent_at.replace(tzinfo=None)},
        )
        channel.sent_count = deliveries
        links = ensure_links(session, settings, channel.id, "email", EMAIL)
        static = next(link.id for link in links if not link.dynamic)
        ids = session.scalars(
            select(Delivery.id)
            .where(Delivery.campaign_channel_id == channel.id)
            .order_by(Delivery.id)
        ).all()
        session.execute(text("ANALYZE contacts; ANALYZE deliveries"))
    pixels = [f"/t/o/{open_token(settings, d)}" for d in ids]
    clicks = [f"/t/c/{click_token(settings, d, static)}" for d in ids]
    return user.id, pixels, clicks


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_gunicorn(args, port: int) -> subprocess.Popen:
    env = {**os.environ, "HERALD_ENV": "development", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [
            GUNICORN,
            "--bind", f"127.0.0.1:{port}",
            "--workers", str(args.workers),
            "--worker-class", "gthread",
            "--threads", str(args.threads),
            "--keep-alive", "5",
            "--backlog", "2048",
            "--log-level", "warning",
            "api:create_app()",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gunicorn exited with {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                connection.close()
                return process
        except OSError:
            pass
        time.sleep(0.2)  # polling a process with a deadline
    process.kill()
    raise SystemExit("gunicorn did not answer /healthz within 60 s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def load(port: int, paths_file: str, connections: int, seconds: float, expect: int) -> dict:
    """Run the load generator in its own process; what it counted."""
    result = subprocess.run(
        [
            sys.executable, "-m", "bench.tracking", "--client",
            "--port", str(port), "--paths", paths_file, "--connections", str(connections),
            "--seconds", str(seconds), "--expect", str(expect),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    return json.loads(result.stdout)


def client_main(args) -> None:
    """The load generator: `connections` threads, each with one keep-alive connection,
    cycling through its share of the paths until the time is up."""
    paths = Path(args.paths).read_text().split()
    stop_at = time.monotonic() + args.seconds
    counts = [0] * args.connections
    errors = [0] * args.connections

    def worker(index: int) -> None:
        mine = paths[index :: args.connections] or paths
        connection = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
        headers = {"User-Agent": BROWSER}
        position = 0
        while time.monotonic() < stop_at:
            try:
                connection.request("GET", mine[position % len(mine)], headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status == args.expect:
                    counts[index] += 1
                else:
                    errors[index] += 1
                if response.will_close:
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
            except (OSError, http.client.HTTPException):
                errors[index] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
            position += 1
        connection.close()

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    print(json.dumps({"hits": sum(counts), "errors": sum(errors), "seconds": elapsed}))


def endpoints_part(args, settings: Settings) -> None:
    ensure_database(settings)
    engine = make_engine(settings)
    factory = make_session_factory(engine)
    user_id, pixels, clicks = create_campaign(factory, settings, args.deliveries)
    port = free_port()
    server = start_gunicorn(args, port)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            for name, paths in (("noop", ["/healthz"]), ("pixel", pixels), ("click", clicks)):
                files[name] = str(Path(tmp) / f"{name}.txt")
                Path(files[name]).write_text("\n".join(paths))
            load(port, files["noop"], args.connections, 2, 200)  # warm every worker up
            phases = (
                ("noop", "noop", 200),
                ("pixel", "pixel", 200),
                ("pixel2", "pixel", 200),
                ("click", "click", 302),
                ("noop2", "noop", 200),
            )
            for name, file_name, expect in phases:
                file = files[file_name]
                results[name] = load(port, file, args.connections, args.seconds, expect)
    finally:
        stop(server)
    with session_scope(factory) as session:
        channel = session.scalars(
            select(CampaignChannel)
            .join(Campaign, Campaign.id == CampaignChannel.campaign_id)
            .where(Campaign.user_id == user_id)
        ).one()
        facts = session.execute(
            select(func.count(Delivery.opened_at), func.count(Delivery.clicked_at)).where(
                Delivery.campaign_channel_id == channel.id
            )
        ).one()
        counters_ok = (channel.opened_count, channel.clicked_count) == tuple(facts)
        events = session.scalar(
            text("SELECT count(*) FROM delivery_events WHERE campaign_channel_id = :c"),
            {"c": channel.id},
        )
        summary = (channel.opened_count, channel.clicked_count, events)
        if not args.keep:
            session.execute(delete(Contact).where(Contact.user_id == user_id))
            session.execute(delete(User).where(User.id == user_id))
    engine.dispose()

    noop = (results["noop"]["hits"] + results["noop2"]["hits"]) / (
        results["noop"]["seconds"] + results["noop2"]["seconds"]
    )
    print(
        f"\nendpoints: gunicorn {args.workers} workers x {args.threads} threads (gthread,"
        f" keep-alive), {args.connections} client connections in a separate process,"
        f" {args.seconds:.0f} s each, {args.deliveries:,} deliveries"
    )
    labels = {
        "noop": "GET /healthz (no-op)",
        "pixel": "GET /t/o, first opens",
        "pixel2": "GET /t/o, repeats",
        "click": "GET /t/c (click)",
        "noop2": "GET /healthz again",
    }
    for name, label in labels.items():
        r = results[name]
        rate = r["hits"] / r["seconds"]
        print(f"  {label:24} {rate:8.0f} hits/s  ({r['hits']:,} hits, {r['errors']} errors)")
    for name in ("pixel", "pixel2", "click"):
        rate = results[name]["hits"] / results[name]["seconds"]
        print(f"  {labels[name].removeprefix('GET ')} / no-op: {rate / noop:.2f}")
    opened, clicked, events = summary
    print(
        f"  after the run: opened_count {opened:,}, clicked_count {clicked:,},"
        f" {events:,} events; counters equal the deliveries: {'yes' if counters_ok else 'NO'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["rewrite", "endpoints", "all"], default="all")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--deliveries", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the bench user and data")
    # The load generator's own options (it is this script, run with --client).
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=200, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
    settings = replace(get_settings(), public_base_url="https://t.example")
    if args.part in ("rewrite", "all"):
        rewrite_part(settings, args.messages)
    if args.part in ("endpoints", "all"):
        endpoints_part(args, get_settings())


if __name__ == "__main__":
    main()

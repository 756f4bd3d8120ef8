"""CSV contact import, 1,000,000 rows by default, against a baseline in the same run.

Generates a CSV of N contacts in a temporary file, then measures:

* baseline: a raw `COPY … FROM STDIN (FORMAT csv)` of the same file into a plain table
  of text columns, the floor for getting these bytes into PostgreSQL;
* upload: POST /api/v1/contacts/imports through the real WSGI app (Flask test client),
  which parses the multipart stream and COPYs every row into staging as JSON;
* upsert: the import's batch step, run in-process until completed, which validates every
  row and upserts it set-based (the work a `sync` worker does);
* optionally (--twice) the same file imported again, when every row is an update;
* the process's peak RSS after each phase, which must not grow with the file.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/herald_bench \\
    REDIS_URL=redis://127.0.0.1:6379/14 .venv/bin/python -m bench.csv_import --rows 1000000

Run `DATABASE_URL=… .venv/bin/alembic upgrade head` first. The bench user (and so its
contacts) is deleted at the end unless --keep is given.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import delete, select, text

from api import create_app
from api.extensions import db
from engine.clock import system_clock
from engine.contacts.csv_import import BATCH_SIZE, run_import_batch
from engine.db import session_scope
from engine.models import ContactImport, User
from engine.settings import get_settings

HEADER = (
    "external_id,email,phone,first_name,last_name,timezone,locale,"
    "consent_email,consent_sms,push_tokens,plan,city\n"
)
PLANS = ("free", "pro", "team")
CITIES = ("Paris", "Lyon", "Berlin", "Lisbon", "Austin")


def write_csv(path: Path, rows: int) -> int:
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(HEADER)
        for i in range(rows):
            out.write(
                f"bench-{i},user{i}@example.com,+336{10000000 + i % 89999999},"
                f"First{i},Last{i},Europe/Paris,fr-FR,"
                f"{'yes' if i % 3 else 'no'},{'yes' if i % 2 else 'no'},tok-{i},"
                f"{PLANS[i % 3]},{CITIES[i % 5]}\n"
            )
    return path.stat().st_size


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def baseline_copy(engine, path: Path) -> float:
    """Seconds for a raw COPY of the file into a plain table of text columns."""
    columns = ", ".join(f"{name} text" for name in HEADER.strip().split(","))
    with engine.connect() as conn:
        dbapi = conn.connection.driver_connection
        with dbapi.cursor() as cursor:
            cursor.execute(f"CREATE TEMP TABLE bench_raw ({columns})")
            started = time.perf_counter()
            with (
                cursor.copy("COPY bench_raw FROM STDIN WITH (FORMAT csv, HEADER true)") as copy,
                path.open("rb") as source,
            ):
                while chunk := source.read(1024 * 1024):
                    copy.write(chunk)
            elapsed = time.perf_counter() - started
        dbapi.rollback()
    return elapsed


def upload(client, headers: dict, path: Path) -> tuple[float, str]:
    started = time.perf_counter()
    with path.open("rb") as source:
        response = client.post(
            "/api/v1/contacts/imports",
            data={"file": (source, "bench.csv")},
            headers=headers,
            content_type="multipart/form-data",
        )
    elapsed = time.perf_counter() - started
    assert response.status_code == 202, response.get_data(as_text=True)[:500]
    return elapsed, response.get_json()["id"]


def upsert(import_id: str, batch_size: int) -> tuple[float, ContactImport]:
    job_id = uuid.UUID(import_id)
    started = time.perf_counter()
    more = True
    while more:
        with session_scope(db.factory) as session:
            more = run_import_batch(session, job_id, system_clock.now(), batch_size=batch_size)
    elapsed = time.perf_counter() - started
    with session_scope(db.factory) as session:
        job = session.get(ContactImport, job_id)
    return elapsed, job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--twice", action="store_true", help="import the file again (updates)")
    parser.add_argument("--keep", action="store_true", help="keep the bench user's contacts")
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL"):
        raise SystemExit("set DATABASE_URL (a migrated PostgreSQL database) and REDIS_URL")

    app = create_app(get_settings())
    client = app.test_client()
    email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
    password = "bench-passphrase-not-common"
    client.post("/api/v1/auth/register", json={"email": email, "password": password})
    tokens = client.post("/api/v1/auth/login", json={"email": email, "password": password})
    headers = {"Authorization": f"Bearer {tokens.get_json()['access_token']}"}
    n = args.rows

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "contacts.csv"
        size = write_csv(path, n)
        print(f"CSV: {n:,} rows, {size / 1e6:.1f} MB; peak RSS {peak_rss_mb():.0f} MB")

        copy_s = baseline_copy(db.engine, path)
        print(f"baseline raw COPY     {n / copy_s:10,.0f} rows/s  {copy_s:7.1f} s")

        upload_s, import_id = upload(client, headers, path)
        print(
            f"upload (API→staging)  {n / upload_s:10,.0f} rows/s  {upload_s:7.1f} s"
            f"  ({copy_s / upload_s:.2f}x baseline rate); peak RSS {peak_rss_mb():.0f} MB"
        )
        upsert_s, job = upsert(import_id, args.batch_size)
        assert job.status == "completed" and job.rows_done == n, job
        print(
            f"upsert (batch step)   {n / upsert_s:10,.0f} rows/s  {upsert_s:7.1f} s"
            f"  created={job.created_count:,} updated={job.updated_count:,}"
            f" rejected={job.rejected_count:,}; peak RSS {peak_rss_mb():.0f} MB"
        )
        total = upload_s + upsert_s
        print(f"total                 {n / total:10,.0f} rows/s  {total:7.1f} s")

        if args.twice:
            upload_s, import_id = upload(client, headers, path)
            upsert_s, job = upsert(import_id, args.batch_size)
            print(
                f"again (all updates)   {n / (upload_s + upsert_s):10,.0f} rows/s"
                f"  {upload_s + upsert_s:7.1f} s (upload {upload_s:.1f} s, upsert"
                f" {upsert_s:.1f} s) updated={job.updated_count:,};"
                f" peak RSS {peak_rss_mb():.0f} MB"
            )

    if not args.keep:
        with session_scope(db.factory) as session:
            user_id = session.scalar(select(User.id).where(User.email == email))
            session.execute(text("SET LOCAL statement_timeout = 0"))
            session.execute(delete(User).where(User.id == user_id))


if __name__ == "__main__":
    main()

"""Shared fixtures. Everything here is real: PostgreSQL, Redis, Celery workers and, for
email, an SMTP server (aiosmtpd) on loopback. Nothing of ours is mocked.

The test database is migrated once per session with Alembic, then emptied after each
test with one TRUNCATE, which is far faster than re-migrating.
"""

from __future__ import annotations

import os
import socket
import threading
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, select, text

ROOT = Path(__file__).resolve().parent.parent
TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/herald_test"
)
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

# Point the whole process (API, engine, worker tasks) at the test services before any
# Herald module reads its settings.
os.environ.update(
    HERALD_ENV="test",
    DATABASE_URL=TEST_DATABASE_URL,
    REDIS_URL=TEST_REDIS_URL,
    EMAIL_PROVIDER="null",
)

from engine.settings import Settings, get_settings, reset_settings  # noqa: E402

reset_settings()


def _pg_url(url: str) -> str:
    return Settings(database_url=url).sqlalchemy_url


@pytest.fixture(scope="session")
def migrated_database() -> str:
    """herald_test at Alembic head, rebuilt from empty once per test session."""
    from alembic import command
    from alembic.config import Config

    url = _pg_url(TEST_DATABASE_URL)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        # IF EXISTS: a run killed between these two statements leaves no schema behind.
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")
    return url


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SmtpSink:
    """A real SMTP server on loopback that keeps every message it accepts."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[Message] = []
        self._arrived = threading.Condition()
        self.port = free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd handler hook
        with self._arrived:
            self.messages.append(message_from_bytes(envelope.content))
            self._arrived.notify_all()
        return "250 OK"

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def wait_for(self, to: str, count: int = 1, timeout: float = 15.0) -> list[Message]:
        """Block until `count` messages to `to` arrived (a condition, not a sleep)."""

        def matching() -> list[Message]:
            return [m for m in self.messages if m["To"] == to]

        with self._arrived:
            self._arrived.wait_for(lambda: len(matching()) >= count, timeout=timeout)
            found = matching()
        assert len(found) >= count, f"expected {count} message(s) to {to}, got {len(found)}"
        return found


@pytest.fixture(scope="session")
def smtp_sink():
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture(scope="session")
def base_settings(migrated_database, smtp_sink, tmp_path_factory) -> Settings:
    """Settings for the API and for worker tasks alike: both read the environment."""
    os.environ.update(
        HERALD_VAR_DIR=str(tmp_path_factory.mktemp("var")),
        EMAIL_PROVIDER="smtp",
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(smtp_sink.port),
        LOGIN_MAX_FAILURES_PER_ACCOUNT="3",
        LOGIN_MAX_FAILURES_PER_IP="6",
        PUBLIC_BASE_URL="http://herald.test",
    )
    reset_settings()
    return get_settings()


@pytest.fixture(autouse=True)
def _clean_state(request):
    """Empty every table and the test Redis database after each test that used them."""
    yield
    if "base_settings" not in request.fixturenames and "migrated_database" not in (
        request.fixturenames
    ):
        return
    engine = create_engine(_pg_url(TEST_DATABASE_URL))
    with engine.begin() as conn:
        tables = conn.scalars(
            text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename <> 'alembic_version'"
            )
        ).all()
        if tables:
            conn.execute(text(f"TRUNCATE {', '.join(tables)} CASCADE"))
    engine.dispose()
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()


@pytest.fixture
def settings(base_settings) -> Settings:
    return base_settings


@pytest.fixture
def app(settings):
    from api import create_app
    from api.extensions import db

    app = create_app(settings)
    yield app
    db.dispose(app)
    app.extensions["herald"].celery.close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def celery_worker(app):
    """A real Celery worker (solo pool, in a thread) consuming the app's queues on Redis."""
    from celery.contrib.testing.worker import start_worker

    celery = app.extensions["herald"].celery
    with start_worker(celery, perform_ping_check=False, loglevel="WARNING") as worker:
        yield worker


@pytest.fixture
def db_session(app):
    from api.extensions import db

    session = db.factory()
    yield session
    session.close()


def make_account(client, email: str, *, verified: bool = True) -> dict:
    """A registered, logged-in marketer: {"id", "email", "headers"}."""
    from sqlalchemy import update

    from api.extensions import db
    from engine.models import User
    from tests.helpers import bearer, signed_up

    pair = signed_up(client, email)
    with client.application.app_context():
        session = db.factory()
        session.execute(update(User).where(User.email == email).values(is_verified=verified))
        session.commit()
        user_id = session.scalar(select(User.id).where(User.email == email))
        session.close()
    return {"id": user_id, "email": email, "headers": bearer(pair["access_token"])}


@pytest.fixture
def alice(client) -> dict:
    """A verified marketer, logged in."""
    return make_account(client, "alice@example.com")


@pytest.fixture
def bob(client) -> dict:
    """A second verified marketer, for cross-tenant checks."""
    return make_account(client, "bob@example.com")

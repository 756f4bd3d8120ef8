"""Engines and sessions for PostgreSQL (production) and SQLite (the embedded default).

Services take a Session and never commit; whoever opened the session (a request, a task,
a CLI command) owns the transaction. `session_scope` is that owner for non-HTTP callers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from engine.settings import Settings

SQLITE_BUSY_TIMEOUT_MS = 5000


def make_engine(settings: Settings, **kwargs: object) -> Engine:
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs
        )
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    # Timestamps are stored without time zone, as UTC: pin every connection to UTC so
    # CURRENT_TIMESTAMP defaults and now() agree with what Python writes.
    return create_engine(
        url,
        connect_args={"options": "-c TimeZone=UTC"},
        pool_pre_ping=True,
        **kwargs,
    )


def _configure_sqlite(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while a worker writes; busy_timeout waits instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def insert_ignoring_conflicts(session: Session, table, rows: list[dict], *, index_elements):
    """INSERT … ON CONFLICT DO NOTHING on both dialects: the idempotent write that lets a
    retry repeat without duplicating. Returns the executed result (rowcount = rows added)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(table).values(rows).on_conflict_do_nothing(index_elements=index_elements)
    return session.execute(stmt)

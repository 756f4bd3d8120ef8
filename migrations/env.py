"""Alembic environment: migrates the database Herald itself is configured to use.

The URL comes from Alembic's config only when a caller set one (tests, a one-off
operation); otherwise it comes from the same environment the API and the workers read, so
`alembic upgrade head` cannot migrate a different database than the one Herald opens.
The engine is built by engine.db.make_engine, so migrations run under the app's session
settings: TimeZone=UTC on PostgreSQL (CURRENT_TIMESTAMP defaults must agree with the UTC
Python writes) and foreign keys enforced on SQLite.
"""

from __future__ import annotations

import dataclasses
from logging.config import fileConfig
from pathlib import Path
from typing import Any

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import make_url

from engine.db import make_engine
from engine.models import Base
from engine.settings import Settings

config = context.config

if config.config_file_name is not None:
    # Loggers created before Alembic ran (the app's, pytest's capture) must keep working.
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _settings() -> Settings:
    """Settings whose sqlalchemy_url is the database to migrate."""
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        return Settings.from_env()
    # An explicit URL must not depend on the environment (HERALD_ENV=production would
    # demand secrets a migration never uses), and the directory make_engine creates for
    # SQLite has to be the one that holds this file, not ./var.
    settings = Settings()
    database = make_url(url).database if url.startswith("sqlite") else None
    var_dir = Path(database).parent if database and database != ":memory:" else settings.var_dir
    return dataclasses.replace(settings, database_url=url, var_dir=var_dir)


def _compare_server_default(
    context: Any,
    inspected_column: Any,
    metadata_column: Any,
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    """SQLite has no gen_random_uuid(), so the migration leaves that default out there on
    purpose (ids come from Python's uuid4); without this, autogenerate on SQLite would
    propose adding it to every table. Anything else: Alembic's own comparison (None)."""
    if (
        context.dialect.name == "sqlite"
        and inspected_default is None
        and rendered_metadata_default is not None
        and "gen_random_uuid" in rendered_metadata_default
    ):
        return False
    return None


def _context_options(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "compare_type": True,
        "compare_server_default": _compare_server_default,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        "render_as_batch": dialect_name == "sqlite",
    }


def run_migrations_offline() -> None:
    """`alembic upgrade --sql`: emit the DDL for a DBA to review instead of running it."""
    url = _settings().sqlalchemy_url
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_context_options(make_url(url).get_backend_name()),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # NullPool: a migration is one short session; pooled connections would outlive it.
    connectable = make_engine(_settings(), poolclass=pool.NullPool)
    try:
        with connectable.connect() as connection:
            context.configure(connection=connection, **_context_options(connection.dialect.name))
            with context.begin_transaction():
                context.run_migrations()
    finally:
        connectable.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

"""The migrations, run against real databases because that is the only place they run.

PostgreSQL is production and SQLite is the embedded default: a revision only one of them
accepts, a schema that drifts from the models, or an updated_at that goes stale under a
bulk UPDATE is caught here instead of by a deploy. The PostgreSQL tests own a database
(herald_test_migrations) so they can wipe its schema without touching anyone else's.
"""

from __future__ import annotations

import os
import pprint
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import IntegrityError

from engine.models import Base

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get(
    "TEST_MIGRATIONS_DATABASE_URL",
    "postgresql+psycopg://postgres@127.0.0.1:5432/herald_test_migrations",
)
MODEL_TABLES = frozenset(Base.metadata.tables)
# Derived from the models, not copied from the migration: a table that gains updated_at
# without a trigger must fail here.
UPDATED_AT_TABLES = frozenset(
    name for name, table in Base.metadata.tables.items() if "updated_at" in table.c
)
MIRROR = "models_mirror"
# Migration 0009: a channel's deliveries go with it by trigger, not by a foreign key.
CHANNEL_DELETE_TRIGGER = "trg_campaign_channels_delete_deliveries"
CHANNEL_DELETE_FUNCTION = "herald_delete_channel_deliveries"
# Python and the database share this machine's clock; this only absorbs SQLite's
# millisecond truncation and scheduling jitter.
CLOCK_SLACK = timedelta(seconds=2)


def alembic_config(url: str, **kwargs: Any) -> Config:
    # No ini file: env.py then leaves logging alone, so pytest's log capture keeps working.
    config = Config(**kwargs)
    config.set_main_option("script_location", str(ROOT / "migrations"))
    # ConfigParser would read a "%" in a password as interpolation.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def schema_snapshot(conn: sa.Connection, schema: str | None = None) -> dict[str, Any]:
    """Each table as plain values, for comparing a migrated schema with one built by
    Base.metadata.create_all. Unlike compare_metadata, this also sees CHECK constraints,
    partial-index predicates and serial defaults, which Alembic does not compare."""
    inspector = sa.inspect(conn)
    prefix = f"{schema}." if schema else None

    def text(value: object) -> str | None:
        # A mirror schema's sequences and tables come back qualified with its name.
        if value is None:
            return None
        return str(value).replace(prefix, "") if prefix else str(value)

    snapshot: dict[str, Any] = {}
    for table in inspector.get_table_names(schema=schema):
        if table == "alembic_version":
            continue
        pk = inspector.get_pk_constraint(table, schema=schema)
        snapshot[table] = {
            "columns": {
                c["name"]: (repr(c["type"]), c["nullable"], text(c.get("default")))
                for c in inspector.get_columns(table, schema=schema)
            },
            "primary_key": (pk["name"], tuple(pk["constrained_columns"])),
            "foreign_keys": sorted(
                (
                    fk["name"],
                    tuple(fk["constrained_columns"]),
                    fk["referred_table"],
                    tuple(fk["referred_columns"]),
                    fk["options"].get("ondelete"),
                )
                for fk in inspector.get_foreign_keys(table, schema=schema)
            ),
            "unique": sorted(
                (uq["name"], tuple(uq["column_names"]))
                for uq in inspector.get_unique_constraints(table, schema=schema)
            ),
            "checks": sorted(
                (ck["name"], ck["sqltext"])
                for ck in inspector.get_check_constraints(table, schema=schema)
            ),
            "indexes": sorted(
                (
                    ix["name"],
                    tuple(ix["column_names"]),
                    bool(ix["unique"]),
                    sorted((k, text(v)) for k, v in ix.get("dialect_options", {}).items()),
                )
                for ix in inspector.get_indexes(table, schema=schema)
            ),
        }
    return snapshot


def assert_same_schema(migrated: dict[str, Any], mirrored: dict[str, Any]) -> None:
    assert sorted(migrated) == sorted(mirrored) == sorted(MODEL_TABLES)
    for table in sorted(mirrored):
        assert migrated[table] == mirrored[table], f"{table} differs from the models"


# -- PostgreSQL ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_url() -> str:
    url = sa.make_url(PG_URL)
    admin = sa.create_engine(
        url.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    with admin.connect() as conn:
        exists = conn.scalar(
            sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": url.database}
        )
        if not exists:
            conn.exec_driver_sql(f'CREATE DATABASE "{url.database}"')
    admin.dispose()

    # Whatever an earlier (or crashed) run left behind, start from nothing.
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    # The app's session setting (engine.db.make_engine): timestamps are UTC.
    engine = sa.create_engine(pg_url, connect_args={"options": "-c TimeZone=UTC"})
    yield engine
    engine.dispose()


@pytest.fixture
def pg_head(pg_url: str, pg_engine: sa.Engine) -> sa.Engine:
    # Every test migrates for itself (a no-op at head), so none depends on test order.
    command.upgrade(alembic_config(pg_url), "head")
    return pg_engine


@pytest.fixture
def pg_conn(pg_head: sa.Engine) -> Iterator[sa.Connection]:
    """A connection whose work is rolled back, so tests leave no rows for each other."""
    with pg_head.connect() as conn:
        yield conn
        conn.rollback()


def pg_state(conn: sa.Connection) -> dict[str, set[Any]]:
    def rows(sql: str) -> set[Any]:
        return {tuple(row) for row in conn.execute(sa.text(sql))}

    return {
        "tables": {
            name for (name,) in rows("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        },
        # Tables, indexes, sequences, views: anything a downgrade could leave behind.
        "relations": {
            name
            for (name,) in rows(
                "SELECT c.relname FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
            )
        },
        "functions": {
            name
            for (name,) in rows(
                "SELECT p.proname FROM pg_proc p"
                " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'"
            )
        },
        "triggers": rows(
            "SELECT c.relname, t.tgname, p.proname FROM pg_trigger t"
            " JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE NOT t.tgisinternal"
        ),
    }


def assert_pg_at_head(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        state = pg_state(conn)
        version = conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
    assert state["tables"] == MODEL_TABLES | {"alembic_version"}
    assert state["functions"] == {"herald_set_updated_at", CHANNEL_DELETE_FUNCTION}
    assert state["triggers"] == {
        (table, f"trg_{table}_set_updated_at", "herald_set_updated_at")
        for table in UPDATED_AT_TABLES
    } | {("campaign_channels", CHANNEL_DELETE_TRIGGER, CHANNEL_DELETE_FUNCTION)}
    assert version == head_revision()


def assert_pg_empty(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        state = pg_state(conn)
    assert state["relations"] <= {"alembic_version", "alembic_version_pkc"}
    assert state["functions"] == set()
    assert state["triggers"] == set()


def test_postgresql_upgrade_downgrade_round_trip(pg_url: str, pg_engine: sa.Engine) -> None:
    config = alembic_config(pg_url)
    command.downgrade(config, "base")  # empty, whatever ran before
    assert_pg_empty(pg_engine)

    command.upgrade(config, "head")
    assert_pg_at_head(pg_engine)
    command.downgrade(config, "base")
    assert_pg_empty(pg_engine)
    command.upgrade(config, "head")
    assert_pg_at_head(pg_engine)


def test_postgresql_schema_matches_models(pg_url: str, pg_conn: sa.Connection) -> None:
    context = MigrationContext.configure(
        pg_conn, opts={"compare_type": True, "compare_server_default": True}
    )
    diff = compare_metadata(context, Base.metadata)
    assert diff == [], "migrations and models disagree:\n" + pprint.pformat(diff)
    # `alembic check` goes through env.py's own comparison settings; it must agree too.
    command.check(alembic_config(pg_url))


def test_postgresql_schema_matches_models_create_all(pg_head: sa.Engine) -> None:
    with pg_head.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {MIRROR}")
        Base.metadata.create_all(conn.execution_options(schema_translate_map={None: MIRROR}))
        migrated, mirrored = schema_snapshot(conn), schema_snapshot(conn, MIRROR)
        conn.rollback()  # PostgreSQL DDL is transactional: the mirror is gone again
    assert_same_schema(migrated, mirrored)
    # The PostgreSQL forms the models ask for, spelled out so a silent fallback shows.
    users, sessions = migrated["users"]["columns"], migrated["user_sessions"]["columns"]
    assert users["id"] == ("UUID()", False, "gen_random_uuid()")
    assert sessions["ip_address"][0] == "INET()"
    assert migrated["campaigns"]["columns"]["config"][0].startswith("JSONB(")
    assert migrated["deliveries"]["columns"]["id"] == (
        "BIGINT()",
        False,
        "nextval('deliveries_id_seq'::regclass)",
    )


def insert_user(conn: sa.Connection, email: str, **values: object) -> Any:
    columns = ", ".join(["email", "password_hash", *values])
    params = ", ".join([":email", "'x'", *(f":{k}" for k in values)])
    return conn.scalar(
        sa.text(f"INSERT INTO users ({columns}) VALUES ({params}) RETURNING id"),
        {"email": email, **values},
    )


def test_postgresql_updated_at_trigger_stamps_set_based_updates(pg_conn: sa.Connection) -> None:
    # Far from UTC, so a trigger stamping local time would be 14 hours off.
    pg_conn.exec_driver_sql("SET LOCAL TIME ZONE 'Pacific/Kiritimati'")
    past = datetime(2000, 1, 1)
    insert_user(pg_conn, "a@example.com", updated_at=past)
    insert_user(pg_conn, "b@example.com", updated_at=past)

    before = utcnow()
    updated = pg_conn.execute(sa.text("UPDATE users SET first_name = 'x'")).rowcount
    after = utcnow()

    assert updated == 2
    stamps = pg_conn.scalars(sa.text("SELECT updated_at FROM users")).all()
    assert len(stamps) == 2
    for stamp in stamps:
        assert before - CLOCK_SLACK <= stamp <= after + CLOCK_SLACK

    explicit = datetime(2010, 5, 5, 12, 0, 0)
    pg_conn.execute(
        sa.text(
            "UPDATE users SET first_name = 'y', updated_at = :at WHERE email = 'a@example.com'"
        ),
        {"at": explicit},
    )
    kept = pg_conn.scalar(sa.text("SELECT updated_at FROM users WHERE email = 'a@example.com'"))
    assert kept == explicit


def test_postgresql_check_constraints_reject_unknown_values(pg_conn: sa.Connection) -> None:
    user_id = insert_user(pg_conn, "checks@example.com")
    insert_campaign = sa.text(
        "INSERT INTO campaigns (user_id, name, status) VALUES (:user_id, 'c', :status) RETURNING id"
    )

    with pytest.raises(IntegrityError) as refused, pg_conn.begin_nested():
        pg_conn.execute(insert_campaign, {"user_id": user_id, "status": "bogus"})
    assert refused.value.orig.diag.constraint_name == "ck_campaigns_status"

    # The same row with a known status goes in: it was the value that was refused.
    campaign_id = pg_conn.scalar(insert_campaign, {"user_id": user_id, "status": "scheduled"})
    with pytest.raises(IntegrityError) as refused, pg_conn.begin_nested():
        pg_conn.execute(
            sa.text("INSERT INTO campaign_channels (campaign_id, channel_type) VALUES (:c, 'fax')"),
            {"c": campaign_id},
        )
    assert refused.value.orig.diag.constraint_name == "ck_campaign_channels_channel_type"


def test_postgresql_on_delete_rules(pg_conn: sa.Connection) -> None:
    def one(sql: str, **params: object) -> Any:
        return pg_conn.scalar(sa.text(sql), params)

    user_id = insert_user(pg_conn, "cascade@example.com")
    conversation_id = one("INSERT INTO conversations (user_id) VALUES (:u) RETURNING id", u=user_id)
    for role in ("user", "assistant"):
        one(
            "INSERT INTO messages (conversation_id, role, content)"
            " VALUES (:c, :role, 'hi') RETURNING id",
            c=conversation_id,
            role=role,
        )
    campaign_id = one(
        "INSERT INTO campaigns (user_id, conversation_id, name) VALUES (:u, :c, 'c') RETURNING id",
        u=user_id,
        c=conversation_id,
    )
    channel_id = one(
        "INSERT INTO campaign_channels (campaign_id, channel_type) VALUES (:c, 'email')"
        " RETURNING id",
        c=campaign_id,
    )
    one("INSERT INTO audiences (campaign_id, name) VALUES (:c, 'all') RETURNING id", c=campaign_id)
    contact_id = one(
        "INSERT INTO contacts (user_id, email) VALUES (:u, 'c@example.com') RETURNING id",
        u=user_id,
    )
    delivery_id = one(
        "INSERT INTO deliveries (campaign_channel_id, contact_id) VALUES (:ch, :co) RETURNING id",
        ch=channel_id,
        co=contact_id,
    )
    assert isinstance(delivery_id, int)  # the BIGSERIAL filled it

    # Deleting a contact keeps its delivery rows (the counters depend on them). There is
    # no foreign key to clear contact_id (migration 0008): erasure, in
    # engine.services.contacts.delete_contact, redacts the rows itself.
    one("DELETE FROM contacts WHERE id = :id RETURNING id", id=contact_id)
    assert one("SELECT contact_id FROM deliveries WHERE id = :id", id=delivery_id) == contact_id

    one("DELETE FROM conversations WHERE id = :id RETURNING id", id=conversation_id)
    assert one("SELECT count(*) FROM messages WHERE conversation_id = :c", c=conversation_id) == 0
    assert one("SELECT count(*) FROM campaigns WHERE id = :c", c=campaign_id) == 1
    assert one("SELECT conversation_id FROM campaigns WHERE id = :c", c=campaign_id) is None

    one("DELETE FROM campaigns WHERE id = :id RETURNING id", id=campaign_id)
    assert one("SELECT count(*) FROM campaign_channels WHERE campaign_id = :c", c=campaign_id) == 0
    assert one("SELECT count(*) FROM audiences WHERE campaign_id = :c", c=campaign_id) == 0
    assert one("SELECT count(*) FROM deliveries WHERE id = :id", id=delivery_id) == 0


def _channel_with_delivery(conn: sa.Connection, user_id: Any, name: str) -> tuple[Any, Any]:
    """A campaign with one email channel and one delivery on it: (campaign, delivery)."""
    campaign_id = conn.scalar(
        sa.text("INSERT INTO campaigns (id, user_id, name) VALUES (:id, :u, :n) RETURNING id"),
        {"id": str(uuid.uuid4()), "u": str(user_id), "n": name},
    )
    channel_id = conn.scalar(
        sa.text(
            "INSERT INTO campaign_channels (id, campaign_id, channel_type)"
            " VALUES (:id, :c, 'email') RETURNING id"
        ),
        {"id": str(uuid.uuid4()), "c": str(campaign_id)},
    )
    delivery_id = conn.scalar(
        sa.text("INSERT INTO deliveries (campaign_channel_id) VALUES (:ch) RETURNING id"),
        {"ch": str(channel_id)},
    )
    return campaign_id, delivery_id


def _deliveries_left(conn: sa.Connection, *ids: Any) -> int:
    return conn.scalar(
        sa.text("SELECT count(*) FROM deliveries WHERE id IN ({})".format(",".join(map(str, ids))))
    )


def test_postgresql_deleting_a_user_deletes_every_channels_deliveries(
    pg_conn: sa.Connection,
) -> None:
    # Deliveries have no foreign key to their channel (migration 0009): a statement
    # trigger on campaign_channels deletes them, also when the channels go by the
    # cascade from users through campaigns, several at once.
    user_id = insert_user(pg_conn, "erased@example.com")
    other_user = insert_user(pg_conn, "kept@example.com")
    first = _channel_with_delivery(pg_conn, user_id, "one")
    second = _channel_with_delivery(pg_conn, user_id, "two")
    kept = _channel_with_delivery(pg_conn, other_user, "kept")
    assert _deliveries_left(pg_conn, first[1], second[1], kept[1]) == 3

    pg_conn.execute(sa.text("DELETE FROM users WHERE id = :id"), {"id": user_id})

    assert _deliveries_left(pg_conn, first[1], second[1]) == 0
    assert _deliveries_left(pg_conn, kept[1]) == 1


def test_offline_mode_renders_postgresql_ddl() -> None:
    # `alembic upgrade head --sql` has no connection at all: an unreachable host proves it.
    buffer = StringIO()
    config = alembic_config(
        "postgresql+psycopg://nobody@unreachable.invalid/x", output_buffer=buffer
    )
    command.upgrade(config, "head", sql=True)
    sql = buffer.getvalue()
    assert "CREATE FUNCTION herald_set_updated_at()" in sql
    assert sql.count("EXECUTE FUNCTION herald_set_updated_at()") == len(UPDATED_AT_TABLES)
    assert "id UUID DEFAULT gen_random_uuid() NOT NULL" in sql
    assert "id BIGSERIAL NOT NULL" in sql


# -- SQLite --------------------------------------------------------------------------


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def sqlite_objects(conn: sa.Connection) -> set[tuple[str, str, str]]:
    rows = conn.execute(
        sa.text(
            "SELECT type, name, tbl_name FROM sqlite_master"
            " WHERE type IN ('table', 'trigger') AND name NOT LIKE 'sqlite_%'"
        )
    )
    return {tuple(row) for row in rows}


def assert_sqlite_at_head(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        objects = sqlite_objects(conn)
        version = conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
    assert {name for kind, name, _ in objects if kind == "table"} == MODEL_TABLES | {
        "alembic_version"
    }
    assert {(name, table) for kind, name, table in objects if kind == "trigger"} == {
        (f"trg_{table}_set_updated_at", table) for table in UPDATED_AT_TABLES
    } | {(CHANNEL_DELETE_TRIGGER, "campaign_channels")}
    assert version == head_revision()


def test_sqlite_upgrade_downgrade_round_trip(tmp_path: Path) -> None:
    # First the command line with alembic.ini and no URL anywhere: the embedded default an
    # operator gets on a fresh machine. The var dir does not exist yet; env.py creates it.
    var_dir = tmp_path / "var"
    env = {**os.environ, "HERALD_ENV": "test", "HERALD_VAR_DIR": str(var_dir)}
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    url = sqlite_url(var_dir / "herald.sqlite3")
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    assert_sqlite_at_head(engine)

    config = alembic_config(url)
    command.downgrade(config, "base")
    with engine.connect() as conn:
        assert sqlite_objects(conn) == {("table", "alembic_version", "alembic_version")}
    command.upgrade(config, "head")
    assert_sqlite_at_head(engine)


def test_sqlite_deleting_a_campaign_or_user_deletes_its_deliveries(tmp_path: Path) -> None:
    # SQLite's form of migration 0009's trigger, fired by its foreign keys' cascades.
    url = sqlite_url(tmp_path / "herald.sqlite3")
    command.upgrade(alembic_config(url), "head")
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")  # as engine.db does for the app
        user_id = uuid.uuid4().hex
        conn.execute(
            sa.text("INSERT INTO users (id, email, password_hash) VALUES (:id, 'a@x.com', 'x')"),
            {"id": user_id},
        )
        first = _channel_with_delivery(conn, user_id, "one")
        second = _channel_with_delivery(conn, user_id, "two")
        assert _deliveries_left(conn, first[1], second[1]) == 2

        conn.execute(sa.text("DELETE FROM campaigns WHERE id = :id"), {"id": first[0]})
        assert _deliveries_left(conn, first[1]) == 0
        assert _deliveries_left(conn, second[1]) == 1

        conn.execute(sa.text("DELETE FROM users WHERE id = :id"), {"id": user_id})
        assert _deliveries_left(conn, second[1]) == 0
        conn.commit()


def test_sqlite_schema_matches_models_create_all(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "herald.sqlite3")
    config = alembic_config(url)
    command.upgrade(config, "head")
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        conn.exec_driver_sql(f"ATTACH DATABASE ':memory:' AS {MIRROR}")
        Base.metadata.create_all(conn.execution_options(schema_translate_map={None: MIRROR}))
        migrated, mirrored = schema_snapshot(conn), schema_snapshot(conn, MIRROR)

    # The one intended difference: SQLite has no gen_random_uuid(), ids come from Python.
    for table in mirrored.values():
        kind, nullable, default = table["columns"].get("id", (None, None, None))
        if default == "gen_random_uuid()":
            table["columns"]["id"] = (kind, nullable, None)
    assert_same_schema(migrated, mirrored)
    # Only an INTEGER primary key is a rowid alias, i.e. autoincrements on SQLite.
    assert migrated["deliveries"]["columns"]["id"][0] == "INTEGER()"
    # env.py tells autogenerate about that difference, so `alembic check` stays usable.
    command.check(config)


def test_sqlite_updated_at_trigger_stamps_set_based_updates(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "herald.sqlite3")
    command.upgrade(alembic_config(url), "head")
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    users = Base.metadata.tables["users"]  # read back through UTCDateTime, as the app does
    past = datetime(2000, 1, 1, tzinfo=UTC)

    with engine.begin() as conn:
        conn.execute(
            users.insert(),
            [
                {"email": email, "password_hash": "x", "updated_at": past}
                for email in ("a@example.com", "b@example.com")
            ],
        )
        before = datetime.now(UTC)
        updated = conn.execute(sa.text("UPDATE users SET first_name = 'x'")).rowcount
        after = datetime.now(UTC)
        stamps = conn.scalars(sa.select(users.c.updated_at)).all()

        assert updated == 2
        assert len(stamps) == 2
        for stamp in stamps:
            assert before - CLOCK_SLACK <= stamp <= after + CLOCK_SLACK

        explicit = datetime(2010, 5, 5, 12, 0, 0, tzinfo=UTC)
        conn.execute(
            users.update()
            .where(users.c.email == "a@example.com")
            .values(first_name="y", updated_at=explicit)
        )
        kept = conn.scalar(sa.select(users.c.updated_at).where(users.c.email == "a@example.com"))
        assert kept == explicit

"""Initial schema: users, sources, conversations, campaigns, contacts, deliveries.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Written by hand and frozen: it names its own types and constraint names instead of
importing engine.models, so later model edits cannot rewrite history. tests/
test_migrations.py proves it still matches the models (autogenerate finds no diff).

One script serves PostgreSQL and SQLite. The portable types carry their PostgreSQL form
as a variant (JSONB, INET, native UUID, BIGSERIAL); the dialect is consulted only where
SQL differs: gen_random_uuid() exists only on PostgreSQL, and the updated_at triggers are
written once per dialect.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The tables whose updated_at the triggers maintain. Spelled out, not derived from the
# models: this revision must create the same triggers whatever the models say later.
UPDATED_AT_TABLES = (
    "users",
    "data_sources",
    "conversations",
    "campaigns",
    "campaign_channels",
    "audiences",
    "contacts",
)

JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
INET_ADDRESS = sa.String(45).with_variant(postgresql.INET(), "postgresql")
# BIGSERIAL on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is an autoincrementing rowid.
DELIVERY_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Enumerations as they stand at this revision (engine/models/enums.py may grow later;
# a new value then needs its own migration to widen the CHECK).
CAMPAIGN_STATUSES = ("draft", "scheduled", "running", "paused", "completed", "cancelled")
CHANNEL_TYPES = ("email", "sms", "push", "whatsapp")
CHANNEL_STATUSES = ("pending", "planning", "planned", "done")
CONVERSATION_STATUSES = ("active", "archived")
MESSAGE_ROLES = ("user", "assistant")
SOURCE_TYPES = ("gtm", "facebook_pixel", "shopify")
SOURCE_STATUSES = ("active", "paused", "error")
DELIVERY_STATUSES = ("queued", "sending", "sent", "failed", "cancelled", "suppressed")
SUPPRESSION_REASONS = ("unsubscribe", "bounce", "complaint", "manual")


def _is_postgresql() -> bool:
    # get_context() rather than get_bind(): there is no bind under `alembic upgrade --sql`.
    return op.get_context().dialect.name == "postgresql"


# -- column and constraint helpers ---------------------------------------------------
# Column objects belong to one table, so these are factories. Every name goes through
# op.f(): the names are final as written, and the naming convention Alembic borrows
# from target_metadata must not prefix them a second time.


def _id() -> sa.Column:
    # Python supplies uuid4 everywhere; PostgreSQL also fills ids for rows written by SQL.
    server_default = sa.text("gen_random_uuid()") if _is_postgresql() else None
    return sa.Column("id", sa.Uuid(), server_default=server_default, nullable=False)


def _user_id(*, nullable: bool = False) -> sa.Column:
    return sa.Column("user_id", sa.Uuid(), nullable=nullable)


def _timestamp(name: str, *, nullable: bool = True) -> sa.Column:
    # TIMESTAMP WITHOUT TIME ZONE holding UTC (engine.models.base.UTCDateTime).
    return sa.Column(name, sa.DateTime(), nullable=nullable)


def _created_at() -> sa.Column:
    return sa.Column(
        "created_at", sa.DateTime(), server_default=sa.func.current_timestamp(), nullable=False
    )


def _updated_at() -> sa.Column:
    return sa.Column(
        "updated_at", sa.DateTime(), server_default=sa.func.current_timestamp(), nullable=False
    )


def _json(name: str, empty: str) -> sa.Column:
    return sa.Column(name, JSON_DOCUMENT, server_default=sa.text(empty), nullable=False)


def _status(length: int, default: str) -> sa.Column:
    return sa.Column("status", sa.String(length), server_default=default, nullable=False)


def _flag(name: str, *, default: bool) -> sa.Column:
    return sa.Column(
        name, sa.Boolean(), server_default=sa.true() if default else sa.false(), nullable=False
    )


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), server_default="0", nullable=False)


def _pk(table: str, *columns: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint(*(columns or ("id",)), name=op.f(f"pk_{table}"))


def _fk(table: str, column: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"), ondelete=ondelete
    )


def _unique(table: str, *columns: str) -> sa.UniqueConstraint:
    return sa.UniqueConstraint(*columns, name=op.f(f"uq_{table}_{'_'.join(columns)}"))


def _check_in(table: str, column: str, values: tuple[str, ...]) -> sa.CheckConstraint:
    quoted = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({quoted})", name=op.f(f"ck_{table}_{column}"))


def _index(table: str, *columns: str, **kw: object) -> None:
    op.create_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns), **kw)


# -- upgrade -------------------------------------------------------------------------


def upgrade() -> None:
    _create_users()
    _create_sources_and_contacts()
    _create_conversations()
    _create_campaigns()
    _create_deliveries()
    if _is_postgresql():
        _create_postgresql_updated_at_triggers()
    else:
        _create_sqlite_updated_at_triggers()


def _create_users() -> None:
    op.create_table(
        "users",
        _id(),
        sa.Column("email", sa.String(255), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("first_name", sa.String(100)),
        sa.Column("last_name", sa.String(100)),
        sa.Column("company_name", sa.String(255)),
        _flag("is_active", default=True),
        _flag("is_verified", default=False),
        _created_at(),
        _updated_at(),
        _timestamp("last_login_at"),
        _pk("users"),
        _unique("users", "email"),
    )

    op.create_table(
        "user_sessions",
        _id(),
        _user_id(),
        sa.Column("refresh_token_hash", sa.String(255), nullable=False),
        sa.Column("access_token_jti", sa.String(255)),
        sa.Column("ip_address", INET_ADDRESS),
        sa.Column("user_agent", sa.Text()),
        _timestamp("expires_at", nullable=False),
        _created_at(),
        _timestamp("last_used_at"),
        _timestamp("revoked_at"),
        _pk("user_sessions"),
        _fk("user_sessions", "user_id", "users", "CASCADE"),
        _unique("user_sessions", "refresh_token_hash"),
    )
    _index("user_sessions", "user_id")

    op.create_table(
        "token_blacklist",
        _id(),
        sa.Column("jti", sa.String(255), nullable=False),
        sa.Column("token_type", sa.String(20), server_default="access", nullable=False),
        _user_id(nullable=True),
        _timestamp("expires_at", nullable=False),
        _created_at(),
        _pk("token_blacklist"),
        _fk("token_blacklist", "user_id", "users", "CASCADE"),
        _unique("token_blacklist", "jti"),
    )
    _index("token_blacklist", "expires_at")


def _create_sources_and_contacts() -> None:
    op.create_table(
        "data_sources",
        _id(),
        _user_id(),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("source_type", sa.String(50), nullable=False),
        _json("config", "'{}'"),
        _status(50, "active"),
        _timestamp("last_sync_at"),
        _created_at(),
        _updated_at(),
        _pk("data_sources"),
        _fk("data_sources", "user_id", "users", "CASCADE"),
        _check_in("data_sources", "source_type", SOURCE_TYPES),
        _check_in("data_sources", "status", SOURCE_STATUSES),
    )
    _index("data_sources", "user_id")

    op.create_table(
        "contacts",
        _id(),
        _user_id(),
        sa.Column("external_id", sa.String(255)),
        sa.Column("email", sa.String(320)),
        sa.Column("phone", sa.String(32)),
        sa.Column("whatsapp", sa.String(32)),
        _json("push_tokens", "'[]'"),
        sa.Column("first_name", sa.String(100)),
        sa.Column("last_name", sa.String(100)),
        sa.Column("timezone", sa.String(64)),
        sa.Column("locale", sa.String(35)),
        _json("attributes", "'{}'"),
        # Consent is opt-in: absent means no.
        _flag("consent_email", default=False),
        _flag("consent_sms", default=False),
        _flag("consent_push", default=False),
        _flag("consent_whatsapp", default=False),
        _created_at(),
        _updated_at(),
        _pk("contacts"),
        _fk("contacts", "user_id", "users", "CASCADE"),
        _unique("contacts", "user_id", "external_id"),
        _unique("contacts", "user_id", "email"),
    )
    # Keyset pagination walks (user_id, id).
    _index("contacts", "user_id", "id")

    op.create_table(
        "data_events",
        _id(),
        sa.Column("data_source_id", sa.Uuid(), nullable=False),
        sa.Column("contact_id", sa.Uuid()),
        sa.Column("event_type", sa.String(100), nullable=False),
        sa.Column("external_id", sa.String(255)),
        _json("payload", "'{}'"),
        _timestamp("occurred_at", nullable=False),
        _created_at(),
        _pk("data_events"),
        _fk("data_events", "data_source_id", "data_sources", "CASCADE"),
        _fk("data_events", "contact_id", "contacts", "SET NULL"),
        # (source, external_id) makes re-imports idempotent.
        _unique("data_events", "data_source_id", "external_id"),
    )
    _index("data_events", "data_source_id", "occurred_at")
    _index("data_events", "contact_id", "event_type", "occurred_at")

    op.create_table(
        "contact_sources",
        sa.Column("data_source_id", sa.Uuid(), nullable=False),
        sa.Column("contact_id", sa.Uuid(), nullable=False),
        sa.Column("external_id", sa.String(255), nullable=False),
        _created_at(),
        _pk("contact_sources", "data_source_id", "contact_id"),
        _fk("contact_sources", "data_source_id", "data_sources", "CASCADE"),
        _fk("contact_sources", "contact_id", "contacts", "CASCADE"),
        _unique("contact_sources", "data_source_id", "external_id"),
    )
    _index("contact_sources", "contact_id")

    op.create_table(
        "suppressions",
        _id(),
        _user_id(),
        sa.Column("channel", sa.String(20), nullable=False),
        sa.Column("address", sa.String(512), nullable=False),
        sa.Column("reason", sa.String(20), nullable=False),
        _created_at(),
        _pk("suppressions"),
        _fk("suppressions", "user_id", "users", "CASCADE"),
        _check_in("suppressions", "channel", CHANNEL_TYPES),
        _check_in("suppressions", "reason", SUPPRESSION_REASONS),
        _unique("suppressions", "user_id", "channel", "address"),
    )


def _create_conversations() -> None:
    op.create_table(
        "conversations",
        _id(),
        _user_id(),
        sa.Column("title", sa.String(255)),
        _status(50, "active"),
        _created_at(),
        _updated_at(),
        _pk("conversations"),
        _fk("conversations", "user_id", "users", "CASCADE"),
        _check_in("conversations", "status", CONVERSATION_STATUSES),
    )
    _index("conversations", "user_id")

    op.create_table(
        "messages",
        _id(),
        sa.Column("conversation_id", sa.Uuid(), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        # Nullable, as in the model; the default only covers rows that omit it.
        sa.Column("metadata", JSON_DOCUMENT, server_default="{}"),
        _created_at(),
        _pk("messages"),
        _fk("messages", "conversation_id", "conversations", "CASCADE"),
        _check_in("messages", "role", MESSAGE_ROLES),
    )
    _index("messages", "conversation_id", "created_at")


def _create_campaigns() -> None:
    op.create_table(
        "campaigns",
        _id(),
        _user_id(),
        sa.Column("conversation_id", sa.Uuid()),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("description", sa.Text()),
        _status(50, "draft"),
        _timestamp("scheduled_at"),
        _timestamp("started_at"),
        _timestamp("ended_at"),
        _json("config", "'{}'"),
        _created_at(),
        _updated_at(),
        _pk("campaigns"),
        _fk("campaigns", "user_id", "users", "CASCADE"),
        _fk("campaigns", "conversation_id", "conversations", "SET NULL"),
        _check_in("campaigns", "status", CAMPAIGN_STATUSES),
    )
    _index("campaigns", "user_id", "status")
    # Beat's promotion scans only due scheduled campaigns; keep that scan tiny.
    scheduled = sa.text("status = 'scheduled'")
    op.create_index(
        op.f("ix_campaigns_due_scheduled"),
        "campaigns",
        ["scheduled_at"],
        postgresql_where=scheduled,
        sqlite_where=scheduled,
    )

    op.create_table(
        "campaign_channels",
        _id(),
        sa.Column("campaign_id", sa.Uuid(), nullable=False),
        sa.Column("channel_type", sa.String(50), nullable=False),
        _json("config", "'{}'"),
        _status(20, "pending"),
        _counter("sent_count"),
        _counter("delivered_count"),
        _counter("opened_count"),
        _counter("clicked_count"),
        _created_at(),
        _updated_at(),
        _pk("campaign_channels"),
        _fk("campaign_channels", "campaign_id", "campaigns", "CASCADE"),
        _check_in("campaign_channels", "channel_type", CHANNEL_TYPES),
        _check_in("campaign_channels", "status", CHANNEL_STATUSES),
        sa.CheckConstraint(
            "sent_count >= 0 AND delivered_count >= 0 AND opened_count >= 0 AND clicked_count >= 0",
            name=op.f("ck_campaign_channels_counters_non_negative"),
        ),
        _unique("campaign_channels", "campaign_id", "channel_type"),
    )

    op.create_table(
        "audiences",
        _id(),
        sa.Column("campaign_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        _json("definition", "'{}'"),
        _created_at(),
        _updated_at(),
        _pk("audiences"),
        _fk("audiences", "campaign_id", "campaigns", "CASCADE"),
    )
    _index("audiences", "campaign_id")


def _create_deliveries() -> None:
    op.create_table(
        "deliveries",
        sa.Column("id", DELIVERY_ID, autoincrement=True, nullable=False),
        sa.Column("campaign_channel_id", sa.Uuid(), nullable=False),
        # Cleared when a contact is erased; the row (and so the counters) stays.
        sa.Column("contact_id", sa.Uuid()),
        sa.Column("address", sa.String(512)),
        _status(20, "queued"),
        sa.Column("provider_message_id", sa.String(255)),
        _counter("attempts"),
        _timestamp("next_attempt_at"),
        sa.Column("last_error", sa.Text()),
        _timestamp("sent_at"),
        _timestamp("delivered_at"),
        _timestamp("opened_at"),
        _timestamp("clicked_at"),
        _timestamp("failed_at"),
        _created_at(),
        _pk("deliveries"),
        _fk("deliveries", "campaign_channel_id", "campaign_channels", "CASCADE"),
        _fk("deliveries", "contact_id", "contacts", "SET NULL"),
        _check_in("deliveries", "status", DELIVERY_STATUSES),
        _unique("deliveries", "campaign_channel_id", "contact_id"),
    )
    _index("deliveries", "campaign_channel_id", "status")
    _index("deliveries", "contact_id")


# -- updated_at triggers -------------------------------------------------------------
# The ORM cannot stamp updated_at for set-based UPDATEs (bulk status changes, counter
# bumps), so the database does it for every row changed by any statement.


def _create_postgresql_updated_at_triggers() -> None:
    # A statement that sets updated_at itself keeps its value (backfills, tests);
    # otherwise stamp the wall clock in UTC. clock_timestamp(), not now(): now() is the
    # transaction start, which would let a long transaction write stale times.
    op.execute(
        """
        CREATE FUNCTION herald_set_updated_at() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
                NEW.updated_at := timezone('UTC', clock_timestamp());
            END IF;
            RETURN NEW;
        END;
        $$
        """
    )
    for table in UPDATED_AT_TABLES:
        op.execute(
            f"CREATE TRIGGER trg_{table}_set_updated_at BEFORE UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION herald_set_updated_at()"
        )


def _create_sqlite_updated_at_triggers() -> None:
    # SQLite cannot assign NEW in a BEFORE trigger, so an AFTER trigger writes the row
    # again; that inner UPDATE does not re-fire it (recursive_triggers is off, and its
    # WHEN is false anyway). strftime's "YYYY-MM-DD HH:MM:SS.SSS" is UTC and parses as
    # SQLAlchemy's SQLite DateTime.
    for table in UPDATED_AT_TABLES:
        op.execute(
            f"CREATE TRIGGER trg_{table}_set_updated_at AFTER UPDATE ON {table} "
            "FOR EACH ROW WHEN NEW.updated_at IS OLD.updated_at "
            f"BEGIN UPDATE {table} SET updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') "
            "WHERE id = NEW.id; END"
        )


# -- downgrade -----------------------------------------------------------------------


def downgrade() -> None:
    for table in UPDATED_AT_TABLES:
        op.execute(f"DROP TRIGGER trg_{table}_set_updated_at" + _on_table(table))
    if _is_postgresql():
        op.execute("DROP FUNCTION herald_set_updated_at()")

    # Children before parents, so no foreign key is left pointing at a dropped table.
    for table in (
        "deliveries",
        "audiences",
        "campaign_channels",
        "campaigns",
        "messages",
        "conversations",
        "suppressions",
        "contact_sources",
        "data_events",
        "contacts",
        "data_sources",
        "token_blacklist",
        "user_sessions",
        "users",
    ):
        op.drop_table(table)


def _on_table(table: str) -> str:
    # PostgreSQL scopes trigger names to their table; SQLite's are schema-wide.
    return f" ON {table}" if _is_postgresql() else ""

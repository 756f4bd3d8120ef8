"""Provider events: the delivery event log, soft-bounce tallies, the lookup of deliveries
by provider message id, the soft_bounce suppression reason and the suppressions list
index.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# BIGSERIAL on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is an autoincrementing rowid.
EVENT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
CHANNEL_TYPES = ("email", "sms", "push", "whatsapp")
DELIVERY_EVENT_KINDS = ("sent", "delivered", "opened", "clicked", "failed", "complained")
REASONS_BEFORE = ("unsubscribe", "bounce", "complaint", "manual")
REASONS_AFTER = (*REASONS_BEFORE, "soft_bounce")
ORPHANS = "delivery_id IS NULL"
HAS_PROVIDER_ID = "provider_message_id IS NOT NULL"


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "delivery_events",
        sa.Column("id", EVENT_ID, autoincrement=True, nullable=False),
        sa.Column("delivery_id", EVENT_ID, nullable=True),
        sa.Column("campaign_channel_id", sa.Uuid(), nullable=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("occurred_at", sa.DateTime(), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(),
            server_default=sa.func.current_timestamp(),
            nullable=False,
        ),
        sa.Column("provider_message_id", sa.String(255), nullable=True),
        sa.Column("provider_event_id", sa.String(255), nullable=True),
        sa.Column("machine", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("detail", JSON_DOCUMENT, server_default=sa.text("'{}'"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_events")),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["deliveries.id"],
            name=op.f("fk_delivery_events_delivery_id_deliveries"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["campaign_channel_id"],
            ["campaign_channels.id"],
            name=op.f("fk_delivery_events_campaign_channel_id_campaign_channels"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(_in("kind", DELIVERY_EVENT_KINDS), name=op.f("ck_delivery_events_kind")),
        sa.UniqueConstraint(
            "source",
            "provider_event_id",
            name=op.f("uq_delivery_events_source_provider_event_id"),
        ),
    )
    op.create_index(op.f("ix_delivery_events_delivery_id"), "delivery_events", ["delivery_id"])
    op.create_index(
        op.f("ix_delivery_events_campaign_channel_id_occurred_at"),
        "delivery_events",
        ["campaign_channel_id", "occurred_at"],
    )
    op.create_index(
        "ix_delivery_events_orphans",
        "delivery_events",
        ["source", "provider_message_id"],
        postgresql_where=sa.text(ORPHANS),
        sqlite_where=sa.text(ORPHANS),
    )

    op.create_table(
        "soft_bounces",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("channel", sa.String(20), nullable=False),
        sa.Column("address", sa.String(512), nullable=False),
        sa.Column("bounces", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_bounced_at", sa.DateTime(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(), server_default=sa.func.current_timestamp(), nullable=False
        ),
        sa.PrimaryKeyConstraint("user_id", "channel", "address", name=op.f("pk_soft_bounces")),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_soft_bounces_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(_in("channel", CHANNEL_TYPES), name=op.f("ck_soft_bounces_channel")),
    )

    # A plain CREATE INDEX blocks writes to deliveries while it builds; on a large live
    # log, build it beforehand with CREATE INDEX CONCURRENTLY under this name, and this
    # step is skipped.
    op.create_index(
        "ix_deliveries_provider_message_id",
        "deliveries",
        ["provider_message_id"],
        postgresql_where=sa.text(HAS_PROVIDER_ID),
        sqlite_where=sa.text(HAS_PROVIDER_ID),
        if_not_exists=True,
    )
    op.create_index(
        op.f("ix_suppressions_user_id_created_at_id"),
        "suppressions",
        ["user_id", "created_at", "id"],
    )
    _replace_reason_check(REASONS_AFTER)


def downgrade() -> None:
    # Rows with the new reason would violate the narrower CHECK: they become manual ones,
    # still suppressed, rather than lost.
    op.execute("UPDATE suppressions SET reason = 'manual' WHERE reason = 'soft_bounce'")
    _replace_reason_check(REASONS_BEFORE)
    op.drop_index(op.f("ix_suppressions_user_id_created_at_id"), table_name="suppressions")
    op.drop_index("ix_deliveries_provider_message_id", table_name="deliveries")
    op.drop_table("soft_bounces")
    op.drop_index("ix_delivery_events_orphans", table_name="delivery_events")
    op.drop_index(
        op.f("ix_delivery_events_campaign_channel_id_occurred_at"), table_name="delivery_events"
    )
    op.drop_index(op.f("ix_delivery_events_delivery_id"), table_name="delivery_events")
    op.drop_table("delivery_events")


def _replace_reason_check(reasons: tuple[str, ...]) -> None:
    # SQLite cannot alter a CHECK: batch mode rebuilds the table (suppressions has no
    # updated_at trigger to lose). PostgreSQL drops and re-adds it in place.
    with op.batch_alter_table("suppressions") as batch:
        batch.drop_constraint(op.f("ck_suppressions_reason"), type_="check")
        batch.create_check_constraint(op.f("ck_suppressions_reason"), _in("reason", reasons))

"""Click tracking: campaign_links, the links each campaign channel's messages carry.

A click token names a delivery and one of these rows; the redirect goes to the row's
destination, never to anything taken from the request (engine/tracking/links.py).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGSERIAL on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is an autoincrementing rowid.
LINK_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "campaign_links",
        sa.Column("id", LINK_ID, autoincrement=True, nullable=False),
        sa.Column("campaign_channel_id", sa.Uuid(), nullable=False),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("destination", sa.Text(), nullable=True),
        sa.Column("dynamic", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(), server_default=sa.func.current_timestamp(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaign_links")),
        sa.ForeignKeyConstraint(
            ["campaign_channel_id"],
            ["campaign_channels.id"],
            name=op.f("fk_campaign_links_campaign_channel_id_campaign_channels"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "campaign_channel_id", "url", name=op.f("uq_campaign_links_campaign_channel_id_url")
        ),
    )


def downgrade() -> None:
    op.drop_table("campaign_links")

"""Dispatch bookkeeping: delivery leases and dispatch times, campaign status reasons.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DUE_RETRIES = "status = 'queued' AND next_attempt_at IS NOT NULL"
EXPIRED_LEASES = "status = 'sending'"


def upgrade() -> None:
    # ADD COLUMN of a nullable column is a catalogue change on both dialects: no table
    # rewrite, no batch mode (which would drop SQLite's triggers).
    op.add_column("deliveries", sa.Column("dispatched_at", sa.DateTime(), nullable=True))
    op.add_column("deliveries", sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
    op.add_column("campaigns", sa.Column("status_reason", sa.Text(), nullable=True))
    op.create_index(
        "ix_deliveries_due_retries",
        "deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text(DUE_RETRIES),
        sqlite_where=sa.text(DUE_RETRIES),
    )
    op.create_index(
        "ix_deliveries_expired_leases",
        "deliveries",
        ["lease_expires_at"],
        postgresql_where=sa.text(EXPIRED_LEASES),
        sqlite_where=sa.text(EXPIRED_LEASES),
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_expired_leases", table_name="deliveries")
    op.drop_index("ix_deliveries_due_retries", table_name="deliveries")
    # Plain DROP COLUMN (SQLite 3.35+), not batch mode: a batch rebuild would drop the
    # updated_at trigger on campaigns.
    for table, column in (
        ("campaigns", "status_reason"),
        ("deliveries", "lease_expires_at"),
        ("deliveries", "dispatched_at"),
    ):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")

"""Deliveries: index (campaign_channel_id, status, id) instead of (campaign_channel_id,
status), so a batch's rows are one index range.

Every batch statement (the claim, the record, the ranges planning cuts) asks for
"this channel's queued rows with id between a and b". With only (channel, status)
indexed, that is every queued row of the channel, filtered by id: for a channel of a
million rows, each of its 2,000 batches walked up to a million index entries, and
PostgreSQL picks that index whenever its statistics are stale, which is exactly right
after planning inserted the rows (measured: 15 ms instead of 2 ms per 500-row claim at
20,000 rows, growing with the channel). With id as the third column the same index
gives the range itself, and still serves everything the old one did (a prefix).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain CREATE INDEX blocks writes to deliveries while it builds; on a large live
    # log, build it beforehand with CREATE INDEX CONCURRENTLY under this name, and this
    # step is skipped.
    op.create_index(
        op.f("ix_deliveries_campaign_channel_id_status_id"),
        "deliveries",
        ["campaign_channel_id", "status", "id"],
        if_not_exists=True,
    )
    op.drop_index(op.f("ix_deliveries_campaign_channel_id_status"), table_name="deliveries")


def downgrade() -> None:
    op.create_index(
        op.f("ix_deliveries_campaign_channel_id_status"),
        "deliveries",
        ["campaign_channel_id", "status"],
    )
    op.drop_index(op.f("ix_deliveries_campaign_channel_id_status_id"), table_name="deliveries")

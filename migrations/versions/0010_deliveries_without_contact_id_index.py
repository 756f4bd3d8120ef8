"""Deliveries: no index on contact_id alone.

Only erasure looks deliveries up by contact, and it can reach them through the unique
(campaign_channel_id, contact_id) index, one probe per channel of the contact's owner
(engine.services.contacts.delete_contact). Every other write paid for the index:
planning adds an entry per recipient, and since a status change is never a HOT update
here, so do the sender's two status changes. EXPLAIN ANALYZE of planning's insert of
1,000,000 recipients (7 Dec 2026): 12.7 s with the index, 9.7-10.8 s without.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_deliveries_contact_id"


def upgrade() -> None:
    op.drop_index(_INDEX, table_name="deliveries")


def downgrade() -> None:
    op.create_index(_INDEX, "deliveries", ["contact_id"])

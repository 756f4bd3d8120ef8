"""Deliveries: no foreign key from contact_id to contacts.

Planning inserts a channel's deliveries in one INSERT … SELECT from contacts. The
foreign key made PostgreSQL check every new row on its own: a lookup in contacts'
primary key that also takes a KEY SHARE lock on the contact, i.e. writes the contact's
tuple header, a WAL record and a dirtied page per recipient (two channels planned at
once even create MultiXacts). Measured on one 1,000,000-recipient insert: about half of
its PostgreSQL CPU.

What the key guaranteed is kept otherwise:
- a delivery is only ever inserted by planning, from contacts that exist in the same
  statement's snapshot;
- erasure (engine.services.contacts.delete_contact) clears contact_id and the address
  of the contact's deliveries explicitly, and first waits for any planner of that
  user's channels (SELECT … FOR SHARE on the channels being planned), so no planner can
  commit a delivery for a contact erased under it;
- the sender joins contacts and fails a row whose contact is gone.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = "fk_deliveries_contact_id_contacts"


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint(_NAME, type_="foreignkey")


def downgrade() -> None:
    # Rows of contacts erased meanwhile already have contact_id NULL; a row pointing at
    # a contact that no longer exists would make this fail, so clear those first.
    op.execute(
        "UPDATE deliveries SET contact_id = NULL WHERE contact_id IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM contacts WHERE contacts.id = deliveries.contact_id)"
    )
    with op.batch_alter_table("deliveries") as batch:
        batch.create_foreign_key(_NAME, "contacts", ["contact_id"], ["id"], ondelete="SET NULL")

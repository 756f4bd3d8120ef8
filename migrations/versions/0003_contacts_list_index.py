"""Index for listing contacts newest first within a user.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_contacts_user_id_created_at_id"), "contacts", ["user_id", "created_at", "id"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_contacts_user_id_created_at_id"), table_name="contacts")

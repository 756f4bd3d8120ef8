"""Contact imports (job and staging rows) and data source ingest keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
IMPORT_STATUSES = ("receiving", "queued", "running", "completed", "failed")


def _is_postgresql() -> bool:
    return op.get_context().dialect.name == "postgresql"


def _count(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), server_default="0", nullable=False)


def _sqlite_updated_at_trigger(table: str) -> None:
    op.execute(
        f"CREATE TRIGGER trg_{table}_set_updated_at AFTER UPDATE ON {table} "
        "FOR EACH ROW WHEN NEW.updated_at IS OLD.updated_at "
        f"BEGIN UPDATE {table} SET updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "WHERE id = NEW.id; END"
    )


def _alter_data_sources(change) -> None:
    """Run a batch change on data_sources. On SQLite, batch mode rebuilds the table,
    which drops its updated_at trigger; put it back."""
    with op.batch_alter_table("data_sources") as batch:
        change(batch)
    if not _is_postgresql():
        _sqlite_updated_at_trigger("data_sources")


def upgrade() -> None:
    id_default = sa.text("gen_random_uuid()") if _is_postgresql() else None
    quoted = ", ".join(f"'{s}'" for s in IMPORT_STATUSES)
    op.create_table(
        "contact_imports",
        sa.Column("id", sa.Uuid(), server_default=id_default, nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("filename", sa.String(255), nullable=True),
        sa.Column("status", sa.String(20), server_default="receiving", nullable=False),
        _count("total_rows"),
        _count("rows_done"),
        _count("created_count"),
        _count("updated_count"),
        _count("rejected_count"),
        sa.Column("errors", JSON_DOCUMENT, server_default=sa.text("'[]'"), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(), server_default=sa.func.current_timestamp(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(), server_default=sa.func.current_timestamp(), nullable=False
        ),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint(f"status IN ({quoted})", name=op.f("ck_contact_imports_status")),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_contact_imports_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contact_imports")),
    )
    op.create_index(
        op.f("ix_contact_imports_user_id_created_at"), "contact_imports", ["user_id", "created_at"]
    )
    op.create_table(
        "contact_import_rows",
        sa.Column("import_id", sa.Uuid(), nullable=False),
        sa.Column("row_number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("data", JSON_DOCUMENT, nullable=False),
        sa.ForeignKeyConstraint(
            ["import_id"],
            ["contact_imports.id"],
            name=op.f("fk_contact_import_rows_import_id_contact_imports"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("import_id", "row_number", name=op.f("pk_contact_import_rows")),
    )

    def add_ingest_key(batch) -> None:
        batch.add_column(sa.Column("ingest_key", sa.String(64), nullable=True))
        batch.create_unique_constraint(op.f("uq_data_sources_ingest_key"), ["ingest_key"])

    _alter_data_sources(add_ingest_key)

    # updated_at stays true on every UPDATE, as for the tables of 0001.
    if _is_postgresql():
        op.execute(
            "CREATE TRIGGER trg_contact_imports_set_updated_at BEFORE UPDATE ON contact_imports "
            "FOR EACH ROW EXECUTE FUNCTION herald_set_updated_at()"
        )
    else:
        _sqlite_updated_at_trigger("contact_imports")


def downgrade() -> None:
    on_table = " ON contact_imports" if _is_postgresql() else ""
    op.execute(f"DROP TRIGGER trg_contact_imports_set_updated_at{on_table}")

    def drop_ingest_key(batch) -> None:
        batch.drop_constraint(op.f("uq_data_sources_ingest_key"), type_="unique")
        batch.drop_column("ingest_key")

    if not _is_postgresql():
        op.execute("DROP TRIGGER trg_data_sources_set_updated_at")
    _alter_data_sources(drop_ingest_key)
    op.drop_table("contact_import_rows")
    op.drop_index(op.f("ix_contact_imports_user_id_created_at"), table_name="contact_imports")
    op.drop_table("contact_imports")

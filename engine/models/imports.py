"""CSV contact imports: the job a marketer polls, and the staging rows it reads from.

The API streams an upload into contact_import_rows (COPY) and returns at once; a sync
worker then upserts from staging in batches, advancing rows_done as its checkpoint. The
API and the workers share no disk, so PostgreSQL is where the file lives in between.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from engine.models.base import (
    Base,
    JSONDocument,
    UTCDateTime,
    check_in,
    created_at,
    json_array,
    updated_at,
    uuid_pk,
)
from engine.models.enums import IMPORT_STATUSES


def _count() -> Mapped[int]:
    return mapped_column(Integer, nullable=False, server_default="0", default=0)


class ContactImport(Base):
    __tablename__ = "contact_imports"
    __table_args__ = (
        CheckConstraint(check_in("status", IMPORT_STATUSES), name="status"),
        Index(None, "user_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    filename: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(
        String(20), nullable=False, server_default="receiving", default="receiving"
    )
    total_rows: Mapped[int] = _count()
    rows_done: Mapped[int] = _count()
    created_count: Mapped[int] = _count()
    updated_count: Mapped[int] = _count()
    rejected_count: Mapped[int] = _count()
    # The first rejected rows with their reasons; capped, so a bad file stays small.
    errors: Mapped[list[Any]] = json_array()
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = updated_at()
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ContactImportRow(Base):
    __tablename__ = "contact_import_rows"

    import_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("contact_imports.id", ondelete="CASCADE"), primary_key=True
    )
    row_number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False)

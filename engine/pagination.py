"""Keyset pagination, the one way every list in Herald pages.

OFFSET re-reads every skipped row and shifts when rows are inserted; a keyset cursor
(the sort key of the last row) costs one index seek and never repeats or skips a row.
Lists sort newest first on (created_at, id): id breaks ties between equal timestamps.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, literal, tuple_
from sqlalchemy.orm import Session

from engine.errors import ValidationFailed

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_cursor: str | None


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, row_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        return datetime.fromisoformat(created), uuid.UUID(row_id)
    except (ValueError, TypeError) as exc:
        raise ValidationFailed("invalid cursor", fields={"cursor": ["invalid cursor"]}) from exc


def paginate(session: Session, stmt: Select, model, *, limit: int, cursor: str | None) -> Page:
    """Page a select of `model` rows, newest first."""
    if cursor:
        created, row_id = decode_cursor(cursor)
        after = tuple_(literal(created, model.created_at.type), literal(row_id, model.id.type))
        stmt = stmt.where(tuple_(model.created_at, model.id) < after)
    stmt = stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id)
    return Page(items=rows, next_cursor=next_cursor)


# -- append-only logs: keyset on the id alone ------------------------------------------
# Deliveries have a monotonically increasing BIGINT id and no updated_at, so the id
# alone is the sort key: newest first is id descending, and the cursor is the last id.


def encode_id_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([row_id]).encode()).decode().rstrip("=")


def decode_id_cursor(cursor: str) -> int:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        (row_id,) = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, TypeError) as exc:
        raise ValidationFailed("invalid cursor", fields={"cursor": ["invalid cursor"]}) from exc
    if not isinstance(row_id, int) or isinstance(row_id, bool) or not 1 <= row_id < 2**63:
        raise ValidationFailed("invalid cursor", fields={"cursor": ["invalid cursor"]})
    return row_id


def paginate_by_id(
    session: Session, stmt: Select, id_column, *, limit: int, cursor: str | None
) -> Page:
    """Page a select (ORM rows or plain column rows exposing `.id`), id descending."""
    if cursor:
        stmt = stmt.where(id_column < decode_id_cursor(cursor))
    rows = list(session.execute(stmt.order_by(id_column.desc()).limit(limit + 1)))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_id_cursor(rows[-1].id)
    return Page(items=rows, next_cursor=next_cursor)

"""Tenant isolation in one place: a row that belongs to someone else is "not found".

Answering 404 for another user's id, exactly as for a missing one, means ids leak
nothing about other tenants. Every service fetches by (user_id, id) through here.
"""

from __future__ import annotations

import uuid
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.errors import NotFound

T = TypeVar("T")


def get_owned(
    session: Session,
    model: type[T],
    user_id: uuid.UUID,
    row_id: uuid.UUID | str,
    *,
    what: str,
    for_update: bool = False,
) -> T:
    """The user's row of `model` with this id, or NotFound naming `what`."""
    try:
        key = row_id if isinstance(row_id, uuid.UUID) else uuid.UUID(str(row_id))
    except ValueError:
        raise NotFound(f"{what} not found") from None
    stmt = select(model).where(model.id == key, model.user_id == user_id)
    if for_update:
        stmt = stmt.with_for_update()
    row = session.scalar(stmt)
    if row is None:
        raise NotFound(f"{what} not found")
    return row

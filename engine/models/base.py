"""Declarative base and the column types shared by every table.

The schema runs on PostgreSQL in production and on SQLite in the embedded default, so
each portable type names its PostgreSQL form (JSONB, INET, native UUID) as a variant.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, FetchedValue, MetaData, String, Uuid, func, text
from sqlalchemy.dialects.postgresql import INET, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """TIMESTAMP without time zone holding UTC, handed to Python as an aware datetime.

    The seed keeps TIMESTAMP; storing UTC only and converting at the edge means the API
    can always answer ISO 8601 with an offset and nobody compares naive to aware.
    """

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


JSONDocument = JSON().with_variant(JSONB(), "postgresql")
InetAddress = String(45).with_variant(INET(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONDocument,
        list[Any]: JSONDocument,
        uuid.UUID: Uuid(),
    }


def uuid_pk() -> Mapped[uuid.UUID]:
    # Python generates ids so SQLite works; PostgreSQL also defaults to gen_random_uuid()
    # for rows written by raw SQL.
    return mapped_column(
        Uuid(), primary_key=True, default=uuid.uuid4, server_default=text("gen_random_uuid()")
    )


def created_at() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), nullable=False, server_default=func.current_timestamp())


def updated_at() -> Mapped[datetime]:
    # A trigger (see migrations) sets it on every UPDATE, set-based ones included;
    # FetchedValue tells the ORM to reload it rather than trust its own copy.
    return mapped_column(
        UTCDateTime(),
        nullable=False,
        server_default=func.current_timestamp(),
        server_onupdate=FetchedValue(),
    )


def json_object() -> Any:
    return mapped_column(JSONDocument, nullable=False, server_default=text("'{}'"), default=dict)


def json_array() -> Any:
    return mapped_column(JSONDocument, nullable=False, server_default=text("'[]'"), default=list)


def check_in(column: str, values: tuple[str, ...]) -> str:
    """SQL for an enumeration CHECK; kept as text so the migration can say the same."""
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"

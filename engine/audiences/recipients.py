"""Who a campaign reaches on a channel: the one definition of "recipient".

recipients = (union of the campaign's audiences, deduplicated)
             minus contacts without an address for the channel
             minus contacts without consent for the channel
             minus addresses suppressed for the user on that channel

`recipients_select` is a plain SELECT (contact_id, address): the dispatch engine can
wrap it in INSERT … SELECT … ON CONFLICT DO NOTHING, and the count endpoint counts it,
so what is counted is exactly what would be planned.

Addresses per channel: email -> contacts.email, sms -> contacts.phone, whatsapp ->
contacts.whatsapp, push -> the contact id as text (a contact is reachable by push when
push_tokens is a non-empty array; the sender fans out to its tokens at send time, and a
push suppression names the contact id). An empty string is no address. Email
suppressions match case-insensitively; the others match exactly (E.164 phones).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, FromClause, Select, Text, and_, cast, func, select
from sqlalchemy.orm import Session

from engine.audiences.compiler import AudienceCompiler, contacts
from engine.audiences.definition import Node, parse_definition
from engine.models import Audience, Campaign, Suppression
from engine.models.enums import CHANNEL_TYPES

suppressions = Suppression.__table__

_ADDRESS_COLUMN = {"email": "email", "sms": "phone", "whatsapp": "whatsapp"}


def address_of(channel: str, dialect: str) -> ColumnElement:
    if channel not in CHANNEL_TYPES:
        raise ValueError(f"unknown channel {channel!r}")
    if channel in _ADDRESS_COLUMN:
        return contacts.c[_ADDRESS_COLUMN[channel]]
    if dialect == "postgresql":
        return cast(contacts.c.id, Text)
    # SQLite stores the uuid as 32 hex digits; write it in its canonical 8-4-4-4-12 form.
    hexed = func.lower(contacts.c.id)
    parts = [func.substr(hexed, start, length) for start, length in _UUID_GROUPS]
    return (
        parts[0]
        .concat("-")
        .concat(parts[1])
        .concat("-")
        .concat(parts[2])
        .concat("-")
        .concat(parts[3])
        .concat("-")
        .concat(parts[4])
    )


_UUID_GROUPS = ((1, 8), (9, 4), (13, 4), (17, 4), (21, 12))


def _compared(address: ColumnElement, channel: str) -> ColumnElement:
    # Email suppressions match whatever the case; phones (E.164) and ids match exactly.
    return func.lower(address) if channel == "email" else address


def suppressed_addresses(channel: str, user_id: uuid.UUID):
    """The user's suppressed addresses on `channel`, each once, as compared."""
    address = _compared(suppressions.c.address, channel).label("address")
    return (
        select(address)
        .where(suppressions.c.user_id == user_id, suppressions.c.channel == channel)
        .distinct()
        .subquery(f"suppressed_{channel}")
    )


def _has_address(channel: str, dialect: str) -> ColumnElement[bool]:
    if channel != "push":
        address = address_of(channel, dialect)
        return and_(address.is_not(None), address != "")
    tokens = contacts.c.push_tokens
    if dialect == "postgresql":
        return and_(func.jsonb_typeof(tokens) == "array", func.jsonb_array_length(tokens) > 0)
    return and_(func.json_type(tokens) == "array", func.json_array_length(tokens) > 0)


class _Reach:
    """The joins and the condition that say whether a contact can receive a channel.

    Suppressions are LEFT JOINed (an anti-join once `address IS NULL` is asked) rather
    than tested with NOT EXISTS per contact: inside the count's FILTER clauses NOT EXISTS
    stays a per-row SubPlan, whose estimated cost alone pushes PostgreSQL into JIT
    compiling the statement, which then costs more than running it."""

    def __init__(self, user_id: uuid.UUID, dialect: str) -> None:
        self.user_id = user_id
        self.dialect = dialect
        self.suppressed: dict[str, Any] = {}

    def join(self, source: FromClause, channel: str) -> FromClause:
        suppressed = suppressed_addresses(channel, self.user_id)
        self.suppressed[channel] = suppressed
        address = _compared(address_of(channel, self.dialect), channel)
        return source.outerjoin(suppressed, suppressed.c.address == address)

    def condition(self, channel: str) -> ColumnElement[bool]:
        return and_(
            contacts.c[f"consent_{channel}"].is_(True),
            _has_address(channel, self.dialect),
            self.suppressed[channel].c.address.is_(None),
        )


def _campaign_definitions(session: Session, campaign_id: uuid.UUID) -> tuple[uuid.UUID, list[Node]]:
    user_id = session.scalar(select(Campaign.user_id).where(Campaign.id == campaign_id))
    if user_id is None:
        raise LookupError(f"campaign {campaign_id} does not exist")
    stored = session.scalars(
        select(Audience.definition).where(Audience.campaign_id == campaign_id)
    ).all()
    return user_id, [parse_definition(raw) for raw in stored]


def recipients_query(
    dialect: str,
    user_id: uuid.UUID,
    definitions: list[Node],
    channel: str,
    *,
    now: datetime,
) -> Select:
    """SELECT contact_id, address of the user's contacts in any of `definitions` that
    `channel` can reach; each contact at most once."""
    compiler = AudienceCompiler(dialect, user_id, now)
    members = compiler.members_where(definitions)
    reach = _Reach(user_id, dialect)
    source = reach.join(compiler.from_clause(), channel)
    return (
        select(
            contacts.c.id.label("contact_id"),
            address_of(channel, dialect).label("address"),
        )
        .select_from(source)
        .where(members, reach.condition(channel))
    )


def recipients_select(
    session: Session, campaign_id: uuid.UUID, channel: str, *, now: datetime
) -> Select:
    """The campaign's recipients on `channel` as a composable SELECT (contact_id,
    address). It reads the audience definitions to compile them; the filtering itself
    is all in the returned statement. A campaign without audiences reaches nobody."""
    user_id, definitions = _campaign_definitions(session, campaign_id)
    dialect = session.get_bind().dialect.name
    return recipients_query(dialect, user_id, definitions, channel, now=now)


def recipient_counts_query(
    dialect: str, user_id: uuid.UUID, definitions: list[Node], *, now: datetime
) -> Select:
    """One row: `total` (contacts in the union of audiences) and one count per channel,
    each counting exactly the rows recipients_query would give for that channel."""
    compiler = AudienceCompiler(dialect, user_id, now)
    members = compiler.members_where(definitions)
    reach = _Reach(user_id, dialect)
    source = compiler.from_clause()
    for channel in CHANNEL_TYPES:
        source = reach.join(source, channel)
    per_channel = [
        func.count().filter(reach.condition(channel)).label(channel) for channel in CHANNEL_TYPES
    ]
    return select(func.count().label("total"), *per_channel).select_from(source).where(members)


def recipient_counts(session: Session, campaign_id: uuid.UUID, *, now: datetime) -> dict[str, int]:
    user_id, definitions = _campaign_definitions(session, campaign_id)
    dialect = session.get_bind().dialect.name
    row = session.execute(recipient_counts_query(dialect, user_id, definitions, now=now)).one()
    return dict(row._mapping)

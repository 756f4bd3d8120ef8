"""Definition tree -> one SQL statement over contacts.

The shape, and why:
- Every leaf compiles to a predicate that is never NULL (COALESCE(…, false) where SQL's
  three-valued logic could leak a NULL), so NOT is plain boolean negation exactly as in
  the reference evaluator: NOT(NULL) would be NULL and drop the row.
- Type checks come first (jsonb_typeof / json_type): a value of another JSON type never
  matches, and no cast of a wrongly typed value can raise.
- Event conditions read one aggregate, LEFT JOINed on contact_id: `SELECT contact_id,
  count(*) FILTER (WHERE <condition 1>) AS n1, … GROUP BY contact_id`, one column per
  distinct (event, where, within_days), and each predicate is COALESCE(n, 0) between
  min and max. A join keeps its plan (one pass over the events, a hash join) wherever
  the condition sits — under NOT or ANY an `IN (subquery)` becomes a SubPlan that
  PostgreSQL may run per contact — and one aggregate reads data_events once however
  many event conditions there are. It reads only events of the user's data sources, of
  the named types, which the (data_source_id, occurred_at) index serves when every
  condition has within_days.
- Several audiences OR together over one scan of contacts, so a contact in two of them
  is one row: the union is deduplicated by construction.

PostgreSQL is the production target (jsonb operators; attribute equality compiles to
containment `@>` so a GIN index on contacts.attributes can serve it). SQLite, the
embedded default, gets the same semantics through its JSON1 functions, except that
numbers beyond ±2**63 compare as doubles there.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Integer,
    Select,
    Text,
    Uuid,
    all_,
    and_,
    any_,
    exists,
    false,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    true,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from engine.audiences.definition import (
    BOOLEAN,
    NUMBER,
    STRING,
    AllOf,
    AnyOf,
    Column,
    Comparison,
    Consent,
    ContactIds,
    EventCondition,
    FromSource,
    Node,
    Not,
)
from engine.models import Contact, ContactSource, DataEvent, DataSource
from engine.models.base import UTCDateTime

contacts = Contact.__table__
events = DataEvent.__table__
sources = DataSource.__table__
contact_sources = ContactSource.__table__

SUPPORTED_DIALECTS = ("postgresql", "sqlite")
EVENT_COUNTS = "audience_event_counts"


def _never_null(predicate: ColumnElement[bool]) -> ColumnElement[bool]:
    return func.coalesce(predicate, false())


def _ordered(left: Any, op: str, right: Any) -> ColumnElement[bool]:
    return {
        "gt": left > right,
        "gte": left >= right,
        "lt": left < right,
        "lte": left <= right,
    }[op]


class _PostgresJson:
    """Conditions on a jsonb document column, with jsonb operators."""

    def value(self, document, keys: tuple[str, ...]):
        # `->` with a text key only ever reads an object member (NULL on an array),
        # whereas `#>` would treat "0" as an array index.
        expr = type_coerce(document, JSONB)
        for key in keys:
            expr = expr.op("->", return_type=JSONB)(literal(key, Text))
        return expr

    @staticmethod
    def _jsonb(value: Any):
        return literal(value, JSONB)

    def compare(self, document, keys: tuple[str, ...], cond: Comparison) -> ColumnElement[bool]:
        op, operand, value_type = cond.op, cond.value, cond.value_type
        value = self.value(document, keys)
        kind = func.jsonb_typeof(value)
        if op == "exists":
            present = _never_null(kind != "null")
            return present if operand else not_(present)
        if op == "eq":
            # Containment of {"k1": {"k2": v}} is exact equality for a scalar v (a nested
            # array never contains a bare scalar) and is what a GIN index answers.
            probe: Any = operand
            for key in reversed(keys):
                probe = {key: probe}
            return _never_null(type_coerce(document, JSONB).bool_op("@>")(self._jsonb(probe)))
        if op == "ne":
            return _never_null(and_(kind == value_type, value != self._jsonb(operand)))
        if op in ("in", "not_in"):
            member = self._jsonb(list(operand)).bool_op("@>")(value)
            return _never_null(and_(kind == value_type, member if op == "in" else not_(member)))
        if op == "contains":
            in_array = and_(kind == "array", value.bool_op("@>")(self._jsonb([operand])))
            if value_type != STRING:
                return _never_null(in_array)
            text = value.op("#>>", return_type=Text)(literal_column("'{}'::text[]"))
            substring = and_(kind == "string", func.strpos(text, operand) > 0)
            return _never_null(or_(substring, in_array))
        return _never_null(and_(kind == NUMBER, _ordered(value, op, self._jsonb(operand))))


class _SqliteJson:
    """The same conditions through SQLite's JSON1 functions (json_type names: null, true,
    false, integer, real, text, array, object)."""

    TYPE_NAMES = {STRING: ("text",), NUMBER: ("integer", "real")}

    @staticmethod
    def path(keys: tuple[str, ...]) -> str:
        return "$" + "".join(f'."{key}"' for key in keys)

    @staticmethod
    def _number(value: int | float) -> int | float:
        # SQLite integers are 64-bit; beyond that JSON numbers are doubles there too.
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            return float(value)
        return value

    def _typed(self, kind, value_type: str, operand: Any = None) -> ColumnElement[bool]:
        if value_type == BOOLEAN:
            return kind == ("true" if operand else "false")
        return kind.in_(self.TYPE_NAMES[value_type])

    def compare(self, document, keys: tuple[str, ...], cond: Comparison) -> ColumnElement[bool]:
        op, operand, value_type = cond.op, cond.value, cond.value_type
        path = self.path(keys)
        kind = func.json_type(document, path)
        value = func.json_extract(document, path)
        if op == "exists":
            present = _never_null(kind != "null")
            return present if operand else not_(present)
        if value_type == NUMBER and op not in ("in", "not_in"):
            operand = self._number(operand)
        if op in ("eq", "ne") and value_type == BOOLEAN:
            return _never_null(self._typed(kind, BOOLEAN, operand == (op == "eq")))
        if op == "eq":
            return _never_null(and_(self._typed(kind, value_type), value == operand))
        if op == "ne":
            return _never_null(and_(self._typed(kind, value_type), value != operand))
        if op in ("in", "not_in"):
            if value_type == BOOLEAN:
                names = {"true" if item else "false" for item in operand}
                member = kind.in_(sorted(names))
                typed = kind.in_(("true", "false"))
            else:
                items = [self._number(i) for i in operand] if value_type == NUMBER else operand
                listed = func.json_each(literal(json.dumps(list(items)))).table_valued("value")
                member = value.in_(select(listed.c.value))
                typed = self._typed(kind, value_type)
            return _never_null(and_(typed, member if op == "in" else not_(member)))
        if op == "contains":
            elements = func.json_each(document, path).table_valued("value", "type")
            if value_type == BOOLEAN:
                element_match = elements.c.type == ("true" if operand else "false")
            else:
                element_match = and_(
                    elements.c.type.in_(self.TYPE_NAMES[value_type]),
                    elements.c.value == operand,
                )
            in_array = and_(
                kind == "array", exists(select(1).select_from(elements).where(element_match))
            )
            if value_type != STRING:
                return _never_null(in_array)
            substring = and_(kind == "text", func.instr(value, operand) > 0)
            return _never_null(or_(substring, in_array))
        return _never_null(and_(self._typed(kind, NUMBER), _ordered(value, op, operand)))


@dataclass(frozen=True)
class _EventKey:
    event: str
    where: tuple[Comparison, ...]
    within_days: int | None


class AudienceCompiler:
    """Compiles definitions of one user's audiences into predicates over `contacts`,
    collecting the event aggregates they join. One compiler per statement."""

    def __init__(self, dialect_name: str, user_id: uuid.UUID, now: datetime) -> None:
        if dialect_name not in SUPPORTED_DIALECTS:
            raise NotImplementedError(f"audiences cannot be compiled for {dialect_name!r}")
        self.dialect = dialect_name
        self.json = _PostgresJson() if dialect_name == "postgresql" else _SqliteJson()
        self.user_id = user_id
        self.now = now
        # One count column per distinct (event, where, within_days), all computed in one
        # aggregate over data_events.
        self._event_counts: dict[_EventKey, str] = {}

    # -- statements ---------------------------------------------------------------------

    def from_clause(self) -> FromClause:
        """contacts, LEFT JOIN the event counts if the compiled predicates use any. Call it
        after compiling every predicate of the statement."""
        if not self._event_counts:
            return contacts
        counts = self._event_aggregate()
        return contacts.outerjoin(counts, counts.c.contact_id == contacts.c.id)

    def members_where(self, definitions: list[Node]) -> ColumnElement[bool]:
        """The user's contacts in any of `definitions` (none: nobody)."""
        matched = or_(false(), *(self.predicate(d) for d in definitions))
        return and_(contacts.c.user_id == self.user_id, matched)

    def count_select(self, definition: Node) -> Select:
        where = self.members_where([definition])
        return select(func.count()).select_from(self.from_clause()).where(where)

    # -- predicates ---------------------------------------------------------------------

    def predicate(self, node: Node) -> ColumnElement[bool]:
        if isinstance(node, AllOf):
            return and_(true(), *(self.predicate(c) for c in node.children))
        if isinstance(node, AnyOf):
            return or_(false(), *(self.predicate(c) for c in node.children))
        if isinstance(node, Not):
            return not_(self.predicate(node.child))
        if isinstance(node, Consent):
            return contacts.c[f"consent_{node.channel}"].is_(True)
        if isinstance(node, FromSource):
            return exists().where(
                contact_sources.c.contact_id == contacts.c.id,
                contact_sources.c.data_source_id == node.source_id,
            )
        if isinstance(node, ContactIds):
            return self._id_in(node.ids)
        if isinstance(node, EventCondition):
            return self._event(node)
        if isinstance(node, Comparison):
            if isinstance(node.target, Column):
                return self._column(node)
            return self.json.compare(contacts.c.attributes, node.target.keys, node)
        raise TypeError(f"unknown node {node!r}")

    def _id_in(self, ids: tuple[uuid.UUID, ...]) -> ColumnElement[bool]:
        if not ids:
            return false()
        # One bound array, not one parameter per id: 10,000 ids stay one parameter.
        if self.dialect == "postgresql":
            return contacts.c.id == any_(literal(list(ids), ARRAY(Uuid())))
        listed = func.json_each(literal(json.dumps([i.hex for i in ids]))).table_valued("value")
        return contacts.c.id.in_(select(listed.c.value))

    def _column(self, cond: Comparison) -> ColumnElement[bool]:
        column = contacts.c[cond.target.name]  # type: ignore[union-attr]
        op, operand = cond.op, cond.value
        if op == "exists":
            return column.is_not(None) if operand else column.is_(None)
        if cond.value_type == "datetime":
            return _ordered(column, op, literal(operand, UTCDateTime()))
        if op == "eq":
            return _never_null(column == operand)
        if op == "ne":
            return _never_null(column != operand)
        if op == "contains":
            position = func.strpos if self.dialect == "postgresql" else func.instr
            return _never_null(position(column, operand) > 0)
        # in / not_in with one bound list.
        if self.dialect == "postgresql":
            listed = literal(list(operand), ARRAY(Text()))
            member = column == any_(listed) if op == "in" else column != all_(listed)
            return _never_null(member)
        values = func.json_each(literal(json.dumps(list(operand)))).table_valued("value")
        inside = column.in_(select(values.c.value))
        return _never_null(inside if op == "in" else and_(column.is_not(None), not_(inside)))

    def _event(self, cond: EventCondition) -> ColumnElement[bool]:
        key = _EventKey(cond.event, cond.where, cond.within_days)
        name = self._event_counts.setdefault(key, f"n{len(self._event_counts) + 1}")
        # The aggregate is built once every predicate is known (from_clause), so the
        # predicate names its column by text; NULL there means no such event: zero.
        count = func.coalesce(literal_column(f"{EVENT_COUNTS}.{name}", Integer), 0)
        bounds = [count >= cond.min_count] if cond.min_count > 0 else []
        if cond.max_count is not None:
            bounds.append(count <= cond.max_count)
        return and_(true(), *bounds)

    def _event_aggregate(self):
        """SELECT contact_id, count(*) FILTER (WHERE <condition 1>) AS n1, … FROM the
        events of the user's data sources, of the named types, GROUP BY contact_id: one
        pass over data_events however many event conditions the statement has."""
        user_sources = select(sources.c.id).where(sources.c.user_id == self.user_id)
        columns = [
            func.count().filter(and_(*self._event_filters(key))).label(name)
            for key, name in self._event_counts.items()
        ]
        prefilter = [
            events.c.contact_id.is_not(None),
            events.c.data_source_id.in_(user_sources),
            events.c.event_type.in_(sorted({key.event for key in self._event_counts})),
        ]
        windows = [key.within_days for key in self._event_counts]
        if None not in windows:
            # Every condition looks back at most this far: let the index on
            # (data_source_id, occurred_at) skip the older events.
            prefilter.append(events.c.occurred_at >= self._cutoff(max(windows)))  # type: ignore[type-var]
        return (
            select(events.c.contact_id, *columns)
            .where(*prefilter)
            .group_by(events.c.contact_id)
            .subquery(EVENT_COUNTS)
        )

    def _event_filters(self, key: _EventKey) -> list[ColumnElement[bool]]:
        filters = [events.c.event_type == key.event]
        if key.within_days is not None:
            filters.append(events.c.occurred_at >= self._cutoff(key.within_days))
        for where in key.where:
            filters.append(self.json.compare(events.c.payload, where.target.keys, where))  # type: ignore[union-attr]
        return filters

    def _cutoff(self, days: int):
        return literal(self.now - timedelta(days=days), UTCDateTime())

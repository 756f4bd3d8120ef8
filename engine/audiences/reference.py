"""The rule language evaluated in plain Python, one contact at a time.

This is the executable statement of the semantics, not a production path (production
compiles to one SQL query, see compiler.py). The property tests generate contacts,
events and definitions and require the SQL result to equal what this module says.

The rules it states:
- A condition on a missing value, JSON null, or a value of another JSON type is false.
  That includes `ne` and `not_in`: they match only a present value of the operand's
  type that differs. `exists` is the one operator about presence: true when the value is
  present and not null.
- `not` is plain boolean negation of its child.
- Numbers compare by their decimal value as written in JSON (1 == 1.0; a float compares
  as its shortest repr, which is what PostgreSQL's jsonb numeric stores).
- `contains` with a string matches a string containing it (case-sensitive) or an array
  with an element equal to it; with a number or boolean, an array with an equal element.
- JSON paths walk objects only; a key never indexes an array.
- An event condition counts the contact's events of that type, reported by one of the
  user's data sources, whose payload passes every `where`, with occurred_at >= now -
  within_days; it holds when min_count <= count <= max_count.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from engine.audiences.definition import (
    NUMBER,
    AllOf,
    AnyOf,
    Column,
    Comparison,
    Consent,
    ContactIds,
    EventCondition,
    FromSource,
    JsonPath,
    Node,
    Not,
    json_type,
)


@dataclass
class ContactRecord:
    """A contact as the evaluator sees it: column values by name (None when NULL)."""

    id: uuid.UUID
    columns: dict[str, Any]
    attributes: Any
    consent: dict[str, bool]
    source_ids: set[uuid.UUID] = field(default_factory=set)


@dataclass
class EventRecord:
    contact_id: uuid.UUID | None
    data_source_id: uuid.UUID
    event_type: str
    payload: Any
    occurred_at: datetime


_MISSING = object()


def matching_ids(
    node: Node,
    contacts: Iterable[ContactRecord],
    events: Iterable[EventRecord],
    *,
    user_source_ids: set[uuid.UUID],
    now: datetime,
) -> set[uuid.UUID]:
    by_contact: dict[uuid.UUID, list[EventRecord]] = {}
    for event in events:
        if event.contact_id is not None and event.data_source_id in user_source_ids:
            by_contact.setdefault(event.contact_id, []).append(event)
    return {
        contact.id
        for contact in contacts
        if evaluate(node, contact, by_contact.get(contact.id, []), now)
    }


def evaluate(node: Node, contact: ContactRecord, events: list[EventRecord], now: datetime) -> bool:
    """Whether `contact` (with its own events, from the user's sources) matches `node`."""
    if isinstance(node, AllOf):
        return all(evaluate(child, contact, events, now) for child in node.children)
    if isinstance(node, AnyOf):
        return any(evaluate(child, contact, events, now) for child in node.children)
    if isinstance(node, Not):
        return not evaluate(node.child, contact, events, now)
    if isinstance(node, Consent):
        return bool(contact.consent.get(node.channel))
    if isinstance(node, FromSource):
        return node.source_id in contact.source_ids
    if isinstance(node, ContactIds):
        return contact.id in node.ids
    if isinstance(node, EventCondition):
        return _event_holds(node, events, now)
    if isinstance(node, Comparison):
        return compare(node, _contact_value(node.target, contact))
    raise TypeError(f"unknown node {node!r}")


def _event_holds(node: EventCondition, events: list[EventRecord], now: datetime) -> bool:
    cutoff = now - timedelta(days=node.within_days) if node.within_days is not None else None
    count = sum(
        1
        for event in events
        if event.event_type == node.event
        and (cutoff is None or event.occurred_at >= cutoff)
        and all(compare(w, _lookup(event.payload, w.target.keys)) for w in node.where)  # type: ignore[union-attr]
    )
    return count >= node.min_count and (node.max_count is None or count <= node.max_count)


def _contact_value(target: Column | JsonPath, contact: ContactRecord) -> Any:
    if isinstance(target, Column):
        value = contact.columns.get(target.name)
        return _MISSING if value is None else value
    return _lookup(contact.attributes, target.keys)


def _lookup(document: Any, keys: tuple[str, ...]) -> Any:
    value = document
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def compare(condition: Comparison, value: Any) -> bool:
    op, operand = condition.op, condition.value
    present = value is not _MISSING and value is not None
    if op == "exists":
        return present is operand
    if not present:
        return False
    if condition.value_type == "datetime":
        return _ordered(op, value, operand)
    kind = json_type(value)
    if op == "contains":
        if kind == "string" and condition.value_type == "string":
            return operand in value
        if kind == "array":
            return any(_same(element, operand, condition.value_type) for element in value)
        return False
    if kind != condition.value_type:
        return False
    if op == "eq":
        return _same(value, operand, kind)
    if op == "ne":
        return not _same(value, operand, kind)
    if op == "in":
        return any(_same(value, item, kind) for item in operand)
    if op == "not_in":
        return not any(_same(value, item, kind) for item in operand)
    return _ordered(op, _decimal(value), _decimal(operand))


def _same(value: Any, operand: Any, operand_type: str | None) -> bool:
    if json_type(value) != operand_type:
        return False
    if operand_type == NUMBER:
        return _decimal(value) == _decimal(operand)
    return value == operand


def _ordered(op: str, left: Any, right: Any) -> bool:
    return {
        "gt": left > right,
        "gte": left >= right,
        "lt": left < right,
        "lte": left <= right,
    }[op]


def _decimal(number: int | float) -> Decimal:
    # A JSON number's value is its text; Python floats are written with repr.
    return Decimal(number) if isinstance(number, int) else Decimal(repr(number))

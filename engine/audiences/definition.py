"""The audience rule language: parsing a JSON definition into a typed tree, or naming
the exact path of everything wrong with it.

The tree is the one meaning of a definition. The SQL compiler and the Python reference
evaluator both walk it, so the property tests compare two readings of the same thing
rather than two parsers.

Shape (no wrapper)::

    {"all": [node, ...]}   {"any": [node, ...]}   {"not": node}
    {"field": "attributes.tier", "op": "eq", "value": "gold"}
    {"consent": "email"}
    {"event": "order_placed", "where": [{"field": "value", "op": "gte", "value": 50}],
     "min_count": 1, "max_count": 3, "within_days": 30, "performed": true}
    {"source_id": "<uuid>"}
    {"contact_ids": ["<uuid>", ...]}
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.errors import ValidationFailed
from engine.models.enums import CHANNEL_TYPES

MAX_DEPTH = 8
MAX_NODES = 200
MAX_CONTACT_IDS = 10_000
MAX_LIST_VALUES = 1_000
MAX_WHERE = 20
MAX_STRING = 1_000
MAX_KEY = 100
MAX_PATH_SEGMENTS = 8
MAX_COUNT = 1_000_000
MAX_WITHIN_DAYS = 36_500

# Contact columns a condition may name directly; everything else lives in attributes.*.
TEXT_COLUMNS = (
    "email",
    "phone",
    "whatsapp",
    "first_name",
    "last_name",
    "timezone",
    "locale",
    "external_id",
)
TIMESTAMP_COLUMNS = ("created_at",)

OPERATORS = ("eq", "ne", "in", "not_in", "contains", "gt", "gte", "lt", "lte", "exists")
ORDERING = ("gt", "gte", "lt", "lte")
NODE_KINDS = ("all", "any", "not", "field", "consent", "event", "source_id", "contact_ids")

# JSON types as the rule language names them (a value's type decides what it can match).
STRING, NUMBER, BOOLEAN = "string", "number", "boolean"


# -- the tree ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AllOf:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class AnyOf:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class Column:
    """A contact column: text ones, or created_at."""

    name: str


@dataclass(frozen=True)
class JsonPath:
    """A value inside a JSON document column: contacts.attributes or data_events.payload.

    `keys` walk objects only; a key never indexes into an array."""

    document: str  # "attributes" | "payload"
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Comparison:
    """`target op value`. `value_type` is the JSON type the operand (or every element of
    an in/not_in list) has; a target holding any other type never matches."""

    target: Column | JsonPath
    op: str
    value: Any  # str | int | float | bool | datetime | tuple of scalars
    value_type: str | None  # STRING/NUMBER/BOOLEAN; "datetime" for created_at; None: exists


@dataclass(frozen=True)
class Consent:
    channel: str


@dataclass(frozen=True)
class EventCondition:
    """Performed `event` between min_count and max_count times (max None: no ceiling),
    counting only events whose payload matches every `where`, in the last `within_days`
    days (None: ever)."""

    event: str
    where: tuple[Comparison, ...]
    within_days: int | None
    min_count: int
    max_count: int | None


@dataclass(frozen=True)
class FromSource:
    source_id: uuid.UUID


@dataclass(frozen=True)
class ContactIds:
    ids: tuple[uuid.UUID, ...]


Node = AllOf | AnyOf | Not | Comparison | Consent | EventCondition | FromSource | ContactIds


# -- parsing ----------------------------------------------------------------------------


def parse_definition(raw: Any, *, path: str = "definition") -> Node:
    """The tree of `raw`, or ValidationFailed whose fields name every bad path."""
    parser = _Parser()
    node = parser.node(raw, path, depth=1)
    if parser.nodes > MAX_NODES:
        parser.errors = {path: [f"definition has more than {MAX_NODES} conditions"]}
    if parser.errors:
        raise ValidationFailed("invalid audience definition", fields=parser.errors)
    assert node is not None
    return node


def source_ids(node: Node) -> set[uuid.UUID]:
    """Every data source the definition names (their ownership is checked on write)."""
    found: set[uuid.UUID] = set()
    for sub in walk(node):
        if isinstance(sub, FromSource):
            found.add(sub.source_id)
    return found


def source_paths(raw: Any, *, path: str = "definition") -> dict[uuid.UUID, list[str]]:
    """Where in a (valid) raw definition each source id appears, to name it in errors."""
    found: dict[uuid.UUID, list[str]] = {}

    def visit(value: Any, at: str) -> None:
        if not isinstance(value, dict):
            return
        if "source_id" in value:
            found.setdefault(uuid.UUID(str(value["source_id"])), []).append(f"{at}.source_id")
        for kind in ("all", "any"):
            for index, child in enumerate(value.get(kind) or ()):
                visit(child, f"{at}.{kind}[{index}]")
        if "not" in value:
            visit(value["not"], f"{at}.not")

    visit(raw, path)
    return found


def walk(node: Node):
    yield node
    if isinstance(node, AllOf | AnyOf):
        for child in node.children:
            yield from walk(child)
    elif isinstance(node, Not):
        yield from walk(node.child)


def json_type(value: Any) -> str:
    """The JSON type of a decoded value (bool before int: True is an int in Python)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int | float):
        return NUMBER
    if isinstance(value, str):
        return STRING
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _Parser:
    def __init__(self) -> None:
        self.errors: dict[str, list[str]] = {}
        self.nodes = 0

    def fail(self, path: str, message: str) -> None:
        self.errors.setdefault(path, []).append(message)

    def node(self, raw: Any, path: str, depth: int) -> Node | None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            return None  # reported once, on the whole definition
        if depth > MAX_DEPTH:
            self.fail(path, f"nesting deeper than {MAX_DEPTH} levels")
            return None
        if not isinstance(raw, dict):
            self.fail(path, "must be an object")
            return None
        kinds = [k for k in NODE_KINDS if k in raw]
        if len(kinds) != 1:
            if not kinds:
                unknown = sorted(set(raw) - set(NODE_KINDS))
                for key in unknown:
                    self.fail(f"{path}.{key}", "unknown field")
            self.fail(path, f"must have exactly one of: {', '.join(NODE_KINDS)}")
            return None
        kind = kinds[0]
        return getattr(self, f"_{kind}")(raw, path, depth)

    def _known_keys(self, raw: dict, path: str, allowed: set[str]) -> None:
        for key in raw:
            if key not in allowed:
                self.fail(f"{path}.{key}", "unknown field")

    def _group(self, raw: dict, path: str, depth: int, kind: str) -> Node | None:
        self._known_keys(raw, path, {kind})
        items = raw[kind]
        if not isinstance(items, list):
            self.fail(f"{path}.{kind}", "must be a list of conditions")
            return None
        children = [
            self.node(item, f"{path}.{kind}[{index}]", depth + 1)
            for index, item in enumerate(items)
        ]
        if any(child is None for child in children):
            return None
        return (AllOf if kind == "all" else AnyOf)(tuple(children))  # type: ignore[arg-type]

    def _all(self, raw: dict, path: str, depth: int) -> Node | None:
        return self._group(raw, path, depth, "all")

    def _any(self, raw: dict, path: str, depth: int) -> Node | None:
        return self._group(raw, path, depth, "any")

    def _not(self, raw: dict, path: str, depth: int) -> Node | None:
        self._known_keys(raw, path, {"not"})
        child = self.node(raw["not"], f"{path}.not", depth + 1)
        return None if child is None else Not(child)

    def _consent(self, raw: dict, path: str, depth: int) -> Node | None:
        self._known_keys(raw, path, {"consent"})
        channel = raw["consent"]
        if channel not in CHANNEL_TYPES:
            self.fail(f"{path}.consent", f"must be one of: {', '.join(CHANNEL_TYPES)}")
            return None
        return Consent(channel)

    def _source_id(self, raw: dict, path: str, depth: int) -> Node | None:
        self._known_keys(raw, path, {"source_id"})
        source = _as_uuid(raw["source_id"])
        if source is None:
            self.fail(f"{path}.source_id", "not a valid UUID")
            return None
        return FromSource(source)

    def _contact_ids(self, raw: dict, path: str, depth: int) -> Node | None:
        self._known_keys(raw, path, {"contact_ids"})
        ids = raw["contact_ids"]
        if not isinstance(ids, list):
            self.fail(f"{path}.contact_ids", "must be a list of contact ids")
            return None
        if len(ids) > MAX_CONTACT_IDS:
            self.fail(f"{path}.contact_ids", f"at most {MAX_CONTACT_IDS} contact ids")
            return None
        parsed = []
        for index, item in enumerate(ids):
            value = _as_uuid(item)
            if value is None:
                self.fail(f"{path}.contact_ids[{index}]", "not a valid UUID")
            parsed.append(value)
        if None in parsed:
            return None
        return ContactIds(tuple(dict.fromkeys(parsed)))  # type: ignore[arg-type]

    def _field(self, raw: dict, path: str, depth: int) -> Node | None:
        self._known_keys(raw, path, {"field", "op", "value"})
        target = self._contact_target(raw["field"], f"{path}.field")
        return self._comparison(raw, path, target)

    def _event(self, raw: dict, path: str, depth: int) -> Node | None:
        allowed = {"event", "where", "min_count", "max_count", "within_days", "performed"}
        self._known_keys(raw, path, allowed)
        # Every problem below is reported at its own path inside this node, so a node is
        # valid exactly when no new path failed.
        failed_before = len(self.errors)
        name = raw["event"]
        if not isinstance(name, str) or not name or len(name) > 100:
            self.fail(f"{path}.event", "must be an event name of 1 to 100 characters")
        where: list[Comparison | None] = []
        raw_where = raw.get("where", [])
        if not isinstance(raw_where, list):
            self.fail(f"{path}.where", "must be a list of conditions")
        elif len(raw_where) > MAX_WHERE:
            self.fail(f"{path}.where", f"at most {MAX_WHERE} conditions")
        else:
            for index, item in enumerate(raw_where):
                self.nodes += 1
                where.append(self._where(item, f"{path}.where[{index}]"))
        within = self._count(raw, path, "within_days", minimum=1, maximum=MAX_WITHIN_DAYS)
        min_count = self._count(raw, path, "min_count", minimum=0, maximum=MAX_COUNT)
        max_count = self._count(raw, path, "max_count", minimum=0, maximum=MAX_COUNT)
        performed = raw.get("performed", True)
        if not isinstance(performed, bool):
            self.fail(f"{path}.performed", "must be true or false")
        elif not performed:
            # "did not perform" is exactly a count of zero; a range on top contradicts it.
            for key in ("min_count", "max_count"):
                if key in raw:
                    self.fail(f"{path}.{key}", "not allowed with performed: false")
            min_count, max_count = 0, 0
        if min_count is None:
            # Without a ceiling "performed" means at least once; with one, "at most N
            # times" includes never.
            min_count = 1 if max_count is None else 0
        if max_count is not None and min_count > max_count:
            self.fail(f"{path}.max_count", "must be greater than or equal to min_count")
        if len(self.errors) > failed_before or None in where:
            return None
        return EventCondition(
            event=name,
            where=tuple(where),  # type: ignore[arg-type]
            within_days=within,
            min_count=min_count,
            max_count=max_count,
        )

    def _count(self, raw: dict, path: str, key: str, *, minimum: int, maximum: int) -> int | None:
        if key not in raw:
            return None
        value = raw[key]
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(f"{path}.{key}", "must be an integer")
            return None
        if not minimum <= value <= maximum:
            self.fail(f"{path}.{key}", f"must be between {minimum} and {maximum}")
            return None
        return value

    def _where(self, raw: Any, path: str) -> Comparison | None:
        if not isinstance(raw, dict):
            self.fail(path, "must be an object")
            return None
        self._known_keys(raw, path, {"field", "op", "value"})
        if "field" not in raw:
            self.fail(f"{path}.field", "required")
            return None
        key = raw["field"]
        target = None
        if _valid_key(key):
            target = JsonPath("payload", (key,))
        else:
            self.fail(f"{path}.field", _KEY_RULE)
        return self._comparison(raw, path, target)

    def _contact_target(self, field: Any, path: str) -> Column | JsonPath | None:
        if not isinstance(field, str):
            self.fail(path, "must be a string")
            return None
        if field in TEXT_COLUMNS or field in TIMESTAMP_COLUMNS:
            return Column(field)
        if field.startswith("attributes."):
            keys = tuple(field.split(".")[1:])
            if len(keys) > MAX_PATH_SEGMENTS:
                self.fail(path, f"at most {MAX_PATH_SEGMENTS} keys after attributes.")
                return None
            if not all(_valid_key(k) for k in keys):
                self.fail(path, f"each key after attributes. {_KEY_RULE}")
                return None
            return JsonPath("attributes", keys)
        self.fail(
            path,
            f"unknown field {field!r}: use one of {', '.join(TEXT_COLUMNS + TIMESTAMP_COLUMNS)}"
            " or attributes.<key>",
        )
        return None

    def _comparison(
        self, raw: dict, path: str, target: Column | JsonPath | None
    ) -> Comparison | None:
        op = raw.get("op")
        if "op" not in raw:
            self.fail(f"{path}.op", "required")
            return None
        if op not in OPERATORS:
            self.fail(f"{path}.op", f"unknown operator {op!r}")
            return None
        value_path = f"{path}.value"
        if op == "exists":
            value = raw.get("value", True)
            if not isinstance(value, bool):
                self.fail(value_path, "exists takes true or false")
                return None
            if target is None:
                return None
            if target == Column("created_at"):
                self.fail(f"{path}.op", "created_at always exists")
                return None
            return Comparison(target, op, value, None)
        if "value" not in raw:
            self.fail(value_path, "required")
            return None
        value = raw["value"]
        if target is not None and isinstance(target, Column) and target.name == "created_at":
            return self._timestamp_comparison(target, op, value, path)
        typed = self._typed_operand(op, value, value_path)
        if typed is None or target is None:
            return None
        operand, value_type = typed
        if isinstance(target, Column) and value_type != STRING:
            self.fail(value_path, f"{target.name} is text: compare it with a string")
            return None
        if isinstance(target, Column) and op in ORDERING:
            self.fail(f"{path}.op", f"operator {op!r} compares numbers; {target.name} is text")
            return None
        return Comparison(target, op, operand, value_type)

    def _timestamp_comparison(
        self, target: Column, op: str, value: Any, path: str
    ) -> Comparison | None:
        if op not in ORDERING:
            self.fail(f"{path}.op", f"created_at takes one of: {', '.join(ORDERING)}")
            return None
        moment = None
        if isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                moment = None
        if moment is None or moment.tzinfo is None:
            self.fail(f"{path}.value", "must be an ISO 8601 date-time with a time zone")
            return None
        return Comparison(target, op, moment, "datetime")

    def _typed_operand(self, op: str, value: Any, path: str) -> tuple[Any, str] | None:
        if op in ("in", "not_in"):
            if not isinstance(value, list) or not value:
                self.fail(path, f"{op} takes a non-empty list")
                return None
            if len(value) > MAX_LIST_VALUES:
                self.fail(path, f"at most {MAX_LIST_VALUES} values")
                return None
            types = set()
            for index, item in enumerate(value):
                item_type = self._scalar_type(item, f"{path}[{index}]")
                if item_type is None:
                    return None
                types.add(item_type)
            if len(types) > 1:
                self.fail(path, "values must all be strings, all numbers or all booleans")
                return None
            return tuple(dict.fromkeys(value)), types.pop()
        value_type = self._scalar_type(value, path)
        if value_type is None:
            return None
        if op in ORDERING and value_type != NUMBER:
            self.fail(path, f"{op} takes a number")
            return None
        return value, value_type

    def _scalar_type(self, value: Any, path: str) -> str | None:
        kind = json_type(value)
        if kind == STRING:
            if len(value) > MAX_STRING:
                self.fail(path, f"at most {MAX_STRING} characters")
                return None
            return STRING
        if kind == NUMBER:
            if isinstance(value, float) and not math.isfinite(value):
                self.fail(path, "must be a finite number")
                return None
            return NUMBER
        if kind == BOOLEAN:
            return BOOLEAN
        self.fail(path, "must be a string, a number or a boolean")
        return None


# A key is used inside SQL JSON paths (SQLite quotes it); quotes and backslashes have no
# portable escape there, and "." separates the keys of attributes.a.b.
_KEY_RULE = f'must be 1 to {MAX_KEY} characters without ", \\ or control characters'


def _valid_key(key: Any) -> bool:
    return (
        isinstance(key, str)
        and 0 < len(key) <= MAX_KEY
        and not any(ch in key for ch in '"\\')
        and all(ch.isprintable() for ch in key)
    )


def _as_uuid(value: Any) -> uuid.UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None

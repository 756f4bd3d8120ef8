"""The audience compiler against the reference evaluator, by property.

Hypothesis draws a small world (contacts with attributes of mixed JSON types, some keys
missing or null, events from the user's and another user's sources, source memberships,
suppressions) and several definitions. The SQL answer (on real PostgreSQL, and on SQLite,
the embedded default) must equal the reference evaluator's, for audience membership and
for the per-channel recipients. Each example writes inside a transaction it rolls back.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, insert, select

from engine.audiences.compiler import AudienceCompiler, contacts
from engine.audiences.definition import (
    ORDERING,
    AnyOf,
    EventCondition,
    json_type,
    parse_definition,
)
from engine.audiences.recipients import recipient_counts_query, recipients_query
from engine.audiences.reference import ContactRecord, EventRecord, matching_ids
from engine.models import ContactSource, DataEvent, DataSource, Suppression, User
from engine.models.enums import CHANNEL_TYPES

ROOT = Path(__file__).resolve().parent.parent

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
USER = uuid.UUID("00000000-0000-4000-8000-000000000001")
OTHER_USER = uuid.UUID("00000000-0000-4000-8000-000000000002")
SOURCE_A = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
SOURCE_B = uuid.UUID("00000000-0000-4000-8000-0000000000b2")
FOREIGN_SOURCE = uuid.UUID("00000000-0000-4000-8000-0000000000f3")
USER_SOURCES = {SOURCE_A, SOURCE_B}
CONTACT_POOL = [uuid.UUID(int=0x10000 + i) for i in range(30)]
CREATED = [NOW - timedelta(days=d) for d in (0, 3, 10, 40)]

# Small pools make equal values, and so matches, frequent.
KEYS = ["tier", "score", "tags", "nested"]
PAYLOAD_KEYS = ["value", "sku", "tags"]
STRINGS = ["gold", "Gold", "go", "", "ld", "1", "true", "gold silver"]
NUMBERS = [0, 1, -1, 2, 10, 1.5, 0.1, -0.0, 1.0, 50, 49.999, 10**20, 1e20, -3.25]
TEXT_COLUMNS = ["email", "first_name", "locale", "external_id"]
CONTACT_FIELDS = [
    "attributes.tier",
    "attributes.score",
    "attributes.tags",
    "attributes.nested",
    "attributes.nested.tier",
    "attributes.nested.score",
    "attributes.tags.0",  # a key never indexes an array
    "attributes.missing",
]

strings = st.sampled_from(STRINGS)
numbers = st.sampled_from(NUMBERS) | st.integers(-3, 60)
booleans = st.booleans()
scalars = strings | numbers | booleans | st.none()


arrays = st.lists(scalars | st.lists(scalars, max_size=2), max_size=4)


def json_values(keys: list[str]):
    """Any JSON: scalars of every type (null included), arrays, objects."""
    nested = st.fixed_dictionaries({}, optional={k: scalars | arrays for k in keys})
    return st.one_of(strings, numbers, booleans, st.none(), arrays, nested)


def documents(keys: list[str]):
    """Objects where each key is missing about half the time, and otherwise usually of
    the type its name suggests but often of any other (tier: text, score: number,
    tags: array, nested: object)."""
    usual = {
        "tier": strings,
        "sku": strings,
        "score": numbers,
        "value": numbers,
        "tags": arrays,
        "nested": st.fixed_dictionaries({}, optional={k: json_values(KEYS) for k in KEYS}),
    }
    return st.fixed_dictionaries(
        {}, optional={k: st.one_of(usual[k], usual[k], json_values(keys)) for k in keys}
    )


# Built once: strategies are cheap to draw from and costly to build.
ATTRIBUTES = documents(KEYS)
PAYLOADS = documents(PAYLOAD_KEYS)


def _maybe(*pool):
    return st.none() | st.sampled_from(pool)


TEXT_VALUES = {
    "phone": _maybe("+33612345678", "+14155550100", ""),
    "whatsapp": _maybe("+33612345678", ""),
    "first_name": _maybe(*STRINGS),
    "last_name": _maybe("Lovelace", ""),
    "locale": _maybe("fr", "en-GB", "gold"),
    "timezone": _maybe("Europe/Paris"),
}
PREFIXES = _maybe("gold", "silver", "Gold", "")
PUSH_TOKENS = st.sampled_from([[], ["tok-1"], ["tok-1", "tok-2"]])
SOURCE_SETS = st.sets(st.sampled_from(sorted(USER_SOURCES)), max_size=2)


@st.composite
def contact_rows(draw, index: int) -> dict:
    prefix = draw(PREFIXES)
    return {
        "id": CONTACT_POOL[index],
        "user_id": USER,
        "email": None if prefix is None else f"{prefix}{index}@example.com",
        "external_id": None if prefix is None else f"{prefix}-{index}",
        **{column: draw(values) for column, values in TEXT_VALUES.items()},
        "push_tokens": draw(PUSH_TOKENS),
        "attributes": draw(ATTRIBUTES),
        **{f"consent_{channel}": draw(booleans) for channel in CHANNEL_TYPES},
        "created_at": draw(st.sampled_from(CREATED)),
        "sources": draw(SOURCE_SETS),
    }


# Exactly on the 7- and 30-day boundaries, and either side of them.
MOMENTS = [NOW - timedelta(days=d, seconds=s) for d in (0, 6, 7, 29, 30, 100) for s in (-1, 0, 1)]


def events():
    return st.fixed_dictionaries(
        {
            "data_source_id": st.sampled_from([SOURCE_A, SOURCE_B, FOREIGN_SOURCE]),
            "event_type": st.sampled_from(["order", "view"]),
            "payload": PAYLOADS,
            "occurred_at": st.sampled_from(MOMENTS),
        }
    )


EVENTS = events()


@st.composite
def worlds(draw) -> dict:
    count = draw(st.integers(0, 30))
    people = [draw(contact_rows(i)) for i in range(count)]
    event_rows = []
    for person in [*people, None]:
        own = draw(st.lists(EVENTS, max_size=2))
        if own:
            # Repeats of one event at other times, so counts of 2 and 3 happen.
            repeats = draw(st.lists(st.sampled_from(MOMENTS), max_size=3))
            own += [{**own[0], "occurred_at": moment} for moment in repeats]
        for event in own:
            event_rows.append({**event, "contact_id": person and person["id"]})
    suppressed = {}
    for person in people:
        for channel, address in _addresses(person).items():
            if address and draw(st.integers(0, 4)) == 0:
                # Email suppressions match whatever the case, even when one address is
                # suppressed twice in two cases.
                spellings = [address]
                if channel == "email":
                    spellings = draw(
                        st.sampled_from([[address.upper()], [address.upper(), address]])
                    )
                for stored in spellings:
                    suppressed[channel, stored] = {"channel": channel, "address": stored}
    return {"contacts": people, "events": event_rows, "suppressions": list(suppressed.values())}


def _addresses(person: dict) -> dict[str, str | None]:
    return {
        "email": person["email"],
        "sms": person["phone"],
        "whatsapp": person["whatsapp"],
        "push": str(person["id"]),
    }


def seen_values(world: dict) -> dict[str, dict[str, list]]:
    """The scalars really present in the world, by place (attributes, payload, columns)
    and JSON type, so operands often equal a stored value (a pool of constants alone
    makes equality almost never true)."""
    found: dict[str, dict[str, set]] = {
        place: {"string": set(), "number": set(), "boolean": set()}
        for place in ("attributes", "elements", "payload", "columns")
    }

    def visit(value, place: str) -> None:
        if isinstance(value, dict):
            for item in value.values():
                visit(item, place)
        elif isinstance(value, list):
            for item in value:
                visit(item, "elements" if place == "attributes" else place)
        elif value is not None:
            found[place][json_type(value)].add(value)

    for person in world["contacts"]:
        visit(person["attributes"], "attributes")
        visit([person[c] for c in TEXT_COLUMNS], "columns")
    for event in world["events"]:
        visit(event["payload"], "payload")
    return {
        place: {kind: sorted(values, key=repr) for kind, values in kinds.items()}
        for place, kinds in found.items()
    }


def operands(seen: list, fallback):
    return st.sampled_from(seen) | fallback if seen else fallback


def comparisons(fields: list[str], seen: dict[str, list], *, text_only: bool = False):
    """Conditions on `fields`, operands drawn from `seen` (values of one place) or pools."""
    texts = operands(seen["string"], strings)
    if text_only:
        value = texts
        lists = st.lists(texts, min_size=1, max_size=3)
    else:
        nums = operands(seen["number"], numbers)
        value = texts | nums | booleans
        lists = (
            st.lists(texts, min_size=1, max_size=3)
            | st.lists(nums, min_size=1, max_size=3)
            | st.lists(booleans, min_size=1, max_size=3)
        )
    field = st.sampled_from(fields)

    def condition(ops, values):
        return st.builds(
            lambda f, o, v: {"field": f, "op": o, "value": v}, field, st.sampled_from(ops), values
        )

    options = [
        condition(["eq", "ne", "contains"], value),
        condition(["in", "not_in"], lists),
        condition(["exists"], booleans),
    ]
    if not text_only:
        options.append(condition(["gt", "gte", "lt", "lte"], operands(seen["number"], numbers)))
    return st.one_of(options)


def event_conditions(seen: dict[str, dict[str, list]]):
    @st.composite
    def build(draw) -> dict:
        node: dict = {"event": draw(st.sampled_from(["order", "view", "never"]))}
        where = draw(st.lists(comparisons(PAYLOAD_KEYS, seen["payload"]), max_size=2))
        if where:
            node["where"] = where
        within = draw(st.sampled_from([None, 7, 30]))
        if within:
            node["within_days"] = within
        shape = draw(st.sampled_from(["plain", "min", "max", "range", "not_performed"]))
        if shape == "min":
            node["min_count"] = draw(st.integers(0, 3))
        elif shape == "max":
            node["max_count"] = draw(st.integers(0, 2))
        elif shape == "range":
            low = draw(st.integers(0, 2))
            node["min_count"], node["max_count"] = low, low + draw(st.integers(0, 2))
        elif shape == "not_performed":
            node["performed"] = False
        return node

    return build()


def other_leaves():
    return [
        st.builds(
            lambda op, moment: {"field": "created_at", "op": op, "value": moment.isoformat()},
            st.sampled_from(["gt", "gte", "lt", "lte"]),
            st.sampled_from(CREATED),
        ),
        st.builds(lambda c: {"consent": c}, st.sampled_from(CHANNEL_TYPES)),
        st.builds(lambda s: {"source_id": str(s)}, st.sampled_from([SOURCE_A, SOURCE_B])),
        st.builds(
            lambda ids: {"contact_ids": [str(i) for i in ids]},
            st.lists(st.sampled_from([*CONTACT_POOL[:12], uuid.UUID(int=7)]), max_size=4),
        ),
    ]


def leaves(seen: dict[str, dict[str, list]]):
    return st.one_of(
        comparisons(CONTACT_FIELDS, seen["attributes"]),
        comparisons(TEXT_COLUMNS, seen["columns"], text_only=True),
        event_conditions(seen),
        *other_leaves(),
    )


def definitions(seen: dict[str, dict[str, list]], depth: int = 0):
    """A definition at most 5 levels deep; `not` drawn as often as `all` and `any`."""

    @st.composite
    def build(draw) -> dict:
        kind = draw(st.sampled_from(["leaf", "all", "any", "not"] if depth < 4 else ["leaf"]))
        if kind == "leaf":
            return draw(leaves(seen))
        if kind == "not":
            return {"not": draw(definitions(seen, depth + 1))}
        return {kind: draw(st.lists(definitions(seen, depth + 1), max_size=3))}

    return build()


@st.composite
def scenarios(draw) -> tuple[dict, list[dict]]:
    """A world, one flat definition with a leaf of every kind (each leaf is probed on
    its own, so every example checks every kind), and a few nested definitions."""
    world = draw(worlds())
    seen = seen_values(world)
    every_kind = [
        *(draw(comparisons(CONTACT_FIELDS, seen["attributes"])) for _ in range(4)),
        draw(comparisons(TEXT_COLUMNS, seen["columns"], text_only=True)),
        *(draw(other) for other in other_leaves()),
        *(draw(event_conditions(seen)) for _ in range(3)),
    ]
    every_kind.extend(draw(targeted(seen)))
    nested = draw(st.lists(definitions(seen), min_size=1, max_size=3))
    return world, [{"any": every_kind}, *nested]


@st.composite
def targeted(draw, seen: dict[str, dict[str, list]]) -> list[dict]:
    """Conditions aimed at values the world holds, for the cases random operands rarely
    reach: array membership, substrings, and event filters that keep some events."""
    found = []
    elements = [v for values in seen["elements"].values() for v in values]
    if elements:
        field = draw(st.sampled_from(["attributes.tags", "attributes.nested.tags"]))
        found.append({"field": field, "op": "contains", "value": draw(st.sampled_from(elements))})
    texts = seen["attributes"]["string"] + seen["elements"]["string"]
    if texts:
        text = draw(st.sampled_from(texts))
        start = draw(st.integers(0, len(text)))
        part = text[start : draw(st.integers(start, len(text)))]
        field = draw(st.sampled_from(["attributes.tier", "attributes.tags"]))
        found.append({"field": field, "op": "contains", "value": part})
    for key, kind, ops in (("sku", "string", ["eq", "ne"]), ("value", "number", ORDERING)):
        if seen["payload"][kind]:
            where = {
                "field": key,
                "op": draw(st.sampled_from(ops)),
                "value": draw(st.sampled_from(seen["payload"][kind])),
            }
            found.append(
                {
                    "event": draw(st.sampled_from(["order", "view"])),
                    "where": [where],
                    **draw(st.sampled_from([{}, {"min_count": 2}, {"max_count": 1}])),
                }
            )
    return found


# -- the two databases ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_engine(migrated_database):
    engine = create_engine(migrated_database)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def sqlite_engine(tmp_path_factory):
    from alembic import command
    from alembic.config import Config

    url = f"sqlite:///{tmp_path_factory.mktemp('audiences') / 'herald.db'}"
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")
    engine = create_engine(url)
    yield engine
    engine.dispose()


def _write_world(conn, world: dict) -> None:
    conn.execute(
        insert(User.__table__),
        [
            {"id": USER, "email": "owner@example.com", "password_hash": "x"},
            {"id": OTHER_USER, "email": "other@example.com", "password_hash": "x"},
        ],
    )
    conn.execute(
        insert(DataSource.__table__),
        [
            {"id": SOURCE_A, "user_id": USER, "name": "a", "source_type": "gtm"},
            {"id": SOURCE_B, "user_id": USER, "name": "b", "source_type": "shopify"},
            {"id": FOREIGN_SOURCE, "user_id": OTHER_USER, "name": "f", "source_type": "gtm"},
        ],
    )
    people = world["contacts"]
    if people:
        conn.execute(
            insert(contacts), [{k: v for k, v in p.items() if k != "sources"} for p in people]
        )
        links = [
            {"data_source_id": s, "contact_id": p["id"], "external_id": f"{p['id']}"}
            for p in people
            for s in p["sources"]
        ]
        if links:
            conn.execute(insert(ContactSource.__table__), links)
    if world["events"]:
        conn.execute(
            insert(DataEvent.__table__), [{"id": uuid.uuid4(), **e} for e in world["events"]]
        )
    if world["suppressions"]:
        conn.execute(
            insert(Suppression.__table__),
            [
                {"id": uuid.uuid4(), "user_id": USER, "reason": "manual", **s}
                for s in world["suppressions"]
            ],
        )


def _records(world: dict) -> tuple[list[ContactRecord], list[EventRecord]]:
    people = [
        ContactRecord(
            id=p["id"],
            columns={k: p[k] for k in (*TEXT_COLUMNS, "phone", "whatsapp", "created_at")},
            attributes=p["attributes"],
            consent={c: p[f"consent_{c}"] for c in CHANNEL_TYPES},
            source_ids=set(p["sources"]),
        )
        for p in world["contacts"]
    ]
    happened = [EventRecord(**e) for e in world["events"]]
    return people, happened


def _expected_recipients(world: dict, members: set[uuid.UUID], channel: str) -> set:
    blocked = {
        (s["address"].lower() if channel == "email" else s["address"])
        for s in world["suppressions"]
        if s["channel"] == channel
    }
    found = set()
    for person in world["contacts"]:
        address = _addresses(person)[channel]
        has_address = bool(person["push_tokens"]) if channel == "push" else bool(address)
        key = address.lower() if channel == "email" and address else address
        if (
            person["id"] in members
            and person[f"consent_{channel}"]
            and has_address
            and key not in blocked
        ):
            found.add((person["id"], address))
    return found


def _probes(raw_definitions: list[dict]) -> list[dict]:
    """Every sub-condition of the definitions, and its negation: a leaf compiled to a
    NULL would leave a contact out of both, which the reference never does."""
    found: dict[str, dict] = {}

    def visit(node: dict) -> None:
        for probe in (node, {"not": node}):
            found.setdefault(json.dumps(probe, sort_keys=True), probe)
        for kind in ("all", "any"):
            for child in node.get(kind, ()):
                visit(child)
        if "not" in node:
            visit(node["not"])

    for raw in raw_definitions:
        visit(raw)
    return list(found.values())


def _explain(world: dict, contact_ids: set[uuid.UUID]) -> str:
    """The contacts (and their events) SQL and the reference disagree on."""
    disputed = [
        {**p, "events": [e for e in world["events"] if e["contact_id"] == p["id"]]}
        for p in world["contacts"]
        if p["id"] in contact_ids
    ]
    return json.dumps(disputed, default=str, indent=1)


def _check(engine, world: dict, raw_definitions: list[dict]) -> None:
    people, happened = _records(world)

    def reference(node) -> set[uuid.UUID]:
        return matching_ids(node, people, happened, user_source_ids=USER_SOURCES, now=NOW)

    probes = [parse_definition(p) for p in _probes(raw_definitions)]
    audiences = [parse_definition(raw) for raw in raw_definitions]
    dialect = engine.dialect.name
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            _write_world(conn, world)
            # Every probe's value for every contact, in one statement.
            compiler = AudienceCompiler(dialect, USER, NOW)
            columns = [compiler.predicate(p).label(f"p{i}") for i, p in enumerate(probes)]
            rows = conn.execute(
                select(contacts.c.id, *columns)
                .select_from(compiler.from_clause())
                .where(contacts.c.user_id == USER)
            ).all()
            assert len(rows) == len(people)
            for index, probe in enumerate(probes, start=1):
                assert all(row[index] is not None for row in rows), probe
                got, want = {row[0] for row in rows if row[index]}, reference(probe)
                assert got == want, f"{probe}\n{_explain(world, got ^ want)}"
                if isinstance(probe, EventCondition):
                    # Alone, so its own time window bounds the scan of data_events.
                    alone = AudienceCompiler(dialect, USER, NOW).count_select(probe)
                    assert conn.scalar(alone) == len(want), probe

            # Only windowed event conditions in one statement: the scan is bounded by the
            # longest window, and each count by its own.
            windowed = [
                p for p in probes if isinstance(p, EventCondition) and p.within_days is not None
            ]
            if len({p.within_days for p in windowed}) > 1:
                together = AnyOf(tuple(windowed))
                count = AudienceCompiler(dialect, USER, NOW).count_select(together)
                assert conn.scalar(count) == len(reference(together))

            expected = [reference(node) for node in audiences]
            for node, want in zip(audiences, expected, strict=True):
                count = AudienceCompiler(dialect, USER, NOW).count_select(node)
                assert conn.scalar(count) == len(want), node
            union = set().union(*expected)
            counts = conn.execute(recipient_counts_query(dialect, USER, audiences, now=NOW)).one()
            assert counts.total == len(union)
            for channel in CHANNEL_TYPES:
                query = recipients_query(dialect, USER, audiences, channel, now=NOW)
                rows = conn.execute(query).all()
                assert len(rows) == len({r.contact_id for r in rows})  # each contact once
                want = _expected_recipients(world, union, channel)
                assert {(r.contact_id, r.address) for r in rows} == want, channel
                assert getattr(counts, channel) == len(want)
        finally:
            transaction.rollback()


PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _plain_contact(index: int, attributes: dict) -> dict:
    return {
        "id": CONTACT_POOL[index],
        "user_id": USER,
        **{column: None for column in (*TEXT_COLUMNS, "phone", "whatsapp", "last_name")},
        "timezone": None,
        "push_tokens": [],
        "attributes": attributes,
        **{f"consent_{channel}": False for channel in CHANNEL_TYPES},
        "created_at": CREATED[0],
        "sources": set(),
    }


# Type confusions a random search reaches rarely: true vs 1 vs "1" (SQLite's JSON
# functions hand booleans back as 1/0), arrays inside arrays, null, a path through an
# array, and -0.0 vs 0.
TYPE_CONFUSION = (
    {
        "contacts": [
            _plain_contact(index, attributes)
            for index, attributes in enumerate(
                [
                    {"tier": 1, "tags": [1, "x"], "score": True},
                    {"tier": True, "tags": [True, 0], "score": 1},
                    {"tier": "1", "tags": ["1", [1]], "score": "1", "nested": {"tags": [False]}},
                    {"tier": None, "tags": None, "score": -0.0},
                    {},
                    {"tags": [[True]], "score": 1.0, "nested": [{"tier": 1}]},
                    {"tags": "x1y", "nested": {"tier": 0, "score": [1]}},
                ]
            )
        ],
        "events": [],
        "suppressions": [],
    },
    [
        {
            "any": [
                {"field": field, "op": op, "value": value}
                for field, op, value in [
                    ("attributes.tags", "contains", True),
                    ("attributes.tags", "contains", False),
                    ("attributes.tags", "contains", 1),
                    ("attributes.tags", "contains", 0),
                    ("attributes.tags", "contains", "1"),
                    ("attributes.nested.tags", "contains", False),
                    ("attributes.tier", "eq", True),
                    ("attributes.tier", "eq", 1),
                    ("attributes.tier", "eq", "1"),
                    ("attributes.tier", "ne", True),
                    ("attributes.tier", "ne", 1),
                    ("attributes.tier", "in", [True]),
                    ("attributes.tier", "not_in", [1, 2]),
                    ("attributes.score", "in", [1]),
                    ("attributes.score", "not_in", ["1"]),
                    ("attributes.score", "eq", 0),
                    ("attributes.score", "gt", 0),
                    ("attributes.score", "lte", 0),
                    ("attributes.tier", "lt", 2),
                    ("attributes.tier", "exists", True),
                    ("attributes.nested.tier", "eq", 1),
                    ("attributes.nested.tier", "exists", True),
                    ("attributes.nested.score", "contains", 1),
                    ("attributes.tags", "contains", "x"),
                ]
            ]
        }
    ],
)


@PROPERTY
@given(scenario=scenarios())
@example(scenario=TYPE_CONFUSION)
def test_postgresql_matches_the_reference(pg_engine, scenario):
    _check(pg_engine, *scenario)


@settings(PROPERTY, max_examples=80)
@given(scenario=scenarios())
@example(scenario=TYPE_CONFUSION)
def test_sqlite_matches_the_reference(sqlite_engine, scenario):
    _check(sqlite_engine, *scenario)

"""Message templates: sandboxed Jinja2 that is checked when written, not when sent.

A template may use exactly these variables:

- `contact`: id, external_id, email, phone, whatsapp, push_tokens, first_name,
  last_name, timezone, locale, created_at, updated_at, `consent.<channel>` (email, sms,
  push, whatsapp) and `attributes.<any key>`;
- `campaign`: id, name, description;
- `unsubscribe_url`: filled by the dispatch engine (empty in previews).

Writing a template with a syntax error, an unknown variable, an unknown contact or
campaign field, or an access to a private attribute ("__class__") fails at once with a
message per template field. What a static check cannot see (an `attr` filter given a
computed name, say) is still stopped by the sandbox when rendering.

Rendering is strict about the schema and lenient about the data: an unknown field
raises (StrictUndefined), but a contact that simply lacks an attribute renders it as
empty (and falsy, so `{% if contact.attributes.vip %}` works), and a missing value
(first_name is null) renders as "", never "None". So one contact's sparse data never
breaks a send.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

from jinja2 import ChainableUndefined, StrictUndefined, Template, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import escape

from engine.errors import ValidationFailed
from engine.models.enums import CHANNEL_TYPES

TEMPLATE_VARIABLES = frozenset({"contact", "campaign", "unsubscribe_url"})

# Contact columns a template may read as they are. Spelled out rather than derived from
# the model, so a column added later (an internal flag, a hash) is not exposed to every
# template by accident; tests/test_templates.py checks each column is listed or hidden.
CONTACT_SCALAR_FIELDS = (
    "id",
    "external_id",
    "email",
    "phone",
    "whatsapp",
    "push_tokens",
    "first_name",
    "last_name",
    "timezone",
    "locale",
    "created_at",
    "updated_at",
)
CONTACT_FIELDS = frozenset({*CONTACT_SCALAR_FIELDS, "attributes", "consent"})
CONSENT_FIELDS = frozenset(CHANNEL_TYPES)
CAMPAIGN_FIELDS = frozenset({"id", "name", "description"})

# The fields each checked record offers; attributes are free-form, so not listed.
_KNOWN_FIELDS = {
    "contact": CONTACT_FIELDS,
    "contact.consent": CONSENT_FIELDS,
    "campaign": CAMPAIGN_FIELDS,
}
# Filters whose string arguments name attributes to read (attr, map(attribute=...), …).
_ATTRIBUTE_FILTERS = frozenset(
    {"attr", "map", "selectattr", "rejectattr", "sort", "groupby", "sum", "unique", "min", "max"}
)


class TemplateRenderError(ValidationFailed):
    """A template that passed its checks still failed for one contact (e.g. a method
    called on a missing value); `field` says which template."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(
            f"template {field} could not be rendered", fields={f"config.{field}": [problem]}
        )
        self.field = field
        self.problem = problem


class _Record(dict):
    """A context mapping that templates read by key only, never by Python attribute.

    So `contact.attributes.items` means the attribute called "items", not dict.items,
    and a template cannot reach any method through the records it is given.
    """

    lenient = False


class _FreeForm(_Record):
    """contact.attributes (and objects nested in it): a missing key is empty, not an
    error, since attributes differ from contact to contact."""

    lenient = True


def _missing(_value: Any) -> Any:
    # None would print as "None"; a missing value should print as nothing.
    return "" if _value is None else _value


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox (no private attributes, no mutation of the context) plus key-only
    lookup on our records."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, _Record):
            return self._lookup(obj, attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, _Record):
            return self._lookup(obj, argument)
        return super().getitem(obj, argument)

    def _lookup(self, record: _Record, key: Any) -> Any:
        if key in record:
            return record[key]
        if record.lenient:
            return ChainableUndefined(name=str(key))
        return self.undefined(obj=record, name=str(key))


def _environment(*, html: bool) -> _Sandbox:
    return _Sandbox(
        undefined=StrictUndefined,
        autoescape=html,
        finalize=_missing,
        auto_reload=False,
        cache_size=0,
    )


_TEXT = _environment(html=False)
_HTML = _environment(html=True)  # email html only: contact data is escaped into markup


def template_problems(source: str, *, html: bool = False) -> list[str]:
    """Everything wrong with a template, as messages; [] means it may be stored."""
    env = _HTML if html else _TEXT
    try:
        tree = env.parse(source)
        # Walking the tree for names also resolves filters and tests, so an unknown
        # filter surfaces here as a TemplateAssertionError (a syntax error subclass).
        undeclared = meta.find_undeclared_variables(tree)
    except TemplateSyntaxError as exc:
        return [f"syntax error at line {exc.lineno}: {exc.message}"]
    problems = [f"unknown variable '{name}'" for name in sorted(undeclared - TEMPLATE_VARIABLES)]
    problems.extend(_lookup_problems(tree))
    problems.extend(_construct_problems(env, tree))
    return list(dict.fromkeys(problems))


def _construct_problems(env: _Sandbox, tree: nodes.Template) -> Iterable[str]:
    # Jinja defers filters and tests used in conditions to render time, and a template
    # has no loader to include others from; both would otherwise fail only when sending.
    for node in tree.find_all(nodes.Filter):
        if node.name not in env.filters:
            yield f"line {node.lineno}: no filter named '{node.name}'"
    for node in tree.find_all(nodes.Test):
        if node.name not in env.tests:
            yield f"line {node.lineno}: no test named '{node.name}'"
    for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        yield f"line {node.lineno}: a template cannot extend, include or import another"


def _lookup_problems(tree: nodes.Template) -> Iterable[str]:
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        key = _constant_key(node)
        if key is not None and key.startswith("_"):
            yield f"line {node.lineno}: access to '{key}' is not allowed"
            continue
        record = _record_path(node.node)
        if record is None:
            continue
        if key is None:
            yield f"line {node.lineno}: '{record}' fields must be named, not computed"
        elif key not in _KNOWN_FIELDS[record]:
            yield f"unknown variable '{record}.{key}'"
    for node in tree.find_all(nodes.Filter):
        if node.name not in _ATTRIBUTE_FILTERS:
            continue
        named = [*node.args, *(kw.value for kw in node.kwargs)]
        for arg in named:
            if isinstance(arg, nodes.Const) and isinstance(arg.value, str):
                if arg.value.startswith("_") or "._" in arg.value:
                    yield f"line {node.lineno}: access to '{arg.value}' is not allowed"
            elif node.name == "attr":
                yield f"line {node.lineno}: the attr filter needs a literal name"


def _constant_key(node: nodes.Getattr | nodes.Getitem) -> str | None:
    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value
    return None


def _record_path(node: nodes.Node) -> str | None:
    """'contact', 'campaign' or 'contact.consent' when `node` denotes that record."""
    if isinstance(node, nodes.Name) and node.ctx == "load" and node.name in _KNOWN_FIELDS:
        return node.name
    if (
        isinstance(node, nodes.Getattr | nodes.Getitem)
        and _constant_key(node) == "consent"
        and _record_path(node.node) == "contact"
    ):
        return "contact.consent"
    return None


@lru_cache(maxsize=32)
def compile_template(source: str, *, html: bool = False) -> Template:
    """Compile once; the Template then renders any number of contacts.

    Cached per process: the sender compiles its channel once per batch of a few hundred
    messages, and compiling a template costs as much as rendering dozens. A Template is
    immutable and renders from any thread. Few entries: a worker serves few campaigns
    at a time, and an HTML email's compiled code is not small."""
    return (_HTML if html else _TEXT).from_string(source)


@lru_cache(maxsize=32)
def uses_unsubscribe_url(source: str) -> bool:
    """Whether the template shows the unsubscribe link (so the sender must sign one)."""
    return "unsubscribe_url" in meta.find_undeclared_variables(_TEXT.parse(source))


def render_template(template: Template, context: Mapping[str, Any], field: str) -> str:
    try:
        return template.render(context)
    except Exception as exc:  # a template is user code: any failure is that template's
        raise TemplateRenderError(field, f"{type(exc).__name__}: {exc}") from exc


def _free_form(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _FreeForm({str(k): _free_form(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_free_form(item) for item in value]
    return value


def contact_context(contact: Any) -> _Record:
    """What `contact` means in a template; takes a Contact or any row with its columns."""
    record = _Record({name: getattr(contact, name) for name in CONTACT_SCALAR_FIELDS})
    record["id"] = str(contact.id)
    record["push_tokens"] = list(contact.push_tokens or [])
    record["attributes"] = _free_form(contact.attributes or {})
    record["consent"] = _Record(
        {channel: bool(getattr(contact, f"consent_{channel}")) for channel in CONSENT_FIELDS}
    )
    return record


def campaign_context(campaign: Any) -> _Record:
    return _Record(id=str(campaign.id), name=campaign.name, description=campaign.description)


# -- the fast path ------------------------------------------------------------------------

# A part of a PlainTemplate: literal text, or a lookup of (contact, campaign, unsubscribe_url).
Lookup = Callable[[Any, Mapping[str, Any], str], Any]


class PlainTemplate:
    """A template made only of literal text and plain field lookups, rendered without Jinja.

    Most message templates are "Hi {{ contact.first_name }}": Jinja spends ~25 µs on each
    render of that (a context, a generator, the sandbox's lookups), this about 1 µs,
    which matters at tens of thousands of messages a second. `plain_template` builds one
    only when its output is the same as Jinja's by construction: the literal text is the
    parser's own (whitespace control and newline handling applied), each lookup returns
    what the sandbox would return from contact_context / campaign_context, and the value
    goes through the same finalize (None → "") and the same conversion (str, or
    markupsafe.escape for HTML). tests/test_templates.py renders both ways and compares.

    `columns` are the contact columns it reads, so a sender can fetch only those.
    """

    __slots__ = ("columns", "html", "parts")

    def __init__(self, parts: tuple[str | Lookup, ...], html: bool, columns: frozenset[str]):
        self.parts = parts
        self.html = html
        self.columns = columns

    def render(self, contact: Any, campaign: Mapping[str, Any], unsubscribe_url: str) -> str:
        convert = escape if self.html else str
        out = []
        for part in self.parts:
            if part.__class__ is str:
                out.append(part)
            else:
                value = part(contact, campaign, unsubscribe_url)
                out.append(convert("" if value is None else value))
        return "".join(out)


def _contact_value(name: str) -> Lookup:
    # The values contact_context gives each scalar field.
    if name == "id":
        return lambda contact, _campaign, _url: str(contact.id)
    if name == "push_tokens":
        return lambda contact, _campaign, _url: list(contact.push_tokens or [])
    return lambda contact, _campaign, _url: getattr(contact, name)


def _attribute_value(key: str) -> Lookup:
    def value(contact: Any, _campaign: Any, _url: str) -> Any:
        attributes = contact.attributes or {}
        if key in attributes:
            return _free_form(attributes[key])
        # contact_context keys attributes by str(key); JSON keys are strings already, so
        # this is only a miss (ChainableUndefined, which renders as "").
        for stored, item in attributes.items():
            if str(stored) == key:
                return _free_form(item)
        return ""

    return value


def _lookup_part(node: nodes.Node) -> tuple[Lookup, frozenset[str]] | None:
    """The lookup for one {{ … }} expression and the contact columns it reads, or None
    when the expression is anything but a plain, known field."""
    if isinstance(node, nodes.Name) and node.name == "unsubscribe_url":
        return (lambda _contact, _campaign, url: url), frozenset()
    if not isinstance(node, nodes.Getattr | nodes.Getitem):
        return None
    key = _constant_key(node)
    if key is None:
        return None
    record = node.node
    if isinstance(record, nodes.Name):
        if record.name == "campaign" and key in CAMPAIGN_FIELDS:
            return (lambda _contact, campaign, _url: campaign[key]), frozenset()
        if record.name == "contact" and key in CONTACT_SCALAR_FIELDS:
            return _contact_value(key), frozenset({key})
        return None
    if not isinstance(record, nodes.Getattr | nodes.Getitem):
        return None
    inner = _constant_key(record)
    if not (isinstance(record.node, nodes.Name) and record.node.name == "contact"):
        return None
    if inner == "consent" and key in CONSENT_FIELDS:
        column = f"consent_{key}"
        return (lambda contact, _c, _u: bool(getattr(contact, column))), frozenset({column})
    if inner == "attributes" and not key.startswith("_"):
        return _attribute_value(key), frozenset({"attributes"})
    return None


@lru_cache(maxsize=32)
def plain_template(source: str, *, html: bool = False) -> PlainTemplate | None:
    """The template's fast path, or None when it needs Jinja (see PlainTemplate)."""
    try:
        tree = (_HTML if html else _TEXT).parse(source)
    except TemplateSyntaxError:
        return None
    parts: list[str | Lookup] = []
    columns: set[str] = set()
    for statement in tree.body:
        if not isinstance(statement, nodes.Output):
            return None
        for node in statement.nodes:
            if isinstance(node, nodes.TemplateData):
                parts.append(node.data)
                continue
            found = _lookup_part(node)
            if found is None:
                return None
            lookup, read = found
            parts.append(lookup)
            columns |= read
    return PlainTemplate(tuple(parts), html, frozenset(columns))

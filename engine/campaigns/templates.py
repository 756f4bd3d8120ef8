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

from collections.abc import Iterable, Mapping
from typing import Any

from jinja2 import ChainableUndefined, StrictUndefined, Template, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


def compile_template(source: str, *, html: bool = False) -> Template:
    """Compile once; the Template then renders any number of contacts."""
    return (_HTML if html else _TEXT).from_string(source)


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

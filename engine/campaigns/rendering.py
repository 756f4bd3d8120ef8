"""A channel's message for one contact: its config with every template rendered.

The dispatch engine renders the same channel for many contacts, so a channel is
compiled once (one Template per template field) and each contact then costs only the
renders. Templates that are plain text and field lookups (most of them) render through
their PlainTemplate fast path, without Jinja and without building the contact's whole
template context; the others through Jinja as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jinja2 import Template

from engine.campaigns.channel_config import TemplateField, template_fields
from engine.campaigns.templates import (
    CONSENT_FIELDS,
    CONTACT_SCALAR_FIELDS,
    PlainTemplate,
    TemplateRenderError,
    campaign_context,
    compile_template,
    contact_context,
    plain_template,
    render_template,
    uses_unsubscribe_url,
)

if TYPE_CHECKING:
    from engine.tracking.links import Tracking

# Every contact column a template can read through contact_context.
ALL_CONTACT_COLUMNS = frozenset(
    {*CONTACT_SCALAR_FIELDS, "attributes", *(f"consent_{c}" for c in CONSENT_FIELDS)}
)


@dataclass(frozen=True)
class CompiledChannel:
    channel_type: str
    config: dict[str, Any]
    templates: tuple[tuple[TemplateField, Template], ...]
    campaign: dict[str, Any]
    # Per template, its fast path, or None where Jinja is needed.
    plain: tuple[PlainTemplate | None, ...] = ()
    # The contact columns render() reads: a sender may fetch only these.
    contact_columns: frozenset[str] = ALL_CONTACT_COLUMNS
    # Whether any template shows {{ unsubscribe_url }}.
    shows_unsubscribe_url: bool = True
    # Containers of the config that hold templates (("template", "parameters"), …):
    # render() copies these, and only these, before writing rendered text into them.
    _containers: tuple[tuple[str | int, ...], ...] = field(default=(), repr=False)
    # Link and open tracking (engine.tracking.links): the templates compiled are its
    # marked config, and each rendered message goes through tracking.fill. None for
    # previews and test sends, which have no delivery to track.
    tracking: Tracking | None = None

    @classmethod
    def compile(
        cls,
        channel_type: str,
        config: dict[str, Any],
        campaign: Any,
        *,
        tracking: Tracking | None = None,
    ) -> CompiledChannel:
        if tracking is not None:
            config = tracking.config
        fields = tuple(template_fields(channel_type, config))
        plain = tuple(plain_template(f.source, html=f.html) for f in fields)
        if all(p is not None for p in plain):
            columns = frozenset().union(*(p.columns for p in plain if p is not None))
        else:
            columns = ALL_CONTACT_COLUMNS  # contact_context reads every column
        containers = {f.path[:end] for f in fields for end in range(1, len(f.path))}
        return cls(
            channel_type,
            config,
            tuple((f, compile_template(f.source, html=f.html)) for f in fields),
            campaign_context(campaign),
            plain,
            columns,
            any(uses_unsubscribe_url(f.source) for f in fields),
            tuple(sorted(containers, key=len)),
            tracking,
        )

    def render(self, contact: Any, *, unsubscribe_url: str = "") -> dict[str, Any]:
        """The config as sent to `contact` (a Contact or a row with its columns, at least
        `contact_columns`).

        Raises TemplateRenderError naming the field if a template fails for this
        contact; the caller decides whether that fails one message or a preview.

        The message shares the config's untemplated nested values (a push `data`
        object, say) instead of deep-copying them for every contact: it is read, never
        written, by the providers.
        """
        message = dict(self.config)
        for path in self._containers:
            parent = _at(message, path[:-1])
            parent[path[-1]] = _copy(parent[path[-1]])
        context = None
        plain = self.plain or (None,) * len(self.templates)
        for (template_field, template), fast in zip(self.templates, plain, strict=True):
            if fast is not None:
                try:
                    text = fast.render(contact, self.campaign, unsubscribe_url)
                except Exception as exc:  # as render_template: any failure is the template's
                    raise TemplateRenderError(
                        template_field.name, f"{type(exc).__name__}: {exc}"
                    ) from exc
            else:
                if context is None:
                    context = {
                        "contact": contact_context(contact),
                        "campaign": self.campaign,
                        "unsubscribe_url": unsubscribe_url,
                    }
                text = render_template(template, context, template_field.name)
            path = template_field.path
            _at(message, path[:-1])[path[-1]] = text
        return message


def _at(document: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        document = document[part]
    return document


def _copy(container: Any) -> Any:
    return list(container) if isinstance(container, list) else dict(container)

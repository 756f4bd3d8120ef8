"""A channel's message for one contact: its config with every template rendered.

The dispatch engine renders the same channel for many contacts, so a channel is
compiled once (one Template per template field) and each contact then costs only a
context build and the renders.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from jinja2 import Template

from engine.campaigns.channel_config import TemplateField, template_fields
from engine.campaigns.templates import (
    campaign_context,
    compile_template,
    contact_context,
    render_template,
)


@dataclass(frozen=True)
class CompiledChannel:
    channel_type: str
    config: dict[str, Any]
    templates: tuple[tuple[TemplateField, Template], ...]
    campaign: dict[str, Any]

    @classmethod
    def compile(cls, channel_type: str, config: dict[str, Any], campaign: Any) -> CompiledChannel:
        fields = tuple(
            (field, compile_template(field.source, html=field.html))
            for field in template_fields(channel_type, config)
        )
        return cls(channel_type, config, fields, campaign_context(campaign))

    def render(self, contact: Any, *, unsubscribe_url: str = "") -> dict[str, Any]:
        """The config as sent to `contact` (a Contact or a row with its columns).

        Raises TemplateRenderError naming the field if a template fails for this
        contact; the caller decides whether that fails one message or a preview.
        """
        context = {
            "contact": contact_context(contact),
            "campaign": self.campaign,
            "unsubscribe_url": unsubscribe_url,
        }
        message = copy.deepcopy(self.config)
        for field, template in self.templates:
            _assign(message, field.path, render_template(template, context, field.name))
        return message


def _assign(document: Any, path: tuple[str | int, ...], value: str) -> None:
    for part in path[:-1]:
        document = document[part]
    document[path[-1]] = value

"""A channel's `config`, validated per channel type, templates included.

| type     | keys                                                                    |
|----------|-------------------------------------------------------------------------|
| email    | subject*, html and/or text*, from_email, from_name, reply_to            |
| sms      | body*, sender                                                           |
| push     | title*, body*, data (object of strings), image_url, url (http/https)    |
| whatsapp | exactly one of template {name*, language*, parameters} or body          |
| (all)    | utm {source, medium, campaign}: appended to tracked links' destinations |

(* required.) Template fields (email subject/html/text, sms body, push title/body,
whatsapp body and each template parameter) are checked as templates when written.
Unknown keys are refused; nulls count as absent and are not stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from engine.campaigns.checks import (
    Problems,
    check_string,
    is_email,
    is_http_url,
    is_object,
    reject_unknown_keys,
)
from engine.campaigns.templates import template_problems
from engine.tracking.links import utm_problems

WHATSAPP_SESSION_WARNING = (
    "a free-form WhatsApp body only reaches contacts who wrote to you in the last 24 hours; "
    "use an approved template to reach everyone else"
)

SUBJECT_MAX = 998  # RFC 5322's line limit, the longest subject a mail server must accept
EMAIL_BODY_MAX = 512 * 1024
NAME_MAX = 255
SMS_BODY_MAX = 1600  # ten concatenated segments
PUSH_TITLE_MAX = 250
PUSH_BODY_MAX = 4000
PUSH_DATA_MAX_KEYS = 50
WHATSAPP_BODY_MAX = 4096
WHATSAPP_PARAMETERS_MAX = 100
WHATSAPP_PARAMETER_MAX = 1024

_SMS_SENDER = re.compile(r"^(\+[1-9][0-9]{6,14}|(?=[A-Za-z0-9 ]*[A-Za-z])[A-Za-z0-9 ]{1,11})$")
_WHATSAPP_TEMPLATE_NAME = re.compile(r"^[a-z0-9_]{1,512}$")
_WHATSAPP_LANGUAGE = re.compile(r"^[a-z]{2,3}(_[A-Z]{2})?$")


@dataclass(frozen=True)
class TemplateField:
    """One template inside a config: where it sits, its source, and its escaping."""

    path: tuple[str | int, ...]
    source: str
    html: bool = False

    @property
    def name(self) -> str:
        """Dotted name as errors report it: "subject", "template.parameters[0]"."""
        name = ""
        for part in self.path:
            name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
        return name


def template_fields(channel_type: str, config: Mapping[str, Any]) -> Iterator[TemplateField]:
    """The templates of a valid config; rendering and validation both walk these."""
    if channel_type == "email":
        for key in ("subject", "text"):
            if config.get(key) is not None:
                yield TemplateField((key,), config[key])
        if config.get("html") is not None:
            yield TemplateField(("html",), config["html"], html=True)
    elif channel_type in ("sms", "push"):
        for key in ("title", "body"):
            if config.get(key) is not None:
                yield TemplateField((key,), config[key])
    elif channel_type == "whatsapp":
        if config.get("body") is not None:
            yield TemplateField(("body",), config["body"])
        template = config.get("template")
        if is_object(template):
            for index, parameter in enumerate(template.get("parameters") or []):
                if isinstance(parameter, str):
                    yield TemplateField(("template", "parameters", index), parameter)


def channel_warnings(channel_type: str, config: Mapping[str, Any]) -> list[str]:
    """Things that are allowed but the marketer should know; shown on every response."""
    if channel_type == "whatsapp" and config.get("body") is not None:
        return [WHATSAPP_SESSION_WARNING]
    return []


def validate_channel_config(
    channel_type: str,
    raw: Any,
    *,
    allowed_from_domains: tuple[str, ...] = (),
    prefix: str = "config",
) -> dict[str, Any]:
    """The config to store, or ValidationFailed naming every bad key ("config.subject")."""
    problems = Problems()
    if not is_object(raw):
        problems.add(prefix, "must be an object")
        problems.raise_if_any("invalid channel config")
    validate = _VALIDATORS[channel_type]
    # `utm` (source, medium, campaign) is allowed on every channel: link tracking
    # appends it to each destination (engine.tracking.links).
    utm = raw.get("utm")
    config = validate(
        problems, {k: v for k, v in raw.items() if k != "utm"}, prefix, allowed_from_domains
    )
    for path, messages in utm_problems(utm, f"{prefix}.utm").items():
        for message in messages:
            problems.add(path, message)
    if isinstance(utm, Mapping) and not problems.fields:
        kept = {k: v.strip() for k, v in utm.items() if isinstance(v, str)}
        if kept:
            config["utm"] = kept
    if not problems.fields:
        for field in template_fields(channel_type, config):
            for problem in template_problems(field.source, html=field.html):
                problems.add(f"{prefix}.{field.name}", problem)
    problems.raise_if_any(f"invalid {channel_type} channel config")
    return config


def _strings(
    problems: Problems,
    raw: Mapping[str, Any],
    prefix: str,
    spec: dict[str, tuple[bool, int]],
    *,
    other_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Check string keys given as {key: (required, max_length)}, refuse keys that are
    neither those nor `other_keys`, and keep the strings present."""
    reject_unknown_keys(problems, raw, (*spec, *other_keys), prefix)
    kept = {}
    for key, (required, max_length) in spec.items():
        value = check_string(problems, raw, key, prefix, required=required, max_length=max_length)
        if value is not None:
            kept[key] = value
    return kept


def _email(problems: Problems, raw, prefix: str, allowed_domains: tuple[str, ...]):
    config = _strings(
        problems,
        raw,
        prefix,
        {
            "subject": (True, SUBJECT_MAX),
            "html": (False, EMAIL_BODY_MAX),
            "text": (False, EMAIL_BODY_MAX),
            "from_email": (False, 320),
            "from_name": (False, NAME_MAX),
            "reply_to": (False, 320),
        },
    )
    if not (config.get("html", "").strip() or config.get("text", "").strip()):
        for key in ("html", "text"):
            if f"{prefix}.{key}" not in problems.fields:
                problems.add(f"{prefix}.{key}", "html or text (or both) is required")
    for key in ("from_email", "reply_to"):
        if key in config and not is_email(config[key]):
            problems.add(f"{prefix}.{key}", "not a valid email address")
    sender = config.get("from_email")
    if sender and is_email(sender) and allowed_domains:
        domain = sender.rsplit("@", 1)[1].lower()
        if domain not in {allowed.lower() for allowed in allowed_domains}:
            problems.add(
                f"{prefix}.from_email",
                f"the domain must be one of: {', '.join(allowed_domains)}",
            )
    if "from_name" in config and any(c in config["from_name"] for c in "\r\n"):
        problems.add(f"{prefix}.from_name", "must be a single line")
    return config


def _sms(problems: Problems, raw, prefix: str, _domains):
    config = _strings(problems, raw, prefix, {"body": (True, SMS_BODY_MAX), "sender": (False, 15)})
    if "sender" in config and not _SMS_SENDER.match(config["sender"]):
        problems.add(
            f"{prefix}.sender",
            "must be an E.164 number (+15551234567) or 1-11 letters, digits and spaces",
        )
    return config


def _push(problems: Problems, raw, prefix: str, _domains):
    spec = {
        "title": (True, PUSH_TITLE_MAX),
        "body": (True, PUSH_BODY_MAX),
        "image_url": (False, 2048),
        "url": (False, 2048),
    }
    config = _strings(problems, raw, prefix, spec, other_keys=("data",))
    for key in ("image_url", "url"):
        if key in config and not is_http_url(config[key]):
            problems.add(f"{prefix}.{key}", "must be an http or https URL")
    data = raw.get("data")
    if data is not None:
        if not is_object(data):
            problems.add(f"{prefix}.data", "must be an object of string values")
        elif len(data) > PUSH_DATA_MAX_KEYS:
            problems.add(f"{prefix}.data", f"at most {PUSH_DATA_MAX_KEYS} keys")
        else:
            for key, value in data.items():
                if not isinstance(value, str):
                    problems.add(f"{prefix}.data.{key}", "must be a string")
            config["data"] = dict(data)
    return config


def _whatsapp(problems: Problems, raw, prefix: str, _domains):
    reject_unknown_keys(problems, raw, ("template", "body"), prefix)
    config: dict[str, Any] = {}
    body = check_string(problems, raw, "body", prefix, max_length=WHATSAPP_BODY_MAX)
    template = raw.get("template")
    if body is not None and template is not None:
        problems.add(f"{prefix}.body", "give either template or body, not both")
    elif body is None and template is None and f"{prefix}.body" not in problems.fields:
        problems.add(f"{prefix}.template", "template or body is required")
    if body is not None:
        if not body.strip():
            problems.add(f"{prefix}.body", "must not be blank")
        config["body"] = body
    if template is not None:
        config["template"] = _whatsapp_template(problems, template, f"{prefix}.template")
    return config


def _whatsapp_template(problems: Problems, raw, prefix: str) -> dict[str, Any]:
    if not is_object(raw):
        problems.add(prefix, "must be an object with name, language and parameters")
        return {}
    spec = {"name": (True, 512), "language": (True, 16)}
    template = _strings(problems, raw, prefix, spec, other_keys=("parameters",))
    if "name" in template and not _WHATSAPP_TEMPLATE_NAME.match(template["name"]):
        problems.add(f"{prefix}.name", "must be lower-case letters, digits and underscores")
    if "language" in template and not _WHATSAPP_LANGUAGE.match(template["language"]):
        problems.add(f"{prefix}.language", "must be a language code such as en or en_US")
    parameters = raw.get("parameters", [])
    if parameters is None:
        parameters = []
    if not isinstance(parameters, list):
        problems.add(f"{prefix}.parameters", "must be a list of strings")
        parameters = []
    elif len(parameters) > WHATSAPP_PARAMETERS_MAX:
        problems.add(f"{prefix}.parameters", f"at most {WHATSAPP_PARAMETERS_MAX} parameters")
    for index, parameter in enumerate(parameters):
        if not isinstance(parameter, str):
            problems.add(f"{prefix}.parameters[{index}]", "must be a string")
        elif len(parameter) > WHATSAPP_PARAMETER_MAX:
            problems.add(
                f"{prefix}.parameters[{index}]",
                f"must be at most {WHATSAPP_PARAMETER_MAX} characters",
            )
    template["parameters"] = list(parameters)
    return template


_VALIDATORS = {"email": _email, "sms": _sms, "push": _push, "whatsapp": _whatsapp}

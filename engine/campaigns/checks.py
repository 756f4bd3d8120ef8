"""Small helpers for validating free-form JSON documents (campaign and channel config).

Those documents are plain dicts whose shape depends on a sibling value (the channel
type), so they are checked by hand rather than by a schema; every problem is collected
under the dotted path of its field ("config.error_threshold.rate"), and all of them are
reported at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from engine.errors import ValidationFailed

# Deliberately plain: a mailbox is local@domain with a dotted domain; providers judge
# deliverability, this only stops typos and junk from being stored.
_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
MAX_URL_LENGTH = 2048


class Problems:
    """Collects messages per field path; raise_if_any() turns them into one 422."""

    def __init__(self) -> None:
        self.fields: dict[str, list[str]] = {}

    def add(self, path: str, message: str) -> None:
        messages = self.fields.setdefault(path, [])
        if message not in messages:
            messages.append(message)

    def raise_if_any(self, message: str) -> None:
        if self.fields:
            raise ValidationFailed(message, fields=self.fields)


def is_object(value: Any) -> bool:
    return isinstance(value, Mapping)


def is_number(value: Any) -> bool:
    # bool is an int in Python but never a number in JSON; NaN and infinities are
    # accepted by Python's JSON parser but are not numbers anyone meant.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_email(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 320 and bool(_EMAIL.match(value))


def is_http_url(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > MAX_URL_LENGTH or any(c.isspace() for c in value):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in {"http", "https"} and bool(parts.hostname)


def reject_unknown_keys(
    problems: Problems, document: Mapping[str, Any], allowed: Iterable[str], prefix: str
) -> None:
    allowed = set(allowed)
    for key in document:
        if key not in allowed:
            problems.add(f"{prefix}.{key}", "unknown field")


def check_string(
    problems: Problems,
    document: Mapping[str, Any],
    key: str,
    prefix: str,
    *,
    required: bool = False,
    max_length: int,
) -> str | None:
    """The string at `key`, or None when absent (a problem is recorded if required)."""
    path = f"{prefix}.{key}"
    value = document.get(key)
    if value is None:
        if required:
            problems.add(path, "required")
        return None
    if not isinstance(value, str):
        problems.add(path, "must be a string")
        return None
    if required and not value.strip():
        problems.add(path, "must not be blank")
        return None
    if len(value) > max_length:
        problems.add(path, f"must be at most {max_length} characters")
        return None
    return value

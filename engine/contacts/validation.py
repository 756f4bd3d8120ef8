"""One contact, as the API, the bulk route and the CSV importer receive it, judged and
normalized into column values.

`validate_contact` takes the API shape (`consent` is an object of four booleans) and
returns `(clean, errors)`: `clean` holds only the fields the input carried, under their
column names (`consent_sms`, …), so the caller decides what an absent field means
(a default on create, "leave unchanged" on update); `errors` maps each bad field's path
("phone", "consent.sms", "push_tokens[2]") to its messages. It never raises on bad
input, because the bulk route and the importer must collect every row's problems
before they write anything.

Everything PostgreSQL would refuse later (over-long strings, NUL characters, NaN in
JSON) is refused here, so a write never fails halfway through a batch.
"""

from __future__ import annotations

import json
import re
import zoneinfo
from collections.abc import Mapping
from functools import cache
from typing import Any

import phonenumbers

from engine.models.enums import CHANNEL_TYPES

# Column sizes (engine/models/contacts.py) and the limits that keep a contact small.
MAX_EXTERNAL_ID = 255
MAX_EMAIL = 254  # RFC 5321's path limit; the column allows more
MAX_NAME = 100
MAX_LOCALE = 35
MAX_PUSH_TOKENS = 20
MAX_PUSH_TOKEN_LENGTH = 512
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY = 100
MAX_ATTRIBUTES_BYTES = 16 * 1024

CONSENT_CHANNELS = CHANNEL_TYPES  # one consent flag per channel
CONTACT_FIELDS = (
    "external_id",
    "email",
    "phone",
    "whatsapp",
    "push_tokens",
    "first_name",
    "last_name",
    "timezone",
    "locale",
    "attributes",
    "consent",
)
# Every column a contact's input can set, in table order.
CONTACT_COLUMNS = (
    "external_id",
    "email",
    "phone",
    "whatsapp",
    "push_tokens",
    "first_name",
    "last_name",
    "timezone",
    "locale",
    "attributes",
    *(f"consent_{channel}" for channel in CONSENT_CHANNELS),
)

UNKNOWN_FIELD = "Unknown field."
NOT_A_STRING = "Not a valid string."

# Deliberately plain: an ASCII local part and a dotted domain whose last label is
# alphabetic. Deliverability is the provider's question; this catches typos and junk.
_EMAIL_RE = re.compile(
    r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$"
)
# A NUL escaped in JSON text: \u0000 after an even number of backslashes (an odd
# number would make it the literal text "\u0000", which is fine).
JSON_NUL_RE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# BCP 47, loosely: a 2 to 3 letter language, then subtags of 1 to 8 letters or digits.
_LOCALE_RE = re.compile(r"^[a-zA-Z]{2,3}(?:-[a-zA-Z0-9]{1,8})*$")


NOT_NULL = "Field may not be null."


class _Invalid(Exception):
    """A field's problems, raised inside a field rule and collected by the caller.

    Each problem is (path, message); a path of None means the field itself.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.problems: list[tuple[str | None, str]] = [(path, message)]

    @classmethod
    def many(cls, problems: list[tuple[str | None, str]]) -> _Invalid:
        error = cls(problems[0][1], problems[0][0])
        error.problems = problems
        return error


def validate_contact(raw: Any) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Judge one contact in the API shape; see the module docstring."""
    if not isinstance(raw, Mapping):
        return {}, {"body": ["Not a valid mapping type."]}
    clean: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for field, value in raw.items():
        rule = _RULES.get(field) if isinstance(field, str) else None
        if rule is None:
            errors.setdefault(str(field), []).append(UNKNOWN_FIELD)
            continue
        try:
            rule(value, clean)
        except _Invalid as invalid:
            for path, message in invalid.problems:
                errors.setdefault(path or field, []).append(message)
    return clean, errors


def normalize_email(value: str) -> str:
    return value.strip().lower()


# -- field rules: each stores its column value(s) in `clean` or raises _Invalid -------


def _text(value: Any, max_length: int) -> str | None:
    """A trimmed string; blank means "no value" (None), like an empty CSV cell."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(NOT_A_STRING)
    value = value.strip()
    if "\x00" in value:
        raise _Invalid("Must not contain NUL characters.")
    if not _encodable(value):
        raise _Invalid("Not valid Unicode text.")
    if len(value) > max_length:
        raise _Invalid(f"Longer than maximum length {max_length}.")
    return value or None


def _encodable(text: str) -> bool:
    """False for text with lone surrogates, which JSON may carry but UTF-8 cannot."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _plain_text(column: str, max_length: int):
    def rule(value: Any, clean: dict[str, Any]) -> None:
        clean[column] = _text(value, max_length)

    return rule


def _email(value: Any, clean: dict[str, Any]) -> None:
    text = _text(value, MAX_EMAIL)
    if text is not None:
        text = text.lower()
        local = text.partition("@")[0]
        if len(local) > 64 or not _EMAIL_RE.match(text):
            raise _Invalid("Not a valid email address.")
    clean["email"] = text


def _phone_rule(column: str):
    def rule(value: Any, clean: dict[str, Any]) -> None:
        clean[column] = to_e164(_text(value, 64))

    return rule


def to_e164(text: str | None) -> str | None:
    """+<country code><number>, or _Invalid. Numbers without a country code are refused
    rather than guessed: the same "06 12 34 56 78" is French, or nothing, depending on
    who typed it."""
    if text is None:
        return None
    if not text.startswith("+"):
        raise _Invalid(
            "Must be in international format: + and the country code (e.g. +33612345678)."
        )
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        raise _Invalid("Not a valid phone number.") from None
    if not phonenumbers.is_valid_number(number):
        raise _Invalid("Not a valid phone number.")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@cache
def _timezones() -> dict[str, str]:
    # available_timezones() walks the tz database on disk: do it once per process.
    return {name.lower(): name for name in zoneinfo.available_timezones()}


def _timezone(value: Any, clean: dict[str, Any]) -> None:
    text = _text(value, 64)
    if text is not None:
        canonical = _timezones().get(text.lower())
        if canonical is None:
            raise _Invalid("Not a valid IANA time zone (e.g. Europe/Paris).")
        text = canonical
    clean["timezone"] = text


def _locale(value: Any, clean: dict[str, Any]) -> None:
    text = _text(value, MAX_LOCALE)
    if text is not None:
        text = text.replace("_", "-")
        if not _LOCALE_RE.match(text):
            raise _Invalid("Not a valid locale (a BCP 47 tag such as fr or pt-BR).")
        text = _canonical_locale(text)
    clean["locale"] = text


def _canonical_locale(tag: str) -> str:
    """BCP 47's conventional case: language lower, Script title, REGION upper."""
    language, *subtags = tag.split("-")
    shaped = [language.lower()]
    for subtag in subtags:
        if len(subtag) == 2 and subtag.isalpha():
            shaped.append(subtag.upper())
        elif len(subtag) == 4 and subtag.isalpha():
            shaped.append(subtag.title())
        else:
            shaped.append(subtag.lower())
    return "-".join(shaped)


def _push_tokens(value: Any, clean: dict[str, Any]) -> None:
    if value is None:
        raise _Invalid(NOT_NULL)
    if not isinstance(value, list):
        raise _Invalid("Not a valid list.")
    tokens: list[str] = []
    for index, token in enumerate(value):
        try:
            text = _text(token, MAX_PUSH_TOKEN_LENGTH)
        except _Invalid as invalid:
            raise _Invalid(invalid.problems[0][1], f"push_tokens[{index}]") from None
        if text is None:
            raise _Invalid("Must not be empty.", f"push_tokens[{index}]")
        if text not in tokens:
            tokens.append(text)
    if len(tokens) > MAX_PUSH_TOKENS:
        raise _Invalid(f"At most {MAX_PUSH_TOKENS} distinct tokens.")
    clean["push_tokens"] = tokens


def _attributes(value: Any, clean: dict[str, Any]) -> None:
    """A JSON object, merged into the stored one (a null value removes that key)."""
    if value is None:
        raise _Invalid(NOT_NULL)
    if not isinstance(value, Mapping):
        raise _Invalid("Not a valid mapping type.")
    if len(value) > MAX_ATTRIBUTES:
        raise _Invalid(f"At most {MAX_ATTRIBUTES} keys.")
    for key in value:
        if not isinstance(key, str) or not key.strip():
            raise _Invalid("Keys must be non-empty strings.")
        if len(key) > MAX_ATTRIBUTE_KEY:
            raise _Invalid(f"Keys must be at most {MAX_ATTRIBUTE_KEY} characters.")
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        raise _Invalid("Must hold only JSON values with finite numbers.") from None
    if JSON_NUL_RE.search(encoded):
        raise _Invalid("Must not contain NUL characters.")
    if not _encodable(encoded):
        raise _Invalid("Not valid Unicode text.")
    if len(encoded.encode()) > MAX_ATTRIBUTES_BYTES:
        raise _Invalid(f"Larger than {MAX_ATTRIBUTES_BYTES // 1024} KB once serialized.")
    clean["attributes"] = dict(value)


def _consent(value: Any, clean: dict[str, Any]) -> None:
    if value is None:
        raise _Invalid(NOT_NULL)
    if not isinstance(value, Mapping):
        raise _Invalid("Not a valid mapping type.")
    problems: list[tuple[str | None, str]] = []
    for channel, given in value.items():
        if channel not in CONSENT_CHANNELS:
            problems.append((f"consent.{channel}", UNKNOWN_FIELD))
        elif not isinstance(given, bool):
            problems.append((f"consent.{channel}", "Not a valid boolean."))
        else:
            clean[f"consent_{channel}"] = given
    if problems:
        raise _Invalid.many(problems)


_RULES = {
    "external_id": _plain_text("external_id", MAX_EXTERNAL_ID),
    "email": _email,
    "phone": _phone_rule("phone"),
    "whatsapp": _phone_rule("whatsapp"),
    "push_tokens": _push_tokens,
    "first_name": _plain_text("first_name", MAX_NAME),
    "last_name": _plain_text("last_name", MAX_NAME),
    "timezone": _timezone,
    "locale": _locale,
    "attributes": _attributes,
    "consent": _consent,
}

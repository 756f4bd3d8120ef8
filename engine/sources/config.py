"""What each source type's config may hold, which of it is secret, and how each value
is checked and normalized.

Pure rules: no database and no encryption here; engine.services.sources stores secret
values encrypted and never hands them back unmasked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SECRET_MAX_LENGTH = 2048

_SHOP_DOMAIN = re.compile(r"[a-z0-9][a-z0-9-]{0,61}\.myshopify\.com")
# Shopify releases an Admin API version every quarter: 2024-01, 2024-04, 2024-07, 2024-10.
_API_VERSION = re.compile(r"20\d\d-(01|04|07|10)")
_PIXEL_ID = re.compile(r"\d{5,20}")
# Web and server-side containers both carry a GTM- id; the suffix length is not promised
# by Google, so only its alphabet and a sane length are checked.
_CONTAINER_ID = re.compile(r"GTM-[A-Z0-9]{4,12}")


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("Not a valid string.")
    return value.strip()


def _shop_domain(value: Any) -> str:
    domain = _string(value).lower()
    if not _SHOP_DOMAIN.fullmatch(domain):
        raise ValueError("must be the shop's <name>.myshopify.com domain, without scheme or path")
    return domain


def _api_version(value: Any) -> str:
    version = _string(value)
    if not _API_VERSION.fullmatch(version):
        raise ValueError("must be a Shopify API version: YYYY-MM with MM one of 01, 04, 07, 10")
    return version


def _pixel_id(value: Any) -> str:
    pixel = _string(value)
    if not _PIXEL_ID.fullmatch(pixel):
        raise ValueError("must be the pixel id: a string of 5 to 20 digits")
    return pixel


def _container_id(value: Any) -> str:
    container = _string(value).upper()
    if not _CONTAINER_ID.fullmatch(container):
        raise ValueError("must be a Tag Manager container id like GTM-AB12CD3")
    return container


def _secret(value: Any) -> str:
    # Kept exactly as given (no strip): it is compared byte for byte by the vendor.
    if not isinstance(value, str):
        raise ValueError("Not a valid string.")
    if not value or value.isspace():
        raise ValueError("may not be empty")
    if len(value) > SECRET_MAX_LENGTH:
        raise ValueError(f"Longer than maximum length {SECRET_MAX_LENGTH}.")
    if any(ch.isspace() for ch in value):
        raise ValueError("may not contain whitespace")
    return value


@dataclass(frozen=True)
class ConfigKey:
    check: Callable[[Any], str]
    required: bool = False
    secret: bool = False


CONFIG_KEYS: dict[str, dict[str, ConfigKey]] = {
    "shopify": {
        "shop_domain": ConfigKey(_shop_domain, required=True),
        "access_token": ConfigKey(_secret, required=True, secret=True),
        "api_version": ConfigKey(_api_version),
        "webhook_secret": ConfigKey(_secret, secret=True),
    },
    "facebook_pixel": {
        "pixel_id": ConfigKey(_pixel_id, required=True),
        "access_token": ConfigKey(_secret, secret=True),
    },
    "gtm": {
        "container_id": ConfigKey(_container_id, required=True),
    },
}

# Sources that receive events from web pages get a public ingest key to address them by.
INGEST_KEY_TYPES = frozenset({"gtm", "facebook_pixel"})


def config_keys(source_type: str) -> dict[str, ConfigKey]:
    return CONFIG_KEYS[source_type]


def secret_keys(source_type: str) -> frozenset[str]:
    return frozenset(name for name, key in CONFIG_KEYS[source_type].items() if key.secret)


def types_with_secrets() -> tuple[str, ...]:
    return tuple(t for t in CONFIG_KEYS if secret_keys(t))

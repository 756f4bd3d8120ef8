"""Signed unsubscribe links, one per delivery: {PUBLIC_BASE_URL}/u/<token>.

The token names the delivery and nothing else; the delivery row says which user,
channel and address to suppress, so a link cannot be edited to unsubscribe someone
else. Unsubscribe links never expire (mail is read years later), hence no timestamp.

A token is `<delivery id>.<tag>`: the tag is HMAC-SHA256 of the id under a key derived
once per process from SECRET_KEY, truncated to 128 bits, base64url. The sender mints
one per message, tens of thousands a second, so minting is one HMAC (about a
microsecond) instead of itsdangerous' serializer (JSON, zlib, a key derivation per
call: ~50 µs). Tokens minted earlier in itsdangerous' format (base64 JSON payload, a
27-character SHA-1 signature) are still in mailboxes and keep verifying.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from functools import lru_cache

from itsdangerous import BadSignature, URLSafeSerializer

from engine.settings import Settings

SALT = "herald.unsubscribe"
_TAG_BYTES = 16
# A current token: a decimal id (no sign, as minted) and a 22-character tag. The
# legacy format never matches (its payload is base64 JSON, its signature 27 characters).
_TOKEN = re.compile(r"([1-9][0-9]{0,18})\.[A-Za-z0-9_-]{22}")


@lru_cache(maxsize=4)
def _mac(secret_key: str) -> hmac.HMAC:
    # The key is derived from SECRET_KEY and the salt, so this tag can never be replayed
    # as another purpose's signature made with the same secret. Each token copies this
    # keyed state instead of rekeying.
    key = hmac.new(secret_key.encode(), SALT.encode(), hashlib.sha256).digest()
    return hmac.new(key, digestmod=hashlib.sha256)


def _tag(secret_key: str, delivery_id: int) -> str:
    mac = _mac(secret_key).copy()
    mac.update(str(delivery_id).encode())
    return base64.urlsafe_b64encode(mac.digest()[:_TAG_BYTES]).rstrip(b"=").decode()


@lru_cache(maxsize=4)
def _legacy_serializer(secret_key: str) -> URLSafeSerializer:
    return URLSafeSerializer(secret_key, salt=SALT)


def unsubscribe_token(settings: Settings, delivery_id: int) -> str:
    return f"{delivery_id}.{_tag(settings.secret_key, delivery_id)}"


def unsubscribe_url(settings: Settings, delivery_id: int) -> str:
    return f"{settings.public_base_url}/u/{unsubscribe_token(settings, delivery_id)}"


def delivery_of(settings: Settings, token: str) -> int | None:
    """The delivery id a token was issued for, or None if it is forged or mangled."""
    match = _TOKEN.fullmatch(token)
    if match is not None:
        delivery_id = int(match.group(1))
        # Compared as text, not as decoded bytes: base64 leaves spare bits in the last
        # character, and a decoder that ignores them would accept altered tokens.
        expected = unsubscribe_token(settings, delivery_id)
        return delivery_id if hmac.compare_digest(expected, token) else None
    try:
        value = _legacy_serializer(settings.secret_key).loads(token)
    except BadSignature:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None

"""Signed unsubscribe links, one per delivery: {PUBLIC_BASE_URL}/u/<token>.

The token names the delivery and nothing else; the delivery row says which user,
channel and address to suppress, so a link cannot be edited to unsubscribe someone
else. Unsubscribe links never expire (mail is read years later), hence no timestamp.
"""

from __future__ import annotations

from functools import lru_cache

from itsdangerous import BadSignature, URLSafeSerializer

from engine.settings import Settings

SALT = "herald.unsubscribe"


def _serializer(settings: Settings) -> URLSafeSerializer:
    return _serializer_for(settings.secret_key)


@lru_cache(maxsize=4)
def _serializer_for(secret_key: str) -> URLSafeSerializer:
    # Built once per key: the sender signs one URL per message, and constructing the
    # serializer (key derivation included) cost about as much as rendering the message.
    return URLSafeSerializer(secret_key, salt=SALT)


def unsubscribe_token(settings: Settings, delivery_id: int) -> str:
    return _serializer(settings).dumps(delivery_id)


def unsubscribe_url(settings: Settings, delivery_id: int) -> str:
    return f"{settings.public_base_url}/u/{unsubscribe_token(settings, delivery_id)}"


def delivery_of(settings: Settings, token: str) -> int | None:
    """The delivery id a token was issued for, or None if it is forged or mangled."""
    try:
        value = _serializer(settings).loads(token)
    except BadSignature:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None

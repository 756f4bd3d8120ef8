"""The per-delivery token a push carries in its `data`, which the app posts back to
/webhooks/push when the notification reached the device.

The app is public (anyone can unpack it), so no secret can ship inside it: the token,
signed here with SECRET_KEY, is the only proof, and it names one delivery, so a leaked
token can mark that one push delivered and nothing else. The salt keeps it apart from
the unsubscribe token of the same delivery (engine/unsubscribe.py): neither can be
replayed as the other. No expiry: a phone may come back online days later.
"""

from __future__ import annotations

from functools import lru_cache

from itsdangerous import BadSignature, URLSafeSerializer

from engine.settings import Settings

SALT = "herald.push.delivered"
# The key of the push `data` entry that carries the token, and the one naming where to
# post it (the app needs no configuration of its own).
DATA_TOKEN_KEY = "herald_token"
DATA_URL_KEY = "herald_delivered_url"
PUSH_WEBHOOK_PATH = "/webhooks/push"
MAX_TOKEN_LENGTH = 512


@lru_cache(maxsize=4)
def _serializer(secret_key: str) -> URLSafeSerializer:
    # Built once per key: the sender mints one token per push.
    return URLSafeSerializer(secret_key, salt=SALT)


def push_token(settings: Settings, delivery_id: int) -> str:
    return _serializer(settings.secret_key).dumps(delivery_id)


def push_data(settings: Settings, delivery_id: int) -> dict[str, str]:
    """What a push for this delivery adds to its FCM `data` (string values only)."""
    return {
        DATA_TOKEN_KEY: push_token(settings, delivery_id),
        DATA_URL_KEY: f"{settings.public_base_url}{PUSH_WEBHOOK_PATH}",
    }


def delivery_of_push_token(settings: Settings, token: object) -> int | None:
    """The delivery a token was minted for, or None if it is forged or mangled."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    try:
        value = _serializer(settings.secret_key).loads(token)
    except BadSignature:
        return None
    except (ValueError, UnicodeError):  # a payload that is not base64'd JSON
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        return None
    return value

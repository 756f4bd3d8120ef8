"""The per-delivery token a push carries in its `data`, which the app posts back to
/webhooks/push when the notification reached the device.

The app is public (anyone can unpack it), so no secret can ship inside it: the token,
signed here with SECRET_KEY, is the only proof, and it names one delivery, so a leaked
token can mark that one push delivered and nothing else. No expiry: a phone may come
back online days later.

Same construction as the unsubscribe token (engine/unsubscribe.py), `<delivery id>.<tag>`
with a 128-bit HMAC-SHA256 tag, because the sender mints one per push: one HMAC, about
a microsecond. The key is derived with another salt, so neither token can be replayed
as the other for the same delivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from functools import lru_cache

from engine.settings import Settings

SALT = "herald.push.delivered"
# The key of the push `data` entry that carries the token, and the one naming where to
# post it (the app needs no configuration of its own).
DATA_TOKEN_KEY = "herald_token"
DATA_URL_KEY = "herald_delivered_url"
PUSH_WEBHOOK_PATH = "/webhooks/push"
_TAG_BYTES = 16
_TOKEN = re.compile(r"([1-9][0-9]{0,18})\.[A-Za-z0-9_-]{22}")


@lru_cache(maxsize=4)
def _mac(secret_key: str) -> hmac.HMAC:
    key = hmac.new(secret_key.encode(), SALT.encode(), hashlib.sha256).digest()
    return hmac.new(key, digestmod=hashlib.sha256)


def push_token(settings: Settings, delivery_id: int) -> str:
    mac = _mac(settings.secret_key).copy()
    mac.update(str(delivery_id).encode())
    tag = base64.urlsafe_b64encode(mac.digest()[:_TAG_BYTES]).rstrip(b"=").decode()
    return f"{delivery_id}.{tag}"


def push_data(settings: Settings, delivery_id: int) -> dict[str, str]:
    """What a push for this delivery adds to its FCM `data` (string values only)."""
    return {
        DATA_TOKEN_KEY: push_token(settings, delivery_id),
        DATA_URL_KEY: f"{settings.public_base_url}{PUSH_WEBHOOK_PATH}",
    }


def delivery_of_push_token(settings: Settings, token: object) -> int | None:
    """The delivery a token was minted for, or None if it is forged or mangled."""
    if not isinstance(token, str):
        return None
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    delivery_id = int(match.group(1))
    if delivery_id >= 2**63:
        return None
    # Compared as text: base64 leaves spare bits in the last character, and comparing
    # decoded bytes would accept a token altered there.
    expected = push_token(settings, delivery_id)
    return delivery_id if hmac.compare_digest(expected, token) else None

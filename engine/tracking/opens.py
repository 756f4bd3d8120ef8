"""Email opens: a 1x1 image at a signed per-delivery URL, {PUBLIC_BASE_URL}/t/o/<token>.

The token is `<delivery id>.<tag>`, the tag a 128-bit HMAC-SHA256 of the id under a key
derived from SECRET_KEY with this module's own salt, as the unsubscribe and push tokens
are (engine/unsubscribe.py, engine/tracking/tokens.py): one HMAC per message, about a
microsecond, and no token of one purpose verifies as another's for the same delivery.
No expiry: mail is opened years later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from functools import lru_cache

from engine.settings import Settings

OPEN_SALT = "herald.track.open"
OPEN_PATH = "/t/o/"
_TAG_BYTES = 16
_TAG_CHARS = 22  # 16 bytes in base64, without the "==" padding
_BLOCK = 64  # SHA-256's block size
_URLSAFE = bytes.maketrans(b"+/", b"-_")
_TOKEN = re.compile(r"([1-9][0-9]{0,18})\.[A-Za-z0-9_-]{22}")

# The smallest transparent GIF (1x1, one transparent colour): 43 bytes.
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


class Signer:
    """HMAC-SHA256 under one key, truncated to 128 bits, base64url: a token's tag.

    The key's inner and outer pad states are hashed once (RFC 2104), so a tag costs two
    SHA-256 state copies and finishes, all in C: the sender signs several links per
    message at tens of thousands of messages a second, and hmac.HMAC's Python wrapper
    costs as much again."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block = key.ljust(_BLOCK, b"\0")  # a derived 32-byte key: never longer than a block
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def tag(self, message: str) -> str:
        inner = self._inner.copy()
        inner.update(message.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        encoded = binascii.b2a_base64(outer.digest()[:_TAG_BYTES], newline=False)
        return encoded[:_TAG_CHARS].translate(_URLSAFE).decode()


@lru_cache(maxsize=8)
def signer(secret_key: str, salt: str) -> Signer:
    """The Signer of one purpose: its key is derived from SECRET_KEY and the purpose's
    salt, so no tag of one purpose verifies as another's (shared with links.py)."""
    return Signer(hmac.new(secret_key.encode(), salt.encode(), hashlib.sha256).digest())


def open_token(settings: Settings, delivery_id: int) -> str:
    return f"{delivery_id}.{signer(settings.secret_key, OPEN_SALT).tag(str(delivery_id))}"


def open_url(settings: Settings, delivery_id: int) -> str:
    return f"{settings.public_base_url}{OPEN_PATH}{open_token(settings, delivery_id)}"


def delivery_of_open_token(settings: Settings, token: object) -> int | None:
    """The delivery an open token was minted for, or None if it is forged or mangled."""
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
    return delivery_id if hmac.compare_digest(open_token(settings, delivery_id), token) else None


def pixel_tag(url: str) -> str:
    """The <img> rendered into an HTML email. Sized and styled to take no room in any
    client; alt="" so a client that blocks images shows nothing either."""
    return (
        f'<img src="{url}" width="1" height="1" alt="" '
        'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0">'
    )

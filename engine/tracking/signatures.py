"""Webhook signatures: checked before anything of the request is read or stored.

A missing signature is 401 (AuthenticationFailed), a wrong one 403 (Forbidden), and so
is any request while the secret is not configured, since nothing could then be
verified. Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable

from engine.errors import AuthenticationFailed, Forbidden

SHA256_PREFIX = "sha256="


def _missing(header: str) -> AuthenticationFailed:
    return AuthenticationFailed(f"{header} header missing", code="signature_missing")


def _invalid(header: str) -> Forbidden:
    return Forbidden(f"{header} does not match the request", code="signature_invalid")


def _not_configured(setting: str) -> Forbidden:
    return Forbidden(
        f"this webhook is disabled: {setting} is not configured", code="webhook_not_configured"
    )


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """Twilio's X-Twilio-Signature: base64 HMAC-SHA1, keyed with the auth token, of the
    URL followed by each POST parameter's name and value, sorted by name (and, for a
    repeated name, by value, as Twilio's own validator does)."""
    values: dict[str, set[str]] = {}
    for name, value in params:
        values.setdefault(name, set()).add(value)
    signed = url + "".join(name + v for name in sorted(values) for v in sorted(values[name]))
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def verify_twilio(
    auth_token: str, url: str, params: Iterable[tuple[str, str]], header: str | None
) -> None:
    """`url` is the one Herald configured ({PUBLIC_BASE_URL}/webhooks/twilio/…), never the
    one the request arrived on: a proxy in front of Herald rewrites scheme and host."""
    if not auth_token:
        raise _not_configured("TWILIO_AUTH_TOKEN")
    if not header:
        raise _missing("X-Twilio-Signature")
    expected = twilio_signature(auth_token, url, params)
    if not hmac.compare_digest(expected.encode(), header.strip().encode()):
        raise _invalid("X-Twilio-Signature")


def hmac_sha256_hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_sha256(secret: str, setting: str, body: bytes, header_name: str, header: str | None):
    """`sha256=<hex HMAC-SHA256 of the raw body>`: WhatsApp's X-Hub-Signature-256 (keyed
    with the app secret) and Herald's X-Herald-Signature for email events."""
    if not secret:
        raise _not_configured(setting)
    if not header:
        raise _missing(header_name)
    given = header.strip()
    if given[: len(SHA256_PREFIX)].lower() == SHA256_PREFIX:
        given = given[len(SHA256_PREFIX) :]
    expected = hmac_sha256_hex(secret, body)
    if not hmac.compare_digest(expected.encode(), given.lower().encode("ascii", "replace")):
        raise _invalid(header_name)

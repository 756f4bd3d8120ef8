"""What the HTTP providers (Twilio, FCM, WhatsApp) share: the httpx client (FCM and
WhatsApp; Twilio's calls are split, see split_http), Retry-After, the reading of a JSON
answer, and the classification of failures that happen before any answer arrives."""

from __future__ import annotations

import math
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from engine.channels.base import SendResult
from engine.channels.split_http import Answer

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 15.0
USER_AGENT = "herald/0.1"


def make_client(
    *,
    connect_timeout: float,
    read_timeout: float,
    headers: dict[str, str] | None = None,
    auth: httpx.Auth | tuple[str, str] | None = None,
) -> httpx.Client:
    """One pooled client per channel, so consecutive sends reuse a kept-alive connection."""
    timeout = httpx.Timeout(
        connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
    )
    return httpx.Client(
        timeout=timeout,
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        auth=auth,
    )


def retry_after(response: httpx.Response | Answer) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    raw = response.headers.get("Retry-After", "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None  # unparseable: the caller's own backoff applies


def transport_failure(delivery_id: int, provider: str, exc: httpx.HTTPError) -> SendResult:
    """No usable answer (timeout, refused, reset): the provider may or may not have the
    message, so it is transient and the retry carries the same idempotency key."""
    return SendResult.transient(delivery_id, transport_error(provider, exc))


def transport_error(provider: str, exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        kind = "timed out"
    elif isinstance(exc, httpx.ConnectError):
        kind = "connection failed"
    else:
        kind = "transport error"
    return f"{provider} {kind}: {str(exc) or type(exc).__name__}"


def json_or_empty(response: httpx.Response | Answer) -> dict[str, Any]:
    """The JSON object a provider answered, or {} when it answered something else (an
    HTML error page from a proxy, an empty body)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def is_transient_status(status: int) -> bool:
    """Statuses that say "not now" rather than "never": throttling, timeouts, 5xx."""
    return status in (408, 425, 429) or status >= 500

"""WhatsApp Cloud API webhooks, as tracking events.

Meta posts `{"object": "whatsapp_business_account", "entry": [{"changes": [{"field":
"messages", "value": {"statuses": [...], "messages": [...]}}]}]}`, batching many
updates in one call. A status carries the message id (wamid), our
`biz_opaque_callback_data` (d<delivery id>, engine/channels/whatsapp.py), its status
(sent, delivered, read, failed) and a Unix timestamp; failed ones carry `errors`.
Inbound `messages` are how a recipient says STOP (a text, or the opt-out button of a
marketing template).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.tracking.recording import Event, safe_text
from engine.tracking.suppression import HARD, OPT_OUT, inbound_number, keyword_intent
from engine.tracking.targets import delivery_id_of_key

SOURCE = "whatsapp"
KIND_OF_STATUS = {"sent": "sent", "delivered": "delivered", "read": "opened", "failed": "failed"}
# 131026: undeliverable (no WhatsApp account on the number, or it cannot receive);
# 131050: the user stopped marketing messages from this business.
FAILURE_OF_CODE = {131026: HARD, 131050: OPT_OUT}
_PLAUSIBLE = timedelta(days=60)


@dataclass(frozen=True)
class StatusUpdate:
    event: Event
    delivery_id: int | None  # from our callback data; None: look it up by message id


@dataclass(frozen=True)
class InboundText:
    address: str  # E.164
    intent: str | None


def updates(payload: Any, now: datetime) -> tuple[list[StatusUpdate], list[InboundText], int]:
    """(status updates, inbound messages, how many items were ignored): whatever in the
    payload is not a status or message of a known shape is skipped, not refused, since
    Meta would retry a refused call for days."""
    statuses: list[StatusUpdate] = []
    inbound: list[InboundText] = []
    ignored = 0
    for value in _values(payload):
        for status in _list(value.get("statuses")):
            update = _status(status, now)
            if update is None:
                ignored += 1
            else:
                statuses.append(update)
        for message in _list(value.get("messages")):
            text = _inbound(message)
            if text is None:
                ignored += 1
            else:
                inbound.append(text)
    return statuses, inbound, ignored


def _values(payload: Any) -> Iterator[Mapping[str, Any]]:
    if not isinstance(payload, Mapping):
        return
    for entry in _list(payload.get("entry")):
        for change in _list(entry.get("changes") if isinstance(entry, Mapping) else None):
            if isinstance(change, Mapping) and isinstance(change.get("value"), Mapping):
                yield change["value"]


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _status(status: Any, now: datetime) -> StatusUpdate | None:
    if not isinstance(status, Mapping):
        return None
    wamid = safe_text(status.get("id"), 255)
    name = status.get("status")
    kind = KIND_OF_STATUS.get(name) if isinstance(name, str) else None
    if not wamid or kind is None:
        return None
    detail: dict[str, Any] = {"status": name}
    error = failure = None
    if kind == "failed":
        codes = [e.get("code") for e in _list(status.get("errors")) if isinstance(e, Mapping)]
        code = next((c for c in codes if isinstance(c, int) and not isinstance(c, bool)), None)
        first = next((e for e in _list(status.get("errors")) if isinstance(e, Mapping)), {})
        title = safe_text(first.get("title") or first.get("message"), 200)
        if code is not None:
            detail["error_code"] = code
        if title:
            detail["error_title"] = title
        error = "whatsapp failed" + (f" {code}" if code is not None else "")
        error += f": {title}" if title else ""
        failure = FAILURE_OF_CODE.get(code) if code is not None else None
    event = Event(
        kind=kind,
        source=SOURCE,
        occurred_at=_timestamp(status.get("timestamp"), now),
        provider_event_id=f"{wamid}:{name}",
        provider_message_id=wamid,
        detail=detail,
        error=error,
        failure=failure,
    )
    return StatusUpdate(event, delivery_id_of_key(status.get("biz_opaque_callback_data")))


def _inbound(message: Any) -> InboundText | None:
    if not isinstance(message, Mapping):
        return None
    sender = message.get("from")  # the WhatsApp id: the number's digits, without "+"
    address = inbound_number("+" + sender.strip()) if isinstance(sender, str) else None
    if address is None:
        return None
    kind = message.get("type")
    if kind == "text":
        body = message.get("text")
        text = body.get("body") if isinstance(body, Mapping) else None
    elif kind == "button":
        button = message.get("button")
        text = button.get("text") if isinstance(button, Mapping) else None
    elif kind == "interactive":
        interactive = message.get("interactive")
        reply = interactive.get("button_reply") if isinstance(interactive, Mapping) else None
        text = reply.get("title") if isinstance(reply, Mapping) else None
    else:
        text = None
    return InboundText(address=address, intent=keyword_intent(text, channel="whatsapp"))


def _timestamp(value: Any, now: datetime) -> datetime:
    try:
        moment = datetime.fromtimestamp(int(str(value)), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return now
    return moment if abs(moment - now) <= _PLAUSIBLE else now

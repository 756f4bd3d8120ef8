"""Twilio's status callbacks and inbound messages, as tracking events.

Twilio posts a form for each status change of a message (queued, sent, delivered,
undelivered, failed, …) to the StatusCallback every send names, and each inbound SMS
to the number's messaging webhook. Neither carries an event id or a timestamp: the
event key is (MessageSid, status), one per status per message, and the time is the
arrival.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from engine.channels.twilio import STATUS_CALLBACK_PATH
from engine.tracking.recording import Event, safe_text
from engine.tracking.suppression import HARD, OPT_OUT, SOFT, inbound_number, keyword_intent

SOURCE = "twilio"
STATUS_PATH = STATUS_CALLBACK_PATH  # /webhooks/twilio/status
INBOUND_PATH = "/webhooks/twilio/inbound"

# MessageStatus -> event kind. The hand-off statuses only ever become `sent` events:
# a late "queued" after "delivered" is stored and moves nothing back.
KIND_OF_STATUS = {
    "accepted": "sent",
    "scheduled": "sent",
    "queued": "sent",
    "sending": "sent",
    "sent": "sent",
    "delivered": "delivered",
    "partially_delivered": "delivered",
    "read": "opened",
    "undelivered": "failed",
    "failed": "failed",
    "canceled": "failed",
}

# ErrorCode -> what it says about the number. Hard: 21211 invalid number, 21614 not a
# mobile number, 30005 unknown handset, 30006 landline or unreachable carrier. 30003 is
# soft: Twilio documents it as the handset being switched off or out of coverage, which
# passes; repeated, it suppresses through the soft-bounce threshold like a full mailbox.
# 21610: the recipient sent STOP to Twilio, which now refuses this number for us.
FAILURE_OF_CODE = {
    21211: HARD,
    21614: HARD,
    30005: HARD,
    30006: HARD,
    30003: SOFT,
    21610: OPT_OUT,
}


def status_event(form: Mapping[str, str], now: datetime) -> Event | None:
    """The event a status callback reports, or None when it names no message or an
    unknown status (answered 200 and ignored)."""
    sid = safe_text(form.get("MessageSid") or form.get("SmsSid"), 64)
    status = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip().lower()
    kind = KIND_OF_STATUS.get(status)
    if not sid or kind is None:
        return None
    code = _error_code(form.get("ErrorCode"))
    detail: dict[str, object] = {"status": status}
    if code is not None:
        detail["error_code"] = code
    error = failure = None
    if kind == "failed":
        error = f"twilio {status}" + (f" {code}" if code is not None else "")
        failure = FAILURE_OF_CODE.get(code) if code is not None else None
    return Event(
        kind=kind,
        source=SOURCE,
        occurred_at=now,
        provider_event_id=f"{sid}:{status}",
        provider_message_id=sid,
        detail=detail,
        error=error,
        failure=failure,
    )


def _error_code(value: object) -> int | None:
    if not isinstance(value, str) or not value.strip().isdigit():
        return None
    code = int(value.strip())
    return code if code < 10**9 else None


@dataclass(frozen=True)
class Inbound:
    channel: str  # sms, or whatsapp for Twilio's WhatsApp senders ("whatsapp:+1…")
    address: str  # E.164
    intent: str | None  # stop | start | None


def inbound_message(form: Mapping[str, str]) -> Inbound | None:
    """What an inbound message asks for. With Twilio's Advanced Opt-Out the form says
    so itself (OptOutType STOP/START); otherwise the body is matched against the
    keywords. None when the sender is not a phone number (a short code, a name)."""
    sender = (form.get("From") or "").strip()
    channel = "sms"
    if sender.lower().startswith("whatsapp:"):
        channel, sender = "whatsapp", sender[len("whatsapp:") :]
    address = inbound_number(sender)
    if address is None:
        return None
    opt_out_type = (form.get("OptOutType") or "").strip().upper()
    if opt_out_type in ("STOP", "START"):
        intent: str | None = opt_out_type.lower()
    else:
        intent = keyword_intent(form.get("Body"), channel=channel)
    return Inbound(channel=channel, address=address, intent=intent)

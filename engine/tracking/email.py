"""Email events: Herald's own JSON shape, RFC 3464 delivery status notifications and
RFC 5965 (ARF) complaint reports, all posted to /webhooks/email.

Every message Herald sends has `Message-ID: <herald.d<delivery id>@<sender domain>>`
(engine/channels/smtp.py), and a bounce or complaint names it (the DSN's returned
headers, or Original-Message-ID), so the delivery is found without any lookup table.

SMTP acceptance (250) only ever means sent. Delivered means the relay reported
delivery to the recipient's mailbox server: a JSON `delivered` event, or a DSN with
`Action: delivered`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from email.parser import HeaderParser
from typing import Any

from engine.errors import ValidationFailed
from engine.tracking.recording import safe_text
from engine.tracking.suppression import HARD, SOFT

MAX_EVENTS = 500
DIAGNOSTIC_MAX = 500
_MESSAGE_ID = re.compile(r"<?\s*herald\.d([1-9][0-9]{0,18})@[^>\s]+\s*>?", re.IGNORECASE)
_STATUS = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$")
# Far-off timestamps are a provider's clock or a typo; the arrival time is better then.
_PLAUSIBLE = timedelta(days=60)


@dataclass(frozen=True)
class EmailReport:
    """One email event, whichever way it arrived."""

    kind: str  # delivered | failed | complained
    delivery_id: int | None  # None: not a message Herald sent
    failure: str | None = None  # failed: hard or soft
    status: str | None = None  # the enhanced status code, e.g. 5.1.1
    diagnostic: str | None = None
    occurred_at: datetime | None = None
    event_id: str | None = None  # the provider's id for the event, when it gives one
    feedback_type: str | None = None  # complaints: abuse, fraud, …

    @property
    def error(self) -> str | None:
        if self.kind != "failed":
            return None
        parts = [f"{self.failure} bounce"]
        if self.status:
            parts.append(self.status)
        text = " ".join(parts)
        return f"{text}: {self.diagnostic}" if self.diagnostic else text

    def detail(self) -> dict[str, Any]:
        detail: dict[str, Any] = {}
        if self.failure:
            detail["bounce"] = self.failure
        if self.status:
            detail["status"] = self.status
        if self.diagnostic:
            detail["diagnostic"] = self.diagnostic
        if self.feedback_type:
            detail["feedback_type"] = self.feedback_type
        return detail


def delivery_id_of_message_id(value: object) -> int | None:
    """The delivery id in a Herald Message-ID (with or without its angle brackets)."""
    if not isinstance(value, str):
        return None
    match = _MESSAGE_ID.fullmatch(value.strip())
    if match is None:
        return None
    delivery_id = int(match.group(1))
    return delivery_id if delivery_id < 2**63 else None


# -- the JSON shape ----------------------------------------------------------------------

_JSON_TYPES = {"delivered": "delivered", "bounce": "failed", "complaint": "complained"}
_JSON_FIELDS = {"type", "message_id", "bounce_type", "id", "timestamp", "status", "diagnostic"}


def parse_json_events(body: Any, now: datetime) -> list[EmailReport]:
    """`{"events": [event, …]}` or one event object; ValidationFailed naming the path
    of every bad field (events[2].bounce_type)."""
    if isinstance(body, Mapping) and "events" in body:
        if set(body) != {"events"}:
            raise _invalid({"body": ['Either {"events": [...]} or one event object.']})
        events, prefix = body["events"], "events"
        if not isinstance(events, list):
            raise _invalid({"events": ["Not a valid list."]})
        if not 1 <= len(events) <= MAX_EVENTS:
            raise _invalid({"events": [f"Between 1 and {MAX_EVENTS} events."]})
    elif isinstance(body, Mapping):
        events, prefix = [body], ""
    else:
        raise _invalid({"body": ["A JSON object."]})
    reports: list[EmailReport] = []
    errors: dict[str, list[str]] = {}
    for index, event in enumerate(events):
        path = f"{prefix}[{index}]." if prefix else ""
        report = _json_event(event, path, now, errors)
        if report is not None:
            reports.append(report)
    if errors:
        raise _invalid(errors)
    return reports


def _json_event(
    event: Any, path: str, now: datetime, errors: dict[str, list[str]]
) -> EmailReport | None:
    def bad(field: str, message: str) -> None:
        errors.setdefault(f"{path}{field}", []).append(message)

    if not isinstance(event, Mapping):
        bad("body" if not path else path.rstrip("."), "Not a valid mapping type.")
        return None
    for field in event:
        if field not in _JSON_FIELDS:
            bad(str(field), "Unknown field.")
    kind = _JSON_TYPES.get(event.get("type")) if isinstance(event.get("type"), str) else None
    if kind is None:
        bad("type", f"Must be one of: {', '.join(_JSON_TYPES)}.")
    message_id = event.get("message_id")
    if not isinstance(message_id, str) or not message_id.strip() or len(message_id) > 998:
        bad("message_id", "The Message-ID Herald set, e.g. <herald.d42@news.example.com>.")
    failure = event.get("bounce_type")
    if kind == "failed" and failure not in (HARD, SOFT):
        bad("bounce_type", "Must be one of: hard, soft.")
    elif kind != "failed" and failure is not None:
        bad("bounce_type", "Only for bounces.")
    event_id = event.get("id")
    if event_id is not None and (not isinstance(event_id, str | int) or isinstance(event_id, bool)):
        bad("id", "Not a valid string.")
    status = event.get("status")
    if status is not None and (not isinstance(status, str) or not _STATUS.match(status.strip())):
        bad("status", "An enhanced status code such as 5.1.1.")
    diagnostic = event.get("diagnostic")
    if diagnostic is not None and not isinstance(diagnostic, str):
        bad("diagnostic", "Not a valid string.")
    occurred_at = _timestamp(event.get("timestamp"), now)
    if event.get("timestamp") is not None and occurred_at is None:
        bad("timestamp", "ISO 8601 with an offset, or Unix seconds.")
    if errors or kind is None:
        return None
    return EmailReport(
        kind=kind,
        delivery_id=delivery_id_of_message_id(message_id),
        failure=failure if kind == "failed" else None,
        status=status.strip() if isinstance(status, str) else None,
        diagnostic=safe_text(diagnostic, DIAGNOSTIC_MAX),
        occurred_at=occurred_at,
        event_id=safe_text(event_id, 200) if event_id is not None else None,
    )


def _timestamp(value: Any, now: datetime) -> datetime | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            moment = datetime.fromtimestamp(value, UTC)
        elif isinstance(value, str):
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            if moment.tzinfo is None:
                return None
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    return moment if abs(moment - now) <= _PLAUSIBLE else now


def _invalid(fields: dict[str, list[str]]) -> ValidationFailed:
    return ValidationFailed("request validation failed", fields=fields)


# -- DSN and ARF reports ---------------------------------------------------------------------


def parse_report(raw: bytes, content_type: str) -> tuple[list[EmailReport], str | None]:
    """The events in a posted report message, and the report's own Message-ID (the
    event key: the same DSN posted twice is one event).

    `content_type` is the request's: message/rfc822 means the body is the whole message
    as received (headers and all); multipart/report means the body is the report's
    MIME body and the header is its Content-Type (with the boundary). Mail that is not a
    delivery-status or feedback report (an auto-reply to the bounce address) gives no
    events."""
    if content_type.lower().startswith("multipart/"):
        raw = (
            b"MIME-Version: 1.0\r\nContent-Type: "
            + content_type.encode("latin-1")
            + (b"\r\n\r\n" + raw)
        )
    message = message_from_bytes(raw)
    report = _find_report(message)
    own_id = safe_text(message.get("Message-ID"), 200)
    if report is None:
        return [], own_id
    report_type = (report.get_param("report-type") or "").lower()
    if report_type == "delivery-status":
        return _dsn_events(report), own_id
    if report_type == "feedback-report":
        return _arf_events(report), own_id
    return [], own_id


def _find_report(message: Message, depth: int = 0) -> Message | None:
    """The multipart/report: the message itself, or one attached or nested (a relay
    that forwards the bounce it received wraps it once)."""
    if depth > 5:
        return None
    if message.get_content_type() == "multipart/report":
        return message
    if message.is_multipart() or message.get_content_type() == "message/rfc822":
        for part in message.get_payload() or []:
            if isinstance(part, Message):
                found = _find_report(part, depth + 1)
                if found is not None:
                    return found
    return None


def _parts(report: Message) -> list[Message]:
    payload = report.get_payload()
    return [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []


def _returned_message_id(report: Message) -> str | None:
    """The Message-ID of the message the report is about: its returned headers
    (text/rfc822-headers) or returned message (message/rfc822)."""
    for part in _parts(report):
        kind = part.get_content_type()
        if kind == "text/rfc822-headers":
            body = part.get_payload(decode=True) or b""
            headers = HeaderParser().parsestr(body.decode("utf-8", "replace"))
            if headers.get("Message-ID"):
                return str(headers["Message-ID"])
        elif kind in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            inner = inner[0] if isinstance(inner, list) and inner else inner
            if isinstance(inner, Message) and inner.get("Message-ID"):
                return str(inner["Message-ID"])
    return None


def _field_groups(part: Message) -> list[Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        return [group for group in payload if isinstance(group, Message)]
    return []


def _dsn_events(report: Message) -> list[EmailReport]:
    status_part = next(
        (p for p in _parts(report) if p.get_content_type() == "message/delivery-status"), None
    )
    if status_part is None:
        return []
    groups = _field_groups(status_part)
    per_message, recipients = (groups[0], groups[1:]) if groups else (None, [])
    returned = _returned_message_id(report)
    events: list[EmailReport] = []
    for fields in recipients:
        message_id = (
            fields.get("Original-Message-ID")
            or (per_message.get("Original-Message-ID") if per_message is not None else None)
            or returned
        )
        action = str(fields.get("Action") or "").strip().lower()
        status = str(fields.get("Status") or "").strip().split(" ")[0]
        match = _STATUS.match(status)
        delivery_id = delivery_id_of_message_id(str(message_id)) if message_id else None
        if action == "delivered":
            events.append(EmailReport("delivered", delivery_id, status=status or None))
        elif action == "failed":
            # A 4.x.x that failed for good (the relay gave up retrying) is still soft:
            # the mailbox may take mail again tomorrow. Anything else failed is hard.
            failure = SOFT if match and match.group(1) == "4" else HARD
            events.append(
                EmailReport(
                    "failed",
                    delivery_id,
                    failure=failure,
                    status=status if match else None,
                    diagnostic=safe_text(fields.get("Diagnostic-Code"), DIAGNOSTIC_MAX),
                )
            )
        # delayed, relayed, expanded: not final, nothing to record.
    return events


def _arf_events(report: Message) -> list[EmailReport]:
    feedback = next(
        (p for p in _parts(report) if p.get_content_type() == "message/feedback-report"), None
    )
    if feedback is None:
        return []
    body = feedback.get_payload(decode=True)
    if body is None:  # parsed as a sub-message: its headers are the fields
        payload = feedback.get_payload()
        fields = payload[0] if isinstance(payload, list) and payload else None
    else:
        fields = HeaderParser().parsestr(body.decode("utf-8", "replace"))
    feedback_type = safe_text(fields.get("Feedback-Type") if fields else None, 40)
    message_id = (fields.get("Original-Message-ID") if fields else None) or (
        _returned_message_id(report)
    )
    delivery_id = delivery_id_of_message_id(str(message_id)) if message_id else None
    return [
        EmailReport(
            "complained",
            delivery_id,
            feedback_type=feedback_type.lower() if feedback_type else "abuse",
        )
    ]

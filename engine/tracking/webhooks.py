"""One service per webhook: the request's content (already verified by its signature,
engine.tracking.signatures) in, a tally of what became of each event out.

Whatever does not name a delivery of ours is counted and ignored, never refused:
providers retry any non-2xx answer (Meta for up to 7 days, relays for hours), and a
refusal would not make the message ours.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from engine.settings import Settings
from engine.tracking import email as email_events
from engine.tracking import orphans, recording, suppression, targets, twilio, whatsapp
from engine.tracking.recording import Event
from engine.tracking.targets import Target
from engine.tracking.tokens import delivery_of_push_token


@dataclass
class Tally:
    """What a webhook call came to, answered to the provider (and handy in logs)."""

    received: int = 0  # events (and inbound messages) in the request
    recorded: int = 0  # new events about one of our deliveries
    duplicates: int = 0  # events already recorded: a provider retry or replay
    pending: int = 0  # kept until their delivery's provider id is recorded (orphans)
    ignored: int = 0  # not about a delivery of ours, or nothing to record
    suppressed: int = 0  # suppressions added (bounces, complaints, STOP)
    unsubscribed: int = 0  # suppressions lifted (START)


def _apply(
    session: Session,
    settings: Settings,
    tally: Tally,
    target: Target,
    event: Event,
    now: datetime,
) -> None:
    event = _scrubbed(event, target)
    recorded = recording.record(session, target.delivery_id, event, now)
    if recorded.stored:
        tally.recorded += 1
    else:
        tally.duplicates += 1
    if suppression.after_event(session, settings, target, event, recorded, now):
        tally.suppressed += 1


def _scrubbed(event: Event, target: Target) -> Event:
    """Provider diagnostics often quote the recipient ("550 <ann@x>: no such user");
    the address must not outlive the contact's erasure in the log, so it goes."""
    if not target.address:
        return event
    pattern = re.compile(re.escape(target.address), re.IGNORECASE)
    detail = {
        key: pattern.sub("<recipient>", value) if isinstance(value, str) else value
        for key, value in event.detail.items()
    }
    error = pattern.sub("<recipient>", event.error) if event.error else event.error
    return dataclasses.replace(event, detail=detail, error=error)


# -- Twilio -------------------------------------------------------------------------------


def twilio_status(
    session: Session, settings: Settings, form: Mapping[str, str], now: datetime
) -> Tally:
    tally = Tally(received=1)
    event = twilio.status_event(form, now)
    if event is None:
        tally.ignored += 1
        return tally
    sid = event.provider_message_id or ""
    target = targets.by_provider_message_id(session, "sms", sid)
    if target is None:
        if recording.record_orphan(session, event, now):
            tally.pending += 1
        else:
            tally.duplicates += 1
        return tally
    orphans.adopt_for(session, settings, target, twilio.SOURCE, sid, now)
    _apply(session, settings, tally, target, event, now)
    return tally


def twilio_inbound(session: Session, form: Mapping[str, str]) -> Tally:
    tally = Tally(received=1)
    inbound = twilio.inbound_message(form)
    if inbound is None or inbound.intent is None:
        tally.ignored += 1
    elif inbound.intent == "stop":
        tally.suppressed += suppression.opt_out(session, inbound.channel, inbound.address)
    else:
        tally.unsubscribed += suppression.opt_in(session, inbound.channel, inbound.address)
    return tally


# -- WhatsApp -----------------------------------------------------------------------------


def whatsapp_updates(session: Session, settings: Settings, payload: Any, now: datetime) -> Tally:
    statuses, inbound, ignored = whatsapp.updates(payload, now)
    tally = Tally(received=len(statuses) + len(inbound) + ignored, ignored=ignored)
    for update in statuses:
        event = update.event
        if update.delivery_id is not None:
            target = targets.by_delivery_id(session, update.delivery_id, "whatsapp")
            if target is None:  # our key, but the delivery is gone (campaign deleted)
                tally.ignored += 1
                continue
        else:
            target = targets.by_provider_message_id(
                session, "whatsapp", event.provider_message_id or ""
            )
            if target is None:
                if recording.record_orphan(session, event, now):
                    tally.pending += 1
                else:
                    tally.duplicates += 1
                continue
        orphans.adopt_for(
            session, settings, target, whatsapp.SOURCE, event.provider_message_id, now
        )
        _apply(session, settings, tally, target, event, now)
    for message in inbound:
        if message.intent == "stop":
            tally.suppressed += suppression.opt_out(session, "whatsapp", message.address)
        elif message.intent == "start":
            tally.unsubscribed += suppression.opt_in(session, "whatsapp", message.address)
        else:
            tally.ignored += 1
    return tally


# -- email --------------------------------------------------------------------------------


def email_reports(
    session: Session,
    settings: Settings,
    reports: list[email_events.EmailReport],
    now: datetime,
    *,
    report_id: str | None = None,
) -> Tally:
    """`report_id` is the Message-ID of a posted DSN or ARF report: with the event's
    position in it, the key that makes the same report posted twice one event."""
    tally = Tally(received=len(reports))
    for index, report in enumerate(reports):
        target = (
            targets.by_delivery_id(session, report.delivery_id, "email")
            if report.delivery_id is not None
            else None
        )
        if target is None:
            tally.ignored += 1
            continue
        if report.event_id:
            key = f"id:{report.event_id}"
        elif report_id:
            key = f"report:{report_id}#{index}"
        else:  # one of each kind per delivery
            key = f"{report.kind}:d{target.delivery_id}"
        event = Event(
            kind=report.kind,
            source="email",
            occurred_at=report.occurred_at or now,
            provider_event_id=key,
            detail=report.detail(),
            error=report.error,
            failure=report.failure,
        )
        _apply(session, settings, tally, target, event, now)
    return tally


# -- push ---------------------------------------------------------------------------------


def push_delivered(session: Session, settings: Settings, token: str, now: datetime) -> Tally:
    """The app says the push reached the device. The caller has checked the token's
    signature (delivery_id_of_push_token); a valid token whose delivery is gone is
    ignored."""
    tally = Tally(received=1)
    delivery_id = delivery_of_push_token(settings, token)
    target = targets.by_delivery_id(session, delivery_id, "push") if delivery_id else None
    if target is None:
        tally.ignored += 1
        return tally
    event = Event(
        kind="delivered",
        source="push",
        occurred_at=now,
        provider_event_id=f"delivered:d{target.delivery_id}",
    )
    _apply(session, settings, tally, target, event, now)
    return tally

"""Test sends: a campaign's channels sent now to a few of the user's own contacts.

A marketer checks what recipients will get before launching, so the messages are the
real ones (engine.dispatch.messages renders them exactly as the sending step does) and
go through the real configured providers. They are not part of the campaign: no
delivery row, no counter, no rate-limit token, and they may be repeated at will.

Differences from a campaign message, all on purpose:
- the email subject starts with "[TEST] ";
- the idempotency key is fresh per message (test-<hex>), so a repeated test is sent
  again rather than deduplicated by the provider;
- {{ unsubscribe_url }} renders as a link that unsubscribes nobody
  ({PUBLIC_BASE_URL}/u/test-send: an invalid token), and emails carry no
  List-Unsubscribe headers, so a mailbox's unsubscribe button cannot act on it.

Consent and suppressions still apply: a test goes to a real address, and a contact who
opted out of a channel, or whose address is suppressed, does not get it (skipped, with
the reason). A marketer testing on their own contact record has consent.

Two steps, so that no provider call happens inside the request's transaction:
`plan_test_send` reads and renders (session), `deliver_test_send` calls the providers
(no session).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from engine.campaigns.rendering import CompiledChannel
from engine.campaigns.templates import TemplateRenderError
from engine.channels import OutboundMessage, channel_for
from engine.dispatch.messages import build_message
from engine.errors import InvalidTransition, ValidationFailed
from engine.models import Campaign, CampaignChannel, Contact, Suppression
from engine.services.ownership import get_owned
from engine.settings import Settings

log = logging.getLogger("herald.test_send")

MAX_TEST_CONTACTS = 20
SUBJECT_PREFIX = "[TEST] "
# The request waits for every call (at most 20 contacts x 4 channels): keep a stalled
# provider from holding it for the providers' default timeouts.
TEST_SEND_TIMEOUTS = {"connect_timeout": 3.0, "read_timeout": 5.0}

_ADDRESS_COLUMN = {"email": "email", "sms": "phone", "whatsapp": "whatsapp"}
# Channels in a stable order in the results.
_CHANNEL_ORDER = ("email", "sms", "push", "whatsapp")


@dataclass(frozen=True)
class PlannedMessage:
    """One (contact, channel) of a test send: a message to send, or why not."""

    contact_id: uuid.UUID
    channel: str
    message: OutboundMessage | None = None
    skipped: str | None = None


def fake_unsubscribe_url(settings: Settings) -> str:
    """Where {{ unsubscribe_url }} points in a test: the unsubscribe page, with a token
    that names no delivery, so following it unsubscribes nobody."""
    return f"{settings.public_base_url}/u/test-send"


def plan_test_send(
    session: Session,
    user_id: uuid.UUID,
    campaign_id: uuid.UUID,
    contact_ids: list[uuid.UUID],
    *,
    settings: Settings,
) -> list[PlannedMessage]:
    """Check the request and render every message; nothing is written.

    Raises NotFound for another user's campaign, InvalidTransition for a cancelled one,
    and ValidationFailed naming `contact_ids[i]` for ids that are not the user's
    contacts (another user's contact reads exactly like a missing one)."""
    campaign = get_owned(session, Campaign, user_id, campaign_id, what="campaign")
    if campaign.status == "cancelled":
        raise InvalidTransition(campaign.status, "test-send")
    wanted = list(dict.fromkeys(contact_ids))  # each contact once, in the order given
    if not 1 <= len(wanted) <= MAX_TEST_CONTACTS:
        raise ValidationFailed(
            "invalid contact ids",
            fields={"contact_ids": [f"between 1 and {MAX_TEST_CONTACTS} contacts"]},
        )
    found = {
        row.id: row
        for row in session.execute(
            select(*Contact.__table__.c).where(Contact.user_id == user_id, Contact.id.in_(wanted))
        )
    }
    unknown = {
        f"contact_ids[{index}]": ["no such contact"]
        for index, contact_id in enumerate(contact_ids)
        if contact_id not in found
    }
    if unknown:
        raise ValidationFailed("unknown contacts", fields=unknown)
    channels = sorted(
        session.scalars(select(CampaignChannel).where(CampaignChannel.campaign_id == campaign.id)),
        key=lambda row: _CHANNEL_ORDER.index(row.channel_type),
    )
    contacts = [found[contact_id] for contact_id in wanted]
    suppressed = _suppressed(session, user_id, contacts, [c.channel_type for c in channels])
    plan: list[PlannedMessage] = []
    number = 0
    for channel in channels:
        compiled = CompiledChannel.compile(channel.channel_type, channel.config, campaign)
        for contact in contacts:
            number += 1
            plan.append(_planned(compiled, contact, number, settings, suppressed))
    return plan


def deliver_test_send(plan: list[PlannedMessage], settings: Settings) -> list[dict[str, Any]]:
    """Send the planned messages now, one provider per channel, and say how each went."""
    results: list[dict[str, Any]] = []
    by_channel: dict[str, list[PlannedMessage]] = {}
    for item in plan:
        by_channel.setdefault(item.channel, []).append(item)
    for channel_type, items in by_channel.items():
        to_send = [item for item in items if item.message is not None]
        outcomes: dict[int, dict[str, Any]] = {}
        if to_send:
            outcomes = _send(channel_type, [item.message for item in to_send], settings)
        for item in items:
            if item.message is None:
                results.append(_result(item, "skipped", error=item.skipped))
            else:
                results.append({**_result(item, "permanent"), **outcomes[item.message.delivery_id]})
    return results


def _planned(
    compiled: CompiledChannel,
    contact: Any,
    number: int,
    settings: Settings,
    suppressed: set[tuple[str, str]],
) -> PlannedMessage:
    channel = compiled.channel_type
    address = _address(channel, contact)
    if not address:
        return PlannedMessage(contact.id, channel, skipped=f"no {channel} address")
    if not getattr(contact, f"consent_{channel}"):
        return PlannedMessage(contact.id, channel, skipped=f"no consent for {channel}")
    if (channel, _compared(channel, address)) in suppressed:
        return PlannedMessage(contact.id, channel, skipped="suppressed")
    try:
        message = build_message(
            compiled,
            contact,
            message_id=number,
            idempotency_key=f"test-{uuid.uuid4().hex}",
            address=address,
            unsubscribe_url=fake_unsubscribe_url(settings),
            list_unsubscribe=False,
        )
    except TemplateRenderError as exc:
        return PlannedMessage(contact.id, channel, skipped=f"template {exc.field}: {exc.problem}")
    if channel == "email":
        content = dict(message.content)
        content["subject"] = SUBJECT_PREFIX + str(content.get("subject") or "")
        message = OutboundMessage(
            delivery_id=message.delivery_id,
            idempotency_key=message.idempotency_key,
            address=message.address,
            content=content,
            push_tokens=message.push_tokens,
        )
    return PlannedMessage(contact.id, channel, message=message)


def _address(channel: str, contact: Any) -> str | None:
    """The contact's address on `channel`, as recipients_select defines it."""
    if channel == "push":
        return str(contact.id) if contact.push_tokens else None
    return getattr(contact, _ADDRESS_COLUMN[channel]) or None


def _compared(channel: str, address: str) -> str:
    # Email suppressions match whatever the case; phones and ids match exactly.
    return address.lower() if channel == "email" else address


def _suppressed(
    session: Session, user_id: uuid.UUID, contacts: list[Any], channels: list[str]
) -> set[tuple[str, str]]:
    """(channel, address as compared) of the given contacts' suppressed addresses."""
    wanted = {
        (channel, _compared(channel, address))
        for channel in channels
        for contact in contacts
        if (address := _address(channel, contact))
    }
    if not wanted:
        return set()
    rows = session.execute(
        select(Suppression.channel, Suppression.address).where(
            Suppression.user_id == user_id,
            or_(
                func.lower(Suppression.address).in_({a for c, a in wanted if c == "email"}),
                Suppression.address.in_({a for c, a in wanted if c != "email"}),
            ),
        )
    )
    return {(channel, _compared(channel, address)) for channel, address in rows} & wanted


def _send(
    channel_type: str, messages: list[OutboundMessage], settings: Settings
) -> dict[int, dict[str, Any]]:
    try:
        provider = channel_for(channel_type, settings, **TEST_SEND_TIMEOUTS)
    except ValueError as exc:  # an unconfigured provider fails the test, not the request
        return {m.delivery_id: {"outcome": "permanent", "error": str(exc)} for m in messages}
    outcomes: dict[int, dict[str, Any]] = {}
    with provider:
        for message in messages:
            result = provider.send(message)
            outcomes[message.delivery_id] = {
                "outcome": result.outcome,
                "error": result.error,
                "provider_message_id": result.provider_message_id,
            }
    return outcomes


def _result(item: PlannedMessage, outcome: str, *, error: str | None = None) -> dict[str, Any]:
    return {
        "contact_id": item.contact_id,
        "channel": item.channel,
        "outcome": outcome,
        "error": error,
        "provider_message_id": None,
    }

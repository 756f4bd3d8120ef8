"""What an event means for its address: automatic suppression and inbound opt-outs.

- A hard failure (an email hard bounce, a number the carrier says does not exist or
  cannot take SMS, a number not on WhatsApp) suppresses the address: reason `bounce`.
- A complaint (the recipient pressed "this is spam") suppresses it: `complaint`.
- A provider saying the recipient opted out (Twilio 21610, WhatsApp 131050): the
  address is suppressed as `unsubscribe`.
- A soft failure (mailbox full, handset off) counts one more soft bounce for the
  address; SOFT_BOUNCE_THRESHOLD of them in a row suppress it (`soft_bounce`). A
  delivery to the address in between starts the count over.

Each delivery counts once: these run only when the event established its fact for the
first time (or, for a complaint, was a new event), never for a replay.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from engine.models import Contact, SoftBounce, Suppression
from engine.services.suppressions import stored_address, suppress
from engine.settings import Settings
from engine.tracking.recording import Event, Recorded
from engine.tracking.targets import Target

HARD = "hard"
SOFT = "soft"
OPT_OUT = "opt_out"

# What an inbound message must say (trimmed, any case) to opt out or back in. The same
# words Twilio's Advanced Opt-Out answers to; "stop promotions" is the text of the
# opt-out button WhatsApp adds to marketing templates.
STOP_KEYWORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_KEYWORDS = frozenset({"START", "UNSTOP"})
WHATSAPP_STOP_BUTTONS = frozenset({"STOP PROMOTIONS"})

# What providers send as the sender of an inbound message: E.164, always. Taken as it
# is, not re-validated against phonenumbers' metadata: a STOP must never be lost because
# a number range is newer than the library, and the lookup is an exact match anyway.
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")

# The contact column each channel's inbound sender is matched against.
_ADDRESS_COLUMN = {"sms": Contact.phone, "whatsapp": Contact.whatsapp}


def after_event(
    session: Session,
    settings: Settings,
    target: Target,
    event: Event,
    recorded: Recorded,
    now: datetime,
) -> str | None:
    """Apply the event's consequences for its address; the suppression reason added, if
    one was."""
    if target.address is None:  # the contact was erased: nobody left to protect
        return None
    if event.kind == "complained" and recorded.stored:
        return _suppress(session, target, "complaint")
    if "delivered" in recorded.new_facts:
        _clear_soft_bounces(session, target)
    if "failed" not in recorded.new_facts:
        return None
    if event.failure == HARD:
        return _suppress(session, target, "bounce")
    if event.failure == OPT_OUT:
        return _suppress(session, target, "unsubscribe")
    if event.failure == SOFT:
        return _count_soft_bounce(session, settings, target, now)
    return None


def _suppress(session: Session, target: Target, reason: str) -> str | None:
    assert target.address is not None
    added = suppress(session, target.user_id, target.channel, target.address, reason)
    return reason if added else None


def _count_soft_bounce(
    session: Session, settings: Settings, target: Target, now: datetime
) -> str | None:
    assert target.address is not None
    address = stored_address(target.channel, target.address)
    key = {"user_id": target.user_id, "channel": target.channel, "address": address}
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    table = SoftBounce.__table__
    # One upsert: concurrent bounces for two deliveries to one address each add one.
    stmt = (
        insert(table)
        .values(**key, bounces=1, last_bounced_at=now)
        .on_conflict_do_update(
            index_elements=list(key),
            set_={"bounces": table.c.bounces + 1, "last_bounced_at": now},
        )
        .returning(table.c.bounces)
    )
    bounces = session.execute(stmt).scalar_one()
    if bounces < settings.soft_bounce_threshold:
        return None
    # The suppression now stands for the tally; deleting the suppression starts over.
    _clear_soft_bounces(session, target)
    return _suppress(session, target, "soft_bounce")


def _clear_soft_bounces(session: Session, target: Target) -> None:
    assert target.address is not None
    session.execute(
        delete(SoftBounce).where(
            SoftBounce.user_id == target.user_id,
            SoftBounce.channel == target.channel,
            SoftBounce.address == stored_address(target.channel, target.address),
        )
    )


# -- inbound opt-outs (STOP / START) ------------------------------------------------------


def inbound_number(sender: object) -> str | None:
    """The sender as stored on contacts (E.164), or None for a short code or a name."""
    if not isinstance(sender, str):
        return None
    sender = sender.strip()
    return sender if _E164.fullmatch(sender) else None


def keyword_intent(text: object, *, channel: str) -> str | None:
    """ "stop", "start" or None for an inbound message's text."""
    if not isinstance(text, str):
        return None
    word = " ".join(text.split()).upper()
    if word in STOP_KEYWORDS or (channel == "whatsapp" and word in WHATSAPP_STOP_BUTTONS):
        return "stop"
    if word in START_KEYWORDS:
        return "start"
    return None


def owners_of(session: Session, channel: str, address: str) -> Sequence[uuid.UUID]:
    """The users with a contact at this number. One Twilio account and one WhatsApp
    number serve the whole deployment, so the number that wrote is all we know: every
    user who has it as a contact's phone (sms) or whatsapp number stops sending to it.
    Users without such a contact never sent to it from a campaign, or erased it."""
    column = _ADDRESS_COLUMN[channel]
    return session.scalars(select(Contact.user_id).where(column == address).distinct()).all()


def opt_out(session: Session, channel: str, address: str) -> int:
    """Suppress the number (reason unsubscribe) for each user who has it; how many
    suppressions were added."""
    return sum(
        suppress(session, user_id, channel, address, "unsubscribe")
        for user_id in owners_of(session, channel, address)
    )


def opt_in(session: Session, channel: str, address: str) -> int:
    """Lift the unsubscribe suppressions of the number (START). A bounce, complaint or
    manual suppression stays: the marketer or the carrier put it there, not the
    recipient's STOP."""
    owners = owners_of(session, channel, address)
    if not owners:
        return 0
    return session.execute(
        delete(Suppression).where(
            Suppression.user_id.in_(owners),
            Suppression.channel == channel,
            Suppression.address == address,
            Suppression.reason == "unsubscribe",
        )
    ).rowcount


# Send-time refusals that condemn the address itself. SMTP: RCPT refused with 5.1.1 (no
# such mailbox), 5.1.2 (no such domain) or 5.1.10 (the domain takes no mail); other 5xx
# (policy, relay denied, content) say nothing about the recipient and suppress nobody.
_SMTP_HARD = frozenset({"5.1.1", "5.1.2", "5.1.10"})
_REASON_OF_FAILURE = {HARD: "bounce", OPT_OUT: "unsubscribe"}


def reason_for_refusal(channel: str, provider_code: str | None) -> str | None:
    """The suppression a provider's synchronous, permanent refusal calls for (the same
    codes as its status callbacks), or None: soft or unrelated failures suppress nothing
    at send time."""
    if not provider_code:
        return None
    if channel == "email":
        return "bounce" if provider_code in _SMTP_HARD else None
    from engine.tracking import twilio, whatsapp  # their code tables import this module

    table = {"sms": twilio.FAILURE_OF_CODE, "whatsapp": whatsapp.FAILURE_OF_CODE}.get(channel)
    if table is None or not provider_code.isdigit():
        return None
    return _REASON_OF_FAILURE.get(table.get(int(provider_code)))

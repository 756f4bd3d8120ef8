"""A pixel fetch or a link click, recorded: the services behind /t/o and /t/c.

Both record through engine.tracking.recording, so a counter moves on a delivery's first
human open or click only, by compare-and-set in the same statement, however many
duplicates race. Which events are kept:

- **opens**: at most one human and one machine `opened` event per delivery (their
  idempotency keys are `open:d<id>` and `open:d<id>:machine`). Reloads and proxies
  refetching the pixel add nothing: a duplicate is answered like the first and stored
  nowhere, so a thousand hits cost a thousand cheap no-op inserts, not a thousand rows.
- **clicks**: every click is an event (no key), human or machine, with its link in the
  detail (`link`): unique and total clicks per link are counted over them. A human
  click also establishes opened and delivered (a click implies an open).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, bindparam, exists, select
from sqlalchemy.orm import Session

from engine.models import Delivery, DeliveryEvent
from engine.models.base import UTCDateTime
from engine.models.links import CampaignLink
from engine.settings import Settings
from engine.tracking import recording
from engine.tracking.links import read_click_token
from engine.tracking.machine import BURST_WINDOW, Hit, judge_click, judge_open
from engine.tracking.opens import delivery_of_open_token
from engine.tracking.recording import Event

SOURCE = "tracking"
USER_AGENT_MAX = 300

_deliveries = Delivery.__table__
_links = CampaignLink.__table__
_events = DeliveryEvent.__table__
# The hot read of a click, one statement: the link's destination joined through the
# delivery's own channel (a valid token can only name that channel's links), the
# delivery's sent_at for the too-soon rule, and whether another link of the same message
# was clicked within the burst window (the delivery_id index). Built once from table
# columns with bind parameters: building an ORM select per click cost ~1.5 ms of Python.
_CLICK_LOOKUP = (
    select(
        _deliveries.c.sent_at,
        _links.c.destination,
        _links.c.dynamic,
        exists()
        .where(
            _events.c.delivery_id == _deliveries.c.id,
            _events.c.kind == "clicked",
            _events.c.occurred_at > bindparam("since", type_=UTCDateTime()),
            _events.c.detail["link"].as_integer() != bindparam("link_id"),
        )
        .label("burst"),
    )
    .join(
        _links,
        and_(
            _links.c.campaign_channel_id == _deliveries.c.campaign_channel_id,
            _links.c.id == bindparam("link_id"),
        ),
    )
    .where(_deliveries.c.id == bindparam("delivery_id"))
)


def record_open(session: Session, settings: Settings, token: str, hit: Hit, now: datetime) -> bool:
    """Record a pixel fetch; True if it was a new event. A forged token, or one whose
    delivery is gone, records nothing (the caller answers the image all the same)."""
    delivery_id = delivery_of_open_token(settings, token)
    if delivery_id is None:
        return False
    verdict = judge_open(hit)
    key = f"open:d{delivery_id}" + (":machine" if verdict.machine else "")
    event = Event(
        kind="opened",
        source=SOURCE,
        occurred_at=now,
        provider_event_id=key,
        detail=_detail(verdict.detail(), hit),
        machine=verdict.machine,
    )
    return recording.record(session, delivery_id, event, now).stored


def record_click(
    session: Session, settings: Settings, token: str, hit: Hit, now: datetime
) -> str | None:
    """Record a click and return where it goes; None (answer 404) for a forged token, a
    delivery that is gone, or a link that is not its channel's."""
    clicked = read_click_token(settings, token)
    if clicked is None:
        return None
    row = session.execute(
        _CLICK_LOOKUP,
        {
            "delivery_id": clicked.delivery_id,
            "link_id": clicked.link_id,
            "since": now - BURST_WINDOW,
        },
    ).first()
    if row is None:
        return None
    destination = clicked.destination if row.dynamic else row.destination
    if destination is None:  # a static token for a dynamic link, or the reverse
        return None
    verdict = judge_click(hit, sent_at=row.sent_at, now=now, other_link_just_clicked=row.burst)
    event = Event(
        kind="clicked",
        source=SOURCE,
        occurred_at=now,
        detail=_detail({"link": clicked.link_id, **verdict.detail()}, hit),
        machine=verdict.machine,
    )
    recording.record(session, clicked.delivery_id, event, now)
    return destination


def _detail(detail: dict, hit: Hit) -> dict:
    # A machine's user agent says which machine it was. A person's is not kept, nor is
    # anyone's IP address: personal data the stats do not need.
    if hit.method != "GET":
        detail["method"] = hit.method
    if detail.get("machine_rule"):
        agent = recording.safe_text(hit.user_agent, USER_AGENT_MAX)
        if agent:
            detail["user_agent"] = agent
    return detail

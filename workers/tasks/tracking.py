"""Provider events that arrived before the sender recorded their message id.

A status callback can beat the sender's checkpoint (engine.tracking.orphans); it is
kept as an orphan and adopted by the next callback about the same message. The last
callback of a message has no next one, so beat runs this sweep. Idempotent: an adopted
orphan is no longer an orphan, and recording is compare-and-set.
"""

from __future__ import annotations

import logging

from celery import shared_task

from engine.clock import system_clock
from engine.settings import get_settings
from engine.tracking.orphans import adopt_orphans
from workers.db import task_session

log = logging.getLogger("herald.tracking")

ADOPT_ORPHAN_EVENTS = "herald.adopt_orphan_events"


@shared_task(name=ADOPT_ORPHAN_EVENTS)
def adopt_orphan_events_task() -> int:
    with task_session() as session:
        adopted = adopt_orphans(session, get_settings(), system_clock.now())
    if adopted:
        log.info("adopted %d early provider event(s)", adopted)
    return adopted

"""Housekeeping run by beat. Each task is one set-based statement and idempotent."""

from __future__ import annotations

import logging

from celery import shared_task

from engine.clock import system_clock
from engine.services.auth import purge_expired_tokens
from workers.db import task_session

log = logging.getLogger("herald.maintenance")


@shared_task(name="herald.purge_expired_tokens")
def purge_expired_tokens_task() -> dict[str, int]:
    with task_session() as session:
        purged = purge_expired_tokens(session, system_clock.now())
    log.info("purged expired tokens: %s", purged)
    return purged

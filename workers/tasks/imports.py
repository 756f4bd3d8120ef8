"""CSV contact imports, upserted from staging by a `sync` worker.

Each batch is its own transaction (engine.contacts.csv_import.run_import_batch), whose
checkpoint makes the task safe to redeliver, retry or run twice: it always resumes after
the last committed batch. A long import hands itself on to a fresh task every few
minutes, well inside the time limits, instead of holding one message for an hour.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from engine.clock import system_clock
from engine.contacts.csv_import import (
    ImportCheckpointMoved,
    mark_import_failed,
    run_import_batch,
    stalled_imports,
)
from engine.errors import Conflict
from workers.db import task_session

log = logging.getLogger("herald.imports")

# Well under the soft time limit (540 s): the task re-enqueues itself past this.
TIME_BUDGET_SECONDS = 240
# A running import touches its job row every batch (seconds); this much silence means
# nobody is working on it.
STALL_GRACE = timedelta(minutes=5)
# A concurrent write, a moved checkpoint, a deadlock or a lost connection: try again.
TRANSIENT = (Conflict, ImportCheckpointMoved, OperationalError, SoftTimeLimitExceeded)


@shared_task(bind=True, name="herald.sync.import_contacts", max_retries=8)
def import_contacts_task(self, import_id: str) -> str:
    job_id = uuid.UUID(import_id)
    deadline = time.monotonic() + TIME_BUDGET_SECONDS
    try:
        while True:
            with task_session() as session:
                more = run_import_batch(session, job_id, system_clock.now())
            if not more:
                log.info("import %s finished", import_id)
                return "finished"
            if time.monotonic() > deadline:
                self.apply_async(args=[import_id])
                return "continued"
    except TRANSIENT as exc:
        if self.request.retries < self.max_retries:
            log.warning("import %s batch failed (%s); retrying", import_id, exc)
            raise self.retry(exc=exc, countdown=min(60, 2**self.request.retries)) from exc
        _give_up(job_id, f"gave up after {self.max_retries} retries: {type(exc).__name__}")
        raise
    except Exception:
        log.exception("import %s failed", import_id)
        _give_up(job_id, "the import stopped on an unexpected error")
        raise


@shared_task(name="herald.sync.resume_stalled_imports")
def resume_stalled_imports_task() -> int:
    """Beat's safety net: PostgreSQL, not the broker, says which imports still have work."""
    with task_session() as session:
        stalled = stalled_imports(session, system_clock.now(), STALL_GRACE)
    for job_id in stalled:
        import_contacts_task.delay(str(job_id))
    if stalled:
        log.warning("re-enqueued %d stalled import(s)", len(stalled))
    return len(stalled)


def _give_up(job_id: uuid.UUID, reason: str) -> None:
    with task_session() as session:
        mark_import_failed(session, job_id, reason, system_clock.now())

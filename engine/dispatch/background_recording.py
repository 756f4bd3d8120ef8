"""Recording a checkpoint's acceptances on a thread while the batch goes on sending.

A checkpoint's recording statement (engine.dispatch.recording) takes a few
milliseconds, longer than the one provider call it is written during; made in line it
held up every 50th call. Acceptances need no hurry once the Redis journal holds them
(a worker killed before they reach PostgreSQL loses nothing: reconciliation records
them from the journal), so they are recorded here, in a transaction of their own on
one helper thread, while the next calls go out. What must happen in line stays in
line (engine.dispatch.sending): the re-check of the campaign and the lease, and the
recording of failures, which may pause the campaign at that very checkpoint.

At most one recording is under way per batch: the next one, and the batch's final
settle, first wait for it. It runs on the process's helper thread
(engine.dispatch.helper_thread) and works on a snapshot of the batch (its own counts,
the lease the rows were claimed under), so nothing is shared with the send loop while
it runs. A recording that fails (PostgreSQL down) gives its outcomes back to the
batch, which records them with its final settle or leaves them to the journal. Only
with the journal and PostgreSQL: without Redis nothing holds the acceptances
meanwhile, and SQLite (the embedded default, one writer) records in line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from engine.channels import SendResult
from engine.db import session_scope
from engine.dispatch.helper_thread import helper_thread
from engine.dispatch.journal import AcceptanceJournal
from engine.dispatch.recording import BatchRun, ClaimedRow, forget_journaled, record_outcomes

Outcomes = list[tuple[ClaimedRow, SendResult]]


class BackgroundRecorder:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        batch: BatchRun,
        rng: Callable[[], float],
        journal: AcceptanceJournal | None,
    ) -> None:
        self._session_factory = session_factory
        self._batch = batch
        self._rng = rng
        self._journal = journal
        self._under_way: tuple[Future[dict[str, int]], Outcomes] | None = None

    def submit(self, outcomes: Outcomes, lease: datetime, now: datetime) -> None:
        """Record `outcomes` (rows claimed under `lease`) on the thread. Waits for the
        previous recording first, and raises its failure (see wait)."""
        self.wait()
        snapshot = dataclasses.replace(self._batch, lease=lease, counts={})
        future = helper_thread().submit(self._record, snapshot, outcomes, now)
        self._under_way = (future, outcomes)

    def wait(self) -> None:
        """Wait for the recording under way. If it failed, its outcomes are not in
        PostgreSQL: they are handed back by raising RecordingFailed. What interrupts
        the wait itself (the soft time limit's signal) propagates as it is, and the
        recording can still be waited for."""
        if self._under_way is None:
            return
        future, outcomes = self._under_way
        failure = future.exception()  # waits
        self._under_way = None
        if failure is not None:
            raise RecordingFailed(outcomes) from failure
        counts = future.result()
        for status, n in counts.items():
            self._batch.add(status, n)

    def _record(self, snapshot: BatchRun, outcomes: Outcomes, now: datetime) -> dict[str, int]:
        with session_scope(self._session_factory) as session:
            record_outcomes(session, snapshot, outcomes, now, self._rng)
        forget_journaled(self._journal, snapshot, outcomes)
        return snapshot.counts


class RecordingFailed(Exception):
    """A background recording did not commit; `outcomes` still need recording."""

    def __init__(self, outcomes: Outcomes) -> None:
        super().__init__(f"{len(outcomes)} outcome(s) not recorded")
        self.outcomes = outcomes

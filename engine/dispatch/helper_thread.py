"""The worker process's one helper thread, for database work that overlaps provider calls.

A batch's calls mostly wait on a socket; the statements that would otherwise stand
between two of them (claiming the rest of the batch, recording a checkpoint's
acceptances) run here meanwhile, each in a transaction of its own. One thread, so they
run in the order they were submitted and never race each other for the same rows. It
is made on first use (after a worker's fork: threads do not survive one) and kept for
the next batches: starting one cost a millisecond a batch.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

_executor: ThreadPoolExecutor | None = None
_executor_pid: int | None = None


def helper_thread() -> ThreadPoolExecutor:
    global _executor, _executor_pid
    if _executor is None or _executor_pid != os.getpid():
        _executor = ThreadPoolExecutor(1, thread_name_prefix="herald-helper")
        _executor_pid = os.getpid()
    return _executor

"""The worker process's one helper thread, for database work that overlaps provider calls.

A batch's calls mostly wait on a socket; the statements that would otherwise stand
between two of them (claiming the rest of the batch, recording a checkpoint's
acceptances) run here meanwhile, each in a transaction of its own. One thread, so they
run in the order they were submitted and never race each other for the same rows. It
is made on first use (after a worker's fork: threads do not survive one) and kept for
the next batches: starting one cost a millisecond a batch.

The thread shares the GIL with the send loop. When a provider's answer arrives while
this thread runs Python (building a recording's parameters, decoding claimed rows),
the send loop waits for the GIL until the thread blocks on the database or the
interpreter's switch interval forces it to let go: 5 ms by default, more than two
calls' worth of provider latency at the speeds Herald sends. The process's interval
is therefore lowered once the thread exists, so the loop waits half a millisecond at
most. Extra switches happen only while a thread waits for the GIL, i.e. while the
helper has work, which is short.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

# Seconds a thread waiting for the GIL waits before asking the holder to drop it.
SWITCH_INTERVAL = 0.0005

_executor: ThreadPoolExecutor | None = None
_executor_pid: int | None = None


def helper_thread() -> ThreadPoolExecutor:
    global _executor, _executor_pid
    if _executor is None or _executor_pid != os.getpid():
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        _executor = ThreadPoolExecutor(1, thread_name_prefix="herald-helper")
        _executor_pid = os.getpid()
    return _executor

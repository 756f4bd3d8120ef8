"""When a transiently failed delivery is tried again.

Exponential in the attempts made (20 s, 40 s, 80 s, … capped at an hour) with ±50 %
jitter, so a provider outage that failed thousands of messages at once does not bring
them all back in the same second. A provider's Retry-After wins when it asks for longer.
"""

from __future__ import annotations

import random
from collections.abc import Callable

BASE_SECONDS = 10.0
MAX_SECONDS = 3600.0


def retry_delay(
    attempts: int,
    retry_after: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after the `attempts`-th attempt failed transiently."""
    exponential = min(MAX_SECONDS, BASE_SECONDS * 2 ** max(1, attempts))
    delay = exponential * (0.5 + rng())
    if retry_after is not None and retry_after > delay:
        return float(retry_after)
    return delay

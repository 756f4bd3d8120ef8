"""Login throttling: failed attempts counted per account and per client IP.

Backed by the `limits` library on Redis, so every API process shares the counts; the
embedded default (no Redis) keeps them in process memory, which the README says.
A moving window avoids the burst a fixed window allows at its boundary.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from engine.errors import RateLimited
from engine.settings import Settings


class LoginThrottle:
    def __init__(self, settings: Settings) -> None:
        uri = settings.redis_url or "memory://"
        self._limiter = MovingWindowRateLimiter(storage_from_string(uri))
        window = settings.login_failure_window
        self._per_account = RateLimitItemPerSecond(
            settings.login_max_failures_per_account, window, namespace="herald-login-account"
        )
        self._per_ip = RateLimitItemPerSecond(
            settings.login_max_failures_per_ip, window, namespace="herald-login-ip"
        )

    def check(self, email: str, ip: str) -> None:
        """Refuse before the password is even checked once either budget is spent."""
        for item, key in ((self._per_account, email), (self._per_ip, ip)):
            if not self._limiter.test(item, key):
                reset_at = self._limiter.get_window_stats(item, key).reset_time
                retry_after = max(1, math.ceil(reset_at - time.time()))
                raise RateLimited("too many failed login attempts; try again later", retry_after)

    def record_failure(self, email: str, ip: str) -> None:
        self._limiter.hit(self._per_account, email)
        self._limiter.hit(self._per_ip, ip)

    def record_success(self, email: str) -> None:
        # A correct password ends the account's streak; the IP budget keeps counting so
        # one valid account cannot be used to reset a spraying client.
        self._limiter.clear(self._per_account, email)

"""The one source of "now" for domain logic.

Everything time-dependent (token expiry, purges, and later promotion of due campaigns)
asks a Clock instead of the database's now(), so tests can set the time explicitly or
with freezegun and never sleep.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock:
    """A clock that only moves when told to; for tests."""

    def __init__(self, at: datetime) -> None:
        self._at = at

    def now(self) -> datetime:
        return self._at

    def set(self, at: datetime) -> None:
        self._at = at


system_clock = SystemClock()

"""The one clock a process's decisions are made with.

Every time-dependent decision (a certificate's validity window, whether the
CA is in date, an audit record's time, policy time windows, rate limits,
token-cache expiry, serving-certificate renewal) reads the ``Clock`` it was
given where the server or the CLI is assembled, never the system clock
directly, so tests drive time as SPIRE's do. Operational timeouts (how long
to wait for a worker or a batch-mate) are not decisions and use
``time.monotonic`` where they are.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock", "ManualClock", "SYSTEM_CLOCK"]


@runtime_checkable
class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time, unix seconds."""
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (rates, cache ages)."""
    def utcnow(self) -> dt.datetime:
        """``now()`` as an aware UTC datetime."""


class SystemClock:
    """The machine's clocks."""

    now = staticmethod(time.time)
    monotonic = staticmethod(time.monotonic)

    def utcnow(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock that moves only when told to (tests; replaying a scenario).
    ``monotonic`` advances with it."""

    def __init__(self, start: float | dt.datetime) -> None:
        self._now = start.timestamp() if isinstance(start, dt.datetime) else float(start)
        self._monotonic = 1_000.0
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    def utcnow(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._now, dt.timezone.utc)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock is moved forward; build a new one to go back")
        with self._lock:
            self._now += seconds
            self._monotonic += seconds

    def set(self, moment: float | dt.datetime) -> None:
        """Jump the wall clock (as NTP may); the monotonic clock does not go back."""
        with self._lock:
            target = moment.timestamp() if isinstance(moment, dt.datetime) else float(moment)
            self._monotonic += max(0.0, target - self._now)
            self._now = target

    def __repr__(self) -> str:
        return f"ManualClock({self.utcnow().isoformat()})"

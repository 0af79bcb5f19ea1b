"""When to renew, and how long to wait after a failure (docs/reliability.md, cases 29–30,
docs/istio-contract.md).

Renewal happens at ``not_after − ratio' × (not_after − received)`` where
``received`` is when the agent got the certificate (the CA backdates
NotBefore, so NotBefore would renew early) and ``ratio'`` is drawn uniformly
from ``[ratio − jitter, ratio + jitter]`` clamped to ``[0, 1]``, so a fleet
that got its certificates together does not renew together.
"""

from __future__ import annotations

import random

__all__ = ["refresh_at", "delay_until", "Backoff"]


def refresh_at(received: float, not_after: float, ratio: float = 0.5, jitter: float = 0.01,
               rng: random.Random | None = None) -> float:
    """Unix time at which a certificate received at ``received`` and valid
    until ``not_after`` should be renewed. A certificate received after its
    expiry (or with no lifetime left) is due at ``not_after``: at once."""
    if jitter < 0:
        raise ValueError("jitter must be >= 0")
    draw = (rng or random).uniform(ratio - jitter, ratio + jitter) if jitter else ratio
    effective = min(1.0, max(0.0, draw))
    lifetime = max(0.0, not_after - received)
    return not_after - effective * lifetime


def delay_until(when: float, now: float) -> float:
    """Seconds to sleep until ``when``; 0 when it is already past."""
    return max(0.0, when - now)


class Backoff:
    """Capped exponential backoff with proportional jitter:
    ``initial × factor^n``, at most ``maximum``, each value multiplied by a
    uniform draw from ``[1 − jitter, 1 + jitter]`` (and still capped)."""

    def __init__(self, initial: float = 1.0, maximum: float = 60.0, factor: float = 2.0, jitter: float = 0.1,
                 rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("backoff needs 0 < initial <= maximum, factor >= 1, 0 <= jitter < 1")
        self.initial, self.maximum, self.factor, self.jitter = initial, maximum, factor, jitter
        self._rng = rng or random.Random()
        self._failures = 0

    @property
    def failures(self) -> int:
        """Consecutive failures since the last reset."""
        return self._failures

    def next(self) -> float:
        """The delay after one more failure."""
        base = min(self.maximum, self.initial * self.factor ** min(self._failures, 64))
        self._failures += 1
        if self.jitter:
            base *= self._rng.uniform(1 - self.jitter, 1 + self.jitter)
        return min(self.maximum, base)

    def reset(self) -> None:
        self._failures = 0

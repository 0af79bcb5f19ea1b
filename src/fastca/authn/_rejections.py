"""Recently rejected tokens, so one bad token costs one remote check.

An agent (or an attacker) retrying a token the API server or the issuer has
just refused would otherwise cost a TokenReview or a signature check per
call. Only definitive verdicts are kept (the reviewer answered "not
authenticated", the signature does not verify, the token expired): an
outage or a timeout is never remembered, so it stays retryable.

Entries are keyed by a SHA-256 of the token (with the cluster or issuer it
was judged by); the token itself is not kept. The table is an LRU bounded
in entries, each entry living ``ttl`` seconds on a monotonic clock.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["ExpiringLru", "RejectionCache", "token_key"]

V = TypeVar("V")


def token_key(scope: str, token: str) -> bytes:
    """The cache key of a token judged within ``scope`` (a cluster id, an issuer)."""
    return hashlib.sha256(scope.encode() + b"\0" + token.encode()).digest()


class ExpiringLru(Generic[V]):
    """key -> (value, expiry on ``clock``), at most ``size`` entries, the
    least recently used going first; ``size`` 0 or ``ttl`` 0 keeps nothing."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float]) -> None:
        self.size, self.ttl, self._clock = size, ttl, clock
        self._entries: OrderedDict[bytes, tuple[V, float]] = OrderedDict()

    def entry(self, key: bytes) -> tuple[V, float] | None:
        """(value, expiry) of a live entry."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[1]:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def _store(self, key: bytes, value: V, expires: float) -> None:
        if self.size <= 0 or self.ttl <= 0 or expires <= self._clock():
            return
        self._entries[key] = (value, expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, ttl={self.ttl}, entries={len(self._entries)})"


class RejectionCache(ExpiringLru[None]):
    """Keys of tokens refused less than ``ttl`` seconds ago."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(size, ttl, clock)
        self.hits = 0

    def rejected(self, key: bytes) -> bool:
        """True if this key was rejected less than ``ttl`` ago."""
        if self.entry(key) is None:
            return False
        self.hits += 1
        return True

    def reject(self, key: bytes) -> None:
        self._store(key, None, self._clock() + self.ttl)

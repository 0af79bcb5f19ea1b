"""Per-request policy after authentication: which identity is certified, and
whether this caller may have it now and from here (the seed's zero-trust
enforcer: rate limit, time window, source network).

Stages run in a fixed order and each either passes or raises one of the
tree's errors; the clock is injected so tests move time.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from fastca.authn.caller import Caller
from fastca.clock import SYSTEM_CLOCK, Clock
from fastca.config import PolicyConfig
from fastca.errors import AuthenticationFailed, Overloaded, PolicyDenied

__all__ = ["RequestPolicy", "spiffe_identity_of"]


def spiffe_identity_of(caller: Caller, trust_domain: str) -> str:
    """The one SPIFFE ID a caller is certified as. Identities of another
    trust domain, or none at all, are an authentication failure: fastca
    never certifies a name outside its own trust domain."""
    prefix = f"spiffe://{trust_domain}/"
    own = [identity for identity in caller.identities if identity.startswith(prefix)]
    if len(own) != 1:
        found = "no" if not own else "several"
        raise AuthenticationFailed(f"caller ({caller.credential_type}) has {found} SPIFFE identity in trust domain "
                                   f"{trust_domain}")
    return own[0]


class _TokenBuckets:
    """Per-identity token buckets in a bounded LRU (an attacker minting
    identities cannot grow it without bound)."""

    def __init__(self, rate: float, burst: int, capacity: int, clock: Callable[[], float]) -> None:
        self._rate, self._burst, self._capacity, self._clock = rate, burst, capacity, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self._burst), now))
            tokens = min(float(self._burst), tokens + (now - last) * self._rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self._capacity:
                self._buckets.popitem(last=False)
            return allowed


@dataclass(frozen=True)
class _Window:
    patterns: tuple[str, ...]
    start_minute: int
    end_minute: int

    def open_at(self, minute: int) -> bool:
        if self.start_minute <= self.end_minute:
            return self.start_minute <= minute < self.end_minute
        return minute >= self.start_minute or minute < self.end_minute   # spans midnight


def _minute_of(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


class RequestPolicy:
    def __init__(self, config: PolicyConfig, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._config = config
        self._clock = clock
        limit = config.rate_limit
        self._buckets = (_TokenBuckets(limit.per_identity_per_second, limit.burst, limit.max_tracked_identities,
                                       clock.monotonic) if limit.per_identity_per_second else None)
        self._windows = [_Window(tuple(rule.identities), _minute_of(rule.start), _minute_of(rule.end))
                         for rule in config.time_windows]
        self._networks = [(tuple(rule.identities), [ipaddress.ip_network(c, strict=False) for c in rule.cidrs])
                          for rule in config.source_networks]

    @property
    def strict_csr(self) -> bool:
        return self._config.strict_csr

    def check(self, identity: str, peer_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> None:
        """Source network, then time window, then rate limit (the limit is
        only spent on requests that would otherwise go ahead)."""
        for patterns, networks in self._networks:
            if _matches(identity, patterns):
                if peer_ip is None or not any(peer_ip in network for network in networks):
                    raise PolicyDenied(f"{identity} may not request certificates from {peer_ip}",
                                       public_message="request denied by CA policy: source network not allowed")
        if self._windows:
            moment = self._clock.utcnow()
            minute = moment.hour * 60 + moment.minute
            for window in self._windows:
                if _matches(identity, window.patterns) and not window.open_at(minute):
                    raise PolicyDenied(f"{identity} is outside its issuance window at {moment:%H:%M}Z",
                                       public_message="request denied by CA policy: outside the issuance window")
        if self._buckets is not None and not self._buckets.take(identity):
            raise Overloaded(f"rate limit exceeded for {identity}",
                             public_message="rate limit exceeded for this identity, retry later")


def _matches(identity: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(identity, pattern) for pattern in patterns)

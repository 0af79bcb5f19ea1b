"""The issuance monitor: anomaly signals over what the CA issues and refuses,
and a decaying risk score per identity (docs/monitoring.md has the rules).

It sits off the hot path. ``observe_*`` are called from one monitoring
thread, with the same facts the audit log gets; ``high_risk`` and ``score``
are called from the request path, concurrently, and take no lock: a score is
kept as one immutable ``(value, last_update)`` pair swapped in whole, so a
read is a dict lookup and a multiplication.

Memory is bounded by the configuration: every table is an LRU
(``OrderedDict`` with ``move_to_end``), per-identity state is a slots object
with small tuples, and a (caller, node)'s memory of the identities it asked
for is a fixed-size filter. An identity evicted and seen again is new.

Time is the caller's: every observation carries its own time, and the reads
take one (``at``), or read the injected clock when it is left out.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from socket import AF_INET6, inet_pton

from fastca.clock import SYSTEM_CLOCK, Clock
from fastca.monitoring.config import SIGNALS, MonitoringConfig

__all__ = ["IssuanceMonitor", "Observation", "Alert", "caller_subject", "network_of"]

_exp = math.exp

# _Identity.flags
_BURSTING = 1           # a burst episode is open (alerted; not calmed down yet)
_TTL_OUTLYING = 2       # a run of TTL outliers is open
_NETS_WIDE = 4          # seen from more networks than max_networks_per_identity: new_network off
_NODES_WIDE = 8         # seen on more nodes than max_nodes_per_identity: new_node off

# _Caller.flags
_FANNING = 1            # a fan-out episode is open

_FILTER_BYTES = 256     # per generation: 2,048 bits, two bits per identity
_FILTER_MASK = _FILTER_BYTES * 8 - 1
_FILTER_SHIFT = (_FILTER_BYTES * 8).bit_length() - 1
_MAX_KEY_OWNERS = 4     # identities remembered per public key
_MAX_NAMES = 65_536     # interned node names and network prefixes (cleared when full)
_V4_MAPPED = bytes(10) + b"\xff\xff"


@dataclass(slots=True)
class Observation:
    """One certificate issued, as the server saw it."""

    at: float               # epoch seconds
    identity: str           # the SPIFFE ID certified
    caller: str             # the authenticated caller; a node agent's own identity when it impersonates
    impersonated: bool      # the caller asked for an identity other than its own (node agent, ztunnel)
    node: str               # the caller's Kubernetes node, "" when unknown
    peer_ip: str            # the peer's address, bare ("10.1.2.3", "fd00::1"), "" when unknown
    spki_sha256: bytes      # SHA-256 of the CSR's SubjectPublicKeyInfo
    csr_sha256: bytes       # SHA-256 of the CSR's DER
    ttl_seconds: int        # the TTL granted
    serial: str             # the certificate's serial (what the audit record is found by)


@dataclass(frozen=True, slots=True)
class Alert:
    """One anomaly. ``identity`` is the subject whose score moved (a SPIFFE
    ID, or ``caller_subject(caller, node)`` for fan_out; "" for
    auth_failures); ``score`` is that subject's score just after; ``detail``
    is for a person and holds no secret (at most an 8-hex-digit hash prefix)."""

    signal: str
    identity: str
    caller: str
    serial: str
    at: float
    score: float
    detail: str


def caller_subject(caller: str, node: str) -> str:
    """The key a node agent's fan-out and impersonation refusals are kept
    (and scored) under. ztunnel runs on every node with one service account,
    so the node is part of it; ``@`` cannot occur in a SPIFFE ID."""
    return f"{caller}@{node}" if node else caller


def network_of(peer_ip: str) -> str | bytes | None:
    """The /24 of an IPv4 address ("10.1.2" for 10.1.2.3) or the /64 of an
    IPv6 one (its first 8 bytes); an IPv4-mapped IPv6 address is IPv4.
    None when there is no usable address. IPv4 is not validated (the
    server's peer address is a bare, well-formed address)."""
    if ":" in peer_ip:
        try:
            packed = inet_pton(AF_INET6, peer_ip.partition("%")[0])
        except OSError:
            return None
        if packed[:12] == _V4_MAPPED:
            return "%d.%d.%d" % (packed[12], packed[13], packed[14])
        return packed[:8]
    head, dot, _ = peer_ip.rpartition(".")
    return head if dot else None


def _network_text(network: str | bytes) -> str:
    if isinstance(network, str):
        return f"{network}.0/24"
    return str(ipaddress.IPv6Network((network + bytes(8), 64)))


class _Identity:
    __slots__ = ("name", "first", "last", "short", "long", "nets", "nodes", "ttl_norm", "ttl_streak", "flags")

    def __init__(self, name: str, at: float, ttl: int) -> None:
        self.name = name            # the one str kept for this identity (the indexes point at it)
        self.first = at             # first seen (since it was last evicted)
        self.last = at              # last issuance
        self.short = 0.0            # issuances, decaying over burst_window_seconds
        self.long = 0.0             # issuances, decaying over burst_baseline_seconds
        self.nets: tuple = ()       # networks seen (interned prefixes)
        self.nodes: tuple = ()      # nodes seen (interned names)
        self.ttl_norm = ttl         # the usual TTL: the largest non-outlier granted
        self.ttl_streak = 0         # outliers in a row
        self.flags = 0


class _Caller:
    __slots__ = ("first", "current", "previous", "current_count", "previous_count", "extra", "generation_at",
                 "fresh", "fresh_at", "flags", "refused_at")

    def __init__(self, at: float) -> None:
        self.first = at
        # Which identities this (caller, node) asked for lately: two generations of a
        # two-bit filter, rotated every fan_out_memory_seconds / 2.
        self.current = bytearray(_FILTER_BYTES)
        self.previous = bytearray(_FILTER_BYTES)
        self.current_count = 0      # distinct identities put in current
        self.previous_count = 0
        self.extra = 0              # of those, how many previous did not hold
        self.generation_at = at
        self.fresh = 0.0            # identities new to it, decaying over fan_out_window_seconds
        self.fresh_at = at
        self.flags = 0
        self.refused_at: float | None = None    # last node-impersonation refusal


class _Risk:
    __slots__ = ("state", "recent")

    def __init__(self, at: float) -> None:
        self.state = (0.0, at)      # (value, time of value): replaced whole, read without the lock
        self.recent: tuple[tuple[float, str, float, str], ...] = ()    # (at, signal, weight, detail)


class _Peer:
    __slots__ = ("count", "last", "flagged")

    def __init__(self, at: float) -> None:
        self.count = 0.0
        self.last = at
        self.flagged = False


class IssuanceMonitor:
    def __init__(self, config: MonitoringConfig, *, clock: Clock = SYSTEM_CLOCK,
                 started_at: float | None = None) -> None:
        """``started_at``: when learning began; unset, the first observation's time."""
        self._config = c = config
        self._clock = clock
        self._lock = threading.Lock()
        self._started = started_at
        self._learned = c.learning_seconds <= 0
        self._identities: OrderedDict[str, _Identity] = OrderedDict()
        self._callers: OrderedDict[str, _Caller] = OrderedDict()
        self._keys: OrderedDict[bytes, str | tuple[str, ...]] = OrderedDict()
        self._csrs: OrderedDict[bytes, bool] = OrderedDict()
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._risk: OrderedDict[str, _Risk] = OrderedDict()
        self._names: dict[str | bytes, str | bytes] = {}
        self._counts = dict.fromkeys(SIGNALS, 0)
        self._weights = dict(c.weights)
        self._decay = math.log(2) / c.half_life_seconds
        self._threshold = c.alert_threshold
        self._inv_short = 1.0 / c.burst_window_seconds
        self._inv_long = 1.0 / c.burst_baseline_seconds
        self._inv_fan = 1.0 / c.fan_out_window_seconds
        self._inv_auth = 1.0 / c.auth_failure_window_seconds

    # --- reads (any thread)

    def score(self, identity: str, at: float | None = None) -> float:
        entry = self._risk.get(identity)
        if entry is None:
            return 0.0
        value, since = entry.state
        if at is None:
            at = self._clock.now()
        return value * _exp((since - at) * self._decay) if at > since else value

    def high_risk(self, identity: str, at: float | None = None) -> bool:
        """Score >= alert_threshold: a dict lookup and, for a scored identity, one exp."""
        entry = self._risk.get(identity)
        if entry is None:
            return False
        value, since = entry.state
        if value < self._threshold:
            return False
        if at is None:
            at = self._clock.now()
        return (value * _exp((since - at) * self._decay) if at > since else value) >= self._threshold

    def explain(self, identity: str, at: float | None = None) -> dict:
        """The score and the signals behind it, newest first (at most
        ``recent_signals``); ``remaining`` is what each still adds before the
        cap, so they sum to the score unless it was capped."""
        if at is None:
            at = self._clock.now()
        entry = self._risk.get(identity)
        recent = entry.recent if entry is not None else ()
        current = self.score(identity, at)
        return {
            "identity": identity,
            "score": current,
            "high_risk": current >= self._threshold,
            "threshold": self._threshold,
            "tracked": identity in self._identities,
            "signals": [{"signal": signal, "at": when, "weight": weight,
                         "remaining": weight * _exp(min(0.0, when - at) * self._decay), "detail": detail}
                        for when, signal, weight, detail in reversed(recent)],
        }

    def top(self, n: int, at: float | None = None) -> list[tuple[str, float, tuple[str, ...]]]:
        """The n highest scores now, with each one's recent signals (newest
        first). O(scored subjects): for a CLI or a scrape, never per request."""
        if at is None:
            at = self._clock.now()
        with self._lock:
            entries = list(self._risk.items())
        decay = self._decay
        scored = []
        for subject, entry in entries:
            value, since = entry.state
            if at > since:
                value *= _exp((since - at) * decay)
            if value > 0.0:
                scored.append((value, subject, entry.recent))
        best = heapq.nlargest(n, scored, key=lambda item: item[0])
        return [(subject, value, tuple(signal for _, signal, _, _ in reversed(recent)))
                for value, subject, recent in best]

    def high_risk_count(self, at: float | None = None) -> int:
        """Scored subjects at or above the threshold now. O(scored subjects):
        for a scrape, never per request."""
        if at is None:
            at = self._clock.now()
        with self._lock:
            states = [entry.state for entry in self._risk.values()]
        decay, threshold = self._decay, self._threshold
        return sum(1 for value, since in states
                   if value >= threshold and value * _exp(min(0.0, since - at) * decay) >= threshold)

    @property
    def tracked_identities(self) -> int:
        return len(self._identities)

    @property
    def alerts_by_signal(self) -> dict[str, int]:
        """Alerts raised since start, by signal (every signal present)."""
        with self._lock:
            return dict(self._counts)

    def sizes(self) -> dict[str, int]:
        """Entries in each bounded table."""
        return {"identities": len(self._identities), "callers": len(self._callers), "keys": len(self._keys),
                "csrs": len(self._csrs), "peers": len(self._peers), "scored": len(self._risk)}

    # --- observations (the monitoring thread)

    def observe_issued(self, obs: Observation) -> list[Alert]:
        with self._lock:
            return self._issued(obs)

    def observe_refused(self, at: float, caller: str, identity: str, peer_ip: str, reason: str, *,
                        node: str = "") -> list[Alert]:
        """A refused request. Only ``reason == "node_impersonation"`` (the node
        authorizer refused ``caller`` on ``node`` an identity not scheduled
        there) is a signal; other refusals are not looked at."""
        if reason != "node_impersonation":
            return []
        with self._lock:
            self._learning_over(at)
            weight = self._weights["node_impersonation"]
            if not weight:
                return []
            subject = caller_subject(caller, node)
            state = self._caller(subject, at)
            previous, state.refused_at = state.refused_at, at
            if previous is not None and at - previous < self._config.impersonation_quiet_seconds:
                return []       # the same episode
            self._add_score(identity, at, "node_impersonation", weight, f"{subject} asked for it (refused)")
            self._add_score(subject, at, "node_impersonation", weight, f"asked for {identity} (refused)")
            detail = (f"{subject} asked for {identity}, which is not scheduled on its node "
                      f"(refused; the caller is scored too)")
            return [self._alert("node_impersonation", identity, caller, "", at, weight, detail)]

    def observe_auth_failure(self, at: float, peer_ip: str) -> list[Alert]:
        """An authentication failure from ``peer_ip`` (scored against no identity)."""
        threshold = self._config.auth_failure_threshold
        if not threshold:
            return []
        with self._lock:
            self._learning_over(at)
            peers = self._peers
            peer = peers.get(peer_ip)
            if peer is None:
                peer = peers[peer_ip] = _Peer(at)
                if len(peers) > self._config.max_peers:
                    peers.popitem(last=False)
            else:
                peers.move_to_end(peer_ip)
            if at > peer.last:
                peer.count *= _exp((peer.last - at) * self._inv_auth)
                peer.last = at
            peer.count += 1.0
            if peer.flagged:
                if peer.count < threshold * 0.5:
                    peer.flagged = False
                return []
            if peer.count >= threshold:
                peer.flagged = True
                detail = (f"{int(peer.count)} authentication failures from {peer_ip} within about "
                          f"{self._config.auth_failure_window_seconds:g} s")
                return [self._alert("auth_failures", "", "", "", at, 0.0, detail)]
            return []

    # --- internals (under the lock)

    def _learning_over(self, at: float) -> bool:
        if self._learned:
            return True
        if self._started is None:
            self._started = at
        if at - self._started >= self._config.learning_seconds:
            self._learned = True
        return self._learned

    def _alert(self, signal: str, subject: str, caller: str, serial: str, at: float, weight: float,
               detail: str) -> Alert:
        """Counts the alert; the score was added already when ``weight``."""
        self._counts[signal] += 1
        score = self._risk[subject].state[0] if weight and subject else 0.0
        return Alert(signal, subject, caller, serial, at, score, detail)

    def _add_score(self, subject: str, at: float, signal: str, weight: float, detail: str) -> None:
        risk = self._risk
        entry = risk.get(subject)
        if entry is None:
            entry = risk[subject] = _Risk(at)
            if len(risk) > self._config.max_identities:
                risk.popitem(last=False)
        else:
            risk.move_to_end(subject)
        value, since = entry.state
        if at > since:
            value *= _exp((since - at) * self._decay)
            since = at
        entry.recent = (entry.recent + ((at, signal, weight, detail),))[-self._config.recent_signals:]
        entry.state = (min(self._config.score_cap, value + weight), since)

    def _raise(self, alerts: list[Alert] | None, signal: str, subject: str, obs: Observation,
               detail: str) -> list[Alert]:
        weight = self._weights[signal]
        self._add_score(subject, obs.at, signal, weight, detail)
        alert = self._alert(signal, subject, obs.caller, obs.serial, obs.at, weight, detail)
        if alerts is None:
            return [alert]
        alerts.append(alert)
        return alerts

    def _caller(self, subject: str, at: float) -> _Caller:
        callers = self._callers
        state = callers.get(subject)
        if state is None:
            state = callers[subject] = _Caller(at)
            if len(callers) > self._config.max_callers:
                callers.popitem(last=False)
        else:
            callers.move_to_end(subject)
        return state

    def _intern(self, value):
        names = self._names
        known = names.get(value)
        if known is None:
            if len(names) >= _MAX_NAMES:
                names.clear()
            known = names[value] = value
        return known

    def _issued(self, obs: Observation) -> list[Alert]:
        c = self._config
        w = self._weights
        at = obs.at
        identity = obs.identity
        learned = self._learned or self._learning_over(at)
        alerts: list[Alert] | None = None
        delegated = obs.impersonated or obs.caller != identity

        identities = self._identities
        st = identities.get(identity)
        if st is None:
            st = identities[identity] = _Identity(identity, at, obs.ttl_seconds)
            if len(identities) > c.max_identities:
                identities.popitem(last=False)
            established = False
            st.short = st.long = 1.0
            if learned and w["new_identity"]:
                alerts = self._raise(alerts, "new_identity", identity, obs, "first certificate for this identity")
        else:
            identities.move_to_end(identity)
            age = at - st.first
            established = learned and age >= min(c.identity_history_ttl_fraction * st.ttl_norm,
                                                 c.identity_history_max_seconds)
            # burst: two decaying counts of issuances, short and long
            elapsed = at - st.last
            if elapsed > 0:
                st.short = st.short * _exp(-elapsed * self._inv_short) + 1.0
                st.long = st.long * _exp(-elapsed * self._inv_long) + 1.0
                st.last = at
            else:
                st.short += 1.0
                st.long += 1.0
            if st.short >= c.burst_min_count:
                if established and w["burst"]:
                    # Both rates per second. The baseline leaves the short window out (a
                    # burst must not raise its own baseline) and is corrected for a history
                    # shorter than its window (else a young identity's baseline reads as tiny).
                    short_rate = st.short * self._inv_short
                    span = age - c.burst_window_seconds
                    if span < c.burst_window_seconds:
                        span = c.burst_window_seconds
                    older = st.long - st.short
                    long_rate = (older if older > 1e-6 else 1e-6) * self._inv_long \
                        / -math.expm1(-span * self._inv_long)
                    if st.flags & _BURSTING:
                        if short_rate < 0.5 * c.burst_factor * long_rate:
                            st.flags &= ~_BURSTING
                    elif short_rate >= c.burst_factor * long_rate:
                        st.flags |= _BURSTING
                        alerts = self._raise(alerts, "burst", identity, obs,
                                             f"{st.short:.0f} certificates in about {c.burst_window_seconds:g} s, "
                                             f"{short_rate / long_rate:.0f}x its usual rate")
            elif st.flags & _BURSTING and st.short < 0.5 * c.burst_min_count:
                st.flags &= ~_BURSTING

            # ttl_outlier: against the largest usual TTL; a run of outliers alerts once
            ttl = obs.ttl_seconds
            norm = st.ttl_norm
            if ttl > norm:
                if established and ttl > c.ttl_factor * norm and ttl - norm >= c.ttl_min_excess_seconds \
                        and w["ttl_outlier"]:
                    st.ttl_streak += 1
                    if not st.flags & _TTL_OUTLYING:
                        st.flags |= _TTL_OUTLYING
                        alerts = self._raise(alerts, "ttl_outlier", identity, obs,
                                             f"TTL {ttl} s granted, usually at most {norm} s")
                    if st.ttl_streak >= c.ttl_adopt_after:      # a deliberate change: learn it
                        st.ttl_norm = ttl
                        st.ttl_streak = 0
                        st.flags &= ~_TTL_OUTLYING
                else:
                    st.ttl_norm = ttl
                    st.ttl_streak = 0
                    st.flags &= ~_TTL_OUTLYING
            elif st.flags & _TTL_OUTLYING:
                st.ttl_streak = 0
                st.flags &= ~_TTL_OUTLYING

        # new_network / new_node: bounded sets per identity, alerting once each. A
        # request a node agent makes on an identity's behalf comes from the agent's
        # place: it updates the sets but is judged by fan_out, not here.
        new_net = new_node = None
        judged = established and not delegated
        if not st.flags & _NETS_WIDE:
            net = network_of(obs.peer_ip)
            if net is not None and net not in st.nets:
                if len(st.nets) >= c.max_networks_per_identity:
                    st.flags |= _NETS_WIDE
                    st.nets = ()
                else:
                    st.nets += (self._intern(net),)
                    if judged:
                        new_net = net
        node = obs.node
        if node and not st.flags & _NODES_WIDE and node not in st.nodes:
            if len(st.nodes) >= c.max_nodes_per_identity:
                st.flags |= _NODES_WIDE
                st.nodes = ()
            else:
                st.nodes += (self._intern(node),)
                if judged:
                    new_node = node
        if new_node is not None and w["new_node"]:
            also = f" (from network {_network_text(new_net)}, also new)" if new_net is not None else ""
            alerts = self._raise(alerts, "new_node", identity, obs, f"first certificate on node {node}{also}")
        elif new_net is not None and w["new_network"]:
            alerts = self._raise(alerts, "new_network", identity, obs,
                                 f"first certificate from network {_network_text(new_net)}")

        # key_reuse: one public key, several identities (no hash: a record of a
        # version 1 audit log, which kept none)
        if w["key_reuse"] and obs.spki_sha256:
            keys = self._keys
            spki = obs.spki_sha256
            owners = keys.get(spki)
            if owners is None:
                keys[spki] = st.name
                if len(keys) > c.max_keys:
                    keys.popitem(last=False)
            else:
                keys.move_to_end(spki)
                if type(owners) is str:
                    if owners != identity:
                        keys[spki] = (owners, st.name)
                        alerts = self._raise(alerts, "key_reuse", identity, obs,
                                             f"public key {spki[:4].hex()}… was certified for {owners} before")
                elif identity not in owners:
                    keys[spki] = (owners + (st.name,))[-_MAX_KEY_OWNERS:]
                    alerts = self._raise(alerts, "key_reuse", identity, obs,
                                         f"public key {spki[:4].hex()}… was certified for {len(owners)} other "
                                         f"identities before, last {owners[-1]}")

        # csr_replay: the same CSR bytes again (alerting once per CSR)
        if w["csr_replay"] and obs.csr_sha256:
            csrs = self._csrs
            digest = obs.csr_sha256
            replayed = csrs.get(digest)
            if replayed is None:
                csrs[digest] = False
                if len(csrs) > c.max_keys:
                    csrs.popitem(last=False)
            else:
                csrs.move_to_end(digest)
                if not replayed:
                    csrs[digest] = True
                    alerts = self._raise(alerts, "csr_replay", identity, obs,
                                         f"CSR {digest[:4].hex()}… was presented before")

        # fan_out: a (caller, node) asking for identities it never asked for lately
        if delegated:
            subject = caller_subject(obs.caller, node)
            cs = self._caller(subject, at)
            if at - cs.generation_at >= 0.5 * c.fan_out_memory_seconds:
                current = cs.previous
                current[:] = bytes(_FILTER_BYTES)
                cs.previous, cs.current = cs.current, current
                cs.previous_count, cs.current_count, cs.extra = cs.current_count, 0, 0
                cs.generation_at = at
            h = hash(identity)
            b1 = h & _FILTER_MASK
            b2 = (h >> _FILTER_SHIFT) & _FILTER_MASK
            i1, m1, i2, m2 = b1 >> 3, 1 << (b1 & 7), b2 >> 3, 1 << (b2 & 7)
            current = cs.current
            if not (current[i1] & m1 and current[i2] & m2):
                current[i1] |= m1
                current[i2] |= m2
                cs.current_count += 1
                previous = cs.previous
                if not (previous[i1] & m1 and previous[i2] & m2):
                    cs.extra += 1
                    if learned and at - cs.first >= c.fan_out_window_seconds and w["fan_out"]:
                        count = cs.fresh * _exp((cs.fresh_at - at) * self._inv_fan) + 1.0 if at > cs.fresh_at \
                            else cs.fresh + 1.0
                        cs.fresh, cs.fresh_at = count, at
                        before = max(1.0, cs.previous_count + cs.extra - count)
                        if not cs.flags & _FANNING and count >= c.fan_out_min_identities \
                                and count >= c.fan_out_factor * before:
                            cs.flags |= _FANNING
                            alerts = self._raise(alerts, "fan_out", subject, obs,
                                                 f"{count:.0f} identities new to this caller within about "
                                                 f"{c.fan_out_window_seconds:g} s (it served about {before:.0f} "
                                                 f"before); latest {identity}")
            if cs.flags & _FANNING and cs.fresh * _exp(min(0.0, cs.fresh_at - at) * self._inv_fan) \
                    < 0.5 * c.fan_out_min_identities:
                cs.flags &= ~_FANNING

        return alerts if alerts is not None else []

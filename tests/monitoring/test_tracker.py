"""The issuance monitor: a steady mesh raises nothing, each injected anomaly
raises exactly its alert once per episode, scores decay, every table stays
within its bound. Time is explicit throughout (no clock is read)."""

from __future__ import annotations

import heapq
import random
import subprocess
import sys
import threading

import pytest
from pydantic import ValidationError

from fastca.clock import ManualClock
from fastca.monitoring import (DEFAULT_WEIGHTS, SCORED_SIGNALS, SIGNALS, Alert, IssuanceMonitor, MonitoringConfig,
                               Observation, caller_subject, network_of)

T0 = 1_800_000_000.0
TD = "spiffe://cluster.local"
ZTUNNEL = f"{TD}/ns/istio-system/sa/ztunnel"


def sa(name: str, ns: str = "shop") -> str:
    return f"{TD}/ns/{ns}/sa/{name}"


class Mesh:
    """A monitor and a deterministic source of fresh keys and CSRs."""

    def __init__(self, **config) -> None:
        config.setdefault("learning_seconds", 3600)
        self.monitor = IssuanceMonitor(MonitoringConfig(**config), clock=ManualClock(T0), started_at=T0)
        self._rng = random.Random(15)
        self.last: dict[str, Observation] = {}
        self.serials = 0

    def fresh(self) -> bytes:
        return self._rng.randbytes(32)

    def issue(self, at: float, identity: str, *, caller: str | None = None, node: str = "node-1",
              ip: str = "10.0.1.10", ttl: int = 3600, spki: bytes | None = None,
              csr: bytes | None = None) -> list[Alert]:
        self.serials += 1
        obs = Observation(at=at, identity=identity, caller=caller or identity, impersonated=caller is not None,
                          node=node, peer_ip=ip, spki_sha256=spki or self.fresh(), csr_sha256=csr or self.fresh(),
                          ttl_seconds=ttl, serial=f"{self.serials:x}")
        self.last[identity] = obs
        return self.monitor.observe_issued(obs)

    def history(self, *pods: tuple[str, dict], until: float = T0 + 7200, every: float = 1800) -> None:
        """Each (identity, issue() arguments) renewing from T0 to ``until``:
        past learning, and each identity has history."""
        at = T0
        while at <= until:
            for offset, (identity, kwargs) in enumerate(pods):
                assert self.issue(at + offset * 0.001, identity, **kwargs) == []
            at += every


def signals(alerts: list[Alert]) -> list[str]:
    return [alert.signal for alert in alerts]


# --- a steady mesh


def test_a_steady_population_raises_no_alert_over_days():
    """2,000 identities (some shared by many pods, one by 100), TTLs of 1 h,
    6 h and 24 h, each pod renewing at half its TTL with 1 % jitter, on 40
    nodes (half behind ztunnel), fresh keys and CSRs: a day of learning,
    then three days without a single alert."""
    rng = random.Random(1)
    mesh = Mesh(learning_seconds=86_400)
    nodes = [f"node-{n}" for n in range(40)]
    pods = []           # (identity, ttl, node index, pod ip)
    for i in range(2000):
        identity = sa(f"app-{i}", ns=f"ns-{i % 50}")
        ttl = 3600 if i == 0 else rng.choices([86_400, 21_600, 3600], weights=[70, 20, 10])[0]
        replicas = 100 if i == 0 else rng.choices([1, 2, 3, 5, 30], weights=[60, 20, 10, 8, 2])[0]
        for _ in range(replicas):
            node = rng.randrange(len(nodes))
            pods.append((identity, ttl, node, f"10.{node}.{rng.randrange(4)}.{rng.randrange(1, 250)}"))
    events = [(T0 + rng.uniform(0, ttl / 2), index) for index, (_, ttl, _, _) in enumerate(pods)]
    heapq.heapify(events)
    end = T0 + 4 * 86_400
    issued = 0
    all_alerts = []
    while events[0][0] < end:
        at, index = heapq.heappop(events)
        identity, ttl, node, ip = pods[index]
        if node % 2:        # ambient: the node's ztunnel asks, from its own address
            alerts = mesh.issue(at, identity, caller=ZTUNNEL, node=nodes[node], ip=f"10.{node}.0.2", ttl=ttl)
        else:
            alerts = mesh.issue(at, identity, node=nodes[node], ip=ip, ttl=ttl)
        all_alerts += alerts
        issued += 1
        heapq.heappush(events, (at + ttl / 2 * rng.uniform(0.99, 1.01), index))
    assert issued > 100_000                         # the run is what it claims
    assert mesh.monitor._identities[pods[0][0]].short > 20      # the 100-pod identity is above the burst floor
    assert mesh.monitor.tracked_identities == 2000
    assert mesh.monitor.sizes()["callers"] == 20    # one ztunnel per odd node
    assert all_alerts == []
    assert mesh.monitor.alerts_by_signal == dict.fromkeys(SIGNALS, 0)
    assert mesh.monitor.top(10, end) == []
    # ...and the same monitor still sees an anomaly in that population afterwards.
    victim = pods[5][0]
    assert signals(mesh.issue(end, victim, ttl=pods[5][1], node=nodes[pods[5][2]], ip=pods[5][3],
                              csr=mesh.last[pods[7][0]].csr_sha256, spki=mesh.fresh())) == ["csr_replay"]


# --- each anomaly: exactly its alert, once per episode, and the score moves

A, B = sa("cart"), sa("checkout")


@pytest.fixture
def mesh() -> Mesh:
    m = Mesh()
    m.history((A, {"ip": "10.0.1.10"}), (B, {"ip": "10.0.1.11"}))
    assert m.monitor.score(A) == 0.0 and m.monitor.alerts_by_signal == dict.fromkeys(SIGNALS, 0)
    return m


def only(mesh: Mesh, signal: str, count: int = 1) -> None:
    counts = mesh.monitor.alerts_by_signal
    assert counts == {**dict.fromkeys(SIGNALS, 0), signal: count}


def test_burst_alerts_once_per_episode(mesh):
    at = T0 + 7300
    raised = []
    for k in range(40):                    # 40 certificates in 400 s: the usual is 2 an hour
        raised += mesh.issue(at + 10 * k, A)
    assert signals(raised) == ["burst"]
    assert raised[0].identity == A and raised[0].score == pytest.approx(30.0, rel=1e-2)
    assert "usual rate" in raised[0].detail
    assert mesh.monitor.score(A, at + 400) > 25.0
    assert mesh.monitor.score(B, at + 400) == 0.0
    # calm for hours, a normal renewal, then a second burst: a second episode
    later = at + 6 * 3600
    assert mesh.issue(later, A) == []
    raised = []
    for k in range(40):
        raised += mesh.issue(later + 1800 + 10 * k, A)
    assert signals(raised) == ["burst"]
    only(mesh, "burst", 2)


def test_a_burst_below_the_absolute_floor_never_alerts(mesh):
    at = T0 + 7300
    for k in range(15):                    # 15 in a minute is 30x the usual rate, but few
        assert mesh.issue(at + 4 * k, A) == []
    only(mesh, "burst", 0)


def test_a_young_shared_identity_rolling_out_is_no_burst():
    """100 pods of a new deployment arriving within minutes: its own baseline."""
    mesh = Mesh()
    mesh.history((A, {}))
    start = T0 + 7200
    for k in range(100):
        alerts = mesh.issue(start + 3 * k, sa("fresh-deployment"))
        assert signals(alerts) == (["new_identity"] if k == 0 else [])


def test_key_reuse_across_two_identities(mesh):
    at = T0 + 7300
    key = mesh.last[A].spki_sha256
    raised = mesh.issue(at, B, spki=key, ip="10.0.1.11")
    assert signals(raised) == ["key_reuse"]
    assert raised[0].identity == B and A in raised[0].detail and key.hex() not in raised[0].detail
    assert mesh.monitor.score(B, at) == pytest.approx(DEFAULT_WEIGHTS["key_reuse"])
    # the same episode: B again, A again with that key
    assert mesh.issue(at + 60, B, spki=key, ip="10.0.1.11") == []
    assert mesh.issue(at + 120, A, spki=key) == []
    # the same identity renewing with its own key is not reuse
    own = mesh.last[A].spki_sha256
    assert mesh.issue(at + 180, A, spki=own) == []
    only(mesh, "key_reuse")
    # a third identity with it is a new anomaly
    assert signals(mesh.issue(at + 240, sa("third"), spki=key)) == ["new_identity", "key_reuse"]


def test_replayed_csr(mesh):
    at = T0 + 7300
    first = mesh.last[A]
    raised = mesh.issue(at, A, spki=first.spki_sha256, csr=first.csr_sha256)
    assert signals(raised) == ["csr_replay"]
    assert raised[0].serial == mesh.last[A].serial and first.csr_sha256.hex() not in raised[0].detail
    assert mesh.monitor.score(A, at) == pytest.approx(DEFAULT_WEIGHTS["csr_replay"])
    assert mesh.issue(at + 60, A, spki=first.spki_sha256, csr=first.csr_sha256) == []
    only(mesh, "csr_replay")


def test_new_network(mesh):
    at = T0 + 7300
    assert mesh.issue(at, A, ip="10.0.1.99") == []              # same /24
    raised = mesh.issue(at + 10, A, ip="192.168.7.4")
    assert signals(raised) == ["new_network"] and "192.168.7.0/24" in raised[0].detail
    assert mesh.monitor.score(A, at + 10) == pytest.approx(DEFAULT_WEIGHTS["new_network"])
    assert mesh.issue(at + 20, A, ip="192.168.7.5") == []       # the same episode: now known
    assert mesh.issue(at + 30, A) == []                         # and the old one still is
    only(mesh, "new_network")


def test_new_network_ipv6_is_judged_by_its_64():
    mesh = Mesh()
    mesh.history((A, {"ip": "fd00:1:2:3::10"}))
    at = T0 + 7300
    assert mesh.issue(at, A, ip="fd00:1:2:3:ffff::1") == []
    raised = mesh.issue(at + 10, A, ip="fd00:1:2:4::10")
    assert signals(raised) == ["new_network"] and "fd00:1:2:4::/64" in raised[0].detail
    assert network_of("::ffff:10.1.2.3") == network_of("10.1.2.9") == "10.1.2"
    assert network_of("") is None and network_of("not-an-address") is None and network_of("fe80::zz") is None


def test_new_node(mesh):
    at = T0 + 7300
    raised = mesh.issue(at, A, node="node-9")
    assert signals(raised) == ["new_node"] and "node-9" in raised[0].detail
    assert mesh.monitor.score(A, at) == pytest.approx(DEFAULT_WEIGHTS["new_node"])
    assert mesh.issue(at + 10, A, node="node-9") == []
    # a new node from a new network is one alert, naming both
    raised = mesh.issue(at + 20, B, node="node-8", ip="10.0.8.3")
    assert signals(raised) == ["new_node"] and "10.0.8.0/24" in raised[0].detail
    only(mesh, "new_node", 2)


def test_an_identity_spread_too_wide_stops_raising_location_signals():
    mesh = Mesh(max_nodes_per_identity=4, max_networks_per_identity=4)
    mesh.history((A, {}))
    at = T0 + 7300
    for n in range(2, 5):           # fills the set: each is new
        assert signals(mesh.issue(at + n * 1800, A, node=f"node-{n}", ip=f"10.0.{n}.1")) == ["new_node"]
    for n in range(5, 40):          # a DaemonSet-like spread: no longer judged
        assert mesh.issue(at + n * 1800, A, node=f"node-{n}", ip=f"10.0.{n}.1") == []
    only(mesh, "new_node", 3)


def test_ttl_outlier_alerts_once_and_a_lasting_change_is_learned(mesh):
    at = T0 + 7300
    assert mesh.issue(at, A, ttl=7200) == []                    # 2x: within the norm
    raised = mesh.issue(at + 10, A, ttl=90 * 86_400)
    assert signals(raised) == ["ttl_outlier"] and "7776000" in raised[0].detail
    assert mesh.monitor.score(A, at + 10) == pytest.approx(DEFAULT_WEIGHTS["ttl_outlier"])
    for k in range(1, 5):                                       # the same run: nothing more
        assert mesh.issue(at + 10 + k, A, ttl=90 * 86_400) == []
    # five in a row were adopted: it is the norm now, the old TTL is below it
    assert mesh.issue(at + 100, A, ttl=90 * 86_400) == []
    assert mesh.issue(at + 200, A, ttl=3600) == []
    only(mesh, "ttl_outlier")


def test_ttl_outlier_run_ends_with_a_normal_ttl(mesh):
    at = T0 + 7300
    assert signals(mesh.issue(at, A, ttl=86_400)) == ["ttl_outlier"]
    assert mesh.issue(at + 1, A, ttl=3600) == []
    assert signals(mesh.issue(at + 2, A, ttl=86_400)) == ["ttl_outlier"]
    only(mesh, "ttl_outlier", 2)


def test_node_fan_out():
    """ztunnel on node-1 serves 5 identities; suddenly it asks for 30 that
    live (established) on node-2: one fan_out against ztunnel@node-1, and no
    per-identity location alert (the place is the agent's)."""
    mesh = Mesh()
    served = [sa(f"local-{k}") for k in range(5)]
    remote = [sa(f"remote-{k}") for k in range(30)]
    mesh.history(*[(identity, {"caller": ZTUNNEL, "ip": "10.0.1.2"}) for identity in served],
                 *[(identity, {"node": "node-2", "ip": "10.0.2.9"}) for identity in remote])
    at = T0 + 7300
    raised = []
    for k, identity in enumerate(remote):
        raised += mesh.issue(at + k, identity, caller=ZTUNNEL, ip="10.0.1.2")
    subject = caller_subject(ZTUNNEL, "node-1")
    assert signals(raised) == ["fan_out"]
    alert = raised[0]
    assert alert.identity == subject == f"{ZTUNNEL}@node-1" and alert.caller == ZTUNNEL
    # The 21st new identity tips it, or one a little later: the caller's memory
    # is a filter keyed by str hashes (randomised per process), and a false
    # "seen before" only delays the count.
    tipped = [mesh.last[identity].serial for identity in remote].index(alert.serial)
    assert 20 <= tipped <= 23, tipped
    assert mesh.monitor.score(subject, at + 30) == pytest.approx(DEFAULT_WEIGHTS["fan_out"], rel=1e-2)
    assert mesh.monitor.score(remote[0], at + 30) == 0.0
    # its usual identities, and the remote ones again, are nothing more
    for k, identity in enumerate(served + remote):
        assert mesh.issue(at + 100 + k, identity, caller=ZTUNNEL, ip="10.0.1.2") == []
    # another node's ztunnel is another subject, unaffected
    assert mesh.monitor.score(caller_subject(ZTUNNEL, "node-2"), at + 200) == 0.0
    only(mesh, "fan_out")


def test_a_node_gaining_a_few_pods_is_no_fan_out():
    mesh = Mesh()
    # a drained node's pods land here: 12 identities new to it, under the floor of 20
    mesh.history(*[(sa(f"local-{k}"), {"caller": ZTUNNEL}) for k in range(5)],
                 *[(sa(f"moved-{k}"), {"node": "node-2", "ip": "10.0.2.9"}) for k in range(12)])
    for k in range(12):
        assert mesh.issue(T0 + 7300 + k, sa(f"moved-{k}"), caller=ZTUNNEL) == []
    assert mesh.monitor.alerts_by_signal == dict.fromkeys(SIGNALS, 0)


def test_node_impersonation_refusal(mesh):
    at = T0 + 7300
    subject = caller_subject(ZTUNNEL, "node-3")
    raised = mesh.monitor.observe_refused(at, ZTUNNEL, A, "10.0.3.2", "node_impersonation", node="node-3")
    assert signals(raised) == ["node_impersonation"]
    assert raised[0].identity == A and raised[0].caller == ZTUNNEL and subject in raised[0].detail
    weight = DEFAULT_WEIGHTS["node_impersonation"]
    assert mesh.monitor.score(A, at) == pytest.approx(weight)
    assert mesh.monitor.score(subject, at) == pytest.approx(weight)
    assert mesh.monitor.high_risk(A, at) and mesh.monitor.high_risk(subject, at)
    # the same episode: more refusals for the same or other identities
    assert mesh.monitor.observe_refused(at + 60, ZTUNNEL, B, "10.0.3.2", "node_impersonation", node="node-3") == []
    assert mesh.monitor.observe_refused(at + 120, ZTUNNEL, A, "10.0.3.2", "node_impersonation", node="node-3") == []
    # other refusals are no signal
    assert mesh.monitor.observe_refused(at + 180, B, B, "10.0.1.11", "rate_limited") == []
    only(mesh, "node_impersonation")
    # quiet for longer than impersonation_quiet_seconds: a new episode
    again = mesh.monitor.observe_refused(at + 120 + 3601, ZTUNNEL, B, "10.0.3.2", "node_impersonation",
                                         node="node-3")
    assert signals(again) == ["node_impersonation"] and again[0].identity == B


def test_auth_failures_from_one_peer(mesh):
    at = T0 + 7300
    raised = []
    for k in range(40):
        raised += mesh.monitor.observe_auth_failure(at + k * 0.5, "203.0.113.9")
    for k in range(10):     # another peer, a few failures: an agent with a stale token
        raised += mesh.monitor.observe_auth_failure(at + k * 5, "10.0.1.50")
    assert signals(raised) == ["auth_failures"]
    alert = raised[0]
    assert alert.identity == "" and alert.score == 0.0 and "203.0.113.9" in alert.detail
    assert mesh.monitor.top(5, at + 60) == []                    # scored against no identity
    only(mesh, "auth_failures")
    # calm for a while, then a second wave: a second episode
    raised = []
    for k in range(40):
        raised += mesh.monitor.observe_auth_failure(at + 3600 + k * 0.5, "203.0.113.9")
    assert signals(raised) == ["auth_failures"]


def test_history_signals_are_quiet_while_learning():
    mesh = Mesh(learning_seconds=86_400)
    mesh.history((A, {}), until=T0 + 7200)
    at = T0 + 7300
    assert mesh.issue(at, sa("brand-new")) == []
    assert mesh.issue(at + 1, A, node="node-7", ip="172.16.0.1", ttl=90 * 86_400) == []
    for k in range(40):
        assert mesh.issue(at + 10 + k, A) == []
    # ...but evidence needing no history is not
    assert signals(mesh.issue(at + 100, B, spki=mesh.last[A].spki_sha256)) == ["key_reuse"]
    only(mesh, "key_reuse")
    # learning over: a new identity is noticed
    assert signals(mesh.issue(T0 + 86_400, sa("later"))) == ["new_identity"]


def test_new_identity_after_learning_and_a_weight_of_zero_switches_a_signal_off():
    mesh = Mesh(weights={"new_identity": 0})
    mesh.history((A, {}))
    assert mesh.issue(T0 + 7300, sa("other")) == []
    assert mesh.monitor.alerts_by_signal["new_identity"] == 0 and mesh.monitor.score(sa("other"), T0 + 7300) == 0
    mesh = Mesh()
    mesh.history((A, {}))
    raised = mesh.issue(T0 + 7300, sa("other"))
    assert signals(raised) == ["new_identity"] and raised[0].score == pytest.approx(DEFAULT_WEIGHTS["new_identity"])


# --- the score


def test_the_score_decays_by_half_lives_and_high_risk_flips_back(mesh):
    at = T0 + 7300
    first = mesh.last[A]
    mesh.issue(at, A, spki=first.spki_sha256, csr=first.csr_sha256)         # csr_replay 30
    mesh.issue(at, B, spki=first.spki_sha256)                               # key_reuse 40 on B
    mesh.monitor.observe_refused(at, ZTUNNEL, A, "10.0.3.2", "node_impersonation", node="node-3")   # +50 on A
    peak = mesh.monitor.score(A, at)
    assert peak == pytest.approx(80.0)
    assert mesh.monitor.high_risk(A, at)
    for k in range(1, 6):
        assert mesh.monitor.score(A, at + k * 3600) == pytest.approx(peak * 2.0 ** -k, rel=1e-9)
    # 80 falls to the threshold of 50 after log2(80/50) = 0.678 half-lives (2,441 s)
    assert mesh.monitor.high_risk(A, at + 2400) and not mesh.monitor.high_risk(A, at + 2500)
    assert not mesh.monitor.high_risk(B, at)                                # 40 < 50
    # a read before the last update does not grow it
    assert mesh.monitor.score(A, at - 100) == pytest.approx(peak)
    explained = mesh.monitor.explain(A, at + 3600)
    assert explained["score"] == pytest.approx(40.0) and explained["high_risk"] is False and explained["tracked"]
    assert [s["signal"] for s in explained["signals"]] == ["node_impersonation", "csr_replay"]
    assert sum(s["remaining"] for s in explained["signals"]) == pytest.approx(40.0)
    assert mesh.monitor.top(3, at) == [(A, pytest.approx(80.0), ("node_impersonation", "csr_replay")),
                                       (caller_subject(ZTUNNEL, "node-3"), pytest.approx(50.0),
                                        ("node_impersonation",)),
                                       (B, pytest.approx(40.0), ("key_reuse",))]
    assert [subject for subject, _, _ in mesh.monitor.top(1, at)] == [A]
    assert mesh.monitor.explain(sa("never"), at) == {"identity": sa("never"), "score": 0.0, "high_risk": False,
                                                     "threshold": 50.0, "tracked": False, "signals": []}


def test_the_score_is_capped_and_explain_is_bounded():
    mesh = Mesh(recent_signals=3, impersonation_quiet_seconds=1)
    at = T0
    for k in range(20):
        mesh.monitor.observe_refused(at + 2 * k, ZTUNNEL, A, "", "node_impersonation", node=f"n{k}")
    assert mesh.monitor.alerts_by_signal["node_impersonation"] == 20
    assert mesh.monitor.score(A, at + 40) <= 100.0
    assert mesh.monitor.score(A, at + 38) == pytest.approx(100.0)
    assert len(mesh.monitor.explain(A, at + 40)["signals"]) == 3


def test_high_risk_and_score_read_the_clock_when_no_time_is_given():
    clock = ManualClock(T0)
    monitor = IssuanceMonitor(MonitoringConfig(learning_seconds=0), clock=clock)
    monitor.observe_refused(T0, ZTUNNEL, A, "", "node_impersonation", node="n")
    assert monitor.high_risk(A) and monitor.score(A) == pytest.approx(50.0)
    clock.advance(3600)
    assert not monitor.high_risk(A) and monitor.score(A) == pytest.approx(25.0)


# --- bounds


def test_every_table_stays_within_its_bound():
    limits = dict(max_identities=50, max_callers=10, max_keys=100, max_peers=20)
    mesh = Mesh(learning_seconds=0, **limits)
    for k in range(5000):
        mesh.issue(T0 + k, sa(f"id-{k}"), caller=ZTUNNEL if k % 2 else None, node=f"node-{k % 300}",
                   ip=f"10.{k % 250}.{k % 7}.1")
        mesh.monitor.observe_auth_failure(T0 + k, f"192.0.2.{k % 250}-{k}")
        mesh.monitor.observe_refused(T0 + k, f"{TD}/ns/x/sa/agent-{k}", sa(f"id-{k}"), "", "node_impersonation")
        if k % 500 == 0:
            sizes = mesh.monitor.sizes()
            assert sizes["identities"] <= 50 and sizes["callers"] <= 10 and sizes["keys"] <= 100
            assert sizes["csrs"] <= 100 and sizes["peers"] <= 20 and sizes["scored"] <= 50
    assert mesh.monitor.sizes() == {"identities": 50, "callers": 10, "keys": 100, "csrs": 100, "peers": 20,
                                    "scored": 50}
    assert mesh.monitor.tracked_identities == 50
    assert len(mesh.monitor._names) <= 65_536


def test_an_evicted_identity_seen_again_is_new():
    mesh = Mesh(learning_seconds=0, max_identities=10)
    assert signals(mesh.issue(T0, A)) == ["new_identity"]
    assert mesh.issue(T0 + 1, A) == []
    for k in range(10):
        mesh.issue(T0 + 2 + k, sa(f"other-{k}"))
    assert signals(mesh.issue(T0 + 20, A)) == ["new_identity"]


def test_an_evicted_key_is_forgotten():
    mesh = Mesh(learning_seconds=0, max_keys=10)
    key = mesh.fresh()
    mesh.issue(T0, A, spki=key)
    for k in range(10):
        mesh.issue(T0 + 1 + k, A)
    assert signals(mesh.issue(T0 + 20, B, spki=key)) == ["new_identity"]     # no key_reuse: forgotten


# --- concurrency and layering


def test_reads_from_another_thread_while_observing():
    mesh = Mesh(learning_seconds=0)
    stop = threading.Event()
    seen: list[bool] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.append(mesh.monitor.high_risk(A, T0 + 10_000))
                mesh.monitor.score(sa("id-7"), T0 + 10_000)
        except BaseException as error:     # pragma: no cover - what the test looks for
            errors.append(error)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for k in range(20_000):
            mesh.issue(T0 + k * 0.01, sa(f"id-{k % 3000}"))
        mesh.monitor.observe_refused(T0 + 200, ZTUNNEL, A, "", "node_impersonation", node="n")
        for k in range(2000):
            mesh.issue(T0 + 201 + k * 0.01, sa(f"id-{k % 3000}"))
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert seen and set(seen) <= {False, True}
    assert mesh.monitor.high_risk(A, T0 + 200) and not mesh.monitor.high_risk(A, T0 + 201)
    assert mesh.monitor.score(A, T0 + 201) > 49.0 and not mesh.monitor.high_risk(sa("id-7"), T0 + 200)


def test_the_package_imports_nothing_of_fastca_but_the_clock():
    probe = ("import sys, fastca.monitoring; "
             "print(sorted(m for m in sys.modules if m.startswith('fastca') and m not in "
             "('fastca', 'fastca.clock') and not m.startswith('fastca.monitoring')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --- configuration


def test_weights_are_completed_from_the_defaults():
    config = MonitoringConfig(weights={"new_node": 2.5})
    assert config.weights == {**DEFAULT_WEIGHTS, "new_node": 2.5}
    assert set(config.weights) == set(SCORED_SIGNALS) and "auth_failures" not in config.weights
    assert MonitoringConfig().enabled is False


@pytest.mark.parametrize("change, message", [
    ({"weights": {"bursts": 1}}, "no weight for bursts"),
    ({"weights": {"auth_failures": 1}}, "no weight for auth_failures"),
    ({"weights": {"burst": -1}}, "weights must be >= 0"),
    ({"max_identities": 0}, "greater than or equal to 1"),
    ({"max_keys": -5}, "greater than or equal to 1"),
    ({"half_life_seconds": -1}, "greater than 0"),
    ({"learning_seconds": -1}, "greater than or equal to 0"),
    ({"alert_threshold": -3}, "greater than 0"),
    ({"burst_factor": 0.5}, "greater than 1"),
    ({"alert_threshold": 150}, "above score_cap"),
    ({"max_identity": 10}, "Extra inputs are not permitted"),
])
def test_invalid_configuration_is_refused(change, message):
    with pytest.raises(ValidationError, match=message):
        MonitoringConfig.model_validate(change)


def test_the_configuration_is_frozen():
    config = MonitoringConfig()
    with pytest.raises(ValidationError):
        config.alert_threshold = 1.0     # type: ignore[misc]

"""Issuance monitoring through a real `fastca serve` (SoftHSM, TLS on
loopback, TokenReview against a local HTTPS API server, the node authorizer
on a pod file): a steady population renewing raises nothing over a measured
period; each injected anomaly (burst, key reuse across two identities, a
replayed CSR, a new source network, a new node, a node agent's fan-out)
raises exactly its alert, flags the certificate that raised it and moves its subject's
score, which then decays; so do a TTL far above the identity's norm and each
refusal signal (a node agent asking for a pod not on its node, bad tokens
from one address), the refusals without a flag. The opt-in risk policy acts
on a high-risk identity's next request (a fresh TokenReview and a shortened
TTL on one signer, PERMISSION_DENIED on the other) and stops once the score
decays.

The monitor's windows are scaled down from hours to seconds in the
configuration, so the whole story takes about a minute of real time."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fastca.ca.softhsm import find_softhsm_module
from fastca.monitoring import SIGNALS
from tests.conftest import run_fastca
from tests.frontend.agent_client import AgentClient
from tests.monitoring._traffic import (TD, Relay, alert_counts, csr_for, gauge, issuer_key, lifetime, serial_of,
                                       spiffe, token)
from tests.frontend.conftest import apiserver as apiserver  # noqa: F401 - the fixture, used by name
from tests.frontend.conftest import NODE, init_state, service_account_token, start_server, tokenreview_config, \
    write_config

pytestmark = pytest.mark.slow

TTL = 3600
SHORTENED_TTL = 600
THRESHOLD = 25.0
HALF_LIFE = 30.0
LEARNING = 4.0
RENEW_EVERY = 2.0
POPULATION = [f"app-{i}" for i in range(8)]           # each renews on its own, from 127.0.0.1
FANNED = [f"fan-{i}" for i in range(5)]               # renew on their own too, then ztunnel asks for them
ZTUNNEL_SERVED = ["zt-0", "zt-1"]                     # what ztunnel asks for all along
ZTUNNEL = f"{TD}/ns/istio-system/sa/ztunnel"
ZTUNNEL_TOKEN = service_account_token("istio-system", "ztunnel", "ztunnel-abc")
SOURCE_ELSEWHERE = "127.0.3.1"                         # another /24 than 127.0.0.1


class Mesh:
    """The server, and the population renewing in the background."""

    def __init__(self, server, apiserver) -> None:  # noqa: F811 - the fixture's value
        self.server = server
        self.apiserver = apiserver
        self.root = server.root_pem
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._stop = threading.Event()
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._renew, daemon=True)

    def client(self, bearer: str, port: int | None = None) -> AgentClient:
        return AgentClient(f"localhost:{port or self.server.ports['grpc']}", self.root, token=bearer)

    def issue(self, name: str, *, bearer: str | None = None, key=None, csr: bytes | None = None,
              port: int | None = None, cert_signer: str = "", ttl: int = TTL) -> list[str]:
        identity = spiffe(name)
        if csr is None:
            csr, key = csr_for(identity, key)
        self.keys[name] = key
        return self.client(bearer or token(name), port).create_certificate(csr, ttl=ttl, cert_signer=cert_signer)

    def bulk(self, bearer: str, csrs: list[bytes]) -> list[list[str]]:
        """One BulkCertificateService call; the chains, every element issued."""
        from fastca.proto import bulk_pb2, bulk_pb2_grpc, istio_ca_pb2

        requests = [istio_ca_pb2.IstioCertificateRequest(csr=csr.decode(), validity_duration=TTL) for csr in csrs]
        with self.client(bearer).channel() as channel:
            response = bulk_pb2_grpc.BulkCertificateServiceStub(channel).CreateCertificates(
                bulk_pb2.BulkCertificateRequest(requests=requests),
                metadata=[("authorization", f"Bearer {bearer}"), ("clusterid", "Kubernetes")], timeout=30)
        assert [result.code for result in response.results] == [0] * len(csrs), response.results
        return [list(result.cert_chain) for result in response.results]

    def impersonate(self, name: str) -> list[str]:
        csr, _ = csr_for(spiffe(name))
        return self.client(ZTUNNEL_TOKEN).create_certificate(csr, ttl=TTL, impersonate=spiffe(name))

    def _renew(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                for name in (*POPULATION, *FANNED):
                    self.issue(name)
                for name in ZTUNNEL_SERVED:
                    self.impersonate(name)
            except grpc.RpcError as error:     # noqa: PERF203 - reported by the test
                self.errors.append(f"{error.code()}: {error.details()}")
            self._stop.wait(max(0.0, RENEW_EVERY - (time.monotonic() - started)))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    # -- what the server says

    def alerts(self) -> dict[str, float]:
        return alert_counts(self.server.ports["metrics"])

    def gauge(self, name: str) -> float:
        return gauge(self.server.ports["metrics"], name)

    def alert_lines(self) -> list[dict]:
        return [event for event in self.server.log_events() if event.get("event") == "issuance alert"]

    def wait_for_alert(self, signal: str, before: dict[str, float], timeout: float = 15.0) -> dict[str, float]:
        """Wait until ``signal`` was raised once more, then a little longer:
        every other counter must not have moved."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.alerts()
            if now[signal] > before[signal]:
                time.sleep(1.0)         # five polls: anything else raised would be counted by now
                now = self.alerts()
                assert now == {**before, signal: before[signal] + 1}, (signal, before, now)
                return now
            time.sleep(0.1)
        raise AssertionError(f"no {signal} alert within {timeout} s: {self.alerts()}")

    def risk(self, subject: str) -> dict:
        out = run_fastca("risk", "--state", str(self.server.state), "--identity", subject, "--json")
        return json.loads(out.stdout)["subjects"][0]

    def reviews_of(self, bearer: str) -> int:
        return sum(1 for request in self.apiserver.requests_to("/apis/authentication.k8s.io/v1/tokenreviews")
                   if request.json()["spec"]["token"] == bearer)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, apiserver):  # noqa: F811 - the fixture
    base = tmp_path_factory.mktemp("monitoring")
    state = init_state(base / "state")
    other_key = (f"pkcs11:token=fastca;object=other-ca;type=private?module-path={find_softhsm_module()}"
                 f"&pin-source=file:{state / 'pin'}")
    other = base / "other-ca"
    run_fastca("init", "--state", str(other), "--key-uri", other_key,
               env={"SOFTHSM2_CONF": str(state / "softhsm2.conf")})
    pods = [{"namespace": "istio-system", "name": "ztunnel-abc", "uid": "uid-ztunnel-abc",
             "service_account": "ztunnel", "node_name": NODE}]
    pods += [{"namespace": "shop", "name": f"{name}-pod", "uid": f"uid-{name}-pod", "service_account": name,
              "node_name": NODE} for name in (*ZTUNNEL_SERVED, *FANNED)]
    (base / "pods.json").write_text(json.dumps({"pods": pods}))
    write_config(state, {
        "authn": {"tokenreview": [tokenreview_config(apiserver, base / "apiserver-token")],
                  "node_authorizer": {"trusted_node_accounts": ["istio-system/ztunnel"], "pod_source": "static",
                                      "static_file": str(base / "pods.json")}},
        "signers": {"other": {"state_dir": str(other)}},
        "policy": {"rate_limit": {"per_identity_per_second": 0}},
        "monitoring": {
            "enabled": True, "poll_seconds": 0.2, "learning_seconds": LEARNING,
            "identity_history_max_seconds": 3.0, "half_life_seconds": HALF_LIFE, "alert_threshold": THRESHOLD,
            "burst_window_seconds": 4.0, "burst_baseline_seconds": 120.0, "burst_min_count": 8.0,
            "burst_factor": 4.0, "fan_out_window_seconds": 3.0, "fan_out_min_identities": 4.0,
            "fan_out_factor": 2.0, "fan_out_memory_seconds": 600.0,
            "policy": {"default": {"actions": ["fresh_token", "shorten_ttl"],
                                   "shortened_ttl_seconds": SHORTENED_TTL},
                       "other": {"actions": ["refuse"]}},
        },
    })
    server = start_server(state)
    mesh = Mesh(server, apiserver)
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()
        server.stop()


def test_steady_population_then_each_anomaly_raises_exactly_its_alert_and_policy_acts(mesh):
    # --- a steady population renewing at its TTL: learning, then a measured quiet period
    time.sleep(LEARNING + 10.0)
    quiet = mesh.alerts()
    assert quiet == dict.fromkeys(SIGNALS, 0.0), quiet
    assert mesh.alert_lines() == []
    assert mesh.gauge("fastca_monitoring_tracked_identities") == len(POPULATION) + len(FANNED) + len(ZTUNNEL_SERVED)
    assert mesh.gauge("fastca_monitoring_top_risk_score") == 0.0
    assert not mesh.errors, mesh.errors

    # --- burst: one identity asks for many certificates at once
    for _ in range(20):
        mesh.issue("app-0")
    counts = mesh.wait_for_alert("burst", quiet)
    assert mesh.risk(spiffe("app-0"))["signals"][0]["signal"] == "burst"

    # --- key reuse: app-1 presents the key app-2 was certified for
    reused = mesh.issue("app-1", key=mesh.keys["app-2"])
    counts = mesh.wait_for_alert("key_reuse", counts)

    # --- a replayed CSR: app-3 sends the same bytes twice
    csr, _ = csr_for(spiffe("app-3"))
    mesh.issue("app-3", csr=csr)
    replayed = mesh.issue("app-3", csr=csr)
    counts = mesh.wait_for_alert("csr_replay", counts)

    # --- a new source network: app-4 renews from another /24
    relay = Relay(mesh.server.ports["grpc"], SOURCE_ELSEWHERE)
    try:
        moved = mesh.issue("app-4", port=relay.port)
    finally:
        relay.close()
    counts = mesh.wait_for_alert("new_network", counts)

    # --- a new node: app-6 renews from a pod on another node (same network)
    on_node_b = mesh.issue("app-6", bearer=token("app-6", "elsewhere-app-6"))
    counts = mesh.wait_for_alert("new_node", counts)

    # --- fan-out: ztunnel suddenly asks for identities it never asked for
    for name in FANNED:
        mesh.impersonate(name)
    counts = mesh.wait_for_alert("fan_out", counts)

    # --- a TTL far above the identity's norm (a day against an hour)
    stretched = mesh.issue("app-2", ttl=86_400)
    counts = mesh.wait_for_alert("ttl_outlier", counts)

    # --- refusals, which never reach the audit log: observed by the refusing process
    # ztunnel asks for an identity with no pod on its node: refused, and an alert.
    with pytest.raises(grpc.RpcError) as refused:
        mesh.impersonate("ghost")
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    counts = mesh.wait_for_alert("node_impersonation", counts)
    # One address presenting bad tokens, many times: an alert for that peer.
    for _ in range(25):
        with pytest.raises(grpc.RpcError) as refused:
            mesh.issue("app-7", bearer="not-a-token")
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    counts = mesh.wait_for_alert("auth_failures", counts)

    # Each alert: one log line naming its signal, and a flag on the certificate that raised it.
    lines = mesh.alert_lines()
    issued_alerts = ["burst", "key_reuse", "csr_replay", "new_network", "new_node", "fan_out", "ttl_outlier"]
    assert sorted(line["signal"] for line in lines) == sorted([*issued_alerts, "node_impersonation", "auth_failures"])
    refusal_lines = [line for line in lines if line["signal"] in ("node_impersonation", "auth_failures")]
    assert [line["serial"] for line in refusal_lines] == ["", ""]                # no certificate: nothing to flag
    assert refusal_lines[0]["subject"] == spiffe("ghost") and refusal_lines[0]["caller"] == ZTUNNEL
    assert "127.0.0.1" in refusal_lines[1]["detail"]
    lines = [line for line in lines if line not in refusal_lines]
    flagged = json.loads(run_fastca("audit", "list", "--state", str(mesh.server.state), "--flagged",
                                    "--json", "--limit", "100").stdout)
    flags = {record["serial"]: record["flags"] for record in flagged}
    assert flags[serial_of(reused)] == ["key_reuse"]
    assert flags[serial_of(replayed)] == ["csr_replay"]
    assert flags[serial_of(moved)] == ["new_network"]
    assert flags[serial_of(on_node_b)] == ["new_node"]
    assert flags[serial_of(stretched)] == ["ttl_outlier"]
    assert sorted(flag for record in flagged for flag in record["flags"]) == sorted(issued_alerts)
    for line in lines:
        assert line["serial"] in flags and line["signal"] in flags[line["serial"]]

    # Every subject's score moved; `fastca risk` derives the same from the log.
    subjects = {"burst": spiffe("app-0"), "key_reuse": spiffe("app-1"), "csr_replay": spiffe("app-3"),
                "new_network": spiffe("app-4"), "new_node": spiffe("app-6"), "fan_out": f"{ZTUNNEL}@{NODE}",
                "ttl_outlier": spiffe("app-2")}
    for signal, subject in subjects.items():
        explained = mesh.risk(subject)
        assert explained["score"] > 0 and signal in [s["signal"] for s in explained["signals"]], (signal, explained)
    assert mesh.risk(spiffe("app-5"))["score"] == 0.0
    assert mesh.gauge("fastca_monitoring_high_risk_identities") >= 1

    # --- policy: app-1 (key reuse, 40) is high-risk. On the default signer its
    # next requests are reviewed again (no cached TokenReview) and shortened.
    assert mesh.risk(spiffe("app-1"))["high_risk"]
    own = token("app-1", "app-1-foreground")
    first = mesh.issue("app-1", bearer=own)
    second = mesh.issue("app-1", bearer=own)
    assert mesh.reviews_of(own) == 2            # a cached review would have made it 1
    assert lifetime(first) <= SHORTENED_TTL + 120 and lifetime(second) <= SHORTENED_TTL + 120
    # A bulk call: its token reviewed again once, not once per element; each shortened.
    chains = mesh.bulk(own, [csr_for(spiffe("app-1"))[0] for _ in range(3)])
    assert mesh.reviews_of(own) == 3 and all(lifetime(chain) <= SHORTENED_TTL + 120 for chain in chains)
    # ...an identity that is not high-risk: one review, cached; the full TTL.
    calm = token("app-5", "app-5-foreground")
    assert lifetime(mesh.issue("app-5", bearer=calm)) >= TTL
    mesh.issue("app-5", bearer=calm)
    assert mesh.reviews_of(calm) == 1
    # On the signer whose policy refuses: PERMISSION_DENIED, saying why and what to do.
    with pytest.raises(grpc.RpcError) as refused:
        mesh.issue("app-1", bearer=own, cert_signer="other")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "risk score" in refused.value.details() and "fastca risk" in refused.value.details()
    assert issuer_key(mesh.issue("app-5", bearer=calm, cert_signer="other")) != issuer_key(first)

    # --- the score decays back: the policy stops acting once it is below the threshold
    start = mesh.risk(spiffe("app-1"))["score"]
    deadline = time.monotonic() + 60
    while mesh.risk(spiffe("app-1"))["high_risk"]:
        assert time.monotonic() < deadline, "the score did not decay"
        time.sleep(1.0)
    later = mesh.risk(spiffe("app-1"))["score"]
    assert later < THRESHOLD < start
    calm_again = mesh.issue("app-1", bearer=own)
    reviews = mesh.reviews_of(own)              # at most one more: the cached review may have expired
    assert lifetime(calm_again) >= TTL and lifetime(mesh.issue("app-1", bearer=own)) >= TTL
    assert mesh.reviews_of(own) == reviews
    assert issuer_key(mesh.issue("app-1", bearer=own, cert_signer="other")) != issuer_key(first)
    assert not mesh.errors, mesh.errors

"""Acceptance (issue 14, peers): a real `fastca serve` with three peers (a
file, an HTTPS URL, a remote cluster's istio-ca-root-cert through a
kubeconfig), a real `fastca agent`, and an SDS client subscribed to ROOTCA.
A peer's new root reaches ROOTCA within the sync interval (plus the agent's
poll); a malformed and an oversized bundle are refused and reported and the
last good kept; a peer gone past its grace period leaves the bundle; the
published ConfigMap carries the merged bundle."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from fastca.trust.config import CONFIGMAP_KEY, CONFIGMAP_NAME
from tests.agent.conftest import WORKLOAD_NS, WORKLOAD_SA
from tests.agent.sds_client import SotwStream
from tests.agent.test_agent_e2e import AgentProcess
from tests.authn._https import FakeHttpsServer, Request, Response
from tests.frontend.conftest import (apiserver, init_state, service_account_token,  # noqa: F401
                                     start_server, tokenreview_config, write_config)
from tests.trust._apiserver import KubeStandIn
from tests.trust._roots import certificate, pem
from tests.trust.test_replicas import _until

SYNC = 1.0
POLL = 0.5
GRACE = 6.0


def _orgs(bundle: bytes) -> set[str]:
    return {c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(bundle)}


def _metric(port: int, series: str) -> float | None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def _rootca(received) -> bytes:
    return received.secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes


@pytest.mark.slow
def test_peer_roots_reach_agents_refusals_keep_the_last_good_and_the_grace_period_drops(
        tmp_path: Path, apiserver):  # noqa: F811
    west, east, south = certificate("west"), certificate("east"), certificate("south")
    west_file = tmp_path / "west.pem"
    west_file.write_bytes(pem(west))
    served = {"east": pem(east)}

    def handle(request: Request) -> Response:
        return Response(body=served["east"], headers={"Content-Type": "application/x-pem-file"})

    with KubeStandIn(tmp_path) as cluster, FakeHttpsServer(tmp_path, handle) as https:
        for namespace in ("default", WORKLOAD_NS, "istio-system"):
            cluster.create_namespace(namespace)
        cluster.put_configmap("istio-system", CONFIGMAP_NAME, {CONFIGMAP_KEY: pem(south).decode()})
        state = init_state(tmp_path / "state")
        own = (state / "root-cert.pem").read_bytes()
        write_config(state, {
            "authn": {"tokenreview": [tokenreview_config(apiserver, tmp_path / "apiserver-token")]},
            "trust": {
                # The stand-in plays both clusters: this one (where the ConfigMap is
                # published) and the peer "south" (whose istio-system copy is read).
                "kubernetes": {"enabled": True, "kubeconfig": str(cluster.write_kubeconfig(tmp_path / "local")),
                               "lease_duration_seconds": 4, "renew_deadline_seconds": 3.0,
                               "retry_period_seconds": 1.0, "skip_namespaces": ["istio-system"]},
                "peers": {"sync_interval_seconds": SYNC, "grace_period_seconds": GRACE, "max_bytes": 16384,
                          "sources": {
                              "west": {"file": str(west_file)},
                              "east": {"url": f"{https.url}/roots.pem", "ca_file": str(https.ca_file)},
                              "south": {"kubeconfig": str(cluster.write_kubeconfig(tmp_path / "south")),
                                        "namespace": "istio-system"}}}}})
        server = start_server(state)
        token = tmp_path / "istio-token"
        token.write_text(service_account_token(WORKLOAD_NS, WORKLOAD_SA, "api-1"))
        agent = None
        try:
            metrics = server.ports["metrics"]
            agent = AgentProcess(tmp_path, "--ca-addr", server.address, "--ca-root", str(state / "root-cert.pem"),
                                 "--trust-domain", "cluster.local", "--namespace", WORKLOAD_NS,
                                 "--service-account", WORKLOAD_SA, "--token-file", str(token),
                                 env={"FASTCA_AGENT_ROOT_POLL_SECONDS": str(POLL)})
            rootca = SotwStream(str(agent.socket), ["ROOTCA"])
            first = rootca.receive()
            rootca.ack(first)
            own_orgs = _orgs(own)
            # The first sync runs before the ports open: the first answer already has every peer.
            assert _orgs(_rootca(first)) == own_orgs | {"O=west", "O=east", "O=south"}
            assert _rootca(first).startswith(own)                      # own roots first

            # The Kubernetes ConfigMap carries the merged bundle.
            def published() -> bytes | None:
                cm = cluster.configmap(WORKLOAD_NS, CONFIGMAP_NAME)
                return cm["data"][CONFIGMAP_KEY].encode() if cm else None

            _until(lambda: published() == _rootca(first), 20, "the merged bundle in the ConfigMap")

            # Adding a root to a peer: a new ROOTCA is pushed within the sync interval (+ the poll).
            west_2 = certificate("west-2")
            west_file.write_bytes(pem(west, west_2))
            changed_at = time.monotonic()
            pushed = rootca.receive(timeout=15)
            took = time.monotonic() - changed_at
            rootca.ack(pushed)
            print(f"peer root pushed to ROOTCA after {took:.2f}s")
            assert "O=west-2" in _orgs(_rootca(pushed))
            assert took <= SYNC + POLL + 1.5, took
            _until(lambda: published() == _rootca(pushed), 20, "the ConfigMap updated")
            good = _rootca(pushed)

            # A malformed bundle (HTTPS) and an oversized one (the ConfigMap): refused, reported, last good kept.
            served["east"] = b"<html>maintenance</html>"
            cluster.put_configmap("istio-system", CONFIGMAP_NAME,
                                  {CONFIGMAP_KEY: pem(*(certificate(f"s{i}") for i in range(60))).decode()})
            _until(lambda: _metric(metrics, 'fastca_trust_peer_ok{peer="east"}') == 0
                   and _metric(metrics, 'fastca_trust_peer_ok{peer="south"}') == 0, 10, "the refusals reported")
            assert _metric(metrics, 'fastca_trust_peer_refusals_total{peer="east",reason="empty"}') >= 1
            assert _metric(metrics, 'fastca_trust_peer_refusals_total{peer="south",reason="too_large"}') >= 1
            assert _metric(metrics, 'fastca_trust_peer_in_bundle{peer="east"}') == 1
            assert rootca.nothing_within(SYNC * 2 + POLL)                # nothing pushed: the last good stands
            refusals = [e for e in server.log_events() if e.get("event") == "peer trust bundle not updated"]
            assert {e["peer"] for e in refusals} >= {"east", "south"}
            assert published() == good

            # A peer gone past its grace period leaves the bundle (and comes back when it answers).
            served["east"] = pem(east)
            cluster.put_configmap("istio-system", CONFIGMAP_NAME, {CONFIGMAP_KEY: pem(south).decode()})
            west_file.unlink()
            gone_at = time.monotonic()
            dropped = rootca.receive(timeout=GRACE + 15)
            rootca.ack(dropped)
            assert _orgs(_rootca(dropped)) == own_orgs | {"O=east", "O=south"}
            assert time.monotonic() - gone_at >= GRACE - SYNC * 2
            assert _metric(metrics, 'fastca_trust_peer_in_bundle{peer="west"}') == 0
            assert any(e.get("event", "").startswith("peer trust bundle dropped") for e in server.log_events())
            _until(lambda: published() == _rootca(dropped), 20, "the ConfigMap without the dropped peer")
            rootca.close()
        finally:
            if agent is not None:
                agent.stop()
            assert server.stop() == 0

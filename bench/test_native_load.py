"""The native load generator (agentload, Go on grpc-go) against a real
``fastca serve``: SoftHSM key, TLS, TokenReview through the bench's fake API
server, the SQLite audit log. Its counts are checked against what the server
recorded, and its failure counts against a refusal the server really makes.
The build needs golang-go and golang-google-grpc-dev (dev/test installs them)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from bench.cfssl_peer import CfsslTarget
from bench.fake_apiserver import FakeApiServer
from bench.fastca_server import FastcaServer
from bench.loadgen import BulkTarget, IstioTarget, LoadSpec, make_csrs
from bench.native_load import native_config, agentload_binary, run_native_load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("native-load")
    # Refusals are counted in bulk here: the per-connection bound on refused
    # authentications is lifted (its own test is in tests/frontend).
    with FakeApiServer(workdir) as api, FastcaServer(workdir / "fastca", api.url, api.ca_file,
                                                     server_settings={"max_unauthenticated_calls": 1_000_000}) as running:
        yield running


def _issued(server: FastcaServer) -> int:
    with sqlite3.connect(server.state / "audit.db") as db:
        return db.execute("SELECT count(*) FROM issuance WHERE credential_type != 'self'").fetchone()[0]


def test_drives_the_istio_path_and_every_success_is_a_recorded_certificate(server):
    csrs = make_csrs(16, "ec-p256", distinct_keys=2)
    before = _issued(server)
    spec = LoadSpec(connections=4, warmup_s=0.5, duration_s=2.0, call_timeout_s=10.0)
    summary = run_native_load(IstioTarget(server.address, server.root_pem), spec, csrs, server_pid=server.pid)
    assert summary["errors"] == {}
    assert summary["ok"] > 10
    # Successes counted in the window are a subset of what the server audited
    # (warm-up and drain calls are recorded but not counted).
    assert _issued(server) - before >= summary["ok"]
    assert summary["generator_cpu_s"] > 0 and summary["server_cpu_s"] > 0
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]


@dataclass(frozen=True)
class _StrangerTarget(IstioTarget):
    @staticmethod
    def token(process_index: int, connection_index: int) -> str:
        return f"not-a-service-account-{connection_index}"     # the fake API server rejects it


def test_refusals_are_counted_by_their_grpc_status(server):
    csrs = make_csrs(4, "ec-p256", distinct_keys=1)
    before = _issued(server)
    spec = LoadSpec(connections=2, warmup_s=0.2, duration_s=1.0, call_timeout_s=10.0)
    summary = run_native_load(_StrangerTarget(server.address, server.root_pem), spec, csrs, server_pid=None)
    assert summary["ok"] == 0
    assert set(summary["errors"]) == {"UNAUTHENTICATED"} and summary["errors"]["UNAUTHENTICATED"] > 0
    assert summary["error_latency_ms"]["p50"] > 0
    assert _issued(server) == before


def test_grpc_go_with_a_client_certificate_a_token_or_neither_on_one_port(server):
    """The Istio agent's client stack on fastca's main port: a VM's client
    certificate, a sidecar's token, or nothing (UNAUTHENTICATED)."""
    csrs = make_csrs(8, "rsa-2048", distinct_keys=2)
    spec = LoadSpec(connections=2, warmup_s=0.2, duration_s=1.0, call_timeout_s=10.0)
    cert, key = server.client_identity("spiffe://cluster.local/ns/vm/sa/grpc-go")
    plain = IstioTarget(server.address, server.root_pem)
    with_cert = replace(plain, client_cert_pem=cert, client_key_pem=key, use_tokens=False)
    neither = replace(plain, use_tokens=False)
    for target in (with_cert, plain):
        summary = run_native_load(target, spec, csrs, server_pid=None)
        assert summary["errors"] == {} and summary["ok"] > 0, summary["errors"]
    refused = run_native_load(neither, spec, csrs, server_pid=None)
    assert refused["ok"] == 0 and set(refused["errors"]) == {"UNAUTHENTICATED"}


def test_the_istiod_shaped_peer_serves_both_ways(tmp_path):
    from bench.go_peer import GoPeer

    csrs = make_csrs(8, "rsa-2048", distinct_keys=2)
    spec = LoadSpec(connections=2, warmup_s=0.2, duration_s=1.0, call_timeout_s=10.0)
    with GoPeer(tmp_path, connections=2) as peer:
        for target in (peer.target(), peer.target(client_certificate=True)):
            summary = run_native_load(target, spec, csrs, server_pid=peer.pid)
            assert summary["errors"] == {} and summary["ok"] > 0 and summary["server_cpu_s"] > 0
        refused = run_native_load(replace(peer.target(), use_tokens=False), spec, csrs, server_pid=None)
        assert refused["ok"] == 0 and set(refused["errors"]) == {"UNAUTHENTICATED"}


def test_a_root_bundle_without_certificates_stops_it_with_the_reason(server):
    csr = make_csrs(1, "ec-p256", distinct_keys=1)
    spec = LoadSpec(connections=1, warmup_s=0.1, duration_s=0.5)
    with pytest.raises(RuntimeError, match="no certificate in the root bundle"):
        run_native_load(IstioTarget(server.address, csr[0]), spec, csr, server_pid=None)


def test_configuration_for_cfssl_and_what_it_cannot_drive(tmp_path: Path):
    csrs = make_csrs(3, "ec-p256", distinct_keys=1)
    spec = LoadSpec(connections=8, warmup_s=1, duration_s=2, rate=100)
    config = native_config(CfsslTarget("127.0.0.1:8888"), spec, csrs, tmp_path)
    assert config["kind"] == "cfssl" and config["method"] == "/api/v1/cfssl/sign" and config["rate"] == 100
    records = (tmp_path / "requests.bin").read_bytes()
    first_length = int.from_bytes(records[:4], "big")
    assert json.loads(records[4:4 + first_length]) == {"certificate_request": csrs[0].decode()}
    with pytest.raises(TypeError, match="bulk"):
        native_config(BulkTarget("127.0.0.1:1", b""), spec, csrs, tmp_path)
    assert agentload_binary().exists()

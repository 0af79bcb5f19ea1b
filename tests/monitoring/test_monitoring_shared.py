"""Risk scores shared without asking anyone: every server process derives
them from the audit log. Two workers of one server (SQLite): an anomaly
issued through either is scored by both, so risk policy acts whichever
worker takes the next connection, and it is reported once (worker 0). Two
replicas on one PostgreSQL log (behind one port, one network HSM): each
derives the score from the other's certificates too; the record is
flagged, and the alert reported, once."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import grpc
import pytest

from tests.audit.conftest import pg_database, postgres  # noqa: F401 - the fixtures, used by name
from tests.audit.postgres import TestDatabase
from tests.conftest import run_fastca
from tests.frontend.agent_client import AgentClient
from tests.frontend.conftest import apiserver as apiserver  # noqa: F401 - the fixture, used by name
from tests.frontend.conftest import init_state, start_server, tokenreview_config, write_config
from tests.frontend.replicas import replicas_on_a_network_hsm
from tests.monitoring._traffic import alert_counts, csr_for, metrics_text, serial_of, spiffe, token

pytestmark = pytest.mark.slow

CONNECTIONS = 12        # new connections each: SO_REUSEPORT spreads them over the processes


def _config(apiserver, base: Path, **audit) -> dict:  # noqa: F811 - the fixture's value
    return {"authn": {"tokenreview": [tokenreview_config(apiserver, base / "api-token")]},
            "policy": {"rate_limit": {"per_identity_per_second": 0}},
            **({"audit": audit} if audit else {}),
            "monitoring": {"enabled": True, "poll_seconds": 0.2, "learning_seconds": 0,
                           "policy": {"default": {"actions": ["refuse"], "threshold": 30}}}}


def _issue(address: str, root: bytes, name: str, key=None) -> list[str]:
    csr, key = csr_for(spiffe(name), key)
    chain = AgentClient(address, root, token=token(name)).create_certificate(csr, ttl=3600)
    return chain, key


def _refusals(address: str, root: bytes, name: str) -> list[str]:
    """The status of CONNECTIONS requests for ``name``, each on a new connection."""
    codes = []
    for _ in range(CONNECTIONS):
        try:
            _issue(address, root, name)
            codes.append("OK")
        except grpc.RpcError as error:
            codes.append(error.code().name)
            assert "risk score" in error.details()
    return codes


def _until(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return value


def _denied(metrics_port: int) -> float:
    match = re.search(r'^fastca_requests_total\{code="PERMISSION_DENIED",method="CreateCertificate"\} (\S+)$',
                      metrics_text(metrics_port), re.M)
    return float(match.group(1)) if match else 0.0


def _metrics_port(server) -> int:
    """A one-process server's metrics port (a supervisor lists its workers')."""
    ports = server.ports["metrics"]
    return ports[0] if isinstance(ports, list) else ports


def _flags(state: Path, serial: str) -> list[str]:
    record = json.loads(run_fastca("audit", "show", serial, "--state", str(state), "--json").stdout)
    return record["flags"]


def test_two_workers_share_every_score_and_report_once(tmp_path, apiserver):  # noqa: F811
    state = init_state(tmp_path / "state")
    write_config(state, _config(apiserver, tmp_path))
    server = start_server(state, workers=2)
    try:
        serving = _until(lambda: [e for e in server.log_events() if e.get("event") == "serving" and "workers" in e])
        address, root = f"localhost:{serving[0]['ports']['grpc']}", server.root_pem
        metrics = serving[0]["ports"]["metrics"]       # worker 0's first
        assert len(metrics) == 2
        _, key = _issue(address, root, "owner")
        chain, _ = _issue(address, root, "copier", key)     # key reuse (40 + new identity 5)
        _until(lambda: alert_counts(metrics[0])["key_reuse"] == 1)
        time.sleep(1.0)
        # Reported by worker 0 alone: one count, one log line, one flag.
        assert [alert_counts(port)["key_reuse"] for port in metrics] == [1, 0]
        assert [e["signal"] for e in server.log_events() if e.get("event") == "issuance alert"].count("key_reuse") == 1
        assert _flags(state, serial_of(chain)) == ["new_identity", "key_reuse"]
        # Whichever worker takes the connection refuses the high-risk identity
        # (the kernel gave each worker some of the connections).
        assert _refusals(address, root, "copier") == ["PERMISSION_DENIED"] * CONNECTIONS
        denied = [_denied(port) for port in metrics]
        assert sum(denied) == CONNECTIONS and all(denied), denied
        assert _refusals(address, root, "owner") == ["OK"] * CONNECTIONS
    finally:
        assert server.stop() == 0


def test_replicas_on_one_postgresql_log_derive_the_same_scores(tmp_path, apiserver,  # noqa: F811
                                                              pg_database: TestDatabase):  # noqa: F811
    state = init_state(tmp_path / "state")
    write_config(state, _config(apiserver, tmp_path, database=pg_database.url,
                                password_file=str(pg_database.password_file)))
    with replicas_on_a_network_hsm(state) as shared:
        replicas, address = shared.servers, shared.address
        root = replicas[0].root_pem
        _, key = _issue(address, root, "owner")
        chain, _ = _issue(address, root, "copier", key)
        # Each replica follows the shared log and raises it, whichever issued;
        # the first to flag the record reports it, so it is counted once in all.
        ports = [_metrics_port(replica) for replica in replicas]
        _until(lambda: sum(alert_counts(port)["key_reuse"] for port in ports) == 1)
        time.sleep(1.0)
        assert sum(alert_counts(port)["key_reuse"] for port in ports) == 1
        assert sum(1 for replica in replicas for e in replica.log_events()
                   if e.get("event") == "issuance alert" and e.get("signal") == "key_reuse") == 1
        assert _flags(state, serial_of(chain)) == ["new_identity", "key_reuse"]         # flagged once
        # Both derived the score: whichever replica takes the connection refuses.
        assert _refusals(address, root, "copier") == ["PERMISSION_DENIED"] * CONNECTIONS
        denied = [_denied(port) for port in ports]
        assert sum(denied) == CONNECTIONS and all(denied), denied
        assert _refusals(address, root, "owner") == ["OK"] * CONNECTIONS

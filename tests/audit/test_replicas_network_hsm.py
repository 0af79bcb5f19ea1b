"""Two replicas behind one address, one CA key in a network HSM, one
registry (issue 14): two `fastca serve` processes bound to the same port
(SO_REUSEPORT), each loading p11-kit-client.so against one `p11-kit server`
that exports the SoftHSM token, both recording into one PostgreSQL database.
One replica is killed with SIGKILL mid-load; agents that retry (as Istio's
do, on a new connection) get every certificate from the other, and every
certificate any agent received is in PostgreSQL exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
from cryptography import x509

from tests.audit.postgres import PostgresServer, TestDatabase
from tests.conftest import agent_csrs
from tests.frontend.agent_client import AgentClient
from tests.frontend.conftest import apiserver, init_state, service_account_token  # noqa: F401
from tests.frontend.conftest import tokenreview_config, write_config
from tests.frontend.replicas import replicas_on_a_network_hsm

AGENTS = 8
CERTIFICATES_EACH = 40


def _agent(n: int, address: str, root_pem: bytes, stop: threading.Event, serials: list[int],
           failures: list[str]) -> None:
    """Renews CERTIFICATES_EACH times; a failed call is retried (a new channel
    each time, so a new connection, which the kernel may give either replica)."""
    client = AgentClient(address, root_pem, token=service_account_token("replicas", f"agent-{n}"))
    csrs = [c.pem for c in agent_csrs()]
    got = 0
    while got < CERTIFICATES_EACH and not stop.is_set():
        try:
            chain = client.create_certificate(csrs[(n + got) % len(csrs)], timeout=10)
        except grpc.RpcError as error:
            failures.append(error.code().name)
            time.sleep(0.05)
            continue
        serials.append(x509.load_pem_x509_certificate(chain[0].encode()).serial_number)
        got += 1


def _issued_to_agents(replica) -> int:
    return sum(1 for e in replica.log_events() if e.get("event") == "certificate issued" and e.get("credential") != "self")


def test_two_replicas_one_network_hsm_one_registry_survive_a_kill(tmp_path: Path, apiserver,  # noqa: F811
                                                                  postgres: PostgresServer,
                                                                  pg_database: TestDatabase) -> None:
    state = init_state(tmp_path / "state")
    write_config(state, {"authn": {"tokenreview": [tokenreview_config(apiserver, tmp_path / "api-token")]},
                         "policy": {"rate_limit": {"per_identity_per_second": 0}},
                         "audit": {"database": pg_database.url, "password_file": str(pg_database.password_file)}})
    with replicas_on_a_network_hsm(state) as shared:
        replicas, address = shared.servers, shared.address
        stop = threading.Event()
        serials: list[int] = []
        failures: list[str] = []
        agents = [threading.Thread(target=_agent, args=(n, address, replicas[0].root_pem, stop, serials, failures),
                                   daemon=True) for n in range(AGENTS)]
        for thread in agents:
            thread.start()
        deadline = time.monotonic() + 60
        while len(serials) < AGENTS * CERTIFICATES_EACH // 3:
            assert time.monotonic() < deadline, f"{len(serials)} certificates, failures {set(failures)}"
            time.sleep(0.05)
        replicas[0].process.kill()
        replicas[0].process.wait(timeout=10)
        issued_by_killed = _issued_to_agents(replicas[0])
        for thread in agents:
            thread.join(timeout=120)
        stop.set()
        assert not any(thread.is_alive() for thread in agents)
        # Every agent got all it asked for, the later ones from the survivor.
        assert len(serials) == AGENTS * CERTIFICATES_EACH and len(set(serials)) == len(serials)
        assert set(failures) <= {"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "UNKNOWN"}, set(failures)
        assert replicas[1].process.poll() is None
        # The address really was shared: both replicas issued to agents.
        assert issued_by_killed > 0 and _issued_to_agents(replicas[1]) > 0
    returned = [f"{serial:x}" for serial in serials]
    counts = dict(postgres.query(pg_database.name, "SELECT serial, count(*) FROM fastca_issuance "
                                                   "WHERE serial = ANY(%s) GROUP BY serial", returned))
    assert [serial for serial in returned if counts.get(serial) != 1] == []
    # Both replicas signed through the one network HSM: each issued (and recorded) its serving certificate.
    (serving,) = postgres.query(pg_database.name, "SELECT count(*) FROM fastca_issuance WHERE credential_type = 'self'")
    assert serving[0] == 2

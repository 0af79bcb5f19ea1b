"""`fastca serve --workers 2`: two processes share the port, each with its
own PKCS#11 session; a dead worker is restarted; SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time

import pytest
from cryptography import x509

from tests.agent.conftest import free_port
from tests.conftest import agent_csrs
from tests.frontend.agent_client import AgentClient
from tests.frontend.conftest import init_state, service_account_token, start_server, tokenreview_config, write_config


def _serving_serial(port: int, root: bytes) -> int:
    context = ssl.create_default_context(cadata=root.decode())
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


@pytest.fixture
def workers(tmp_path, apiserver):
    state = init_state(tmp_path / "state")
    write_config(state, {"authn": {"tokenreview": [tokenreview_config(apiserver, tmp_path / "api-token")]}})
    port = free_port()
    server = start_server(state, "--workers", "2", "--listen", f"127.0.0.1:{port}")
    yield server, port
    if server.process.poll() is None:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_workers_share_the_port_and_restart(workers):
    server, port = workers
    deadline = time.monotonic() + 60
    while not [e for e in server.log_events() if e.get("event") == "serving" and "workers" in e]:
        assert time.monotonic() < deadline, server.log_file.read_text()
        time.sleep(0.1)
    serving = [e for e in server.log_events() if e.get("event") == "serving" and "workers" in e][0]
    pids = serving["pids"]
    assert len(set(pids)) == 2 and len(serving["ports"]["metrics"]) == 2
    frozen = [e["objects"] for e in server.log_events() if e.get("event") == "startup heap frozen"]
    assert len(frozen) == 2 and min(frozen) > 10_000      # each worker, once it is up
    # Each worker issued its own serving certificate; new connections reach both.
    serials = {_serving_serial(port, server.root_pem) for _ in range(40)}
    assert len(serials) == 2
    client = AgentClient(f"localhost:{port}", server.root_pem, token=service_account_token("w", "a"))
    for csr in agent_csrs()[:6]:
        assert len(client.create_certificate(csr.pem)) == 2

    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not any(e.get("event") == "worker restarted" for e in server.log_events()):
        assert time.monotonic() < deadline, server.log_file.read_text()
        time.sleep(0.1)
    restarted = [e for e in server.log_events() if e.get("event") == "worker restarted"][0]["pid"]
    assert restarted not in pids and _alive(restarted)
    assert len(client.create_certificate(agent_csrs()[7].pem)) == 2

    assert server.stop() == 0
    assert not _alive(restarted) and not _alive(pids[1])


def _supervisor_serving(server) -> dict:
    deadline = time.monotonic() + 60
    while True:
        found = [e for e in server.log_events() if e.get("event") == "serving" and "workers" in e]
        if found:
            return found[0]
        assert time.monotonic() < deadline, server.log_file.read_text()
        time.sleep(0.1)


def test_default_is_one_worker_per_cpu(tmp_path, apiserver):
    state = init_state(tmp_path / "state")
    write_config(state, {"authn": {"tokenreview": [tokenreview_config(apiserver, tmp_path / "api-token")]}})
    server = start_server(state, workers=None)
    try:
        serving = _supervisor_serving(server)
        cpus = len(os.sched_getaffinity(0))
        assert serving["workers"] == cpus and len(set(serving["pids"])) == cpus
        client = AgentClient(f"localhost:{serving['ports']['grpc']}", server.root_pem,
                             token=service_account_token("w", "a"))
        assert len(client.create_certificate(agent_csrs()[1].pem)) == 2
    finally:
        assert server.stop() == 0


def test_workers_share_a_port_chosen_for_them(tmp_path, apiserver):
    """--listen HOST:0 with several workers: the supervisor picks the port once."""
    state = init_state(tmp_path / "state")
    write_config(state, {"authn": {"tokenreview": [tokenreview_config(apiserver, tmp_path / "api-token")]}})
    server = start_server(state, "--workers", "2")
    try:
        serving = _supervisor_serving(server)
        port = serving["ports"]["grpc"]
        assert port > 0 and len(set(serving["pids"])) == 2
        assert {w["grpc"] for w in serving["worker_ports"].values()} == {port}
        assert len({_serving_serial(port, server.root_pem) for _ in range(40)}) == 2
    finally:
        assert server.stop() == 0

"""Stopping the server: SIGKILL loses no audit record of a certificate that
was returned; SIGTERM finishes in-flight calls and exits cleanly
(docs/reliability.md, cases 27–28)."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from cryptography import x509

from fastca.audit.sqlite_log import AuditReader
from tests.conftest import agent_csrs
from tests.frontend.agent_client import AgentClient
from tests.frontend.conftest import init_state, service_account_token, start_server, tokenreview_config, write_config


def _server(tmp_path, apiserver):
    state = init_state(tmp_path / "state")
    write_config(state, {"authn": {"tokenreview": [tokenreview_config(apiserver, tmp_path / "api-token")]}})
    return start_server(state)


def _load(server, stop: threading.Event, results: list, workers: int = 12) -> list[threading.Thread]:
    """Agents in a loop, each with its own identity; bounded by `stop` and a deadline."""
    csrs = [c.pem for c in agent_csrs()]
    deadline = time.monotonic() + 30

    def agent(n: int) -> None:
        client = AgentClient(server.address, server.root_pem, token=service_account_token("load", f"a{n}"))
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                chain = client.create_certificate(csrs[(n + i) % len(csrs)], timeout=10)
                results.append(("OK", x509.load_pem_x509_certificate(chain[0].encode()).serial_number))
            except grpc.RpcError as error:
                results.append((error.code().name, None))
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    return
            i += 1

    threads = [threading.Thread(target=agent, args=(n,), daemon=True) for n in range(workers)]
    for thread in threads:
        thread.start()
    return threads


def _wait_for(results: list, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for code, _ in results if code == "OK") < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigkill_mid_load_loses_no_returned_certificate(tmp_path, apiserver):
    server = _server(tmp_path, apiserver)
    stop, results = threading.Event(), []
    threads = _load(server, stop, results)
    _wait_for(results, 200)
    server.process.kill()
    server.process.wait(timeout=10)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    returned = {f"{serial:x}" for code, serial in results if code == "OK"}
    assert len(returned) >= 200
    reader = AuditReader(server.state / "audit.db")
    try:
        missing = [serial for serial in returned if reader.get(serial) is None]
    finally:
        reader.close()
    assert missing == []


def test_sigterm_finishes_in_flight_calls_and_exits_cleanly(tmp_path, apiserver):
    server = _server(tmp_path, apiserver)
    stop, results = threading.Event(), []
    threads = _load(server, stop, results)
    _wait_for(results, 100)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    codes = {code for code, _ in results}
    assert codes <= {"OK", "UNAVAILABLE", "CANCELLED"}, codes
    events = [e.get("event") for e in server.log_events()]
    assert events.index("shutting down") < events.index("stopped")
    # Once up, the process took its startup objects out of the cyclic collector's walks.
    frozen = [e for e in server.log_events() if e.get("event") == "startup heap frozen"]
    assert len(frozen) == 1 and frozen[0]["objects"] > 10_000
    reader = AuditReader(server.state / "audit.db")
    try:
        assert all(reader.get(f"{serial:x}") is not None for code, serial in results if code == "OK")
    finally:
        reader.close()


@pytest.mark.parametrize("flag", ["--plaintext"])
def test_unusable_listen_address_is_a_clear_error(tmp_path, flag):
    import subprocess
    import sys

    state = init_state(tmp_path / "state")
    proc = subprocess.run([sys.executable, "-m", "fastca", "serve", "--state", str(state), flag,
                           "--listen", "203.0.113.1:1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot listen on 203.0.113.1:1" in proc.stderr

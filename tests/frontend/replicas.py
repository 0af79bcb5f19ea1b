"""Replicas of `fastca serve` on one port (SO_REUSEPORT) and one state
directory, their CA key reached through one network HSM: `p11-kit server`
exporting the state's SoftHSM token, each replica loading p11-kit-client.so."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.agent.conftest import free_port
from tests.frontend.conftest import ServerProcess, start_server
from tests.frontend.test_hsm_recovery import P11KIT_CLIENT, P11KitServer, _set_module


@dataclass
class Replicas:
    servers: list[ServerProcess]
    address: str                 # localhost:<the shared port>
    env: dict[str, str]          # what a command line needs to reach the same HSM
    hsm: P11KitServer


@contextmanager
def replicas_on_a_network_hsm(state: Path, count: int = 2) -> Iterator[Replicas]:
    """Started replicas; on the way out the ones still running are stopped
    (each must exit 0) and the HSM server is killed."""
    hsm = P11KitServer(state)
    hsm.start()
    _set_module(state, P11KIT_CLIENT)
    env = {"P11_KIT_SERVER_ADDRESS": f"unix:path={hsm.socket}"}
    port = free_port()
    servers: list[ServerProcess] = []
    try:
        servers = [start_server(state, "--listen", f"127.0.0.1:{port}", env=env) for _ in range(count)]
        assert {s.ports["grpc"] for s in servers} == {port}
        yield Replicas(servers, f"localhost:{port}", env, hsm)
    finally:
        codes = [server.stop() for server in servers if server.process.poll() is None]
        if hsm.process is not None and hsm.process.poll() is None:
            hsm.kill()
        assert all(code == 0 for code in codes), codes

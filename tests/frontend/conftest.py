"""Real `fastca serve` processes for end-to-end tests, beside a fake
Kubernetes API server (HTTPS, real TokenReview JSON)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.authn._https import FakeHttpsServer, Request, Response
from tests.conftest import run_fastca

TRUST_DOMAIN = "cluster.local"
NODE = "node-a"
OTHER_NODE = "node-b"         # where the fake API server puts pods named "elsewhere-..."


def service_account_token(namespace: str, account: str, pod: str | None = None) -> str:
    """Opaque test tokens the fake API server recognises."""
    return f"sa.{namespace}.{account}.{pod or 'nopod'}"


def _token_review(request: Request) -> Response:
    review = request.json()
    token = review["spec"]["token"]
    audiences = review["spec"].get("audiences", [])
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != "sa":
        return Response(body={**review, "status": {"authenticated": False, "error": "invalid token"}})
    _, namespace, account, pod = parts
    user: dict[str, Any] = {"username": f"system:serviceaccount:{namespace}:{account}", "uid": "u-1",
                            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                       "system:authenticated"]}
    if pod != "nopod":
        user["extra"] = {"authentication.kubernetes.io/pod-name": [pod],
                         "authentication.kubernetes.io/pod-uid": [f"uid-{pod}"],
                         "authentication.kubernetes.io/node-name": [OTHER_NODE if pod.startswith("elsewhere-")
                                                                    else NODE]}
    return Response(body={**review, "status": {"authenticated": True, "user": user, "audiences": audiences}})


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory: pytest.TempPathFactory):
    def handle(request: Request) -> Response:
        if request.path.startswith("/apis/authentication.k8s.io/v1/tokenreviews"):
            return _token_review(request)
        return Response(status=404, body={"kind": "Status", "code": 404})

    with FakeHttpsServer(tmp_path_factory.mktemp("apiserver"), handle) as server:
        yield server


@dataclass
class ServerProcess:
    state: Path
    process: subprocess.Popen[bytes]
    log_file: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"localhost:{self.ports['grpc']}"

    @property
    def root_pem(self) -> bytes:
        return (self.state / "root-cert.pem").read_bytes()

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_file.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def start_server(state: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 60.0,
                 workers: int | None = 1, until: str = "serving") -> ServerProcess:
    """``workers``: passed as --workers unless ``extra`` names it (one process
    keeps the suite fast); None leaves the default (one per CPU). Returns
    once the log has an ``until`` event (its ports, or its metrics port)."""
    if workers is not None and "--workers" not in extra:
        extra = ("--workers", str(workers), *extra)
    log_file = state / f"server-{time.monotonic_ns()}.log"
    full_env = dict(os.environ)
    full_env.pop("SOFTHSM2_CONF", None)
    full_env.update(env or {})
    with log_file.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "fastca", "serve", "--state", str(state),
                                    "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", *extra],
                                   stdout=sink, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(state, process, log_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in server.log_events():
            if event.get("event") == until:
                server.ports = event.get("ports") or {"metrics": event["metrics_port"]}
                return server
        if process.poll() is not None:
            raise AssertionError(f"fastca serve exited {process.returncode}:\n{log_file.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no {until!r} from fastca serve:\n{log_file.read_text()}")


def write_config(state: Path, extra: dict[str, Any]) -> None:
    """Add tables to the state's fastca.toml, as an operator would."""
    import tomllib

    path = state / "fastca.toml"
    body = tomllib.loads(path.read_text())
    body.update(extra)
    path.write_text(tomli_w.dumps(body))


def tokenreview_config(apiserver: FakeHttpsServer, token_file: Path) -> dict[str, Any]:
    token_file.write_text("api-server-credential\n")
    return {"cluster_id": "Kubernetes", "api_server": apiserver.url, "ca_file": str(apiserver.ca_file),
            "token_file": str(token_file)}


def init_state(directory: Path, *args: str) -> Path:
    run_fastca("init", "--state", str(directory), *args)
    return directory

"""A real ``fastca serve`` for the benchmark: a fresh state directory (the
embedded SoftHSM token holds the CA key), TokenReview against the bench's
fake API server, TLS on 127.0.0.1. Everything else is the default
configuration: batching, the SQLite audit log and the per-issuance log line
are all on, as in production."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Self

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from bench.ports import free_loopback_port

__all__ = ["CLUSTER_ID", "FastcaServer", "serve_supports_workers"]

CLUSTER_ID = "Kubernetes"
_START_TIMEOUT_S = 60.0


def _fastca(*args: str, timeout_s: float = 120.0) -> None:
    subprocess.run([sys.executable, "-m", "fastca", *args], check=True, capture_output=True, timeout=timeout_s,
                   env=_server_env())


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SOFTHSM2_CONF", None)      # the state directory names its own token configuration
    return env


def serve_supports_workers() -> bool:
    """Whether this fastca's ``serve`` takes ``--workers`` (several server processes)."""
    result = subprocess.run([sys.executable, "-m", "fastca", "serve", "--help"], capture_output=True, text=True,
                            timeout=60, env=_server_env(), check=False)
    return "--workers" in result.stdout


class FastcaServer:
    """``with FastcaServer(dir, api_url, api_ca_file, key_type="ec-p256") as server:``
    then ``server.pid`` (with ``workers``, the supervisor: its process tree is
    the server), ``server.address`` (127.0.0.1:PORT), ``server.root_pem``."""

    def __init__(self, directory: Path, api_url: str, api_ca_file: Path, *, key_type: str = "ec-p256",
                 workers: int | None = None, server_settings: dict[str, Any] | None = None) -> None:
        self.state = directory / "state"
        self._log = directory / "server.log"
        if workers is None:
            # serve's own default (one process per CPU), given explicitly so
            # that the supervisor and its workers are measured as the server.
            workers = len(os.sched_getaffinity(0))
        # Workers share one port, so it must be chosen here; one process takes any.
        self._listen = f"127.0.0.1:{free_loopback_port() if workers else 0}"
        self._supervised = workers is not None and workers > 1     # `serve` supervises only then
        self._extra_args = ("--workers", str(workers)) if workers else ()
        _fastca("init", "--state", str(self.state), "--key-type", key_type)
        token_file = directory / "apiserver-token"
        token_file.write_text("bench-apiserver-credential\n")
        config_path = self.state / "fastca.toml"
        body = tomllib.loads(config_path.read_text())
        body["authn"] = {"tokenreview": [{"cluster_id": CLUSTER_ID, "api_server": api_url,
                                          "ca_file": str(api_ca_file), "token_file": str(token_file)}],
                        # Every generator connection comes from 127.0.0.1: the per-address cap
                        # on calls awaiting a TokenReview (64) would refuse a cold start's burst.
                        "max_pending_per_peer": 100_000}
        # The load generators issue thousands of certificates a second per
        # connection's identity; the per-identity rate limit (on by default,
        # 1/s, burst 20) is off here so results stay comparable with istiod,
        # which has none; bulk runs may send more than the default 100 per call.
        body.setdefault("policy", {})["rate_limit"] = {"per_identity_per_second": 0}
        body.setdefault("server", {})["max_bulk_requests"] = 10_000
        if server_settings:
            body["server"].update(server_settings)
        config_path.write_text(tomli_w.dumps(body))
        self._process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def root_pem(self) -> bytes:
        return (self.state / "root-cert.pem").read_bytes()

    def issued_count(self) -> int:
        """Certificates in the audit log, the server's own serving certificates excepted."""
        import sqlite3

        with sqlite3.connect(f"file:{self.state / 'audit.db'}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM issuance WHERE credential_type != 'self'").fetchone()[0]

    def client_identity(self, spiffe_id: str) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) of a client certificate this CA issued
        (``fastca issue``, so it is audited), as a VM agent holds one."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
        csr_file = self.state.parent / "client.csr"
        csr_file.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
        issued = subprocess.run([sys.executable, "-m", "fastca", "issue", "--state", str(self.state), "--csr",
                                 str(csr_file), "--identity", spiffe_id, "--json"], check=True, capture_output=True,
                                text=True, timeout=120, env=_server_env())
        chain = json.loads(issued.stdout)["cert_chain"]
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return "".join(chain[:-1]).encode(), key_pem

    def __enter__(self) -> Self:
        with self._log.open("wb") as sink:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "fastca", "serve", "--state", str(self.state), "--listen", self._listen,
                 "--metrics", "127.0.0.1:0", *self._extra_args],
                stdout=sink, stderr=subprocess.STDOUT, env=_server_env())
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            serving = self._serving_event()
            if serving is not None:
                self.ports = serving["ports"]
                return self
            if self._process.poll() is not None:
                raise RuntimeError(f"fastca serve exited {self._process.returncode}:\n{self.log_tail()}")
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"fastca serve did not start in {_START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)

    def _serving_event(self) -> dict[str, Any] | None:
        with self._log.open("rb") as handle:
            for line in handle:
                if b'"serving"' not in line:
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                # With workers, each worker says "serving" too; the supervisor's
                # line (with the worker count) comes once all of them do.
                if event.get("event") == "serving" and ("workers" in event) == self._supervised:
                    return event
        return None

    def rss_bytes(self) -> dict[int, int]:
        """Resident memory of each server process (the supervisor's workers,
        or the one process), by pid, from /proc."""
        assert self._process is not None
        pids = _children(self._process.pid) if self._supervised else [self._process.pid]
        out = {}
        for pid in pids:
            try:
                with open(f"/proc/{pid}/status") as status:
                    for line in status:
                        if line.startswith("VmRSS:"):
                            out[pid] = int(line.split()[1]) * 1024
            except OSError:
                continue       # a worker that just exited (the supervisor restarts it)
        return out

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])


def _children(pid: int) -> list[int]:
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children.extend(int(child) for child in handle.read().split())
    except OSError:
        pass
    return children

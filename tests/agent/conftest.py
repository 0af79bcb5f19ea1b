"""Fixtures for the node agent: real `fastca serve` processes (TLS,
TokenReview against the fake API server) on ports that survive a restart, and
an in-process CA (pyca) for the cases a real CA cannot be made to produce."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fastca.agent.caclient import CARequestFailed
from tests.frontend.conftest import apiserver  # noqa: F401  (re-exported fixture)
from tests.frontend.conftest import (ServerProcess, init_state, service_account_token, start_server,
                                     tokenreview_config, write_config)

WORKLOAD_NS, WORKLOAD_SA = "payments", "api"
WORKLOAD_ID = f"spiffe://cluster.local/ns/{WORKLOAD_NS}/sa/{WORKLOAD_SA}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(coro, timeout: float = 60.0):
    """Run one test coroutine with a hard bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@dataclass
class RealCA:
    """One CA state directory served on a fixed port (restartable)."""
    state: Path
    port: int
    token_file: Path                       # the workload's projected token
    server: ServerProcess | None = None

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    @property
    def root_pem(self) -> bytes:
        return (self.state / "root-cert.pem").read_bytes()

    def start(self) -> ServerProcess:
        assert self.server is None or self.server.process.poll() is not None
        self.server = start_server(self.state, "--listen", f"127.0.0.1:{self.port}", "--mtls-listen", "127.0.0.1:0")
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def metric(self, name: str) -> float:
        import urllib.request

        assert self.server is not None
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.server.ports['metrics']}/metrics",
                                      timeout=10).read().decode()
        total = 0.0
        for line in body.splitlines():
            if line.startswith((name + " ", name + "{")):
                total += float(line.rsplit(" ", 1)[1])
        return total


def make_real_ca(base: Path, apiserver) -> RealCA:  # noqa: F811
    state = init_state(base / "state")
    write_config(state, {"authn": {"tokenreview": [tokenreview_config(apiserver, base / "apiserver-token")]}})
    token_file = base / "istio-token"
    token_file.write_text(service_account_token(WORKLOAD_NS, WORKLOAD_SA, "api-1"))
    return RealCA(state, free_port(), token_file)


@pytest.fixture(scope="module")
def shared_ca(tmp_path_factory, apiserver):  # noqa: F811
    """A running CA shared by a module's tests (never stopped by them)."""
    ca = make_real_ca(tmp_path_factory.mktemp("shared-ca"), apiserver)
    ca.start()
    yield ca
    ca.stop()


@pytest.fixture
def own_ca(tmp_path, apiserver):  # noqa: F811
    """A CA a test may stop and restart (same state, same port)."""
    ca = make_real_ca(tmp_path, apiserver)
    ca.start()
    yield ca
    ca.stop()


# -- an in-process CA -------------------------------------------------------------------------------------------
def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, text)])


@dataclass
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()


def make_authority(org: str, issuer: Authority | None = None) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    signer_key = issuer.key if issuer else key
    cert = (x509.CertificateBuilder().subject_name(_name(org))
            .issuer_name(issuer.cert.subject if issuer else _name(org)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(signer_key, hashes.SHA256()))
    return Authority(cert, key)


def issue_leaf(issuer: Authority, public_key, spiffe_id: str, ttl: float) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer.cert.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=2)).not_valid_after(now + dt.timedelta(seconds=ttl))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .sign(issuer.key, hashes.SHA256()))


@dataclass
class LocalCA:
    """Implements ``sign`` like CAClient, backed by pyca. ``identity`` is what
    it puts in the leaf (like a CA using the authenticated caller);
    ``fail`` makes calls raise; ``tamper`` rewrites the chain."""
    root: Authority = field(default_factory=lambda: make_authority("root-1"))
    intermediate: Authority | None = None
    identity: str = "spiffe://cluster.local/ns/payments/sa/api"
    fail: grpc.StatusCode | None = None
    delay: float = 0.0
    tamper: Callable[[list[str]], list[str]] | None = None
    leaf_ttl: float | None = None          # overrides the requested TTL
    calls: int = 0
    ttls: list[int] = field(default_factory=list)

    async def sign(self, csr_pem, ttl_seconds, *, impersonate=None) -> list[str]:
        self.calls += 1
        self.ttls.append(ttl_seconds)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise CARequestFailed(f"CreateCertificate failed: {self.fail.name}", code=self.fail, attempts=5)
        csr = x509.load_pem_x509_csr(csr_pem if isinstance(csr_pem, bytes) else csr_pem.encode())
        assert csr.is_signature_valid
        signer = self.intermediate or self.root
        leaf = issue_leaf(signer, csr.public_key(), self.identity, self.leaf_ttl or ttl_seconds)
        chain = [leaf.public_bytes(serialization.Encoding.PEM).decode()]
        if self.intermediate:
            chain.append(self.intermediate.pem)
        chain.append(self.root.pem)
        return self.tamper(chain) if self.tamper else chain

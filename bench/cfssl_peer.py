"""The peer: cfssl (Go; Debian ``golang-cfssl``) as ``cfssl serve`` on
127.0.0.1 with its CA key in memory, driven over plain HTTP/1.1 keep-alive
by the same load generator (same processes, connections, CSRs, window).

Optional: without ``cfssl`` on PATH, ``CfsslPeer.available()`` is False and
the caller reports "cfssl not installed".
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from bench.loadgen import CallFailed, Connection
from bench.ports import free_loopback_port

__all__ = ["CfsslPeer", "CfsslTarget"]

SIGN_PATH = "/api/v1/cfssl/sign"
_START_TIMEOUT_S = 30.0
# What istiod's workload certificates allow, and a 24 h life like fastca's default.
_SIGNING_CONFIG = {"signing": {"default": {
    "expiry": "24h", "usages": ["digital signature", "key encipherment", "server auth", "client auth"]}}}


@dataclass(frozen=True)
class CfsslTarget:
    """HTTP/1.1 keep-alive, one connection per driver, spoken directly on
    asyncio streams. httpx was tried first: it spent ~0.9 ms of client CPU per
    request, 2.5x what cfssl spends signing, so on 2 cores it measured the
    client; this client costs a small fraction of that."""

    address: str                   # 127.0.0.1:PORT

    @staticmethod
    def body(csr_pem: bytes) -> bytes:
        return json.dumps({"certificate_request": csr_pem.decode()}).encode()

    def prepare(self, csr_pem: bytes) -> bytes:
        body = self.body(csr_pem)
        return (f"POST {SIGN_PATH} HTTP/1.1\r\nHost: {self.address}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def connect(self, process_index: int, connection_index: int, call_timeout_s: float) -> Connection:
        host, _, port = self.address.rpartition(":")
        connection = _CfsslConnection(host, int(port), call_timeout_s)
        await connection.open()
        return connection


class _CfsslConnection:
    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self._host, self._port = host, port
        self._timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.wait_for(asyncio.open_connection(self._host, self._port),
                                                            timeout=30)

    async def call(self, prepared: bytes) -> None:
        if self._writer is None:
            await self.open()       # the last call broke the stream: a new connection, as a client would
        assert self._reader is not None and self._writer is not None
        try:
            async with asyncio.timeout(self._timeout_s):
                self._writer.write(prepared)
                head = await self._reader.readuntil(b"\r\n\r\n")
                body = await self._read_body(head.lower())
        except BaseException:
            await self.close()      # a half-read response leaves the stream unusable
            raise
        status = head[9:12].decode(errors="replace")
        if status != "200":
            raise CallFailed(f"HTTP_{status}")
        if b'"success":true' not in body:
            raise CallFailed("CFSSL_ERROR")

    async def _read_body(self, head: bytes) -> bytes:
        assert self._reader is not None
        marker = b"\r\ncontent-length:"
        if marker in head:
            start = head.index(marker) + len(marker)
            return await self._reader.readexactly(int(head[start:head.index(b"\r\n", start)]))
        if b"\r\ntransfer-encoding: chunked" not in head:
            raise CallFailed("HTTP_UNFRAMED_RESPONSE")
        chunks = []
        while True:                    # bounded by the call's timeout
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await self._reader.readexactly(size + 2)
            if size == 0:
                return b"".join(chunks)
            chunks.append(chunk[:-2])

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._reader = self._writer = None


def _write_ca(directory: Path, key_type: str) -> tuple[Path, Path]:
    now = dt.datetime.now(dt.UTC)
    key: Any = (ec.generate_private_key(ec.SECP256R1()) if key_type == "ec-p256"
                else rsa.generate_private_key(65537, 2048))
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    ca_file, key_file = directory / "ca.pem", directory / "ca-key.pem"
    ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # SEC1 / PKCS#1: what cfssl 1.2's key parser reads for sure.
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return ca_file, key_file


class CfsslPeer:
    """``with CfsslPeer(dir, "ec-p256", probe_csr) as peer:`` then ``peer.pid``,
    ``peer.target``."""

    def __init__(self, directory: Path, key_type: str, probe_csr: bytes) -> None:
        self._directory = directory
        self._key_type = key_type
        self._probe_csr = probe_csr
        self._process: subprocess.Popen[bytes] | None = None
        self.target: CfsslTarget | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("cfssl") is not None

    @staticmethod
    def version() -> str | None:
        if shutil.which("cfssl") is None:
            return None
        output = subprocess.run(["cfssl", "version"], capture_output=True, text=True, timeout=10,
                                check=False).stdout
        return " ".join(line.split(":", 1)[1].strip() for line in output.splitlines() if ":" in line)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> Self:
        self._directory.mkdir(parents=True, exist_ok=True)
        ca_file, key_file = _write_ca(self._directory, self._key_type)
        config_file = self._directory / "signing.json"
        config_file.write_text(json.dumps(_SIGNING_CONFIG))
        port = free_loopback_port()
        with (self._directory / "cfssl.log").open("wb") as sink:
            self._process = subprocess.Popen(
                ["cfssl", "serve", "-address", "127.0.0.1", "-port", str(port), "-ca", str(ca_file),
                 "-ca-key", str(key_file), "-config", str(config_file)],
                stdout=sink, stderr=subprocess.STDOUT)
        self.target = CfsslTarget(f"127.0.0.1:{port}")
        try:
            self._wait_until_signing(port)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_until_signing(self, port: int) -> None:
        import httpx

        body = json.dumps({"certificate_request": self._probe_csr.decode()}).encode()
        deadline = time.monotonic() + _START_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                break
            try:
                response = httpx.post(f"http://127.0.0.1:{port}{SIGN_PATH}", content=body, timeout=5)
                if response.status_code == 200 and response.json().get("success"):
                    return
                last = f"HTTP {response.status_code}: {response.text[:300]}"
            except httpx.TransportError as error:
                last = type(error).__name__
            time.sleep(0.1)
        log = (self._directory / "cfssl.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"cfssl serve did not sign ({last}):\n{log}")

    def __exit__(self, *exc: object) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)

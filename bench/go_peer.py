"""The istiod-shaped peer (bench/goca, Go on Debian's grpc-go): a CA made the
way istiod's is, run on loopback beside fastca in the same benchmark.

``GoPeer`` makes the material it needs (a P-256 CA key in memory and its
self-signed root, a serving certificate for "localhost", a client
certificate for VM-style callers), starts the server with one bearer token
per benchmark connection, and gives the ``IstioTarget`` to drive it, with
token or client-certificate authentication.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench.loadgen import IstioTarget
from bench.native_load import go_binary

__all__ = ["GoPeer", "client_identity"]

_SOURCE = Path(__file__).resolve().parent / "goca"
_TRUST_DOMAIN = "cluster.local"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(ca_cert: x509.Certificate | None, ca_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey,
           *, subject: x509.Name, sans: list[x509.GeneralName], ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(ca_cert.subject if ca_cert is not None else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        builder = (builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    return builder.sign(ca_key, hashes.SHA256())


def client_identity(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                    spiffe_id: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a VM-style client identity under a CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _issue(ca_cert, ca_key, key, subject=x509.Name([]),
                         sans=[x509.UniformResourceIdentifier(spiffe_id)], ca=False)
    return certificate.public_bytes(serialization.Encoding.PEM), _pem_key(key)


class GoPeer:
    """``with GoPeer(workdir, connections=64) as peer: peer.target(...)``."""

    def __init__(self, workdir: Path, *, connections: int) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="goca-", dir=workdir))
        self._connections = connections
        self._process: subprocess.Popen[str] | None = None
        self.address = ""
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, _TRUST_DOMAIN)])
        self.ca_cert = _issue(None, self.ca_key, self.ca_key, subject=name, sans=[], ca=True)
        self.root_pem = self.ca_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def _write(self, name: str, data: bytes) -> str:
        path = self._workdir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)

    def __enter__(self) -> Self:
        serving_key = ec.generate_private_key(ec.SECP256R1())
        serving = _issue(self.ca_cert, self.ca_key, serving_key, subject=x509.Name([]),
                         sans=[x509.DNSName("localhost")], ca=False)
        tokens = {IstioTarget.token(0, i): f"spiffe://{_TRUST_DOMAIN}/ns/bench-0/sa/load-{i}"
                  for i in range(self._connections)}
        config = {"address": "127.0.0.1:0",
                  "serving_cert_file": self._write("serving.pem", serving.public_bytes(serialization.Encoding.PEM)),
                  "serving_key_file": self._write("serving-key.pem", _pem_key(serving_key)),
                  "ca_cert_file": self._write("ca.pem", self.root_pem),
                  "ca_key_file": self._write("ca-key.pem", _pem_key(self.ca_key)),
                  "roots_file": self._write("roots.pem", self.root_pem),
                  "tokens": tokens, "max_ttl_seconds": 90 * 86400}
        config_file = self._write("config.json", json.dumps(config).encode())
        self._process = subprocess.Popen([str(go_binary(_SOURCE, "goca")), config_file], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("ready "):
            self.__exit__()
            raise RuntimeError(f"goca did not start: {self._process.stderr.read()[-2000:]}")
        self.address = f"127.0.0.1:{int(line.split()[1])}"
        return self

    def target(self, *, client_certificate: bool = False) -> IstioTarget:
        """What to drive: token authentication, or a client certificate (and no token)."""
        target = IstioTarget(self.address, self.root_pem)
        if client_certificate:
            cert, key = client_identity(self.ca_cert, self.ca_key, f"spiffe://{_TRUST_DOMAIN}/ns/vm/sa/bench")
            target = replace(target, client_cert_pem=cert, client_key_pem=key, use_tokens=False)
        return target

    def __exit__(self, *exc: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)

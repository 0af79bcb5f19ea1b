"""Traffic for the monitoring tests through a real server: agent-made CSRs
(a fresh key each, or a given one), what came back, the server's alert
counters, and a relay that makes a client appear on another network."""

from __future__ import annotations

import re
import socket
import threading
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fastca.monitoring import SIGNALS
from tests.frontend.conftest import service_account_token

TD = "spiffe://cluster.local"


def spiffe(name: str) -> str:
    return f"{TD}/ns/shop/sa/{name}"


def token(name: str, pod: str | None = None) -> str:
    return service_account_token("shop", name, pod or f"{name}-pod")


def csr_for(identity: str, key: ec.EllipticCurvePrivateKey | None = None) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM), key


def leaf(chain: list[str]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain[0].encode())


def lifetime(chain: list[str]) -> float:
    certificate = leaf(chain)
    return (certificate.not_valid_after_utc - certificate.not_valid_before_utc).total_seconds()


def issuer_key(chain: list[str]) -> bytes:
    """Which CA signed it (both signers' CAs have the same subject name)."""
    return leaf(chain).extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier


def serial_of(chain: list[str]) -> str:
    return f"{leaf(chain).serial_number:x}"


class Relay:
    """A TCP relay whose connections to the server leave from another
    loopback address: the server sees the client on another network."""

    def __init__(self, target_port: int, source: str) -> None:
        self._target = ("127.0.0.1", target_port)
        self._source = source
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target, source_address=(self._source, 0))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def alert_counts(port: int) -> dict[str, float]:
    """fastca_monitoring_alerts_total by signal, from one process's metrics port."""
    counts = dict.fromkeys(SIGNALS, 0.0)
    for match in re.finditer(r'^fastca_monitoring_alerts_total\{signal="(\w+)"\} (\S+)$', metrics_text(port), re.M):
        counts[match.group(1)] = float(match.group(2))
    return counts


def gauge(port: int, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", metrics_text(port), re.M)
    assert match, name
    return float(match.group(1))

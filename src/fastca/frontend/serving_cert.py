"""The TLS certificate the server presents: issued by its own Authority to
the server principal (recorded like every certificate), for the configured
DNS names and the IP addresses it listens on, renewed at half its life
without a restart (grpcio asks for a fresh configuration on each handshake)."""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fastca.authority import SERVER_PRINCIPAL, Authority, IssuedCertificate
from fastca.clock import Clock

__all__ = ["ServingCertificate"]


@dataclass(frozen=True)
class _Pair:
    key_pem: bytes
    chain_pem: bytes
    issued: IssuedCertificate


class ServingCertificate:
    def __init__(self, authority: Authority, *, trust_domain: str, dns_names: list[str], ttl_seconds: int,
                 ip_addresses: list[str] = (), client_roots_pem: bytes | None = None) -> None:
        self._authority = authority
        self._clock: Clock = authority.clock
        self._issued_count = 0
        self._identity = f"spiffe://{trust_domain}/ns/istio-system/sa/fastca"
        self._dns_names = tuple(dns_names)
        self._ip_addresses = tuple(ipaddress.ip_address(address).packed for address in ip_addresses)
        self._ttl = ttl_seconds
        self._client_roots = client_roots_pem
        self._lock = threading.Lock()
        self._pair = self._issue()
        self._fresh: dict[str, bool] = {}

    def _issue(self) -> _Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
        self._issued_count += 1
        issued = self._authority.issue_local(
            SERVER_PRINCIPAL, identity=self._identity, csr=csr.public_bytes(serialization.Encoding.DER),
            ttl_seconds=self._ttl, request_id=f"serving-certificate-{self._issued_count}",
            dns_names=self._dns_names, ip_addresses=self._ip_addresses)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        # Leaf and intermediates; the root stays with the clients.
        chain_pem = "".join(issued.chain[:-1]).encode()
        return _Pair(key_pem, chain_pem, issued)

    @property
    def certificate(self) -> IssuedCertificate:
        return self._pair.issued

    def renew_if_due(self, now: float | None = None) -> bool:
        """Re-issue once half the lifetime has passed; True when renewed."""
        now = self._clock.now() if now is None else now
        pair = self._pair
        start, end = pair.issued.not_before.timestamp(), pair.issued.not_after.timestamp()
        if now < start + (end - start) / 2:
            return False
        new_pair = self._issue()
        with self._lock:
            self._pair = new_pair
            self._fresh = {name: True for name in self._fresh}
        return True

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self._pair.key_pem, self._pair.chain_pem)],
                                                         root_certificates=self._client_roots)

    def credentials(self, *, require_client_certificate: bool, name: str) -> grpc.ServerCredentials:
        """Credentials for one listener; each listener picks up renewals itself."""
        with self._lock:
            self._fresh[name] = False

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            with self._lock:
                if not self._fresh.get(name):
                    return None
                self._fresh[name] = False
            return self._configuration()

        return grpc.dynamic_ssl_server_credentials(self._configuration(), fetch,
                                                   require_client_authentication=require_client_certificate)

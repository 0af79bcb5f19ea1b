"""The TLS certificate the server presents: issued by its own Authority to
the server principal (recorded like every certificate), for the configured
DNS names and the IP addresses it listens on, renewed at half its life
without a restart: the new pair goes into every listener's TLS context,
and handshakes from then on use it."""

from __future__ import annotations

import ipaddress
import ssl
import threading
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fastca.authority import SERVER_PRINCIPAL, Authority, IssuedCertificate
from fastca.clock import Clock
from fastca.frontend.native import load_serving

__all__ = ["ServingCertificate"]


@dataclass(frozen=True)
class _Pair:
    key_pem: bytes = field(repr=False)           # the serving key: never in a repr or a log
    chain_pem: bytes = b""
    issued: IssuedCertificate | None = None


class ServingCertificate:
    def __init__(self, authority: Authority, *, trust_domain: str, dns_names: list[str], ttl_seconds: int,
                 ip_addresses: list[str] = ()) -> None:
        self._authority = authority
        self._clock: Clock = authority.clock
        self._issued_count = 0
        self._identity = f"spiffe://{trust_domain}/ns/istio-system/sa/fastca"
        self._dns_names = tuple(dns_names)
        self._ip_addresses = tuple(ipaddress.ip_address(address).packed for address in ip_addresses)
        self._ttl = ttl_seconds
        self._lock = threading.Lock()
        self._contexts: list[ssl.SSLContext] = []
        self._pair = self._issue()

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
        assert self._pair.issued is not None
        return self._pair.issued

    def serve_on(self, context: ssl.SSLContext) -> ssl.SSLContext:
        """Load the current pair into ``context`` and keep it current."""
        with self._lock:
            load_serving([context], self._pair.chain_pem, self._pair.key_pem)
            self._contexts.append(context)
        return context

    def renew_if_due(self, now: float | None = None) -> bool:
        """Re-issue once half the lifetime has passed; True when renewed."""
        now = self._clock.now() if now is None else now
        issued = self.certificate
        start, end = issued.not_before.timestamp(), issued.not_after.timestamp()
        if now < start + (end - start) / 2:
            return False
        self.renew()
        return True

    def renew(self) -> None:
        """Re-issue now (after a CA rotation switched the signing key)."""
        new_pair = self._issue()
        with self._lock:
            load_serving(self._contexts, new_pair.chain_pem, new_pair.key_pem)
            self._pair = new_pair

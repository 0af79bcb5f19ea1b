"""Client-certificate authentication (istiod's first authenticator).

The TLS layer has already verified the peer's chain; the chain is verified
again here against the roots fastca was configured with, because it costs
tens of microseconds and a TLS layer configured with the wrong trust store
must not turn into a CA that signs for anyone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from fastca.authn.caller import Caller, RequestInfo
from fastca.errors import AuthenticationFailed

__all__ = ["MtlsAuthenticator", "certificate_identities"]

RootsSource = Sequence[x509.Certificate] | Callable[[], Sequence[x509.Certificate]]
_CACHE_KEY = "mtls"


def certificate_identities(certificate: x509.Certificate) -> list[str]:
    """The SAN values of a certificate as text (URI, DNS, IP), in SAN order."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for name in san:
        if isinstance(name, (x509.UniformResourceIdentifier, x509.DNSName)):
            out.append(name.value)
        elif isinstance(name, x509.IPAddress) and isinstance(name.value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            out.append(str(name.value))
    return out


class MtlsAuthenticator:
    """Identities are the leaf's SAN values. Rejected: no URI SAN, more than
    one URI SAN, a CA certificate as leaf, a chain to no configured root.
    A certificate caller has no Kubernetes facts, so it cannot impersonate."""

    name = "mtls"

    def __init__(self, roots: RootsSource, intermediates: RootsSource = ()) -> None:
        # A callable lets the server hand over the current roots after a
        # rotation without rebuilding the chain.
        self._roots = roots
        # grpcio hands over only the peer's leaf, so the CA's own chain
        # (signing certificate and intermediates) completes the path.
        self._intermediates = intermediates
        self._store_for: tuple[x509.Certificate, ...] | None = None
        self._store: Store | None = None

    def _current_store(self) -> Store:
        roots = tuple(self._roots() if callable(self._roots) else self._roots)
        if not roots:
            raise AuthenticationFailed("no trusted roots configured")
        if roots != self._store_for:
            self._store, self._store_for = Store(list(roots)), roots
        assert self._store is not None
        return self._store

    async def authenticate(self, request: RequestInfo) -> Caller | None:
        return self.authenticate_now(request)

    def authenticate_now(self, request: RequestInfo) -> Caller | None:
        """The leaf's verdict, worked out once per connection: the connection
        presented its certificate at the handshake, and every call on it
        carries the same one (the per-call path does no X.509 work)."""
        if not request.peer_certificates:
            return None
        cache = request.connection_cache
        if cache is not None:
            known = cache.get(_CACHE_KEY)
            if known is not None and known[0] == request.peer_certificates:
                if isinstance(known[1], AuthenticationFailed):
                    raise known[1]
                return known[1]
        try:
            verdict: Caller | AuthenticationFailed = self._judge(request.peer_certificates)
        except AuthenticationFailed as error:
            verdict = error
        if cache is not None:
            cache[_CACHE_KEY] = (request.peer_certificates, verdict)
        if isinstance(verdict, AuthenticationFailed):
            raise verdict
        return verdict

    def _judge(self, certificates: tuple[bytes, ...]) -> Caller:
        try:
            chain = [x509.load_der_x509_certificate(der) for der in certificates]
        except ValueError as exc:
            raise AuthenticationFailed(f"peer certificate does not parse: {exc}") from None
        leaf = chain[0]

        try:
            constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is not None and constraints.ca:
            raise AuthenticationFailed("peer certificate is a CA certificate")

        identities = certificate_identities(leaf)
        try:
            uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if not uris:
            raise AuthenticationFailed("peer certificate has no URI SAN")
        if len(uris) > 1:
            raise AuthenticationFailed(f"peer certificate has {len(uris)} URI SANs, expected one")

        # CA certificates must meet the Web PKI profile (basicConstraints,
        # keyUsage keyCertSign...). The leaf's extensions are checked above in
        # the terms Istio cares about; the Web PKI's leaf rules (mandatory AKI,
        # EKU) would refuse certificates istiod accepts.
        verifier = (PolicyBuilder().store(self._current_store())
                    .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                        ee_policy=ExtensionPolicy.permit_all())
                    .build_client_verifier())
        try:
            intermediates = self._intermediates() if callable(self._intermediates) else self._intermediates
            verifier.verify(leaf, chain[1:] + list(intermediates))
        except VerificationError as exc:
            raise AuthenticationFailed(f"peer certificate chain does not verify against the roots: {exc}") from None
        return Caller(identities=tuple(identities), credential_type="mtls")

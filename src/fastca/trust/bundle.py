"""The live trust bundle: the CA's own roots plus the roots of its peers.

``TrustBundle`` is what everything that hands roots out reads: the
Authority's response tail (the last element of every CreateCertificate
chain, so agents' ``ROOTCA``), the Kubernetes publisher's
``istio-ca-root-cert`` and the server's ``TrustBundleService``. It merges
the own roots (first, in their order) with each peer's (peers by name, each
in its order), drops a certificate already present (by DER), and gives the
result a ``version`` (a digest of the PEM). A subscriber is called with the
new PEM when, and only when, the merged bundle changes; nothing is computed
per request.

``validate_bundle`` is the gate a peer's bundle passes before it is merged:
PEM ``CERTIFICATE`` blocks only, each a CA certificate (BasicConstraints
CA:TRUE), none expired, at most ``max_certificates`` of them in at most
``max_bytes``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fastca.observability.logging import get_logger

__all__ = ["TrustBundle", "BundleRefused", "validate_bundle", "DEFAULT_MAX_CERTIFICATES", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_CERTIFICATES = 100
DEFAULT_MAX_BYTES = 1024 * 1024
_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)
_BEGIN = re.compile(rb"-----BEGIN ")

log = get_logger("fastca.trust.bundle")


class BundleRefused(ValueError):
    """A peer's bundle failed validation. ``kind`` is a bounded label:
    ``too_large``, ``malformed``, ``not_ca``, ``expired`` or ``empty``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def validate_bundle(data: bytes, *, now: dt.datetime, max_certificates: int = DEFAULT_MAX_CERTIFICATES,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[x509.Certificate, ...]:
    """The CA certificates of a PEM bundle, or ``BundleRefused``."""
    if len(data) > max_bytes:
        raise BundleRefused("too_large", f"the bundle is {len(data)} bytes, more than max_bytes ({max_bytes})")
    blocks = _BLOCK.findall(data)
    if len(blocks) != len(_BEGIN.findall(data)):
        raise BundleRefused("malformed", "the bundle holds a PEM block that does not end")
    if not blocks:
        raise BundleRefused("empty", "the bundle holds no PEM certificate")
    if len(blocks) > max_certificates:
        raise BundleRefused("too_large", f"the bundle holds {len(blocks)} PEM blocks, more than "
                                         f"max_certificates ({max_certificates})")
    certificates = []
    for index, (label, _body) in enumerate(blocks):
        if label != b"CERTIFICATE":
            raise BundleRefused("malformed", f"PEM block {index} is {label.decode()!r}, not a CERTIFICATE")
    for index, match in enumerate(_BLOCK.finditer(data)):
        try:
            certificate = x509.load_pem_x509_certificate(match.group(0))
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
            subject = certificate.subject.rfc4514_string()
            not_after = certificate.not_valid_after_utc
        except x509.ExtensionNotFound:
            raise BundleRefused("not_ca", f"certificate {index} has no BasicConstraints: not a CA") from None
        except ValueError as error:
            raise BundleRefused("malformed", f"certificate {index} does not parse: {error}") from None
        if not constraints.ca:
            raise BundleRefused("not_ca", f"certificate {index} ({subject!r}) is not a CA (CA:FALSE)")
        if not_after <= now:
            raise BundleRefused("expired", f"certificate {index} ({subject!r}) expired at {not_after:%Y-%m-%dT%H:%M:%S}Z")
        certificates.append(certificate)
    return tuple(certificates)


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


class TrustBundle:
    """Own roots + peer roots, merged; ``pem`` and ``version`` are swapped
    together on each change, so a reader never sees half of one."""

    def __init__(self, own: Sequence[x509.Certificate]) -> None:
        if not own:
            raise ValueError("a trust bundle needs the CA's own roots")
        self._own = tuple(own)
        self._peers: dict[str, tuple[x509.Certificate, ...]] = {}
        self._subscribers: list[Callable[[str], None]] = []
        self._state = self._merge()

    def _merge(self) -> tuple[str, str, tuple[x509.Certificate, ...]]:
        seen: set[bytes] = set()
        merged: list[x509.Certificate] = []
        for certificate in (*self._own, *(c for name in sorted(self._peers) for c in self._peers[name])):
            der = certificate.public_bytes(serialization.Encoding.DER)
            if der not in seen:
                seen.add(der)
                merged.append(certificate)
        pem = "".join(_pem(c) for c in merged)
        return pem, hashlib.sha256(pem.encode()).hexdigest()[:16], tuple(merged)

    @property
    def pem(self) -> str:
        return self._state[0]

    @property
    def version(self) -> str:
        return self._state[1]

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        return self._state[2]

    @property
    def own(self) -> tuple[x509.Certificate, ...]:
        return self._own

    def peer_names(self) -> list[str]:
        return sorted(self._peers)

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """``callback(pem)`` after each change; returns the unsubscribe."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def set_peers(self, peers: Mapping[str, Iterable[x509.Certificate]]) -> bool:
        """Replace every peer's roots at once; True if the merged bundle changed."""
        self._peers = {name: tuple(certs) for name, certs in peers.items() if certs}
        return self._publish()

    def set_own(self, own: Sequence[x509.Certificate]) -> bool:
        """The CA's own roots changed (a root rotation)."""
        if not own:
            raise ValueError("a trust bundle needs the CA's own roots")
        self._own = tuple(own)
        return self._publish()

    def _publish(self) -> bool:
        state = self._merge()
        if state[1] == self._state[1]:
            return False
        self._state = state
        for callback in list(self._subscribers):
            try:
                callback(state[0])
            except Exception as error:      # one reader's failure never stops the others
                log.error("trust bundle subscriber failed", reason=repr(error))
        return True

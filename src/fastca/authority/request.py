"""What goes into the Authority and what comes out of it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

__all__ = ["IssueRequest", "IssuedCertificate"]


@dataclass(frozen=True, slots=True)
class IssueRequest:
    """One certificate to issue, after admission decided what it certifies."""

    csr: bytes                       # PEM or DER, as the client sent it
    identity: str                    # the authorised SPIFFE ID: the certificate's only URI SAN
    ttl_seconds: int | None = None   # None or <= 0: the configured default
    dns_names: tuple[str, ...] = ()  # only the server's own certificate carries any
    ip_addresses: tuple[bytes, ...] = ()  # 4 or 16 octets; likewise
    strict_csr: bool = False         # the CSR's SANs must be exactly [identity] (istio-csr's rule)
    ttl_cap_seconds: int | None = None   # risk policy: the certificate lives at most this long


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    der: bytes
    pem: str
    chain: tuple[str, ...]           # Istio layout: leaf, intermediates..., root bundle
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    identity: str
    key_type: str                    # e.g. "rsa-2048", "ec-p256"
    fingerprint_sha256: str
    spki_sha256: str = ""            # of the certified key, for the audit record (key reuse is visible there)
    csr_sha256: str = ""             # of the CSR as received (a replayed CSR is visible there)

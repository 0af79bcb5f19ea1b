"""One issuance, as the audit log keeps it.

A record says who asked (``caller_identities``, ``credential_type``, ``peer``),
what was certified (``identity``, ``key_type``, validity, ``serial``,
``fingerprint_sha256``) and by whom (``signer``, ``cluster_id``). It carries no
key, token or CSR: nothing in it is secret.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any, Protocol

__all__ = ["IssuanceContext", "IssuanceRecord", "IssuedFacts", "normalize_serial"]


class IssuedFacts(Protocol):
    """What a record takes from an issued certificate (the Authority's IssuedCertificate)."""

    serial: int
    identity: str
    key_type: str
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint_sha256: str
    spki_sha256: str
    csr_sha256: str


def normalize_serial(serial: str | int) -> str:
    """Canonical serial text: lower-case hex, no colons, no leading zeros
    (``f"{serial:x}"``), so ``4A:3F``, ``0x4a3f`` and ``004A3F`` all match."""
    if isinstance(serial, int):
        value = serial
    else:
        text = serial.strip().replace(":", "").lower()
        if text.startswith("0x"):
            text = text[2:]
        try:
            value = int(text, 16)
        except ValueError:
            raise ValueError(f"not a hexadecimal serial number: {serial!r}") from None
    if value < 0:
        raise ValueError("a serial number is positive")
    return f"{value:x}"


def _utc(name: str, value: dt.datetime) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (UTC)")
    return value.astimezone(dt.timezone.utc)


@dataclass(frozen=True, slots=True)
class IssuanceContext:
    """Who asked for a certificate and how: what the front end knows of a
    request that the certificate itself does not say."""

    caller_identities: tuple[str, ...]    # what authentication proved about the caller
    credential_type: str                  # e.g. "k8s-jwt", "mtls", "oidc"
    signer: str                           # the signer's name
    peer: str                             # the client's address
    request_id: str
    impersonated: bool = False
    cluster_id: str = ""
    node: str = ""                        # the caller's Kubernetes node, when its credential says


@dataclass(frozen=True)
class IssuanceRecord:
    serial: str                           # hex, normalised by normalize_serial
    identity: str                         # the SPIFFE ID certified
    caller_identities: tuple[str, ...]    # what authentication proved about the caller
    credential_type: str                  # e.g. "k8s-jwt", "mtls", "oidc"
    key_type: str                         # e.g. "rsa-2048", "ec-p256"
    not_before: dt.datetime               # UTC
    not_after: dt.datetime                # UTC
    signer: str                           # the signer's name
    fingerprint_sha256: str               # hex, of the certificate DER
    peer: str                             # the client's address
    request_id: str
    issued_at: dt.datetime                # UTC
    impersonated: bool = False            # identity differs from the caller's (node authorizer)
    cluster_id: str = ""
    spki_sha256: str = ""                 # hex, of the certified public key (SubjectPublicKeyInfo DER)
    csr_sha256: str = ""                  # hex, of the CSR DER as it arrived
    flags: tuple[str, ...] = ()           # issuance-monitoring signals this certificate raised
    node: str = ""                        # the caller's Kubernetes node ("" if unknown)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "serial", normalize_serial(self.serial))
        set_(self, "caller_identities", tuple(self.caller_identities))
        set_(self, "fingerprint_sha256", self.fingerprint_sha256.replace(":", "").lower())
        for name in ("not_before", "not_after", "issued_at"):
            set_(self, name, _utc(name, getattr(self, name)))
        set_(self, "impersonated", bool(self.impersonated))
        set_(self, "flags", tuple(self.flags))

    @classmethod
    def from_issued(cls, issued: IssuedFacts, *, caller_identities: tuple[str, ...] | list[str],
                    credential_type: str, signer: str, peer: str, request_id: str,
                    impersonated: bool = False, cluster_id: str = "",
                    issued_at: dt.datetime) -> IssuanceRecord:
        """The record of a certificate the issuer just made."""
        return cls(serial=f"{issued.serial:x}", identity=issued.identity,
                   caller_identities=tuple(caller_identities), credential_type=credential_type,
                   key_type=issued.key_type, not_before=issued.not_before, not_after=issued.not_after,
                   signer=signer, fingerprint_sha256=issued.fingerprint_sha256, peer=peer,
                   request_id=request_id, issued_at=issued_at,
                   impersonated=impersonated, cluster_id=cluster_id,
                   spki_sha256=issued.spki_sha256, csr_sha256=issued.csr_sha256)

    @classmethod
    def of(cls, issued: IssuedFacts, context: IssuanceContext, issued_at: dt.datetime) -> IssuanceRecord:
        """The record of ``issued``, made for the request ``context`` describes.
        The Authority's values are already what ``__post_init__`` would make
        of them (hex serial from an int, lower-case fingerprint, UTC times),
        so the record is filled in directly: this runs once per certificate."""
        record = object.__new__(cls)
        record.__dict__.update(
            serial=f"{issued.serial:x}", identity=issued.identity, caller_identities=context.caller_identities,
            credential_type=context.credential_type, key_type=issued.key_type, not_before=issued.not_before,
            not_after=issued.not_after, signer=context.signer, fingerprint_sha256=issued.fingerprint_sha256,
            peer=context.peer, request_id=context.request_id, issued_at=issued_at,
            impersonated=context.impersonated, cluster_id=context.cluster_id,
            spki_sha256=issued.spki_sha256, csr_sha256=issued.csr_sha256, flags=(), node=context.node)
        return record

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 UTC, tuples as lists."""
        out = asdict(self)
        out["caller_identities"] = list(self.caller_identities)
        out["flags"] = list(self.flags)
        for name in ("not_before", "not_after", "issued_at"):
            out[name] = getattr(self, name).isoformat()
        return out

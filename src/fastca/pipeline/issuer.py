"""The issuer: the only caller of ``_native`` and of the signer's batch API.

Stages, in order, for a batch of requests (step-ca's ordered sign stages):
  1. policy   TTL -> validity window, per request
  2. native   parse + verify each CSR, validate identity, assemble TBS (no GIL)
  3. signer   one sign_many call for every TBS that survived
  4. native   assemble certificates; every signature verified with the CA key
  5. chain    leaf + intermediates + root bundle
A request that fails a stage gets its own error; its batch-mates go on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from cryptography.hazmat.primitives import serialization

from fastca import _native
from fastca.ca.material import CAMaterial
from fastca.config import IssuanceConfig
from fastca.chain import istio_chain_tail
from fastca.errors import CANotReady, FastcaError, InvalidRequest, SigningFailed
from fastca.policy.ttl import validity_window
from fastca.signing.base import Signer

__all__ = ["IssueRequest", "IssuedCertificate", "Issuer"]

_SERIAL_BYTES = 16


@dataclass(frozen=True)
class IssueRequest:
    csr: bytes                       # PEM or DER, as the client sent it
    identity: str                    # the authorised SPIFFE ID: the certificate's only URI SAN
    ttl_seconds: int | None = None   # None or <= 0: the configured default
    dns_names: tuple[str, ...] = ()  # only where policy allows them
    ip_addresses: tuple[bytes, ...] = ()  # 4 or 16 octets; the server's own certificate only
    strict_csr: bool = False         # the CSR's URI SANs must be exactly [identity] (istio-csr's rule)


@dataclass(frozen=True)
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


def _to_error(error: _native.NativeError) -> FastcaError:
    if error.code == _native.E_SIGNATURE:
        return SigningFailed(f"CA signature check failed: {error}")
    if error.code == _native.E_INTERNAL:
        return SigningFailed(f"native core error: {error}")
    return InvalidRequest(str(error))


def _positive_serial(random_bytes: bytes) -> bytes:
    # 126 random bits in a fixed 16-octet positive INTEGER: the top bit clear
    # keeps it positive, the next bit set keeps DER from needing a 00 pad or
    # trimming (CERT-PROFILE.md: serial). The native core applies the same rule.
    return bytes([(random_bytes[0] & 0x7F) | 0x40]) + random_bytes[1:]


def _key_type(csr: _native.CsrInfo) -> str:
    if csr.key_type == "ec":
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(csr.curve or "", f"ec-{csr.curve}")
    return f"{csr.key_type}-{csr.key_bits}"


class Issuer:
    """Issues workload certificates from one CA. ``clock`` returns unix
    seconds and is injected so tests can move time (SPIRE does the same)."""

    def __init__(self, material: CAMaterial, signer: Signer, issuance: IssuanceConfig,
                 clock: Callable[[], float] = time.time,
                 sign_observer: Callable[[float], None] | None = None) -> None:
        ca_spki = material.signing_cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        signer_spki = signer.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if ca_spki != signer_spki:
            raise CANotReady("the signer's key does not match the signing certificate")
        self._signer = signer
        self._issuance = issuance
        self._clock = clock
        self._sign_observer = sign_observer
        self._signer_not_after = int(material.not_after.timestamp())
        self._profile = _native.IssuerProfile(
            material.subject_der, material.subject_key_id, signer.algorithm_identifier,
            ca_spki, istio_key_usage=issuance.istio_key_usage)
        self._chain_tail = istio_chain_tail(material.chain_pems, material.root_bundle_pem)

    def issue(self, request: IssueRequest) -> IssuedCertificate:
        result = self.issue_many([request])[0]
        if isinstance(result, FastcaError):
            raise result
        return result

    def issue_many(self, requests: Sequence[IssueRequest]) -> list[IssuedCertificate | FastcaError]:
        now = int(self._clock())
        results: list[IssuedCertificate | FastcaError | None] = [None] * len(requests)
        specs: list[_native.LeafSpec] = []
        spec_index: list[int] = []
        facts: dict[int, tuple[int, int, int]] = {}
        randomness = os.urandom(_SERIAL_BYTES * len(requests))
        issuance = self._issuance
        for i, request in enumerate(requests):
            try:
                not_before, not_after = validity_window(
                    request.ttl_seconds, now=now, default_ttl=issuance.default_ttl_seconds,
                    max_ttl=issuance.max_ttl_seconds, backdate=issuance.backdate_seconds,
                    signer_not_after=self._signer_not_after, clamp_to_max=issuance.over_max_ttl == "clamp")
            except FastcaError as error:
                results[i] = error
                continue
            serial = _positive_serial(randomness[i * _SERIAL_BYTES:(i + 1) * _SERIAL_BYTES])
            specs.append(_native.LeafSpec(request.csr, request.identity, serial,
                                          not_before, not_after, request.dns_names, request.ip_addresses))
            facts[i] = (int.from_bytes(serial, "big"), not_before, not_after)
            spec_index.append(i)

        prepared = _native.prepare_batch(self._profile, specs) if specs else []
        to_sign: list[_native.PreparedLeaf] = []
        sign_index: list[int] = []
        for i, item in zip(spec_index, prepared):
            if isinstance(item, _native.NativeError):
                results[i] = _to_error(item)
            elif requests[i].strict_csr and (item.csr.uris != [requests[i].identity] or item.csr.dns_names
                                             or item.csr.ip_addresses or item.csr.emails):
                results[i] = InvalidRequest("strict CSR mode: the CSR must request exactly the caller's identity "
                                            f"({requests[i].identity}) as its only SAN")
            else:
                to_sign.append(item)
                sign_index.append(i)

        if to_sign:
            tbs = [leaf.tbs for leaf in to_sign]
            started = time.perf_counter()
            try:
                signatures = self._signer.sign_many(tbs)
                if self._sign_observer is not None:
                    self._sign_observer(time.perf_counter() - started)
            except FastcaError as error:
                for i in sign_index:
                    results[i] = error
                signatures = None
            if signatures is not None:
                if len(signatures) != len(tbs):
                    signatures = [b""] * len(tbs)  # a signer that loses items is a faulty signer
                certificates = _native.assemble_batch(self._profile, tbs, signatures, self._signer.ecdsa_raw)
                for i, leaf, cert in zip(sign_index, to_sign, certificates):
                    if isinstance(cert, _native.NativeError):
                        results[i] = _to_error(cert)
                    else:
                        results[i] = self._issued(cert, leaf, requests[i], facts[i])
        return results  # type: ignore[return-value]

    def _issued(self, der: bytes, leaf: _native.PreparedLeaf, request: IssueRequest,
                facts: tuple[int, int, int]) -> IssuedCertificate:
        pem = _native.pem_encode(der)
        serial, not_before, not_after = facts
        return IssuedCertificate(
            der=der, pem=pem, chain=(pem, *self._chain_tail), serial=serial,
            not_before=dt.datetime.fromtimestamp(not_before, dt.timezone.utc),
            not_after=dt.datetime.fromtimestamp(not_after, dt.timezone.utc), identity=request.identity,
            key_type=_key_type(leaf.csr), fingerprint_sha256=hashlib.sha256(der).hexdigest())

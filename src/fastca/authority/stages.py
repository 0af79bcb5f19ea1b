"""The Authority's issuance stages after admission, each a small named object
that works on a batch of ``Work`` in place (step-ca's sign options, as a
batch pipeline). They run in order on the signer's thread; a stage skips the
items an earlier stage already failed, so one bad request fails alone and
its batch-mates go on.

    validity          the CA is in date now; TTL -> (notBefore, notAfter); a serial drawn
    prepare           native: CSR parsed, proof of possession, identity validated, TBS built (no GIL)
    sign              one sign_many call for every TBS that survived
    assemble          native: each signature verified with the CA key, Certificate DER built
    profile-check     native: each certificate re-read by the strict DER reader and held to the profile
    record            the batch's certificates committed to the audit log; only then do they leave
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from fastca import _native
from fastca.audit.record import IssuanceContext, IssuanceRecord
from fastca.ca.material import CAMaterial
from fastca.clock import Clock
from fastca.config import IssuanceConfig
from fastca.errors import CANotReady, CANotValid, FastcaError, InvalidRequest, SigningFailed
from fastca.policy.ttl import validity_window
from fastca.authority.request import IssuedCertificate, IssueRequest
from fastca.batching import Ticket
from fastca.observability.logging import get_logger
from fastca.signing.base import Signer

__all__ = ["AuditSink", "Work", "Stage", "ValidityWindow", "NativePrepare", "Sign", "AssembleAndVerify",
           "ProfileCheck", "Record"]

_SERIAL_BYTES = 16

log = get_logger("fastca.authority")


class AuditSink(Protocol):
    """What the record stage needs of an audit log (SqliteAuditLog, PostgresAuditLog)."""

    def record_many_then(self, records: Sequence[IssuanceRecord],
                         on_done: Callable[[CANotReady | None], None]) -> None: ...


class Work:
    """One request on its way through the stages."""

    __slots__ = ("request", "context", "record", "spec", "prepared", "signature", "der", "outcome", "ticket")

    def __init__(self, request: IssueRequest, context: IssuanceContext | None, record: bool = True) -> None:
        self.request = request
        self.context = context
        self.record = record                 # False only for the health probe's throwaway certificates
        self.spec: _native.LeafSpec | None = None
        self.prepared: _native.PreparedLeaf | None = None
        self.signature: bytes | None = None
        self.der: bytes | None = None
        self.outcome: IssuedCertificate | FastcaError | None = None   # None: still going
        self.ticket: Ticket | None = None     # a callback submission's: abandoned when the caller left

    def fail(self, error: FastcaError) -> None:
        self.outcome = error


class Stage(Protocol):
    name: str

    def run(self, works: list[Work]) -> None: ...


def _going(works: list[Work]) -> list[Work]:
    return [work for work in works if work.outcome is None]


def _native_error(error: _native.NativeError) -> FastcaError:
    if error.code == _native.E_SIGNATURE:
        return SigningFailed(f"CA signature check failed: {error}")
    if error.code == _native.E_INTERNAL:
        return SigningFailed(f"native core error: {error}")
    return InvalidRequest(str(error))


class ValidityWindow:
    name = "validity"

    def __init__(self, material: CAMaterial, issuance: IssuanceConfig, clock: Clock) -> None:
        self._issuance = issuance
        self._clock = clock
        self._valid_from = int(material.valid_from.timestamp())
        self._valid_until = int(material.valid_until.timestamp())

    def run(self, works: list[Work]) -> None:
        now = int(self._clock.now())
        going = _going(works)
        if now < self._valid_from or now >= self._valid_until:
            # Whatever it signed now would not verify: refuse, with the reason.
            state = "is not valid until" if now < self._valid_from else "expired at"
            moment = self._valid_from if now < self._valid_from else self._valid_until
            error = CANotValid(f"the CA's signing chain {state} {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(moment))}")
            for work in going:
                work.fail(error)
            return
        issuance = self._issuance
        randomness = os.urandom(_SERIAL_BYTES * len(going))
        for index, work in enumerate(going):
            request = work.request
            try:
                not_before, not_after = validity_window(
                    request.ttl_seconds, now=now, default_ttl=issuance.default_ttl_seconds,
                    max_ttl=issuance.max_ttl_seconds, backdate=issuance.backdate_seconds,
                    signer_not_after=self._valid_until, clamp_to_max=issuance.over_max_ttl == "clamp")
            except FastcaError as error:
                work.fail(error)
                continue
            if request.ttl_cap_seconds is not None:
                not_after = min(not_after, now + request.ttl_cap_seconds)
            # Never backdated before the CA itself was valid.
            not_before = max(not_before, self._valid_from)
            serial = randomness[index * _SERIAL_BYTES:(index + 1) * _SERIAL_BYTES]
            work.spec = _native.LeafSpec(request.csr, request.identity, serial, not_before, not_after,
                                         request.dns_names, request.ip_addresses)


class NativePrepare:
    name = "prepare"

    def __init__(self, profile: _native.IssuerProfile) -> None:
        self._profile = profile

    def run(self, works: list[Work]) -> None:
        going = _going(works)
        if not going:
            return
        for work, item in zip(going, _native.prepare_batch(self._profile, [work.spec for work in going])):
            if isinstance(item, _native.NativeError):
                work.fail(_native_error(item))
                continue
            request = work.request
            if request.strict_csr and (item.csr.uris != [request.identity] or item.csr.dns_names
                                       or item.csr.ip_addresses or item.csr.emails):
                work.fail(InvalidRequest("strict CSR mode: the CSR must request exactly the caller's identity "
                                         f"({request.identity}) as its only SAN"))
                continue
            work.prepared = item


class Sign:
    name = "sign"

    def __init__(self, signer: Signer, observe: Callable[[float], None] | None = None) -> None:
        self._signer = signer
        self._observe = observe

    def run(self, works: list[Work]) -> None:
        going = _going(works)
        if not going:
            return
        started = time.perf_counter()
        try:
            signatures = self._signer.sign_many([work.prepared.tbs for work in going])  # type: ignore[union-attr]
        except FastcaError as error:
            for work in going:
                work.fail(error)
            return
        if self._observe is not None:
            self._observe(time.perf_counter() - started)
        if len(signatures) != len(going):
            signatures = [b""] * len(going)      # a signer that loses items is a faulty signer
        for work, signature in zip(going, signatures):
            work.signature = signature


class AssembleAndVerify:
    name = "assemble"

    def __init__(self, profile: _native.IssuerProfile, ecdsa_raw: bool) -> None:
        self._profile = profile
        self._ecdsa_raw = ecdsa_raw

    def run(self, works: list[Work]) -> None:
        going = _going(works)
        if not going:
            return
        certificates = _native.assemble_batch(self._profile, [work.prepared.tbs for work in going],  # type: ignore[union-attr]
                                              [work.signature for work in going], self._ecdsa_raw)
        for work, der in zip(going, certificates):
            if isinstance(der, _native.NativeError):
                work.fail(_native_error(der))
            else:
                work.der = der


class ProfileCheck:
    name = "profile-check"

    def __init__(self, profile: _native.IssuerProfile, chain_tail: tuple[str, ...]) -> None:
        self._profile = profile
        self.chain_tail = chain_tail

    def run(self, works: list[Work]) -> None:
        going = _going(works)
        if not going:
            return
        tail = self.chain_tail          # read once: one batch, one bundle, while it may be swapped
        verdicts = _native.check_issued_batch(self._profile, [work.der for work in going],
                                              [work.spec for work in going],
                                              [work.prepared.csr for work in going])  # type: ignore[union-attr]
        for work, verdict in zip(going, verdicts):
            if verdict is not None:
                work.fail(SigningFailed(f"post-issuance profile check failed: {verdict}"))
            else:
                work.outcome = self._issued(work, tail)

    @staticmethod
    def _issued(work: Work, tail: tuple[str, ...]) -> IssuedCertificate:
        der, spec, csr = work.der, work.spec, work.prepared.csr  # type: ignore[union-attr]
        pem = _native.pem_encode(der)
        return IssuedCertificate(
            der=der, pem=pem, chain=(pem, *tail), serial=_serial_value(spec.serial),
            not_before=_utc(spec.not_before), not_after=_utc(spec.not_after), identity=spec.spiffe_id,
            key_type=_key_type(csr), fingerprint_sha256=hashlib.sha256(der).hexdigest(),
            spki_sha256=hashlib.sha256(csr.spki).hexdigest(), csr_sha256=hashlib.sha256(csr.der).hexdigest())


class Record:
    """The last stage: commit, then let go. Its ``run`` returns at once; the
    batch is finished (``then()``) on the audit writer's thread once the
    records are on disk, or failed with UNAVAILABLE if they could not be."""

    name = "record"

    def __init__(self, audit: AuditSink, clock: Clock,
                 on_recorded: Callable[[list[IssuanceRecord]], None] | None = None) -> None:
        self._audit = audit
        self._clock = clock
        self._on_recorded = on_recorded

    def run(self, works: list[Work], then: Callable[[], None]) -> None:
        issued_at = self._clock.utcnow()
        recorded: list[Work] = []
        records: list[IssuanceRecord] = []
        try:
            for work in works:
                if work.ticket is not None and work.ticket.abandoned and isinstance(work.outcome, IssuedCertificate):
                    # Its caller left (deadline, reset stream) while it was
                    # signed: it is thrown away, so it is not recorded either.
                    work.fail(CANotReady("the caller went away before the certificate was ready"))
                    continue
                if isinstance(work.outcome, IssuedCertificate) and work.record:
                    if work.context is None:
                        raise TypeError("a certificate to record has no IssuanceContext")
                    records.append(IssuanceRecord.of(work.outcome, work.context, issued_at))
                    recorded.append(work)
        except Exception as error:  # noqa: BLE001 - no record, so no certificate leaves
            failed = SigningFailed(f"audit record error: {type(error).__name__}: {error}")
            for work in works:
                if work.record and isinstance(work.outcome, IssuedCertificate):
                    work.fail(failed)
            then()
            return
        if not records:
            then()
            return

        def committed(error: CANotReady | None) -> None:
            try:
                if error is not None:
                    for work in recorded:
                        work.fail(error)
                elif self._on_recorded is not None:
                    try:
                        self._on_recorded(records)
                    except Exception as exc:  # noqa: BLE001 - an observer must not withhold recorded certificates
                        log.error("issuance observer failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                then()

        try:
            self._audit.record_many_then(records, committed)
        except FastcaError as error:   # the audit queue is full or the log is closed
            for work in recorded:
                work.fail(error)
            then()


def _serial_value(random_bytes: bytes) -> int:
    # The profile's rule, as the native core applies it: 16 octets, the top
    # bit clear (positive), the next one set (no DER padding or trimming).
    return int.from_bytes(bytes([(random_bytes[0] & 0x7F) | 0x40]) + random_bytes[1:], "big")


def _utc(unix_seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix_seconds, dt.timezone.utc)


def _key_type(csr: _native.CsrInfo) -> str:
    if csr.key_type == "ec":
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(csr.curve or "", f"ec-{csr.curve}")
    return f"{csr.key_type}-{csr.key_bits}"

"""The Authority: one per configured signer, the only place certificates are made.

It owns the CA material, the signer, the clock, the audit commit and the
ordered stages every certificate goes through (listed once, in
``Authority.__init__``). Every path that produces a certificate comes here:
the Istio and bulk RPCs (``issue``, ``issue_admitted``, ``submit_then``),
``fastca issue`` and the server's own serving certificate (``issue_local``),
and the health probe (``probe``, the one path whose certificate is thrown
away and so never recorded). A certificate leaves only after every stage,
its audit record included.

Admission runs per request on the event loop; the other stages run per batch
on the signer's thread, fed by a generic micro-batcher (fastca.batching).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fastca import _native
from fastca.audit.record import IssuanceContext, IssuanceRecord
from fastca.authn.caller import Caller, RequestInfo
from fastca.authority.admission import Admission, LocalPrincipal
from fastca.authority.request import IssuedCertificate, IssueRequest
from fastca.authority.stages import (
    AssembleAndVerify,
    AuditSink,
    NativePrepare,
    ProfileCheck,
    Record,
    Sign,
    ValidityWindow,
    Work,
)
from fastca.batching import Batcher, Ticket
from fastca.ca.material import CAMaterial
from fastca.chain import istio_chain_tail
from fastca.clock import Clock
from fastca.config import IssuanceConfig
from fastca.errors import CANotReady, ConfigurationError, FastcaError, InvalidRequest, Overloaded
from fastca.keys import require_key_matches
from fastca.signing.base import Signer

__all__ = ["Authority", "Authorities", "Outcome"]

Outcome = IssuedCertificate | FastcaError
_LOCAL_TIMEOUT_S = 60.0
_PROBE_TTL_S = 60
_OWN_THREADS = 2      # for a signer without a thread of its own (an in-memory key)


def _probe_csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


class Authority:
    """``executor`` runs batches for a signer without a home thread (None: a
    small pool of the Authority's own). ``on_recorded(records)`` runs after
    each commit on the audit writer's thread; ``observe_sign(seconds)`` after
    each sign_many; ``observe_batch(size, seconds)`` on the event loop."""

    def __init__(self, name: str, material: CAMaterial, signer: Signer, *, issuance: IssuanceConfig,
                 admission: Admission, audit: AuditSink, clock: Clock, executor: Executor | None = None,
                 batch_max: int = 64, batch_delay_s: float = 0.002, queue_limit: int = 4096,
                 on_recorded: Callable[[list[IssuanceRecord]], None] | None = None,
                 observe_sign: Callable[[float], None] | None = None,
                 observe_batch: Callable[[int, float], None] | None = None) -> None:
        self.name = name
        self.clock = clock
        self.admission = admission
        self._issuance = issuance
        self._observe_sign = observe_sign
        self._record = Record(audit, clock, on_recorded)
        self._set_ca(material, signer, root_bundle_pem=material.root_bundle_pem)
        self._retired_signers: list[Signer] = []
        home = signer.home_executor
        self._own_executor = None
        if home is None and executor is None:
            self._own_executor = executor = ThreadPoolExecutor(_OWN_THREADS, thread_name_prefix=f"issue-{name}")
        # A batch runs where its signer lives (the PKCS#11 thread), so it signs without a hand-off.
        self._batcher: Batcher[Work, Outcome] = Batcher(
            self._run_batch, home or executor, concurrency=1 if home else _OWN_THREADS,  # type: ignore[arg-type]
            max_batch=batch_max, max_delay_s=batch_delay_s, queue_limit=queue_limit, observe_batch=observe_batch)
        self._probe_csr = _probe_csr()
        self._probe_identity = f"spiffe://{admission.trust_domain}/ns/fastca/sa/health-probe"
        self._closed = False

    def __repr__(self) -> str:
        return f"Authority({self.name!r}, {self.material.signing_cert.subject.rfc4514_string()!r}, {self._signer!r})"

    def _set_ca(self, material: CAMaterial, signer: Signer, *, root_bundle_pem: str) -> None:
        """Build the stages for ``material`` and ``signer``; the tuple a batch
        runs is assigned last, in one step, so a batch runs wholly on one CA."""
        ca_spki = require_key_matches(signer.public_key, material.signing_cert)
        profile = _native.IssuerProfile(material.subject_der, material.subject_key_id, signer.algorithm_identifier,
                                        ca_spki, istio_key_usage=self._issuance.istio_key_usage)
        profile_check = ProfileCheck(profile, istio_chain_tail(material.chain_pems, root_bundle_pem))
        # The stages every certificate goes through, in order.
        stages = (
            self.admission,
            ValidityWindow(material, self._issuance, self.clock),
            NativePrepare(profile),
            Sign(signer, self._observe_sign),
            AssembleAndVerify(profile, signer.ecdsa_raw),
            profile_check,
            self._record,
        )
        self.material = material
        self._signer = signer
        self._profile_check = profile_check
        self.stages = stages
        self._batch_stages = stages[1:-1]

    def switch_ca(self, material: CAMaterial, signer: Signer) -> None:
        """Sign with another CA from the next batch on (a rotation's new key),
        handing out the same root bundle. The signer must live where the
        current one does (the batcher runs there). The old signer stays open
        until ``close``: a batch may still be using it."""
        if signer.home_executor is not self._signer.home_executor:
            raise ConfigurationError("the new signer runs on another thread than the current one "
                                     "(a rotation keeps the signer backend)")
        previous = self._signer
        self._set_ca(material, signer, root_bundle_pem=self.root_bundle_pem)
        self._retired_signers.append(previous)

    @property
    def root_bundle_pem(self) -> str:
        """The last element of every response: the root bundle agents trust."""
        return self._profile_check.chain_tail[-1]

    def set_root_bundle(self, root_bundle_pem: str) -> None:
        """Hand out another root bundle (own roots plus peers', a rotation)
        from the next batch on: the tail is built here once and swapped in
        one assignment, never recomputed per request."""
        self._profile_check.chain_tail = istio_chain_tail(self.material.chain_pems, root_bundle_pem)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    @property
    def depth(self) -> int:
        """Requests waiting for or in issuance."""
        return self._batcher.depth

    @property
    def full(self) -> bool:
        """Whether a new request would be refused for want of queue room."""
        return self._batcher.full

    # -- remote callers, on the event loop ----------------------------------------

    async def admit(self, caller: Caller, info: RequestInfo, *, csr: bytes, ttl_seconds: int, impersonate: str,
                    request_id: str, fresh_credential: bool = False) -> tuple[IssueRequest, IssuanceContext]:
        return await self.admission.admit(caller, info, csr=csr, ttl_seconds=ttl_seconds, impersonate=impersonate,
                                          request_id=request_id, fresh_credential=fresh_credential)

    async def issue(self, caller: Caller, info: RequestInfo, *, csr: bytes, ttl_seconds: int, impersonate: str,
                    request_id: str) -> IssuedCertificate:
        """Admission, then every other stage; raises the request's error."""
        request, context = await self.admit(caller, info, csr=csr, ttl_seconds=ttl_seconds,
                                            impersonate=impersonate, request_id=request_id)
        return await self.issue_admitted(request, context)

    async def issue_admitted(self, request: IssueRequest, context: IssuanceContext) -> IssuedCertificate:
        outcome = await self._batcher.submit(Work(request, context))
        if isinstance(outcome, FastcaError):
            raise outcome
        return outcome

    async def issue_many_admitted(self, admitted: Sequence[tuple[IssueRequest, IssuanceContext]]) -> list[Outcome]:
        """One outcome per request, in order; those beyond the queue's room are Overloaded."""
        return await self._batcher.submit_many([Work(request, context) for request, context in admitted])

    def submit_then(self, request: IssueRequest, context: IssuanceContext,
                    on_done: Callable[[Outcome], None]) -> Ticket:
        """Issue without a coroutine: ``on_done(outcome)`` runs on the event
        loop unless the ticket is abandoned first (the caller left), in which
        case the request is dropped before it is signed, if it has not been."""
        ticket = Ticket(on_done)  # type: ignore[arg-type]
        work = Work(request, context)
        work.ticket = ticket          # the record stage skips it if the caller left meanwhile
        self._batcher.submit_ticket(work, ticket)
        return ticket

    # -- local principals and the probe, off the event loop -----------------------

    def issue_local(self, principal: LocalPrincipal, *, identity: str, csr: bytes, ttl_seconds: int,
                    request_id: str, dns_names: tuple[str, ...] = (),
                    ip_addresses: tuple[bytes, ...] = ()) -> IssuedCertificate:
        """For the operator (``fastca issue``) and the server's own certificate:
        admitted as a local principal, recorded like any other. Blocks; never
        call it on the event loop."""
        request, context = self.admission.admit_local(principal, identity=identity, csr=csr, ttl_seconds=ttl_seconds,
                                                      request_id=request_id, dns_names=dns_names,
                                                      ip_addresses=ip_addresses)
        outcome = self._run_now(Work(request, context))
        if isinstance(outcome, FastcaError):
            raise outcome
        return outcome

    @property
    def signer_available(self) -> bool:
        """False while the signer knows its HSM is gone (no HSM call is made)."""
        return self._signer.available

    def probe(self) -> None:
        """Sign a throwaway certificate now (SPIRE's health check: the HSM
        answers and the signature verifies); raise the reason if it cannot be.
        Its certificate is discarded here, so it is the one never recorded."""
        # Within max_ttl: a CA configured for very short certificates must still pass its probe.
        ttl = min(_PROBE_TTL_S, self._issuance.max_ttl_seconds)
        work = Work(IssueRequest(self._probe_csr, self._probe_identity, ttl_seconds=ttl), None, record=False)
        outcome = self._run_now(work)
        if isinstance(outcome, FastcaError):
            raise outcome

    def _run_now(self, work: Work) -> Outcome:
        if self._closed:
            raise CANotReady(f"the {self.name!r} authority is closed")
        finished = threading.Event()
        self._run_batch([work], lambda _outcomes: finished.set())
        if not finished.wait(_LOCAL_TIMEOUT_S):
            return CANotReady(f"audit log unavailable: no commit within {_LOCAL_TIMEOUT_S:.0f} s")
        assert work.outcome is not None
        return work.outcome

    # -- the batch, on the signer's thread ------------------------------------------

    def _run_batch(self, works: list[Work], done: Callable[[list[Outcome]], None]) -> None:
        for stage in self._batch_stages:
            stage.run(works)
        self._record.run(works, lambda: done([work.outcome for work in works]))  # type: ignore[misc]

    # -- lifecycle ------------------------------------------------------------------

    async def drain(self) -> None:
        """Stop taking requests; finish (and record) every one already taken."""
        await self._batcher.drain()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for signer in (*self._retired_signers, self._signer):
            signer.close()
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=True)


class Authorities:
    """The server's authorities by signer name: the ``CertSigner`` an agent
    sends chooses one (empty: the default), an unknown name is refused."""

    def __init__(self, authorities: Sequence[Authority], default: str) -> None:
        self._by_name = {authority.name: authority for authority in authorities}
        if default not in self._by_name:
            raise ValueError(f"no {default!r} authority")
        self.default = self._by_name[default]

    def select(self, cert_signer: str) -> Authority:
        if not cert_signer:
            return self.default
        authority = self._by_name.get(cert_signer)
        if authority is None:
            raise InvalidRequest(f"unknown CertSigner {cert_signer!r}")
        return authority

    def __iter__(self):
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def overloaded(self) -> Overloaded | None:
        """An Overloaded error if every authority's queue is full (a call can
        be refused before any authentication work), else None."""
        if all(authority.full for authority in self._by_name.values()):
            return Overloaded("issuance queue full")
        return None

    async def drain(self) -> None:
        for authority in self._by_name.values():
            await authority.drain()

    def close(self) -> None:
        for authority in self._by_name.values():
            authority.close()

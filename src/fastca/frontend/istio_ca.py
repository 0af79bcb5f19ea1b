"""istio.v1.auth.IstioCertificateService/CreateCertificate on the native core.

Thin: decode, authenticate, hand the request to the Authority its
``CertSigner`` selects (admission and everything after happen there), then
map errors to the contract's status codes. The CSR is not looked at before
the caller is authenticated and admitted (docs/reliability.md, case 1).

A call whose caller can be judged at once (a client certificate already
verified on its connection, a cached TokenReview, XFCC) goes from the
protocol callback to the Authority's batcher and back without a coroutine;
one that needs I/O first (a TokenReview not cached yet, OIDC,
impersonation) continues in a task. Either way a call that goes away (its
deadline, a reset stream) abandons its place in the batch: it is not signed
if it has not been, and never recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError

from fastca.audit.record import IssuanceContext, IssuanceRecord
from fastca.authn.caller import Caller, RequestInfo
from fastca.authn.chain import AuthenticatorChain
from fastca.authn.node_authorizer import NotOnNode
from fastca.authority import Authorities, Authority, IssueRequest, Outcome
from fastca.errors import (
    AuthenticationFailed,
    CANotReady,
    CANotValid,
    FastcaError,
    FreshCredentialRequired,
    InvalidRequest,
    InvalidTTL,
    Overloaded,
    SigningFailed,
    grpc_status_of,
)
from fastca.frontend._grpc import INTERNAL, RESOURCE_EXHAUSTED, Call
from fastca.frontend.context import peer_ip, request_info
from fastca.observability.logging import get_logger, log_many, new_request_id
from fastca.proto import istio_ca_pb2

if TYPE_CHECKING:
    from fastca.monitoring.service import MonitoringService

__all__ = ["SERVICE", "METHOD", "CreateCertificate", "IssuanceService", "log_recorded", "metadata_strings",
           "STATUS_CODES"]

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = "CreateCertificate"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
CERT_SIGNER = "CertSigner"
_MAX_METADATA_FIELDS = 16
_MAX_METADATA_KEY_BYTES = 256
_MAX_METADATA_VALUE_BYTES = 4096
_KNOWN_METADATA_KEYS = frozenset({IMPERSONATED_IDENTITY, CERT_SIGNER})

# grpc.StatusCode names as google.rpc.Code numbers.
STATUS_CODES = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
                "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
                "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
                "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16}
STATUS_NAMES = {number: name for name, number in STATUS_CODES.items()}

log = get_logger("fastca.frontend")


def _described(key: str) -> str:
    """How a request's metadata key is named in a status or a log: the keys
    fastca knows by name; any other only by its length and a short hash (it
    is the caller's text, of any length and content)."""
    if key in _KNOWN_METADATA_KEYS:
        return repr(key)
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"of {len(key.encode('utf-8', 'surrogatepass'))} bytes (sha256 {digest}…)"


def metadata_strings(struct: Any) -> dict[str, str]:
    """The Struct's string values. Agents send only strings; anything else
    (nested structs, lists, numbers) is refused before any CSR parsing, as
    are too many fields, keys above 256 bytes and values above 4 KiB. A key
    fastca does not know is never echoed (see ``_described``)."""
    fields = struct.fields
    if len(fields) > _MAX_METADATA_FIELDS:
        raise InvalidRequest(f"metadata has {len(fields)} fields; at most {_MAX_METADATA_FIELDS} are accepted")
    out: dict[str, str] = {}
    for key, value in fields.items():
        if len(key) > _MAX_METADATA_KEY_BYTES or len(key.encode("utf-8", "surrogatepass")) > _MAX_METADATA_KEY_BYTES:
            raise InvalidRequest(f"metadata key {_described(key)} is longer than the "
                                 f"{_MAX_METADATA_KEY_BYTES} bytes accepted")
        if value.WhichOneof("kind") != "string_value":
            raise InvalidRequest(f"metadata value of key {_described(key)} must be a string")
        if len(value.string_value) > _MAX_METADATA_VALUE_BYTES \
                or len(value.string_value.encode("utf-8", "surrogatepass")) > _MAX_METADATA_VALUE_BYTES:
            raise InvalidRequest(f"metadata value of key {_described(key)} is longer than the "
                                 f"{_MAX_METADATA_VALUE_BYTES} bytes accepted")
        out[key] = value.string_value
    return out


def _sign_error_kind(error: FastcaError) -> str | None:
    if isinstance(error, InvalidTTL):
        return "TTL_ERROR"
    if isinstance(error, InvalidRequest):
        return "CSR_ERROR"
    if isinstance(error, (CANotReady, CANotValid)):
        return "CA_NOT_READY"
    if isinstance(error, SigningFailed):
        return "CERT_GEN_ERROR"
    return None


def log_recorded(records: list[IssuanceRecord]) -> None:
    """One "certificate issued" line per recorded certificate (the Authority's
    ``on_recorded``: called once per committed batch, off the event loop)."""
    log_many("fastca.frontend", "info", "certificate issued", [
        {"request_id": r.request_id, "peer": r.peer, "identity": r.identity, "serial": r.serial, "signer": r.signer,
         "credential": r.credential_type, "not_after": r.not_after.isoformat()} for r in records])


class IssuanceService:
    """What every certificate RPC does around the Authority, shared by the
    Istio method (one request per call) and the bulk method (many)."""

    def __init__(self, *, authenticators: AuthenticatorChain, authorities: Authorities, metrics: Any,
                 endpoint: Any = None, monitoring: MonitoringService | None = None) -> None:
        self.authenticators = authenticators
        self.authorities = authorities
        self.metrics = metrics
        self.monitoring = monitoring      # told of refusals (impersonation off-node, failed authentication)
        self.endpoint = endpoint          # set by the front end: counts refused authentication per connection
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, call: Call, coroutine: Any) -> None:
        """Continue a call in a task (it needs I/O); cancelled if the call goes away."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        call.on_cancel = task.cancel

    async def admit(self, request: istio_ca_pb2.IstioCertificateRequest, caller: Caller, info: RequestInfo,
                    request_id: str) -> tuple[Authority, IssueRequest, IssuanceContext, Caller]:
        """The Authority the request's CertSigner names, its admission
        verdict, and the caller as admitted. When risk policy wants the
        caller's token reviewed again, it is (bypassing the TokenReview
        cache) and the request admitted again; the caller returned is then
        the freshly reviewed one (a bulk call's next elements use it)."""
        metadata = metadata_strings(request.metadata)
        authority = self.authorities.select(metadata.get(CERT_SIGNER, ""))
        fresh = False
        while True:
            try:
                issue_request, context = await authority.admit(
                    caller, info, csr=request.csr.encode(), ttl_seconds=request.validity_duration,
                    impersonate=metadata.get(IMPERSONATED_IDENTITY, ""), request_id=request_id,
                    fresh_credential=fresh)
            except FreshCredentialRequired:
                if fresh:
                    raise
                caller = await self.authenticators.authenticate(info, fresh=True)
                fresh = True
                continue
            return authority, issue_request, context, caller

    def issued(self, seconds: float, count: int = 1) -> None:
        self.metrics.issued(count)
        for _ in range(count):
            self.metrics.observe_issuance(seconds)

    def refused(self, error: FastcaError, request_id: str = "", call: Call | None = None) -> int:
        """Count and log a refusal; the status code to answer with."""
        name = grpc_status_of(error)
        if isinstance(error, AuthenticationFailed):
            self.metrics.authentication_failed(type(error).__name__)
            if call is not None and self.endpoint is not None:
                self.endpoint.authentication_refused(call)
            if self.monitoring is not None and call is not None:
                address = peer_ip(call.connection.peer)
                peer = str(address) if address is not None else ""
                if isinstance(error, NotOnNode):
                    self.monitoring.refused_impersonation(error.caller, error.requested, peer, error.node)
                else:
                    self.monitoring.authentication_failed(peer)
        kind = _sign_error_kind(error)
        if kind is not None:
            self.metrics.sign_error(kind)
        log.warning("request refused", code=name, reason=str(error), request_id=request_id,
                    peer=call.connection.peer if call is not None else "")
        return STATUS_CODES[name]

    def fail(self, call: Call, error: BaseException, request_id: str) -> None:
        """Answer a call with its error: a FastcaError's status and public
        message, anything else INTERNAL with a generic message (the cause goes
        to the log only)."""
        if isinstance(error, FastcaError):
            call.fail(self.refused(error, request_id, call), error.public_message)
        else:
            log.error("unexpected error", error=f"{type(error).__name__}: {error}", request_id=request_id,
                      exc_info=(type(error), error, error.__traceback__))
            call.fail(INTERNAL, "internal error")


class CreateCertificate:
    """The method handler the core calls."""

    streaming = False

    def __init__(self, service: IssuanceService) -> None:
        self._service = service

    def accepts(self, call: Call) -> bool:
        # Refused at once, before the request is read or anyone authenticated.
        if self._service.authorities.default.full:
            call.fail(RESOURCE_EXHAUSTED, Overloaded.public_message)
            return False
        return True

    def handle(self, call: Call) -> None:
        service = self._service
        request_id = new_request_id()
        service.metrics.csr_received()
        try:
            try:
                request = istio_ca_pb2.IstioCertificateRequest.FromString(call.message)
            except DecodeError:
                raise InvalidRequest("the request is not an IstioCertificateRequest message") from None
            info = request_info(call)
            caller = service.authenticators.authenticate_now(info)
            if caller is None:
                service.spawn(call, self._slowly(call, request, info, request_id))
                return
            self._admit(call, request, caller, info, request_id)
        except Exception as error:  # noqa: BLE001 - answered, never raised into the core
            service.fail(call, error, request_id)

    def _admit(self, call: Call, request: istio_ca_pb2.IstioCertificateRequest, caller: Caller,
               info: RequestInfo, request_id: str) -> None:
        metadata = metadata_strings(request.metadata)
        authority = self._service.authorities.select(metadata.get(CERT_SIGNER, ""))
        try:
            admitted = authority.admission.admit_now(
                caller, info, csr=request.csr.encode(), ttl_seconds=request.validity_duration,
                impersonate=metadata.get(IMPERSONATED_IDENTITY, ""), request_id=request_id)
        except FreshCredentialRequired:    # risk policy: the token is reviewed again, which awaits
            admitted = None
        if admitted is None:           # impersonation: the node authorizer decides, asynchronously
            self._service.spawn(call, self._slowly(call, request, info, request_id, caller))
            return
        self._submit(call, authority, admitted, request_id)

    def _submit(self, call: Call, authority: Authority, admitted: tuple[IssueRequest, IssuanceContext],
                request_id: str) -> None:
        started = call.started

        def answer(outcome: Outcome) -> None:
            if isinstance(outcome, FastcaError):
                self._service.fail(call, outcome, request_id)
                return
            call.respond(istio_ca_pb2.IstioCertificateResponse(cert_chain=outcome.chain).SerializeToString())
            self._service.issued(time.monotonic() - started)

        ticket = authority.submit_then(admitted[0], admitted[1], answer)
        call.on_cancel = ticket.abandon

    async def _slowly(self, call: Call, request: istio_ca_pb2.IstioCertificateRequest, info: RequestInfo,
                      request_id: str, caller: Caller | None = None) -> None:
        try:
            if caller is None:
                caller = await self._service.authenticators.authenticate(info)
            authority, issue_request, context, _ = await self._service.admit(request, caller, info, request_id)
            if not call.closed:
                self._submit(call, authority, (issue_request, context), request_id)
        except Exception as error:  # noqa: BLE001 - answered, never raised into the loop
            self._service.fail(call, error, request_id)

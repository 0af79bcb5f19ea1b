"""istio.v1.auth.IstioCertificateService/CreateCertificate.

Thin: decode, authenticate, hand the request to the Authority its
``CertSigner`` selects (admission and everything after happen there), then
map errors to the contract's status codes. The CSR is not looked at before
the caller is authenticated and admitted (docs/reliability.md, case 1).
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from fastca.audit.record import IssuanceContext, IssuanceRecord
from fastca.authn.caller import Caller, RequestInfo
from fastca.authn.chain import AuthenticatorChain
from fastca.authority import Authorities, Authority, IssuedCertificate, IssueRequest
from fastca.errors import (
    AuthenticationFailed,
    CANotReady,
    CANotValid,
    FastcaError,
    InvalidRequest,
    InvalidTTL,
    SigningFailed,
    grpc_status_of,
)
from fastca.frontend.context import request_info
from fastca.observability.logging import enter_request, get_logger, leave_request, log_many, new_request_id
from fastca.proto import istio_ca_pb2, istio_ca_pb2_grpc

__all__ = ["IssuanceService", "log_recorded", "IstioCertificateServicer", "SERVICE", "METHOD",
           "metadata_strings"]

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = "CreateCertificate"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
CERT_SIGNER = "CertSigner"
_MAX_METADATA_FIELDS = 16
_MAX_METADATA_VALUE_BYTES = 4096

log = get_logger("fastca.frontend")


def metadata_strings(struct: Any) -> dict[str, str]:
    """The Struct's string values. Agents send only strings; anything else
    (nested structs, lists, numbers) is refused before any CSR parsing."""
    fields = struct.fields
    if len(fields) > _MAX_METADATA_FIELDS:
        raise InvalidRequest(f"metadata has {len(fields)} fields; at most {_MAX_METADATA_FIELDS} are accepted")
    out: dict[str, str] = {}
    for key, value in fields.items():
        if value.WhichOneof("kind") != "string_value":
            raise InvalidRequest(f"metadata value {key!r} must be a string")
        if len(value.string_value) > _MAX_METADATA_VALUE_BYTES:
            raise InvalidRequest(f"metadata value {key!r} is too long")
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
    """One "certificate issued" line per recorded certificate (the batcher's
    ``on_recorded``: called once per committed batch, off the event loop)."""
    log_many("fastca.frontend", "info", "certificate issued", [
        {"request_id": r.request_id, "peer": r.peer, "identity": r.identity, "serial": r.serial, "signer": r.signer,
         "credential": r.credential_type, "not_after": r.not_after.isoformat()} for r in records])


class IssuanceService:
    """What every certificate RPC does around the Authority, shared by the
    Istio servicer (one request per call) and the bulk servicer (many)."""

    def __init__(self, *, authenticators: AuthenticatorChain, authorities: Authorities, metrics: Any) -> None:
        self._authenticators = authenticators
        self.authorities = authorities
        self.metrics = metrics

    async def authenticate(self, context: grpc.aio.ServicerContext) -> tuple[Caller, RequestInfo]:
        info = request_info(context)
        return await self._authenticators.authenticate(info), info

    async def admit(self, request: istio_ca_pb2.IstioCertificateRequest, caller: Caller, info: RequestInfo,
                    request_id: str) -> tuple[Authority, IssueRequest, IssuanceContext]:
        """The Authority the request's CertSigner names, and its admission verdict."""
        self.metrics.csr_received()
        metadata = metadata_strings(request.metadata)
        authority = self.authorities.select(metadata.get(CERT_SIGNER, ""))
        issue_request, context = await authority.admit(
            caller, info, csr=request.csr.encode(), ttl_seconds=request.validity_duration,
            impersonate=metadata.get(IMPERSONATED_IDENTITY, ""), request_id=request_id)
        return authority, issue_request, context

    async def issue(self, request: istio_ca_pb2.IstioCertificateRequest, caller: Caller, info: RequestInfo,
                    request_id: str) -> IssuedCertificate:
        """Admission, then issuance. The Authority returns the certificate only
        once its audit record is committed (and the "certificate issued" line
        is logged then, by log_recorded)."""
        started = time.perf_counter()
        authority, issue_request, context = await self.admit(request, caller, info, request_id)
        issued = await authority.issue_admitted(issue_request, context)
        self.issued(time.perf_counter() - started)
        return issued

    def issued(self, seconds: float, count: int = 1) -> None:
        self.metrics.issued(count)
        for _ in range(count):
            self.metrics.observe_issuance(seconds)

    def rpc(self, context: grpc.aio.ServicerContext, service: str, method: str) -> _Rpc:
        """``async with service.rpc(context, SERVICE, METHOD) as request_id:``
        one call: a request id bound to its logs, a refusal turned into its
        status and public message, and the call counted either way."""
        return _Rpc(self, context, service, method)

    def refused(self, error: FastcaError) -> str:
        """Count and log a refusal; the gRPC status name to answer with."""
        code = grpc_status_of(error)
        if isinstance(error, AuthenticationFailed):
            self.metrics.authentication_failed(type(error).__name__)
        kind = _sign_error_kind(error)
        if kind is not None:
            self.metrics.sign_error(kind)
        log.warning("request refused", code=code, reason=str(error))
        return code


class _Rpc:
    """IssuanceService.rpc's context manager (a class: it runs on every call,
    and a generator-based one costs several times as much)."""

    __slots__ = ("_binding", "_context", "_method", "_service", "_service_name", "_started")

    def __init__(self, service: IssuanceService, context: grpc.aio.ServicerContext, service_name: str,
                 method: str) -> None:
        self._service = service
        self._context = context
        self._service_name = service_name
        self._method = method

    async def __aenter__(self) -> str:
        self._started = time.perf_counter()
        request_id = new_request_id()
        self._binding = enter_request(request_id, self._context.peer(), self._method)
        return request_id

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: Any) -> None:
        code = "OK"
        try:
            if isinstance(error, FastcaError):
                code = self._service.refused(error)
                await self._context.abort(getattr(grpc.StatusCode, code), error.public_message)
            elif isinstance(error, Exception):
                # A bug: the client gets INTERNAL and a generic message, never
                # the exception's text; the log gets the traceback.
                code = "INTERNAL"
                log.error("unexpected error", error=f"{type(error).__name__}: {error}",
                          exc_info=(kind, error, _tb))
                await self._context.abort(grpc.StatusCode.INTERNAL, "internal error")
            elif error is not None:
                code = "CANCELLED"
        finally:
            self._service.metrics.request_finished(self._service_name, self._method, code,
                                                   time.perf_counter() - self._started)
            leave_request(self._binding)


class IstioCertificateServicer(istio_ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self, service: IssuanceService) -> None:
        self._service = service

    async def CreateCertificate(self, request: istio_ca_pb2.IstioCertificateRequest,  # noqa: N802 - gRPC name
                                context: grpc.aio.ServicerContext) -> istio_ca_pb2.IstioCertificateResponse:
        async with self._service.rpc(context, SERVICE, METHOD) as request_id:
            try:
                caller, info = await self._service.authenticate(context)
            except AuthenticationFailed:
                self._service.metrics.csr_received()    # Istio counts the CSR even when auth fails
                raise
            issued = await self._service.issue(request, caller, info, request_id)
            return istio_ca_pb2.IstioCertificateResponse(cert_chain=list(issued.chain))

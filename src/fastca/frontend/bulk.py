"""fastca.v1.BulkCertificateService/CreateCertificates: many Istio requests
in one call, for node agents that renew many workloads at once.

The caller authenticates once; each element then goes through exactly the
admission a CreateCertificate call does (signer, impersonation, identity,
policy). The admitted elements go to their Authority in one submission, so
they reach the native core together, are recorded in the audit log
together, and cost the event loop one wake-up per batch rather than one per
certificate. An element that fails carries its own status; the others are
unaffected. Every element spends its identity's rate limit, as a call of
its own would, and a call holds at most ``max_requests`` elements
(``[server] max_bulk_requests``, 100 by default). A bulk call runs in a
task of its own (it is rare and large).
"""

from __future__ import annotations

import asyncio
import time

from google.protobuf.message import DecodeError

from fastca.audit.record import IssuanceContext
from fastca.authority import Authority, IssueRequest, Outcome
from fastca.errors import FastcaError, InvalidRequest
from fastca.frontend._grpc import RESOURCE_EXHAUSTED, Call
from fastca.frontend.context import request_info
from fastca.frontend.istio_ca import IssuanceService
from fastca.observability.logging import new_request_id
from fastca.proto import bulk_pb2

__all__ = ["BULK_METHOD", "BULK_SERVICE", "MAX_BULK_REQUESTS", "CreateCertificates"]

BULK_SERVICE = "fastca.v1.BulkCertificateService"
BULK_METHOD = "CreateCertificates"
MAX_BULK_REQUESTS = 100


class CreateCertificates:
    streaming = False

    def __init__(self, service: IssuanceService, *, max_requests: int = MAX_BULK_REQUESTS) -> None:
        self._service = service
        self.max_requests = max_requests

    def accepts(self, call: Call) -> bool:
        if self._service.authorities.default.full:
            call.fail(RESOURCE_EXHAUSTED, "server overloaded, retry later")
            return False
        return True

    def handle(self, call: Call) -> None:
        self._service.spawn(call, self._run(call, new_request_id()))

    async def _run(self, call: Call, request_id: str) -> None:
        service = self._service
        try:
            try:
                request = bulk_pb2.BulkCertificateRequest.FromString(call.message)
            except DecodeError:
                raise InvalidRequest("the request is not a BulkCertificateRequest message") from None
            if len(request.requests) > self.max_requests:
                raise InvalidRequest(f"{len(request.requests)} requests in one bulk call; at most "
                                     f"{self.max_requests} are accepted: split them into several calls")
            info = request_info(call)
            caller = await service.authenticators.authenticate(info)
            started = time.perf_counter()
            outcomes: list[Outcome | None] = []   # None: admitted, not issued yet
            by_authority: dict[Authority, list[tuple[int, IssueRequest, IssuanceContext]]] = {}
            for index, element in enumerate(request.requests):
                service.metrics.csr_received()
                try:
                    authority, issue_request, issue_context, caller = await service.admit(
                        element, caller, info, f"{request_id}.{index}")
                except FastcaError as error:
                    outcomes.append(error)
                    continue
                outcomes.append(None)
                by_authority.setdefault(authority, []).append((index, issue_request, issue_context))

            async def issue_group(authority: Authority,
                                  group: list[tuple[int, IssueRequest, IssuanceContext]]) -> None:
                results = await authority.issue_many_admitted([(issue_request, ctx) for _, issue_request, ctx in group])
                for (index, _, _), result in zip(group, results):
                    outcomes[index] = result

            await asyncio.gather(*(issue_group(a, group) for a, group in by_authority.items()))
            elapsed = time.perf_counter() - started
            results = []
            for outcome in outcomes:
                assert outcome is not None
                if isinstance(outcome, FastcaError):
                    results.append(bulk_pb2.BulkCertificateResult(code=service.refused(outcome, request_id),
                                                                  message=outcome.public_message))
                else:
                    results.append(bulk_pb2.BulkCertificateResult(code=0, cert_chain=outcome.chain))
            issued = sum(1 for result in results if result.code == 0)
            if issued:
                service.issued(elapsed, issued)
            call.respond(bulk_pb2.BulkCertificateResponse(results=results).SerializeToString())
        except Exception as error:  # noqa: BLE001 - answered, never raised into the loop
            service.fail(call, error, request_id)

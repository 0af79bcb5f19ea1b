"""fastca.v1.BulkCertificateService/CreateCertificates: many Istio requests
in one call, for node agents that renew many workloads at once.

The caller authenticates once; each element then goes through exactly the
admission a CreateCertificate call does (signer, impersonation, identity,
policy). The admitted elements go to their Authority in one submission, so
they reach the native core together, are recorded in the audit log
together, and cost the event loop one wake-up per batch rather than one per
certificate. An element that fails carries its own status; the others are
unaffected.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from fastca.audit.record import IssuanceContext
from fastca.authority import Authority, IssueRequest, Outcome
from fastca.errors import FastcaError, InvalidRequest
from fastca.frontend.istio_ca import IssuanceService
from fastca.proto import bulk_pb2, bulk_pb2_grpc

__all__ = ["BULK_METHOD", "BULK_SERVICE", "MAX_BULK_REQUESTS", "BulkCertificateServicer"]

BULK_SERVICE = "fastca.v1.BulkCertificateService"
BULK_METHOD = "CreateCertificates"
MAX_BULK_REQUESTS = 1000


class BulkCertificateServicer(bulk_pb2_grpc.BulkCertificateServiceServicer):
    def __init__(self, service: IssuanceService) -> None:
        self._service = service

    async def CreateCertificates(self, request: bulk_pb2.BulkCertificateRequest,  # noqa: N802 - gRPC name
                                 context: grpc.aio.ServicerContext) -> bulk_pb2.BulkCertificateResponse:
        service = self._service
        async with service.rpc(context, BULK_SERVICE, BULK_METHOD) as request_id:
            if len(request.requests) > MAX_BULK_REQUESTS:
                raise InvalidRequest(f"{len(request.requests)} requests in one call; at most "
                                     f"{MAX_BULK_REQUESTS} are accepted")
            caller, info = await service.authenticate(context)
            started = time.perf_counter()
            outcomes: list[Outcome | None] = []   # None: admitted, not issued yet
            by_authority: dict[Authority, list[tuple[int, IssueRequest, IssuanceContext]]] = {}
            for index, element in enumerate(request.requests):
                try:
                    authority, issue_request, issue_context = await service.admit(
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
                    status = getattr(grpc.StatusCode, service.refused(outcome))
                    results.append(bulk_pb2.BulkCertificateResult(code=status.value[0],
                                                                  message=outcome.public_message))
                else:
                    results.append(bulk_pb2.BulkCertificateResult(code=0, cert_chain=list(outcome.chain)))
            issued = sum(1 for result in results if result.code == 0)
            if issued:
                service.issued(elapsed, issued)
            return bulk_pb2.BulkCertificateResponse(results=results)

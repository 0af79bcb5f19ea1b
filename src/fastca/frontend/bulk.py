"""fastca.v1.BulkCertificateService/CreateCertificates: many Istio requests
in one call, for node agents that renew many workloads at once.

The caller authenticates once; each element then goes through exactly the
stages a CreateCertificate call does (signer, impersonation, identity,
policy, issuance, audit), concurrently, so the batcher hands them to the
native core together. An element that fails carries its own status; the
others are unaffected.
"""

from __future__ import annotations

import asyncio

import grpc

from fastca.errors import FastcaError, InvalidRequest
from fastca.frontend._proto import bulk_pb2, bulk_pb2_grpc
from fastca.frontend.istio_ca import IssuanceService

__all__ = ["BulkCertificateServicer", "BULK_SERVICE", "BULK_METHOD", "MAX_BULK_REQUESTS"]

BULK_SERVICE = "fastca.v1.BulkCertificateService"
BULK_METHOD = "CreateCertificates"
MAX_BULK_REQUESTS = 1000


class BulkCertificateServicer(bulk_pb2_grpc.BulkCertificateServiceServicer):
    def __init__(self, service: IssuanceService) -> None:
        self._service = service

    async def CreateCertificates(self, request: bulk_pb2.BulkCertificateRequest,  # noqa: N802 - gRPC name
                                 context: grpc.aio.ServicerContext) -> bulk_pb2.BulkCertificateResponse:
        async with self._service.rpc(context, BULK_SERVICE, BULK_METHOD) as request_id:
            if len(request.requests) > MAX_BULK_REQUESTS:
                raise InvalidRequest(f"{len(request.requests)} requests in one call; at most "
                                     f"{MAX_BULK_REQUESTS} are accepted")
            caller, info = await self._service.authenticate(context)

            async def one(index: int, element) -> bulk_pb2.BulkCertificateResult:
                try:
                    issued = await self._service.issue(element, caller, info, f"{request_id}.{index}")
                except FastcaError as error:
                    status = self._service.refused(error)
                    return bulk_pb2.BulkCertificateResult(code=getattr(grpc.StatusCode, status).value[0],
                                                          message=error.public_message)
                return bulk_pb2.BulkCertificateResult(code=0, cert_chain=list(issued.chain))

            results = await asyncio.gather(*(one(i, e) for i, e in enumerate(request.requests)))
            return bulk_pb2.BulkCertificateResponse(results=results)

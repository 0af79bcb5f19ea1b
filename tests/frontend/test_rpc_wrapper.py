"""IssuanceService.rpc, the wrapper every call runs in, on a real grpc.aio
server over loopback: a refusal becomes its status and public message, a bug
becomes INTERNAL without its text, and every call is counted with its code."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from fastca.authn.chain import AuthenticatorChain
from fastca.errors import InvalidRequest
from fastca.frontend.istio_ca import IssuanceService
from fastca.observability.logging import current_request_id
from fastca.observability.metrics import Metrics

SECRET_DETAIL = "internal detail that must not reach the client"


async def _call(behaviour: str) -> tuple[grpc.StatusCode, str, Metrics, list[str | None]]:
    metrics = Metrics()
    # The wrapper never reaches an Authority: none is needed here.
    service = IssuanceService(authenticators=AuthenticatorChain([]), authorities=None, metrics=metrics)
    seen_ids: list[str | None] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with service.rpc(context, "test.Service", "Do") as request_id:
            seen_ids.append(request_id if current_request_id() == request_id else None)
            if behaviour == "refuse":
                raise InvalidRequest(SECRET_DETAIL, public_message="bad request")
            if behaviour == "bug":
                raise KeyError(SECRET_DETAIL)
            return b"done"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Service", {
        "Do": grpc.unary_unary_rpc_method_handler(handler)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                await channel.unary_unary("/test.Service/Do")(b"", timeout=10)
                code, message = grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as error:
                code, message = error.code(), error.details() or ""
    finally:
        await server.stop(0)
    return code, message, metrics, seen_ids


def _handled(metrics: Metrics, code: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith("grpc_server_handled") and f'grpc_code="{code}"' in line and 'grpc_method="Do"' in line:
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize(("behaviour", "code", "message"), [
    ("ok", grpc.StatusCode.OK, ""),
    ("refuse", grpc.StatusCode.INVALID_ARGUMENT, "bad request"),
    ("bug", grpc.StatusCode.INTERNAL, "internal error"),
])
def test_each_outcome_is_answered_and_counted(behaviour, code, message):
    got_code, got_message, metrics, seen_ids = asyncio.run(_call(behaviour))
    assert (got_code, got_message) == (code, message)
    assert SECRET_DETAIL not in got_message
    assert _handled(metrics, code.name) == 1.0
    assert len(seen_ids) == 1 and seen_ids[0] is not None and len(seen_ids[0]) == 16   # bound for the logs
    assert current_request_id() is None

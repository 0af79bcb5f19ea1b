"""The native echo core behind bench/front_end_floor.py is a real gRPC
server: grpcio's own client, over TLS with ALPN h2, gets the response on
one connection call after call, including requests that span several
HTTP/2 DATA frames. Without that, its per-call floor would mean nothing."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from bench.front_end_floor import EchoServer

from fastca.proto import istio_ca_pb2, istio_ca_pb2_grpc

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["native", "grpc-aio"])
def test_echo_servers_answer_a_grpcio_client(kind, tmp_path):
    with EchoServer(kind, tmp_path) as server:
        async def calls():
            credentials = grpc.ssl_channel_credentials(server.root_pem)
            async with grpc.aio.secure_channel(server.address, credentials,
                                               options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
                stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(channel)
                small = istio_ca_pb2.IstioCertificateRequest(csr="x" * 100, validity_duration=60)
                # 40 KB: more than two DATA frames at HTTP/2's default 16 KB frame size.
                large = istio_ca_pb2.IstioCertificateRequest(csr="y" * 40_000, validity_duration=60)
                return [await stub.CreateCertificate(request, metadata=(("authorization", "Bearer t"),), timeout=10)
                        for request in (small, large, small)]

        responses = asyncio.run(calls())
    pem = server.root_pem.decode()
    assert [list(r.cert_chain) for r in responses] == [[pem, pem, pem]] * 3


def test_a_request_that_is_not_a_request_fails_the_call_not_the_server(tmp_path):
    with EchoServer("native", tmp_path) as server:
        async def calls():
            credentials = grpc.ssl_channel_credentials(server.root_pem)
            async with grpc.aio.secure_channel(server.address, credentials,
                                               options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
                garbage = channel.unary_unary("/istio.v1.auth.IstioCertificateService/CreateCertificate",
                                              request_serializer=lambda raw: raw,
                                              response_deserializer=lambda raw: raw)
                with pytest.raises(grpc.aio.AioRpcError):
                    await garbage(b"\xff\xff\xff", timeout=10)
            async with grpc.aio.secure_channel(server.address, credentials,
                                               options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
                stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(channel)
                return await stub.CreateCertificate(istio_ca_pb2.IstioCertificateRequest(csr="x"), timeout=10)

        response = asyncio.run(calls())
    assert len(response.cert_chain) == 3

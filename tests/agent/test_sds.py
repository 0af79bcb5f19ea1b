"""The SDS server on a real Unix socket, driven by a real gRPC client the way
Envoy drives it; the secret manager is replaced by an in-memory source."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from fastca.agent._sds_messages import combined_version, pack
from fastca.agent.sds import SECRET_TYPE_URL, SdsServer
from fastca.agent.secrets import ROOT_CERT, WORKLOAD_CERT, SecretItem
from fastca.errors import ConfigurationError
from tests.agent._fake_source import FakeSource, root_item, tls_item

WAIT = 5.0      # bound on anything that should happen
QUIET = 0.3     # how long "nothing more arrives" is watched
NODE = base_pb2.Node(id="sidecar~10.0.0.7~web-0.prod~prod.svc.cluster.local", cluster="web.prod")


def sotw(*names: str, nonce: str = "", version: str = "", error: str | None = None,
         type_url: str = SECRET_TYPE_URL) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(node=NODE, type_url=type_url, resource_names=names,
                                             response_nonce=nonce, version_info=version)
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def ack(response: discovery_pb2.DiscoveryResponse, *names: str) -> discovery_pb2.DiscoveryRequest:
    return sotw(*names, nonce=response.nonce, version=response.version_info)


def delta(subscribe: tuple[str, ...] = (), unsubscribe: tuple[str, ...] = (), *, nonce: str = "",
          initial: dict[str, str] | None = None, error: str | None = None,
          type_url: str = SECRET_TYPE_URL) -> discovery_pb2.DeltaDiscoveryRequest:
    request = discovery_pb2.DeltaDiscoveryRequest(
        node=NODE, type_url=type_url, resource_names_subscribe=subscribe,
        resource_names_unsubscribe=unsubscribe, response_nonce=nonce, initial_resource_versions=initial or {})
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def secrets_of(response: discovery_pb2.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    out = {}
    for packed in response.resources:
        assert packed.type_url == SECRET_TYPE_URL
        secret = secret_pb2.Secret()
        assert packed.Unpack(secret)
        out[secret.name] = secret
    return out


def delta_secrets_of(response: discovery_pb2.DeltaDiscoveryResponse) -> dict[str, tuple[str, secret_pb2.Secret]]:
    out = {}
    for resource in response.resources:
        secret = secret_pb2.Secret()
        assert resource.resource.Unpack(secret)
        assert secret.name == resource.name
        out[resource.name] = (resource.version, secret)
    return out


def assert_tls(secret: secret_pb2.Secret, item: SecretItem) -> None:
    assert secret.name == item.name
    assert secret.WhichOneof("type") == "tls_certificate"
    assert secret.tls_certificate.certificate_chain.inline_bytes == item.certificate_chain
    assert secret.tls_certificate.private_key.inline_bytes == item.private_key


def assert_root(secret: secret_pb2.Secret, item: SecretItem) -> None:
    assert secret.name == item.name
    assert secret.WhichOneof("type") == "validation_context"
    assert secret.validation_context.trusted_ca.inline_bytes == item.trusted_ca


class Stream:
    """A bidirectional call with a pump task reading responses into a queue,
    so every wait is a bounded wait on the queue, never on the call."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._responses: asyncio.Queue[Any] = asyncio.Queue()
        self._pump_task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    self._responses.put_nowait(grpc.aio.EOF)
                    return
                self._responses.put_nowait(response)
        except grpc.aio.AioRpcError as error:
            self._responses.put_nowait(error)
        except asyncio.CancelledError:
            pass

    async def send(self, request: Any) -> None:
        await asyncio.wait_for(self.call.write(request), WAIT)

    async def next(self, timeout: float = WAIT) -> Any:
        response = await asyncio.wait_for(self._responses.get(), timeout)
        if isinstance(response, grpc.aio.AioRpcError):
            raise response
        assert response is not grpc.aio.EOF, "stream ended"
        return response

    async def request(self, request: Any) -> Any:
        await self.send(request)
        return await self.next()

    async def quiet(self, timeout: float = QUIET) -> None:
        with pytest.raises(asyncio.TimeoutError):
            extra = await asyncio.wait_for(self._responses.get(), timeout)
            pytest.fail(f"unexpected response: {extra}")

    async def end(self) -> Any:
        """The stream's end: EOF or the error that ended it."""
        return await asyncio.wait_for(self._responses.get(), WAIT)

    async def cancel(self) -> None:
        self.call.cancel()
        self._pump_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._pump_task, WAIT)


class Env:
    def __init__(self, server: SdsServer, channel: grpc.aio.Channel, path: Path) -> None:
        self.server = server
        self.channel = channel
        self.path = path
        self.stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        self.streams: list[Stream] = []

    def stream(self) -> Stream:
        self.streams.append(Stream(self.stub.StreamSecrets()))
        return self.streams[-1]

    def delta(self) -> Stream:
        self.streams.append(Stream(self.stub.DeltaSecrets()))
        return self.streams[-1]


@contextlib.asynccontextmanager
async def serving(source: FakeSource, path: Path | None = None) -> AsyncIterator[Env]:
    with tempfile.TemporaryDirectory(prefix="sds") as directory:
        path = path or Path(directory) / "run" / "socket"
        server = SdsServer(source, socket_path=path)
        await asyncio.wait_for(server.start(), WAIT)
        channel = grpc.aio.insecure_channel(f"unix:{path}")
        env = Env(server, channel, path)
        try:
            yield env
        finally:
            for stream in env.streams:
                await stream.cancel()
            await asyncio.wait_for(channel.close(), WAIT)
            await asyncio.wait_for(server.stop(0), WAIT)


async def eventually(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


def run(coroutine: Any) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 30))


# -- StreamSecrets ----------------------------------------------------------


def test_stream_serves_workload_certificate_and_ack_sends_nothing() -> None:
    async def body() -> None:
        item = tls_item(version="v1")
        source = FakeSource(item, root_item())
        async with serving(source) as env:
            s = env.stream()
            first = await s.request(sotw(WORKLOAD_CERT))
            assert first.type_url == SECRET_TYPE_URL
            assert first.version_info == "v1" and first.nonce
            got = secrets_of(first)
            assert list(got) == [WORKLOAD_CERT]
            assert_tls(got[WORKLOAD_CERT], item)
            await s.send(ack(first, WORKLOAD_CERT))
            await s.quiet()
            assert env.server.pushes == {WORKLOAD_CERT: 1}
            assert env.server.active_streams == 1
            assert source.get_calls[WORKLOAD_CERT] == 1
    run(body())


def test_stream_serves_root_bundle() -> None:
    async def body() -> None:
        roots = root_item(version="r1")
        async with serving(FakeSource(tls_item(), roots)) as env:
            s = env.stream()
            first = await s.request(sotw(ROOT_CERT, type_url=""))   # an unset type_url is accepted
            assert first.version_info == "r1"
            assert_root(secrets_of(first)[ROOT_CERT], roots)
            await s.send(ack(first, ROOT_CERT))
            await s.quiet()
    run(body())


def test_stream_with_both_names_pushes_changes_of_either() -> None:
    async def body() -> None:
        cert, roots = tls_item(version="c1"), root_item(version="r1")
        source = FakeSource(cert, roots)
        async with serving(source) as env:
            s = env.stream()
            first = await s.request(sotw(WORKLOAD_CERT, ROOT_CERT))
            got = secrets_of(first)
            assert_tls(got[WORKLOAD_CERT], cert)
            assert_root(got[ROOT_CERT], roots)
            assert first.version_info == combined_version([cert, roots])
            await s.send(ack(first, WORKLOAD_CERT, ROOT_CERT))
            await s.quiet()

            roots2 = root_item(version="r2")
            source.set(roots2)
            pushed = await s.next()
            assert pushed.nonce != first.nonce and pushed.version_info != first.version_info
            got = secrets_of(pushed)
            assert_root(got[ROOT_CERT], roots2)
            assert_tls(got[WORKLOAD_CERT], cert)
            assert env.server.pushes == {WORKLOAD_CERT: 2, ROOT_CERT: 2}
    run(body())


def test_stream_pushes_a_change_without_being_asked() -> None:
    async def body() -> None:
        source = FakeSource(tls_item(version="1"), root_item())
        async with serving(source) as env:
            s = env.stream()
            first = await s.request(sotw(WORKLOAD_CERT))
            await s.send(ack(first, WORKLOAD_CERT))

            source.notify(ROOT_CERT)                 # not subscribed here
            source.notify(WORKLOAD_CERT)             # same version: nothing new
            await s.quiet()

            rotated = tls_item(version="2")
            source.set(rotated)
            pushed = await s.next()
            assert pushed.version_info == "2" and pushed.nonce not in ("", first.nonce)
            assert_tls(secrets_of(pushed)[WORKLOAD_CERT], rotated)
            await s.send(ack(pushed, WORKLOAD_CERT))
            await s.quiet()
            assert env.server.nacks == 0
    run(body())


def test_stream_nack_is_not_answered_and_the_next_change_is_pushed() -> None:
    async def body() -> None:
        source = FakeSource(tls_item(version="1"))
        async with serving(source) as env:
            s = env.stream()
            first = await s.request(sotw(WORKLOAD_CERT))
            await s.send(sotw(WORKLOAD_CERT, nonce=first.nonce, version="", error="bad key"))
            await s.quiet()
            await eventually(lambda: env.server.nacks == 1)
            # Envoy repeats its subscription with the last good version: still no loop.
            await s.send(sotw(WORKLOAD_CERT, nonce=first.nonce, version="", error="bad key"))
            await s.quiet()
            await eventually(lambda: env.server.nacks == 2)
            assert env.server.pushes[WORKLOAD_CERT] == 1

            source.set(tls_item(version="2"))
            pushed = await s.next()
            assert pushed.version_info == "2"
            await s.send(ack(pushed, WORKLOAD_CERT))
            await s.quiet()
    run(body())


def test_stream_waits_for_an_unavailable_secret() -> None:
    async def body() -> None:
        source = FakeSource()
        async with serving(source) as env:
            s = env.stream()
            await s.send(sotw(WORKLOAD_CERT))
            await s.quiet()
            assert source.get_calls[WORKLOAD_CERT] == 1      # asked once, not polled

            item = tls_item(version="late")
            source.set(item)
            arrived = await s.next()
            assert arrived.version_info == "late"
            assert_tls(secrets_of(arrived)[WORKLOAD_CERT], item)
    run(body())


def test_stream_sends_what_is_available_of_several_names() -> None:
    async def body() -> None:
        cert = tls_item()
        source = FakeSource(cert)
        async with serving(source) as env:
            s = env.stream()
            first = await s.request(sotw(WORKLOAD_CERT, ROOT_CERT))
            assert list(secrets_of(first)) == [WORKLOAD_CERT]
            await s.send(ack(first, WORKLOAD_CERT, ROOT_CERT))
            await s.quiet()

            source.set(root_item())
            both = await s.next()
            assert set(secrets_of(both)) == {WORKLOAD_CERT, ROOT_CERT}

            # Gone at the source: the stream keeps what it had and sends nothing.
            source.remove(ROOT_CERT, notify=True)
            await s.quiet()
    run(body())


def test_stream_ignores_a_stale_nonce() -> None:
    async def body() -> None:
        source = FakeSource(tls_item(version="1"), root_item())
        async with serving(source) as env:
            s = env.stream()
            first = await s.request(sotw(WORKLOAD_CERT))
            source.set(tls_item(version="2"))
            second = await s.next()
            # A late ACK of the first response, naming a new resource: ignored whole.
            await s.send(sotw(WORKLOAD_CERT, ROOT_CERT, nonce=first.nonce, version="1"))
            await s.quiet()
            assert source.get_calls[ROOT_CERT] == 0
            # The same subscription with the current nonce is honoured.
            third = await s.request(sotw(WORKLOAD_CERT, ROOT_CERT, nonce=second.nonce, version="2"))
            assert set(secrets_of(third)) == {WORKLOAD_CERT, ROOT_CERT}
    run(body())


def test_stream_subscription_change_releases_dropped_names() -> None:
    async def body() -> None:
        source = FakeSource(tls_item(), root_item())
        async with serving(source) as env:
            s = env.stream()
            first = await s.request(sotw(WORKLOAD_CERT, ROOT_CERT))
            await s.send(ack(first, WORKLOAD_CERT))          # ROOTCA dropped
            await s.quiet()                                   # default unchanged: nothing to send
            await eventually(lambda: source.released == [ROOT_CERT])
            source.set(root_item(version="2"))                # no longer this stream's business
            await s.quiet()
    run(body())


def test_unknown_resource_names_go_to_the_source() -> None:
    async def body() -> None:
        name = "file-cert:/etc/certs/cert-chain.pem~/etc/certs/key.pem"
        source = FakeSource()
        async with serving(source) as env:
            s = env.stream()
            await s.send(sotw("no-such-thing", name))
            await s.quiet()
            assert source.get_calls["no-such-thing"] == 1 and source.get_calls[name] == 1
            item = tls_item(name=name, version="d1")
            source.set(item)
            got = await s.next()
            assert list(secrets_of(got)) == [name]
            assert_tls(secrets_of(got)[name], item)
    run(body())


def test_streams_are_independent_and_release_on_last_disconnect() -> None:
    async def body() -> None:
        source = FakeSource(tls_item(version="1"))
        async with serving(source) as env:
            a, b = env.stream(), env.stream()
            first_a = await a.request(sotw(WORKLOAD_CERT))
            first_b = await b.request(sotw(WORKLOAD_CERT))
            assert first_a.nonce != first_b.nonce
            await a.send(ack(first_a, WORKLOAD_CERT))
            await b.send(sotw(WORKLOAD_CERT, nonce=first_b.nonce, error="nope"))
            await eventually(lambda: env.server.nacks == 1)

            source.set(tls_item(version="2"))
            assert (await a.next()).version_info == "2"
            assert (await b.next()).version_info == "2"
            assert env.server.active_streams == 2

            await a.cancel()
            await eventually(lambda: source.unsubscribes == 1 and env.server.active_streams == 1)
            assert source.released == []                 # b still needs it
            source.set(tls_item(version="3"))
            assert (await b.next()).version_info == "3"

            await b.cancel()
            await eventually(lambda: source.unsubscribes == 2 and env.server.active_streams == 0)
            assert source.released == [WORKLOAD_CERT]
            assert source.listeners == []
    run(body())


def test_disconnect_during_a_slow_fetch_cleans_up() -> None:
    async def body() -> None:
        source = FakeSource(tls_item())
        source.gate = asyncio.Event()
        async with serving(source) as env:
            s = env.stream()
            await s.send(sotw(WORKLOAD_CERT))
            await eventually(lambda: source.get_calls[WORKLOAD_CERT] == 1)
            await s.cancel()
            await eventually(lambda: source.released == [WORKLOAD_CERT] and source.unsubscribes == 1)
            assert env.server.active_streams == 0
            source.gate.set()
    run(body())


def test_stream_rejects_a_wrong_type_url() -> None:
    async def body() -> None:
        async with serving(FakeSource(tls_item())) as env:
            s = env.stream()
            await s.send(sotw(WORKLOAD_CERT, type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await s.next()
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "Cluster" in error.value.details()
            await eventually(lambda: env.server.active_streams == 0)
    run(body())


def test_stop_ends_open_streams_cleanly() -> None:
    async def body() -> None:
        source = FakeSource(tls_item())
        async with serving(source) as env:
            s = env.stream()
            await s.request(sotw(WORKLOAD_CERT))
            await asyncio.wait_for(env.server.stop(5), WAIT)
            assert await s.end() is grpc.aio.EOF
            assert await asyncio.wait_for(s.call.code(), WAIT) == grpc.StatusCode.OK
            assert source.released == [WORKLOAD_CERT] and source.listeners == []
            assert not env.path.exists()
    run(body())


# -- DeltaSecrets -------------------------------------------------------------


def test_delta_sends_only_what_changed_and_removals() -> None:
    async def body() -> None:
        cert, roots = tls_item(version="c1"), root_item(version="r1")
        source = FakeSource(cert, roots)
        async with serving(source) as env:
            d = env.delta()
            first = await d.request(delta((WORKLOAD_CERT, ROOT_CERT)))
            assert first.type_url == SECRET_TYPE_URL and first.nonce and first.system_version_info
            got = delta_secrets_of(first)
            assert got[WORKLOAD_CERT][0] == "c1" and got[ROOT_CERT][0] == "r1"
            assert_tls(got[WORKLOAD_CERT][1], cert)
            assert_root(got[ROOT_CERT][1], roots)
            assert list(first.removed_resources) == []
            await d.send(delta(nonce=first.nonce))                     # ACK
            await d.quiet()

            cert2 = tls_item(version="c2")
            source.set(cert2)
            changed = await d.next()
            got = delta_secrets_of(changed)
            assert list(got) == [WORKLOAD_CERT] and got[WORKLOAD_CERT][0] == "c2"
            assert_tls(got[WORKLOAD_CERT][1], cert2)
            await d.send(delta(nonce=changed.nonce))
            await d.quiet()

            removal = await d.request(delta(unsubscribe=(ROOT_CERT,), nonce=changed.nonce))
            assert list(removal.removed_resources) == [ROOT_CERT] and len(removal.resources) == 0
            await eventually(lambda: source.released == [ROOT_CERT])
            source.set(root_item(version="r2"))                         # not subscribed any more
            await d.quiet()

            # Re-subscribing sends it again, even at a version sent before.
            back = await d.request(delta((ROOT_CERT,), nonce=removal.nonce))
            assert list(delta_secrets_of(back)) == [ROOT_CERT]
            assert env.server.pushes == {WORKLOAD_CERT: 2, ROOT_CERT: 2}
    run(body())


def test_delta_does_not_resend_versions_the_client_has() -> None:
    async def body() -> None:
        source = FakeSource(tls_item(version="c1"), root_item(version="r1"))
        async with serving(source) as env:
            d = env.delta()
            first = await d.request(delta((WORKLOAD_CERT, ROOT_CERT), initial={WORKLOAD_CERT: "c1", ROOT_CERT: "old"}))
            got = delta_secrets_of(first)
            assert list(got) == [ROOT_CERT] and got[ROOT_CERT][0] == "r1"
            # Subscribing again to what it already has: nothing.
            await d.send(delta((WORKLOAD_CERT,), nonce=first.nonce))
            await d.quiet()
            source.set(tls_item(version="c2"))
            assert list(delta_secrets_of(await d.next())) == [WORKLOAD_CERT]
    run(body())


def test_delta_nack_is_not_answered_and_the_next_change_is_pushed() -> None:
    async def body() -> None:
        source = FakeSource(tls_item(version="c1"))
        async with serving(source) as env:
            d = env.delta()
            first = await d.request(delta((WORKLOAD_CERT,)))
            await d.send(delta(nonce=first.nonce, error="rejected"))
            await d.quiet()
            await d.send(delta((WORKLOAD_CERT,), nonce=first.nonce, error="rejected"))
            await d.quiet()
            await eventually(lambda: env.server.nacks == 2)
            source.set(tls_item(version="c2"))
            pushed = await d.next()
            assert delta_secrets_of(pushed)[WORKLOAD_CERT][0] == "c2" and pushed.nonce != first.nonce
    run(body())


def test_delta_waits_for_an_unavailable_secret() -> None:
    async def body() -> None:
        source = FakeSource(root_item())
        async with serving(source) as env:
            d = env.delta()
            first = await d.request(delta((WORKLOAD_CERT, ROOT_CERT)))
            assert list(delta_secrets_of(first)) == [ROOT_CERT]
            await d.send(delta(nonce=first.nonce))
            await d.quiet()
            source.set(tls_item(version="late"))
            late = await d.next()
            assert list(delta_secrets_of(late)) == [WORKLOAD_CERT]
    run(body())


def test_delta_stream_disconnect_releases() -> None:
    async def body() -> None:
        source = FakeSource(tls_item(), root_item())
        async with serving(source) as env:
            d = env.delta()
            await d.request(delta((WORKLOAD_CERT, ROOT_CERT)))
            await d.cancel()
            await eventually(lambda: sorted(source.released) == [ROOT_CERT, WORKLOAD_CERT]
                             and source.unsubscribes == 1 and env.server.active_streams == 0)
    run(body())


def test_delta_rejects_a_wrong_type_url() -> None:
    async def body() -> None:
        async with serving(FakeSource(tls_item())) as env:
            d = env.delta()
            await d.send(delta((WORKLOAD_CERT,), type_url="type.googleapis.com/envoy.config.listener.v3.Listener"))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await d.next()
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    run(body())


# -- FetchSecrets ---------------------------------------------------------------


def test_fetch_returns_the_current_secrets() -> None:
    async def body() -> None:
        cert, roots = tls_item(version="c7"), root_item(version="r7")
        source = FakeSource(cert, roots)
        async with serving(source) as env:
            response = await env.stub.FetchSecrets(sotw(WORKLOAD_CERT, ROOT_CERT), timeout=WAIT)
            got = secrets_of(response)
            assert_tls(got[WORKLOAD_CERT], cert)
            assert_root(got[ROOT_CERT], roots)
            assert response.version_info == combined_version([cert, roots]) and response.nonce
            assert sorted(source.released) == [ROOT_CERT, WORKLOAD_CERT]   # no stream holds them

            # Held by a stream: a fetch does not release it.
            s = env.stream()
            await s.request(sotw(WORKLOAD_CERT))
            source.released.clear()
            single = await env.stub.FetchSecrets(sotw(WORKLOAD_CERT), timeout=WAIT)
            assert single.version_info == "c7"
            assert source.released == []
    run(body())


def test_fetch_of_an_unavailable_secret_is_unavailable() -> None:
    async def body() -> None:
        async with serving(FakeSource(root_item())) as env:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await env.stub.FetchSecrets(sotw(ROOT_CERT, WORKLOAD_CERT), timeout=WAIT)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no secret 'default'" in error.value.details()
    run(body())


def test_fetch_rejects_a_wrong_type_url() -> None:
    async def body() -> None:
        async with serving(FakeSource(tls_item())) as env:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await env.stub.FetchSecrets(sotw(WORKLOAD_CERT, type_url="type.googleapis.com/x.Y"), timeout=WAIT)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    run(body())


# -- the socket ---------------------------------------------------------------------


def test_socket_is_private_and_parents_are_created_0700() -> None:
    async def body() -> None:
        with tempfile.TemporaryDirectory(prefix="sds") as directory:
            path = Path(directory) / "a" / "b" / "socket"
            async with serving(FakeSource(tls_item()), path) as env:
                assert stat.S_ISSOCK(path.lstat().st_mode)
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                assert stat.S_IMODE((Path(directory) / "a").stat().st_mode) == 0o700
                assert stat.S_IMODE((Path(directory) / "a" / "b").stat().st_mode) == 0o700
                response = await env.stub.FetchSecrets(sotw(WORKLOAD_CERT), timeout=WAIT)
                assert len(response.resources) == 1
    run(body())


def test_stale_socket_is_replaced() -> None:
    async def body() -> None:
        with tempfile.TemporaryDirectory(prefix="sds") as directory:
            path = Path(directory) / "socket"
            stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stale.bind(str(path))
            stale.close()                       # the file stays, nobody listens
            os.chmod(path, 0o777)
            async with serving(FakeSource(tls_item()), path) as env:
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                response = await env.stub.FetchSecrets(sotw(WORKLOAD_CERT), timeout=WAIT)
                assert len(response.resources) == 1
    run(body())


def test_a_regular_file_at_the_socket_path_is_not_removed() -> None:
    async def body() -> None:
        with tempfile.TemporaryDirectory(prefix="sds") as directory:
            path = Path(directory) / "socket"
            path.write_text("not a socket")
            with pytest.raises(ConfigurationError):
                await SdsServer(FakeSource(), socket_path=path).start()
            assert path.read_text() == "not a socket"
    run(body())


def test_a_socket_path_too_long_is_a_configuration_error() -> None:
    async def body() -> None:
        with tempfile.TemporaryDirectory(prefix="sds") as directory:
            path = Path(directory) / ("x" * 120) / "socket"
            with pytest.raises(ConfigurationError):
                await SdsServer(FakeSource(), socket_path=path).start()
    run(body())


def test_a_path_whose_staging_socket_would_be_too_long_fails_cleanly() -> None:
    """The socket is bound first at ``<dir>/.sds-XXXXXXXX/s``; a final path that
    fits but whose staging path does not is refused, and nothing is left behind."""
    async def body() -> None:
        with tempfile.TemporaryDirectory(prefix="sds") as directory:
            parent = Path(directory).absolute()
            parent = parent / ("d" * (100 - len(os.fsencode(parent)) - 1))    # a 100-byte directory
            parent.mkdir()
            path = parent / "socket"                                       # 107 bytes: fits
            with pytest.raises(ConfigurationError, match="first bound at"):  # <parent>/.sds-XXXXXXXX/s: 116
                await SdsServer(FakeSource(), socket_path=path).start()
            assert os.listdir(parent) == []
    run(body())


# -- conversion ---------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(chain=st.binary(min_size=1, max_size=256), key=st.binary(max_size=256), roots=st.binary(min_size=1, max_size=256))
def test_secrets_round_trip_exact_bytes(chain: bytes, key: bytes, roots: bytes) -> None:
    cert = SecretItem(name="c", version="1", certificate_chain=chain, private_key=key)
    bundle = SecretItem(name="r", version="1", trusted_ca=roots)
    for item, check in ((cert, assert_tls), (bundle, assert_root)):
        decoded = secret_pb2.Secret()
        assert pack(item).Unpack(decoded)
        check(decoded, item)


def test_private_key_never_reaches_the_logs() -> None:
    async def body() -> None:
        source = FakeSource(tls_item(version="1"))
        async with serving(source) as env:
            s = env.stream()
            first = await s.request(sotw(WORKLOAD_CERT))
            await s.send(sotw(WORKLOAD_CERT, nonce=first.nonce, error="rejected"))
            await eventually(lambda: env.server.nacks == 1)
            source.set(tls_item(version="2"))
            await s.next()
            await env.stub.FetchSecrets(sotw(WORKLOAD_CERT), timeout=WAIT)

    with structlog.testing.capture_logs() as events:
        run(body())
    names = [e["event"] for e in events]
    assert "sds push" in names and "sds nack" in names and "sds fetch" in names
    text = repr(events)
    assert "key v1" not in text and "key v2" not in text and "PRIVATE KEY" not in text

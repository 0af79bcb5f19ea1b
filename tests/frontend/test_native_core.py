"""The native gRPC core (frontend/_grpc.pyx + native.py) on real sockets, with
handlers of its own: what grpcio's client sends is answered as gRPC says,
and what an abusive HTTP/2 client sends (a raw one, hyper-h2) is bounded
while the server keeps serving others. h2load (nghttp2-client) drives it
too, and must see no protocol error."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fastca.frontend._grpc import (DEADLINE_EXCEEDED, INVALID_ARGUMENT, OK, UNIMPLEMENTED, percent_encode,
                                   parse_timeout)
from fastca.frontend.native import Endpoint, Limits, Listener, bind_socket, load_serving, server_tls_context
from tests._tools import tool

UNARY = "/test.Echo/Unary"
STREAM = "/test.Echo/Stream"


class Echo:
    """Unary: the message back, or what metadata asks for (x-fail: code, x-raise, x-hold)."""

    streaming = False

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.cancelled = 0
        self.held: list = []

    def accepts(self, call) -> bool:
        return True

    def handle(self, call) -> None:
        self.seen.append(dict(call.metadata))
        if "x-raise" in call.metadata:
            raise RuntimeError("a handler bug with a secret detail")
        if "x-fail" in call.metadata:
            message = call.metadata.get("x-message-bin", b"").decode() or call.metadata.get("x-message", "")
            call.fail(int(call.metadata["x-fail"]), message)
            return
        if "x-hold" in call.metadata:
            self.held.append(call)

            def cancelled() -> None:
                self.cancelled += 1

            call.on_cancel = cancelled
            return
        call.respond(call.message)


class StreamEcho:
    streaming = True

    def accepts(self, call) -> bool:
        return True

    def start(self, call) -> None:
        pass

    def message(self, call, message: bytes) -> None:
        call.send(message)

    def half_close(self, call) -> None:
        call.finish(int(call.metadata.get("x-final", "0")), call.metadata.get("x-message", ""))


class CoreServer:
    """An Endpoint with the echo handlers on its own uvloop thread."""

    def __init__(self, tmp: Path, *, tls: bool = False, **endpoint_options) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.echo = Echo()
        self.root_pem: bytes | None = None
        limits = endpoint_options.pop("limits", Limits(max_message_bytes=256 * 1024, max_concurrent_streams=100,
                                                       max_header_list_bytes=16 * 1024))
        handshake = endpoint_options.pop("handshake_timeout_s", 5.0)
        context = self._tls(tmp) if tls else None

        async def start():
            endpoint = Endpoint(routes={UNARY: self.echo, STREAM: StreamEcho()}, limits=limits, loop=self.loop,
                                **endpoint_options)
            listener = Listener(endpoint, "grpc", bind_socket("127.0.0.1:0", reuse_port=False), context, handshake)
            await listener.start()
            return endpoint, listener

        self.endpoint, self.listener = self.run(start())
        self.port = self.listener.port
        self.address = f"127.0.0.1:{self.port}"

    def _tls(self, tmp: Path) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = time.time()
        import datetime as dt

        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                       .serial_number(x509.random_serial_number())
                       .not_valid_before(dt.datetime.fromtimestamp(now - 60, dt.timezone.utc))
                       .not_valid_after(dt.datetime.fromtimestamp(now + 3600, dt.timezone.utc))
                       .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                       .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                       .sign(key, hashes.SHA256()))
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        self.root_pem = pem
        context = server_tls_context(client_roots_pem=pem, require_client_certificate=False)
        load_serving([context], pem, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
        return context

    def run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def unary(self, payload: bytes, metadata=(), timeout: float = 10, **kwargs) -> bytes:
        with self.channel() as channel:
            return channel.unary_unary(UNARY)(payload, metadata=metadata, timeout=timeout, **kwargs)

    def close(self) -> None:
        async def stop():
            await self.endpoint.drain(1.0)
            await self.listener.close()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server(tmp_path):
    core = CoreServer(tmp_path)
    yield core
    core.close()


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


# -- gRPC as clients send it -------------------------------------------------------------

def test_unary_round_trip_across_many_data_frames(server):
    payload = bytes(range(256)) * 800          # 200 KB: many DATA frames each way
    assert server.unary(payload) == payload
    assert server.unary(b"") == b""


def test_errors_are_trailers_only_with_percent_encoded_messages(server):
    message = "no such thing: ünïcode, 100% sure\nsecond line"
    code, details = _status(lambda: server.unary(b"x", metadata=[("x-fail", "5"), ("x-message-bin", message.encode())]))
    assert code == grpc.StatusCode.NOT_FOUND and details == message


def test_a_stream_sends_messages_then_its_status_in_trailers(server):
    with server.channel() as channel:
        call = channel.stream_stream(STREAM)(iter([b"one", b"two", b"three"]),
                                             metadata=[("x-final", "9"), ("x-message", "done here")], timeout=10)
        received = []
        with pytest.raises(grpc.RpcError) as caught:
            for message in call:
                received.append(message)
    assert received == [b"one", b"two", b"three"]
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and caught.value.details() == "done here"


def test_unknown_method_and_compression_are_unimplemented(server):
    with server.channel() as channel:
        code, details = _status(lambda: channel.unary_unary("/test.Echo/Nope")(b"x", timeout=10))
    assert code == grpc.StatusCode.UNIMPLEMENTED and "unknown method" in details
    code, details = _status(lambda: server.unary(b"x" * 100, compression=grpc.Compression.Gzip))
    assert code == grpc.StatusCode.UNIMPLEMENTED and "identity" in details
    assert server.echo.seen == []            # neither reached the handler


def test_a_message_over_the_limit_is_refused_before_the_handler(server):
    code, details = _status(lambda: server.unary(b"x" * (256 * 1024 + 1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than" in details
    assert server.echo.seen == []
    assert server.unary(b"still serving") == b"still serving"


def test_deadline_cancels_the_call_at_the_server(server):
    started = time.monotonic()
    code, _ = _status(lambda: server.unary(b"x", metadata=[("x-hold", "1")], timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 3
    deadline = time.monotonic() + 5
    while server.echo.cancelled < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.echo.cancelled == 1        # the handler heard that its caller left


def test_a_handler_bug_is_internal_without_its_text_and_the_next_call_works(server):
    code, details = _status(lambda: server.unary(b"x", metadata=[("x-raise", "1")]))
    assert code == grpc.StatusCode.INTERNAL and details == "internal error"
    assert server.unary(b"after") == b"after"


def test_metadata_binary_values_and_bounds(server):
    assert server.unary(b"m", metadata=[("trace-bin", b"\x00\xff\x10"), ("clusterid", "Kubernetes")]) == b"m"
    seen = server.echo.seen[-1]
    assert seen["trace-bin"] == b"\x00\xff\x10" and seen["clusterid"] == "Kubernetes"
    long_key = "k" * 300
    code, details = _status(lambda: server.unary(b"m", metadata=[(long_key, "v")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and long_key not in details
    code, details = _status(lambda: server.unary(b"m", metadata=[("big", "v" * 20_000)]))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), code
    assert "v" * 100 not in details
    assert server.unary(b"fine") == b"fine"


def test_timeout_and_message_encodings():
    assert parse_timeout(b"100m") == pytest.approx(0.1) and parse_timeout(b"2S") == 2.0
    assert parse_timeout(b"1H") == 3600.0 and parse_timeout(b"5n") == pytest.approx(5e-9)
    for bad in (b"", b"S", b"123456789S", b"1x", b"-1S", b"1.5S"):
        assert parse_timeout(bad) is None
    assert percent_encode("plain") == b"plain"
    assert percent_encode("50% é") == b"50%25 %C3%A9"


# -- a raw HTTP/2 client -------------------------------------------------------------------

class RawClient:
    """hyper-h2 on a plain socket: frames the grpc library would never send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.flush()
        self.events: list = []
        self.closed = False

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def headers(self, stream_id: int, path: str = UNARY, end: bool = False, extra=()) -> None:
        self.h2.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                         (":authority", "localhost"), ("content-type", "application/grpc"),
                                         ("te", "trailers"), *extra], end_stream=end)
        self.flush()

    def data(self, stream_id: int, payload: bytes, end: bool = True) -> None:
        self.h2.send_data(stream_id, payload, end_stream=end)
        self.flush()

    def read(self, until, timeout: float = 5.0) -> list:
        deadline = time.monotonic() + timeout
        while not until(self.events) and time.monotonic() < deadline and not self.closed:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                break
            except OSError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
                break
            self.events.extend(self.h2.receive_data(chunk))
            self.flush()
        return self.events

    def status_of(self, stream_id: int) -> int | None:
        for event in self.events:
            headers = getattr(event, "headers", None)
            if getattr(event, "stream_id", None) == stream_id and headers:
                for name, value in headers:
                    if name == "grpc-status":
                        return int(value)
        return None


def _framed(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def test_two_messages_in_a_unary_call_are_refused(server):
    client = RawClient(server.port)
    client.headers(1)
    client.data(1, _framed(b"one") + _framed(b"two"))
    client.read(lambda events: client.status_of(1) is not None)
    assert client.status_of(1) == UNIMPLEMENTED
    assert server.echo.seen == []


def test_a_message_announcing_4_gib_is_refused_at_once(server):
    client = RawClient(server.port)
    client.headers(1)
    client.h2.send_data(1, b"\x00\xff\xff\xff\xff" + b"x" * 1000, end_stream=False)
    client.flush()
    client.read(lambda events: client.status_of(1) is not None)
    assert client.status_of(1) == 8       # RESOURCE_EXHAUSTED, before 4 GiB arrive
    client.read(lambda events: any(isinstance(e, h2.events.StreamReset) for e in events), timeout=2)
    assert any(isinstance(e, h2.events.StreamReset) and e.stream_id == 1 for e in client.events)
    assert server.unary(b"others fine") == b"others fine"


def test_a_reset_storm_is_cut_off_and_others_are_served(server):
    client = RawClient(server.port)
    stream_id = 1
    for _ in range(5000):                     # rapid reset (CVE-2023-44487): open, reset, repeat
        client.h2.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"), (":path", UNARY),
                                           (":authority", "x"), ("content-type", "application/grpc")])
        client.h2.reset_stream(stream_id)
        stream_id += 2
        if stream_id % 200 == 1:
            client.flush()
            if client.closed:
                break
    client.flush()
    client.read(lambda events: any(isinstance(e, h2.events.ConnectionTerminated) for e in events), timeout=5)
    terminated = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert client.closed or terminated, "the storm was not stopped"
    assert server.unary(b"others fine") == b"others fine"


def test_a_ping_flood_is_bounded_and_others_are_served(server):
    client = RawClient(server.port)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for i in range(200_000):                  # never reading the PING ACKs
        client.h2.ping(struct.pack(">Q", i))
        if i % 1000 == 0:
            client.flush()
            if client.closed:
                break
    assert server.unary(b"others fine") == b"others fine"
    assert len(server.endpoint.connections) <= 2


def test_ten_thousand_streams_on_one_connection_are_refused_past_the_limit(server):
    client = RawClient(server.port)
    for n in range(10_000):
        stream_id = 2 * n + 1
        try:
            client.h2.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"), (":path", UNARY),
                                               (":authority", "x"), ("content-type", "application/grpc")])
        except h2.exceptions.TooManyStreamsError:
            client.h2.local_settings.max_concurrent_streams = 100_000
            client.h2.remote_settings.max_concurrent_streams = 100_000
            client.h2.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"), (":path", UNARY),
                                               (":authority", "x"), ("content-type", "application/grpc")])
        if n % 500 == 0:
            client.flush()
    client.flush()
    client.read(lambda events: False, timeout=1.5)
    connection = next(iter(server.endpoint.connections), None)
    held = connection.active_calls if connection is not None else 0
    assert held <= 100                         # SETTINGS_MAX_CONCURRENT_STREAMS
    assert server.unary(b"others fine") == b"others fine"


def test_keepalive_pings_while_a_call_is_in_flight_get_no_goaway(server):
    client = RawClient(server.port)
    client.headers(1, extra=[("x-hold", "1")])
    client.data(1, _framed(b"held"))
    for i in range(20):                        # istio-agent pings while its call is in flight
        client.h2.ping(struct.pack(">Q", i))
        client.flush()
        time.sleep(0.02)
    client.read(lambda events: sum(isinstance(e, h2.events.PingAckReceived) for e in events) >= 20)
    assert sum(isinstance(e, h2.events.PingAckReceived) for e in client.events) >= 20
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)
    held = server.echo.held[-1]
    server.loop.call_soon_threadsafe(held.respond, b"released")
    client.read(lambda events: client.status_of(1) is not None)
    assert client.status_of(1) == OK


def test_a_stream_left_half_open_holds_only_itself(tmp_path):
    core = CoreServer(tmp_path, request_timeout_s=0.5)
    try:
        client = RawClient(core.port)
        client.headers(1)                      # and then nothing: no body, no END_STREAM
        client.read(lambda events: client.status_of(1) is not None, timeout=5)
        assert client.status_of(1) == DEADLINE_EXCEEDED
        assert core.unary(b"others fine") == b"others fine"
    finally:
        core.close()


def test_a_handshake_that_never_finishes_is_closed(tmp_path):
    core = CoreServer(tmp_path, tls=True, handshake_timeout_s=0.5)
    try:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", core.port), timeout=10) as silent:
            silent.sendall(b"\x16\x03\x01")        # the first bytes of a ClientHello, then nothing
            assert silent.recv(1024) == b""        # the server gave up on it
        assert time.monotonic() - started < 5
        credentials = grpc.ssl_channel_credentials(core.root_pem)
        with grpc.secure_channel(core.address, credentials,
                                 options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
            assert channel.unary_unary(UNARY)(b"tls fine", timeout=10) == b"tls fine"
    finally:
        core.close()


def test_an_idle_connection_gets_goaway(tmp_path):
    core = CoreServer(tmp_path, idle_timeout_s=0.3)
    try:
        client = RawClient(core.port)
        client.read(lambda events: any(isinstance(e, h2.events.ConnectionTerminated) for e in events), timeout=10)
        assert any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events) or client.closed
    finally:
        core.close()


def test_drain_lets_the_call_in_flight_finish_and_refuses_new_streams(tmp_path):
    core = CoreServer(tmp_path)
    observer = RawClient(core.port)              # an idle connection, to see the GOAWAY frames
    observer.read(lambda events: any(isinstance(e, h2.events.SettingsAcknowledged) for e in events), timeout=2)
    results: list = []
    channel = core.channel()

    def held_call() -> None:
        try:
            results.append(channel.unary_unary(UNARY)(b"held", metadata=[("x-hold", "1")], timeout=20))
        except grpc.RpcError as error:
            results.append(error.code())

    caller = threading.Thread(target=held_call)
    caller.start()
    deadline = time.monotonic() + 5
    while not core.echo.held and time.monotonic() < deadline:
        time.sleep(0.01)
    draining = asyncio.run_coroutine_threadsafe(core.endpoint.drain(5.0), core.loop)

    def goaways(events):
        return [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]

    observer.read(lambda events: len(goaways(events)) >= 1, timeout=3)
    assert goaways(observer.events)[0].last_stream_id in (0, 2**31 - 1)   # the notice, or the final one
    time.sleep(0.3)                            # the final GOAWAY is out: the held call is still served
    assert not draining.done()
    core.loop.call_soon_threadsafe(core.echo.held[-1].respond, b"finished")
    caller.join(10)
    assert results == [b"finished"]
    draining.result(10)
    channel.close()
    core.loop.call_soon_threadsafe(core.loop.stop)
    core.thread.join(10)


def test_h2load_drives_it_without_protocol_errors(server, tmp_path):
    body = tmp_path / "request.bin"
    body.write_bytes(_framed(b"hello from h2load"))
    result = subprocess.run([tool("h2load"), "-n", "2000", "-c", "4", "-m", "16", "-d", str(body),
                             "-H", "content-type: application/grpc", "-H", "te: trailers",
                             f"http://127.0.0.1:{server.port}{UNARY}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored", result.stdout)
    assert done, result.stdout
    total, _, finished, succeeded, failed, errored = map(int, done.groups())
    assert (total, finished, succeeded, failed, errored) == (2000, 2000, 2000, 0, 0), result.stdout
    assert re.search(r"status codes: (\d+) 2xx", result.stdout).group(1) == "2000"

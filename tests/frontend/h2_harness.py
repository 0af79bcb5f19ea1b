"""The fuzz harness of the native front end's protocol core (bench/fuzz.py
drives it with atheris; tests/frontend/test_fuzz_corpus.py replays its
corpus): one client conversation of arbitrary bytes into a real Connection,
with echo handlers and small limits, on a transport and loop that do nothing.
Anything the core reports as its own failure, or raises, is a crash."""

from __future__ import annotations

from typing import Any, Callable

from fastca.frontend._grpc import Connection, Limits

__all__ = ["PREFACE", "one_input"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Handle:
    def cancel(self) -> None:
        pass


class _Loop:
    """What the core asks of a loop (timers) without running any."""

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> _Handle:
        return _Handle()

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> _Handle:
        callback(*args)
        return _Handle()


class _Transport:
    def __init__(self) -> None:
        self.written = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class _Unary:
    streaming = False

    def accepts(self, call: Any) -> bool:
        return True

    def handle(self, call: Any) -> None:
        call.respond(call.message[:64])


class _Stream:
    streaming = True

    def accepts(self, call: Any) -> bool:
        return True

    def start(self, call: Any) -> None:
        pass

    def message(self, call: Any, message: bytes) -> None:
        call.send(message[:64])

    def half_close(self, call: Any) -> None:
        call.finish(0)


class _Endpoint:
    """The Python side the core calls back, failing loudly on what the core
    reports as its own error (a crash of the target)."""

    def __init__(self) -> None:
        self.limits = Limits(max_message_bytes=4096, max_concurrent_streams=8, max_header_list_bytes=2048,
                             max_metadata_key_bytes=64, max_metadata_value_bytes=512, max_metadata_entries=8)
        self.routes = {"/t.S/U": _Unary(), "/t.S/S": _Stream()}
        self.loop = _Loop()

    def connection_made(self, connection: Any) -> None:
        connection.cache = {}

    def connection_lost(self, connection: Any) -> None:
        pass

    def call_closed(self, connection: Any, call: Any, answered: bool) -> None:
        pass

    def protocol_error(self, connection: Any, reason: str) -> None:
        pass                      # a malformed conversation: the expected outcome of most inputs

    def authentication_refused(self, call: Any) -> None:
        pass

    def handler_error(self, call: Any, error: BaseException) -> None:
        raise AssertionError(f"a handler failed inside the core: {error!r}") from error

    def core_error(self, connection: Any, error: BaseException) -> None:
        raise AssertionError(f"the protocol core failed: {error!r}") from error


_ENDPOINT: _Endpoint | None = None


def one_input(data: bytes) -> None:
    """One client conversation: the preface, then ``data`` in two reads."""
    global _ENDPOINT
    if _ENDPOINT is None:
        _ENDPOINT = _Endpoint()
    connection = Connection(_ENDPOINT)
    transport = _Transport()
    connection.connection_made(transport)
    middle = len(data) // 2
    connection.data_received(PREFACE + data[:middle])
    if not transport.closed:
        connection.data_received(data[middle:])
    connection.connection_lost(None)
    if connection.calls:
        raise AssertionError("calls left on a lost connection")

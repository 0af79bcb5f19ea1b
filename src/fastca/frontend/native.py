"""The native front end: listening sockets, TLS, and the connections of the
gRPC core (fastca.frontend._grpc) on the process's event loop (uvloop).

TLS is OpenSSL through Python's ``ssl`` module, which uvloop drives: TLS
1.2 or later, ALPN ``h2``, the serving certificate, and a client
certificate requested on every handshake and verified if one is offered
(``CERT_OPTIONAL``: istiod's "verify client certificate if given") against
the CA's roots, with the CA's own chain as the path to them. A certificate
that does not verify fails the handshake; no certificate at all leaves the
call to token or XFCC authentication. A port may instead require one
(``require_client_certificate``).

Bounds per connection, before a call reaches a handler: the TLS handshake
must finish within ``handshake_timeout_s``; a connection with no call for
``idle_timeout_s`` is sent GOAWAY and closed; one that keeps failing
authentication (``max_unauthenticated_calls``) is cut off; the HTTP/2 and
gRPC limits of _grpc.Limits apply to each stream.

``Endpoint`` is what the core talks to: the method table, the limits,
and the accounting of connections; ``Listener`` is one listening socket;
``drain`` is the graceful shutdown (GOAWAY, then wait for calls in flight).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from fastca.errors import ConfigurationError
from fastca.frontend._grpc import UNAVAILABLE, Call, Connection, Limits
from fastca.observability.logging import get_logger

__all__ = ["Endpoint", "Handler", "Listener", "bind_socket", "server_tls_context", "Limits", "Call"]

log = get_logger("fastca.frontend")
_IDLE_CHECK_S = 5.0
_GOAWAY_NOTICE_S = 0.1      # between the shutdown notice and the final GOAWAY: calls already sent get in


class Handler(Protocol):
    """One gRPC method, as the core calls it. ``accepts(call)`` runs once the
    headers are in (it may refuse the call at once: overload, shutdown);
    a unary method then gets ``handle(call)`` with the whole request; a
    streaming one gets ``start``, ``message`` per request message, and
    ``half_close``."""

    streaming: bool

    def accepts(self, call: Call) -> bool: ...
    def handle(self, call: Call) -> None: ...


class Endpoint:
    """The Python side of every connection of one server process."""

    def __init__(self, *, routes: dict[str, Handler], limits: Limits, loop: asyncio.AbstractEventLoop,
                 idle_timeout_s: float = 300.0, request_timeout_s: float = 30.0, max_unauthenticated_calls: int = 32,
                 on_call_closed: Callable[[Call, bool], None] | None = None) -> None:
        self.routes = routes
        self.limits = limits
        self.loop = loop
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_unauthenticated_calls = max_unauthenticated_calls
        self._on_call_closed = on_call_closed
        self.connections: set[Connection] = set()
        self.draining = False
        self._idle_task: asyncio.Task[None] | None = None
        self._emptied: asyncio.Event | None = None

    # -- from the core ------------------------------------------------------------

    def connection_made(self, connection: Connection) -> None:
        connection.cache = {}
        self.connections.add(connection)
        if self.draining:
            connection.goaway()
        if self._idle_task is None:
            self._idle_task = self.loop.create_task(self._watch())

    def connection_lost(self, connection: Connection) -> None:
        self.connections.discard(connection)
        if self._emptied is not None and not self.connections:
            self._emptied.set()

    def call_closed(self, connection: Connection, call: Call, answered: bool) -> None:
        if self._on_call_closed is not None:
            self._on_call_closed(call, answered)

    def protocol_error(self, connection: Connection, reason: str) -> None:
        log.warning("connection closed on a protocol error", peer=connection.peer, reason=reason)

    def handler_error(self, call: Call | None, error: BaseException) -> None:
        log.error("unexpected error in a call", path=getattr(call, "path", ""),
                  error=f"{type(error).__name__}: {error}", exc_info=(type(error), error, error.__traceback__))

    def core_error(self, connection: Connection, error: BaseException) -> None:
        log.error("protocol core error; connection closed", peer=connection.peer,
                  error=f"{type(error).__name__}: {error}", exc_info=(type(error), error, error.__traceback__))

    # -- from handlers ---------------------------------------------------------------

    def authentication_refused(self, call: Call) -> None:
        """Count a refused authentication on the call's connection; past the
        bound the connection is cut off (a client that never has a credential
        gets no unbounded supply of attempts on one connection)."""
        connection = call.connection
        connection.unauthenticated += 1
        if connection.unauthenticated == self.max_unauthenticated_calls:
            log.warning("connection closed: too many unauthenticated calls", peer=connection.peer,
                        calls=connection.unauthenticated)
            self.loop.call_soon(connection.abort)

    # -- lifecycle --------------------------------------------------------------------

    async def _watch(self) -> None:
        """Connections idle past idle_timeout_s get GOAWAY; a request still not
        complete after request_timeout_s (a stream left half open) is ended
        with DEADLINE_EXCEEDED, so it holds neither a stream nor memory."""
        periods = [t for t in (self.idle_timeout_s, self.request_timeout_s) if t > 0]
        period = min([_IDLE_CHECK_S, *periods]) / 2
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for connection in list(self.connections):
                if self.request_timeout_s > 0:
                    late = [call for call in connection.calls.values()
                            if call.receiving and now - call.started > self.request_timeout_s]
                    for call in late:
                        call.expire(f"the request did not arrive within {self.request_timeout_s:g} s")
                    if late:
                        connection.flush()
                if (self.idle_timeout_s > 0 and connection.active_calls == 0
                        and now - connection.last_active > self.idle_timeout_s):
                    connection.goaway()

    async def drain(self, grace_s: float) -> None:
        """GOAWAY to every connection (a notice first, then the final one, as
        RFC 9113 recommends); wait up to ``grace_s`` for their calls to finish,
        then close what is left. New connections get GOAWAY at once."""
        self.draining = True
        for connection in list(self.connections):
            connection.shutdown_notice()
        await asyncio.sleep(_GOAWAY_NOTICE_S)
        for connection in list(self.connections):
            connection.goaway()
        if self.connections:
            self._emptied = asyncio.Event()
            try:
                await asyncio.wait_for(self._emptied.wait(), timeout=max(0.0, grace_s))
            except TimeoutError:
                pass
        for connection in list(self.connections):
            for call in list(connection.calls.values()):
                call.fail(UNAVAILABLE, "server shutting down")      # agents retry (elsewhere)
            connection.abort()
        if self._idle_task is not None:
            self._idle_task.cancel()


def bind_socket(address: str, *, reuse_port: bool) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``[v6]:port`` too); with
    ``reuse_port``, SO_REUSEPORT, so the worker processes share the port."""
    host, _, port = address.rpartition(":")
    bare = host.strip("[]") or None
    try:
        infos = socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, ValueError) as error:
        raise ConfigurationError(f"cannot listen on {address}: {error}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(sockaddr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise ConfigurationError(f"cannot listen on {address}: {error.strerror}") from None
    return sock


def server_tls_context(*, client_roots_pem: bytes, require_client_certificate: bool) -> ssl.SSLContext:
    """TLS 1.2+, ALPN h2, client certificates requested and verified against
    ``client_roots_pem`` (roots, then the CA's own chain to them) — required
    or only if offered. The serving certificate is loaded by ``load_serving``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    context.load_verify_locations(cadata=client_roots_pem.decode())
    return context


def load_serving(contexts: Iterable[ssl.SSLContext], chain_pem: bytes, key_pem: bytes) -> None:
    """Put a serving certificate and key into each context (new handshakes
    use it at once). ``ssl`` reads them from files only: they pass through a
    0600 file in a private directory that is removed before this returns."""
    with tempfile.TemporaryDirectory(prefix="fastca-serving-") as directory:
        path = Path(directory) / "serving.pem"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key_pem + b"\n" + chain_pem)
        for context in contexts:
            context.load_cert_chain(str(path))


class Listener:
    """One listening socket serving the core's connections."""

    def __init__(self, endpoint: Endpoint, name: str, sock: socket.socket, tls: ssl.SSLContext | None,
                 handshake_timeout_s: float) -> None:
        self.endpoint = endpoint
        self.name = name
        self._sock = sock
        self._tls = tls
        self._handshake_timeout_s = handshake_timeout_s
        self._server: asyncio.AbstractServer | None = None

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    async def start(self) -> None:
        options: dict[str, Any] = {}
        if self._tls is not None:
            options = {"ssl": self._tls, "ssl_handshake_timeout": self._handshake_timeout_s}
        self._server = await self.endpoint.loop.create_server(lambda: Connection(self.endpoint), sock=self._sock,
                                                              **options)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)
            except TimeoutError:
                pass
            self._server = None

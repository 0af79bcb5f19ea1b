"""A real HTTPS server on 127.0.0.1 in a background thread, for the
authenticators that talk to an API server or an issuer. Each test gives it
a handler: ``handler(request) -> Response``; every request is recorded."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.authn._pki import Issuer, make_root, serving_pair


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Response:
    status: int = 200
    body: Any = None                  # JSON-encoded unless bytes
    # A streaming response: lines written one by one, flushed, then the
    # connection closed (what a Kubernetes watch looks like on HTTP/1.0).
    lines: Iterator[bytes] | None = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


class FakeHttpsServer:
    def __init__(self, tmp: Path, handler: Callable[[Request], Response], *, client_ca: bytes | None = None) -> None:
        self.ca: Issuer = make_root("fake server CA")
        cert_pem, key_pem = serving_pair(self.ca)
        self.ca_file = tmp / "server-ca.pem"
        self.ca_file.write_bytes(self.ca.pem)
        (tmp / "server.pem").write_bytes(cert_pem)
        (tmp / "server.key").write_bytes(key_pem)
        self.handler = handler
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                  self.rfile.read(length) if length else b"")
                with outer._lock:
                    outer.requests.append(request)
                response = outer.handler(request)
                if response.delay:
                    threading.Event().wait(response.delay)
                self.send_response(response.status)
                for name, value in response.headers.items():
                    self.send_header(name, value)
                if response.lines is not None:
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    try:
                        for line in response.lines:
                            self.wfile.write(line + b"\n")
                            self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                        pass
                    self.close_connection = True
                    return
                payload = response.body if isinstance(response.body, bytes) else json.dumps(response.body).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                    pass

            do_GET = do_POST = _serve

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp / "server.pem", tmp / "server.key")
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=client_ca.decode())
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def requests_to(self, path_prefix: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(path_prefix)]

    def __enter__(self) -> FakeHttpsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

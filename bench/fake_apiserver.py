"""A minimal Kubernetes API server for the benchmark: HTTPS on 127.0.0.1,
answering TokenReview only. Any token of the form ``sa.<ns>.<sa>.<pod>`` is
a valid service-account token for that pod; anything else is refused.

fastca caches reviews (30 s by default), so with one token per connection
this server sees a few dozen requests a minute: it is not on the hot path.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["FakeApiServer", "review"]

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


def review(body: dict[str, Any]) -> dict[str, Any]:
    """The TokenReview answer for a request body."""
    spec = body.get("spec", {})
    parts = str(spec.get("token", "")).split(".")
    if len(parts) != 4 or parts[0] != "sa":
        return {**body, "status": {"authenticated": False, "error": "invalid token"}}
    _, namespace, account, pod = parts
    user = {"username": f"system:serviceaccount:{namespace}:{account}", "uid": f"uid-{namespace}-{account}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            "extra": {"authentication.kubernetes.io/pod-name": [pod],
                      "authentication.kubernetes.io/pod-uid": [f"uid-{pod}"]}}
    return {**body, "status": {"authenticated": True, "user": user, "audiences": spec.get("audiences", [])}}


def _serving_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a 127.0.0.1 serving certificate (the CA is what
    fastca's ``ca_file`` trusts)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench fake apiserver CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = directory / "apiserver-ca.pem", directory / "apiserver.pem", directory / "apiserver.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_file, cert_file, key_file


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"        # keep-alive, as fastca's httpx client expects

    def setup(self) -> None:
        # The handshake happens here, on the connection's own thread: done in
        # accept() it would serialise every new connection behind the last.
        self.request.settimeout(10)
        self.request.do_handshake()
        self.request.settimeout(None)
        super().setup()

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 1 << 20))
        if self.path.startswith(TOKENREVIEW_PATH):
            status, answer = 201, review(json.loads(body))
        else:
            status, answer = 404, {"kind": "Status", "code": 404}
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    # When fastca's cached reviews expire, every worker asks again at once,
    # over as many new connections as it has callers: a kube-apiserver
    # accepts such bursts, so the stand-in must too (the default backlog is 5).
    request_queue_size = 1024
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass   # a client that gave up mid-handshake is not the benchmark's concern


class FakeApiServer:
    """``with FakeApiServer(dir) as api: api.url, api.ca_file``"""

    def __init__(self, directory: Path) -> None:
        self.ca_file, cert_file, key_file = _serving_files(directory)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

"""The per-call floor of the front end: what serving one unary gRPC call over
TLS costs the server before any CA work, for grpc.aio (what fastca served
with before) and for fastca's native front end (fastca.frontend.native: the
nghttp2 core under Cython, TLS from uvloop), each with an echo handler.

    python -m bench front-end-floor [--rounds 3] [--duration 8] [--json F]

Both servers answer CreateCertificate with the same fixed response (a chain
of three PEMs) on one process with uvloop; both are driven by the native
generator (bench/agentload, grpc-go) with the bench's usual load: 64 TLS
connections, one call in flight each. The report is the server CPU per call,
the rate and the latencies of each, per round and as medians: how much of a
certificate's cost is the front end's own.

Needs Go for the generator (golang-go, golang-google-grpc-dev).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

__all__ = ["EchoServer", "main"]

_HERE = Path(__file__).resolve().parent
KINDS = ("grpc-aio", "native")


def _tls_material(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def _serve(kind: str, cert_file: str, key_file: str) -> None:
    """The child: one echo server of ``kind`` on 127.0.0.1, until killed.
    Prints ``ready <port>`` once it listens."""
    import asyncio

    import uvloop

    from fastca.proto import istio_ca_pb2

    pem = Path(cert_file).read_text()
    response = istio_ca_pb2.IstioCertificateResponse(cert_chain=[pem, pem, pem])
    encoded = response.SerializeToString()

    async def grpc_aio() -> None:
        import grpc

        from fastca.proto import istio_ca_pb2_grpc

        class Echo(istio_ca_pb2_grpc.IstioCertificateServiceServicer):
            async def CreateCertificate(self, request, context):  # noqa: N802 - gRPC name
                return response

        server = grpc.aio.server()
        istio_ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(Echo(), server)
        credentials = grpc.ssl_server_credentials([(Path(key_file).read_bytes(), pem.encode())])
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        print(f"ready {port}", flush=True)
        await server.wait_for_termination()

    async def native() -> None:
        from fastca.frontend.native import Endpoint, Limits, Listener, bind_socket, load_serving, server_tls_context

        class Echo:
            """The same work grpc.aio's handler gets done for it: decode the request, answer."""

            streaming = False

            def accepts(self, call) -> bool:
                return True

            def handle(self, call) -> None:
                istio_ca_pb2.IstioCertificateRequest.FromString(call.message)
                call.respond(encoded)

        context = server_tls_context(client_roots_pem=pem.encode(), require_client_certificate=False)
        load_serving([context], pem.encode(), Path(key_file).read_bytes())
        loop = asyncio.get_running_loop()
        endpoint = Endpoint(routes={"/istio.v1.auth.IstioCertificateService/CreateCertificate": Echo()},
                            limits=Limits(), loop=loop)
        listener = Listener(endpoint, "grpc", bind_socket("127.0.0.1:0", reuse_port=False), context, 10.0)
        await listener.start()
        print(f"ready {listener.port}", flush=True)
        await asyncio.Event().wait()

    uvloop.run(grpc_aio() if kind == "grpc-aio" else native())


class EchoServer:
    """``with EchoServer(kind, workdir) as server:`` then ``server.pid``,
    ``server.address``, ``server.root_pem``."""

    def __init__(self, kind: str, workdir: Path) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: one of {', '.join(KINDS)}")
        self.kind = kind
        self._cert, self._key = _tls_material(workdir)
        self.root_pem = self._cert.read_bytes()
        self._process: subprocess.Popen[str] | None = None
        self.address = ""

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> Self:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.front_end_floor", "--serve", self.kind, str(self._cert), str(self._key)],
            cwd=_HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("ready "):
            self.__exit__()
            raise RuntimeError(f"{self.kind} echo server did not start: {self._process.stderr.read()[-2000:]}")
        self.address = f"127.0.0.1:{int(line.split()[1])}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)


def measure(rounds: int, duration_s: float, connections: int) -> dict[str, Any]:
    from bench.loadgen import IstioTarget, LoadSpec, make_csrs
    from bench.native_load import run_native_load

    csrs = make_csrs(256, "ec-p256", distinct_keys=4)
    spec = LoadSpec(connections=connections, warmup_s=2.0, duration_s=duration_s)
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="front-end-floor-") as tmp:
        for _ in range(rounds):
            for kind in KINDS:                       # interleaved, so drift hits both alike
                with EchoServer(kind, Path(tmp)) as server:
                    load = run_native_load(IstioTarget(server.address, server.root_pem), spec, csrs,
                                           server_pid=server.pid)
                results[kind].append({key: load[key] for key in (
                    "calls_per_s", "errors", "latency_ms", "server_cpu_us_per_cert", "generator_cpu_us_per_call",
                    "generator_cpu_share", "machine_busy_share")})
    medians = {kind: {"calls_per_s": statistics.median(r["calls_per_s"] for r in runs),
                      "server_cpu_us_per_call": statistics.median(r["server_cpu_us_per_cert"] for r in runs),
                      "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in runs),
                      "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in runs)}
               for kind, runs in results.items()}
    return {"rounds": results, "median": medians,
            "cpu_ratio_grpc_aio_over_native": (medians["grpc-aio"]["server_cpu_us_per_call"]
                                               / medians["native"]["server_cpu_us_per_call"])}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve":
        _serve(*argv[1:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per server per round [8]")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    started = time.monotonic()
    report = {"meta": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                       "command": shlex.join([sys.argv[0], *argv]), "cpus": os.cpu_count()},
              **measure(args.rounds, args.duration, args.connections)}
    report["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    for kind, median in report["median"].items():
        print(f"{kind:9} {median['calls_per_s']:8,.0f} calls/s  {median['server_cpu_us_per_call']:6.0f} µs "
              f"server CPU/call  p50 {median['p50_ms']:.1f} ms  p99 {median['p99_ms']:.1f} ms")
    print(f"grpc.aio / native server CPU per call: {report['cpu_ratio_grpc_aio_over_native']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

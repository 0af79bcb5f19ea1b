"""The native load generator (bench/agentload, Go on grpc-go) as a drop-in
for loadgen.run_load.

Why it exists: the Python generator costs ≈ 290 µs of CPU per call, on the
same two cores as the server it measures, so at fastca's rates it takes a
fifth of the machine and every ratio measures the generator too. agentload
speaks to fastca through grpc-go, the client stack istio-agent is built on,
with the same shape of load (one TLS connection per agent, one call in
flight, a token each, distinct CSRs, the same window and pacing rules) for a
fraction of the CPU. It drives cfssl over HTTP/1.1 keep-alive the same way,
so both sides of a comparison get the same generator.

It is built on first use from bench/agentload/main.go with Debian's Go
toolchain and grpc-go sources (``golang-go``, ``golang-google-grpc-dev``; no
module download), into a cache keyed by the source's hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cfssl_peer import SIGN_PATH, CfsslTarget
from bench.loadgen import BulkTarget, IstioTarget, LoadSpec, measure_window, summarise

__all__ = ["GeneratorUnavailable", "agentload_binary", "cache_dir", "go_binary", "run_native_load"]

_SOURCE = Path(__file__).resolve().parent / "agentload" / "main.go"
_GOPATH = Path("/usr/share/gocode")           # where Debian's golang-*-dev packages put their sources
_ISTIO_METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
_READY_TIMEOUT_S = 120.0
_INSTALL_HINT = "apt-get install golang-go golang-google-grpc-dev"


class GeneratorUnavailable(RuntimeError):
    """The native generator cannot be built here; the message says what to install."""


def cache_dir() -> Path:
    """Where the bench keeps what it builds (agentload, the native echo core)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fastca-bench"


def agentload_binary() -> Path:
    """The built generator, compiled now if this source has not been yet."""
    return go_binary(_SOURCE.parent, "agentload")


def go_binary(source_dir: Path, name: str) -> Path:
    """A bench Go program built from ``source_dir`` (once per source: the
    binary is keyed by the hash of its main.go) with Debian's Go and grpc-go."""
    digest = hashlib.sha256((source_dir / "main.go").read_bytes()).hexdigest()[:16]
    binary = cache_dir() / f"{name}-{digest}"
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None or not (_GOPATH / "src" / "google.golang.org" / "grpc").is_dir():
        raise GeneratorUnavailable(f"bench/{name} needs Go and grpc-go's sources: {_INSTALL_HINT}")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(".partial")
    # GOPATH mode against Debian's packaged sources: nothing is fetched.
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(_GOPATH), "GOFLAGS": "",
           "GOCACHE": str(cache_dir() / "go-build")}
    result = subprocess.run([go, "build", "-o", str(partial), "."], cwd=source_dir, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise GeneratorUnavailable(f"building bench/{name} failed ({_INSTALL_HINT}?):\n{result.stderr[-2000:]}")
    partial.replace(binary)      # atomic: a concurrent run never sees half a binary
    return binary


def _records(payloads: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in payloads)


def native_config(target: Any, spec: LoadSpec, csrs: list[bytes], workdir: Path) -> dict[str, Any]:
    requests = workdir / "requests.bin"
    common = {"address": target.address, "requests_file": str(requests), "connections": spec.connections,
              "warmup_s": spec.warmup_s, "duration_s": spec.duration_s, "call_timeout_s": spec.call_timeout_s,
              "rate": spec.rate or 0.0}
    if isinstance(target, BulkTarget):
        raise TypeError("the native generator drives the Istio path and cfssl, not the bulk RPC")
    if isinstance(target, IstioTarget):
        requests.write_bytes(_records([target.prepare(csr).SerializeToString() for csr in csrs]))
        root = workdir / "root.pem"
        root.write_bytes(target.root_pem)
        identity: dict[str, str] = {}
        if target.client_cert_pem is not None:
            (workdir / "client-cert.pem").write_bytes(target.client_cert_pem)
            key_file = workdir / "client-key.pem"
            key_file.write_bytes(target.client_key_pem or b"")
            key_file.chmod(0o600)
            identity = {"client_cert_file": str(workdir / "client-cert.pem"), "client_key_file": str(key_file)}
        tokens = [target.token(0, i) for i in range(spec.connections)] if target.use_tokens else []
        return {**common, "kind": "istio", "root_pem_file": str(root), "server_name": target.server_name,
                "method": _ISTIO_METHOD, "cluster_id": target.cluster_id, "tokens": tokens, **identity}
    if isinstance(target, CfsslTarget):
        requests.write_bytes(_records([target.body(csr) for csr in csrs]))
        return {**common, "kind": "cfssl", "method": SIGN_PATH}
    raise TypeError(f"the native generator cannot drive {type(target).__name__}")


def _report(raw: dict[str, Any]) -> dict[str, Any]:
    """agentload's JSON as a loadgen worker report (what merge_load reads)."""
    return {"latencies": array("d", raw["latencies_s"] or ()).tobytes(),
            "error_latencies": array("d", raw["error_latencies_s"] or ()).tobytes(),
            "errors": raw["errors"], "cpu_s": raw["cpu_s"]}


def run_native_load(target: Any, spec: LoadSpec, csrs: list[bytes], *, server_pid: int | None,
                    tick: Callable[[float], None] | None = None) -> dict[str, Any]:
    """loadgen.run_load's contract with agentload as the generator. One
    process (Go spreads its connections over every core); ``spec.processes``
    does not apply."""
    binary = agentload_binary()
    with tempfile.TemporaryDirectory(prefix="agentload-") as tmp:
        workdir = Path(tmp)
        config = workdir / "config.json"
        config.write_text(json.dumps(native_config(target, spec, csrs, workdir)))
        # stderr to a file, not a pipe: grpc-go's error logs under overload
        # must never fill a pipe nobody reads and stall the generator.
        errors = workdir / "stderr"
        with errors.open("wb") as sink, subprocess.Popen([str(binary), str(config)], stdin=subprocess.PIPE,
                                                          stdout=subprocess.PIPE, stderr=sink) as process:
            assert process.stdin is not None and process.stdout is not None
            try:
                _await_ready(process, errors)
                process.stdin.write(b"go\n")
                process.stdin.flush()
                start_at = time.monotonic()
                measured = measure_window(start_at, spec, server_pid, tick)
                out, _ = process.communicate(timeout=spec.call_timeout_s + 60)
            except BaseException:
                process.kill()
                raise
            if process.returncode != 0:
                raise RuntimeError(f"agentload exited {process.returncode}: {_tail(errors)}")
    raw = json.loads(out)
    summary = summarise([_report(raw)], spec, measured)
    summary["all_ok"] = raw.get("all_ok")       # warm-up and drain included (the audit log's count)
    return summary


def _tail(path: Path) -> str:
    return path.read_bytes()[-2000:].decode(errors="replace")


def _await_ready(process: subprocess.Popen[bytes], errors: Path) -> None:
    """Until agentload says every connection is up (or says why not)."""
    import selectors

    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=_READY_TIMEOUT_S):
            raise TimeoutError("agentload did not connect within the time allowed")
    line = process.stdout.readline()
    if line.strip() != b"ready":
        process.wait(timeout=10)
        raise RuntimeError(f"agentload failed to start: {_tail(errors)}")

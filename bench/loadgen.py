"""An agent-like load generator: P processes x C connections, one call in
flight per connection, distinct CSRs made before any timing.

For the Istio path each connection is its own grpc.aio channel (its own TCP
connection and TLS session: a local subchannel pool, so channels to the same
target do not share one), verifies the server against the CA's root bundle
with server name ``localhost``, and sends ``authorization: Bearer <token>``,
``clusterid`` and the ``CertSigner`` metadata as istio-agent does. Each
connection has a token of its own, so the server sees 64 callers, not one.

Timeline of a run: every process connects all its channels, then all start
together; calls completing in the first ``warmup_s`` are not counted; the
measured window is the next ``duration_s``; then no new calls start and the
ones in flight finish (bounded by the call deadline).

Closed loop by default (each connection sends its next call when the last
one returns). With ``rate`` the calls are paced to that total rate, each
connection on its own schedule, and latency counts from the scheduled send
time, so a server that falls behind is charged for the wait (no coordinated
omission). A connection that is still busy at its next slot sends late:
``rate`` is a ceiling, not a promise; compare it with the measured rate.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from bench.parallel import Parallel, sleep_until
from bench.stats import merge_load

__all__ = ["BulkTarget", "CallFailed", "IstioTarget", "LoadSpec", "MeasuredWindow", "machine_cpu_seconds", "make_csrs",
           "measure_window", "process_tree_cpu_seconds", "run_load", "summarise"]

# After a failed call a connection pauses briefly, as an agent backs off,
# instead of spinning on an error at full speed.
_PAUSE_AFTER_ERROR_S = 0.01
_TICK_S = 0.25


def make_csrs(count: int, key_type: str = "rsa-2048", distinct_keys: int = 32,
              trust_domain: str = "cluster.local") -> list[bytes]:
    """``count`` distinct PEM CSRs shaped like istio-agent's (empty subject,
    one critical SPIFFE URI SAN), signed by ``distinct_keys`` keys in turn:
    key generation is what is slow, and a CSR is distinct by its SAN."""
    if key_type == "rsa-2048":
        keys: list[Any] = [rsa.generate_private_key(65537, 2048) for _ in range(min(count, distinct_keys))]
    elif key_type == "ec-p256":
        keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(min(count, distinct_keys))]
    else:
        raise ValueError(f"CSR key type {key_type!r}: rsa-2048 or ec-p256")
    csrs = []
    for i in range(count):
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
            f"spiffe://{trust_domain}/ns/bench-{i % 97}/sa/workload-{i}")])
        builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(san, critical=True)
        csrs.append(builder.sign(keys[i % len(keys)], hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return csrs


class CallFailed(Exception):
    """A call that did not return a certificate; ``code`` is what is counted
    (a gRPC status name, an HTTP status, or a client-side failure)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class Connection(Protocol):
    async def call(self, prepared: Any) -> None: ...
    async def close(self) -> None: ...


class Target(Protocol):
    """What a worker process drives; pickled into it, so plain data only."""

    def prepare(self, csr_pem: bytes) -> Any: ...
    async def connect(self, process_index: int, connection_index: int, call_timeout_s: float) -> Connection: ...


@dataclass(frozen=True)
class LoadSpec:
    processes: int = 2
    connections: int = 64          # in all, spread over the processes
    warmup_s: float = 5.0
    duration_s: float = 30.0
    call_timeout_s: float = 10.0
    rate: float | None = None      # total calls/s; None: closed loop

    def connections_of(self, process_index: int) -> int:
        base, extra = divmod(self.connections, self.processes)
        return base + (1 if process_index < extra else 0)


@dataclass(frozen=True)
class IstioTarget:
    address: str                   # 127.0.0.1:PORT
    root_pem: bytes
    server_name: str = "localhost"
    cluster_id: str = "Kubernetes"
    ttl_seconds: int = 86400
    # A client certificate every connection presents (a VM agent's), and
    # whether the bearer tokens are sent too.
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = None
    use_tokens: bool = True

    @staticmethod
    def token(process_index: int, connection_index: int) -> str:
        """A service-account token the bench's fake API server accepts
        (sa.<namespace>.<account>.<pod>): one workload per connection."""
        return f"sa.bench-{process_index}.load-{connection_index}.pod-{process_index}-{connection_index}"

    def prepare(self, csr_pem: bytes) -> Any:
        from google.protobuf import struct_pb2

        from fastca.proto import istio_ca_pb2

        metadata = struct_pb2.Struct()
        metadata.update({"CertSigner": ""})
        return istio_ca_pb2.IstioCertificateRequest(csr=csr_pem.decode(), validity_duration=self.ttl_seconds,
                                                    metadata=metadata)

    async def connect(self, process_index: int, connection_index: int, call_timeout_s: float) -> Connection:
        from fastca.proto import istio_ca_pb2_grpc

        channel, headers = await self._open(process_index, connection_index)
        return _IstioConnection(channel, istio_ca_pb2_grpc.IstioCertificateServiceStub(channel), headers,
                                call_timeout_s)

    async def _open(self, process_index: int, connection_index: int) -> tuple[Any, tuple[tuple[str, str], ...]]:
        """A channel of its own (its own TCP connection and TLS session) and
        the headers an agent sends on it."""
        import grpc

        channel = grpc.aio.secure_channel(
            self.address, grpc.ssl_channel_credentials(self.root_pem, self.client_key_pem, self.client_cert_pem),
            options=[("grpc.ssl_target_name_override", self.server_name), ("grpc.use_local_subchannel_pool", 1)])
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        headers: tuple[tuple[str, str], ...] = (("clusterid", self.cluster_id),)
        if self.use_tokens:
            headers = (("authorization", f"Bearer {self.token(process_index, connection_index)}"), *headers)
        return channel, headers


@dataclass(frozen=True)
class BulkTarget(IstioTarget):
    """fastca's bulk RPC: each call carries ``per_call`` CSRs (a node agent
    renewing many workloads at once). A call counts as ``per_call``
    certificates; it succeeds only if every element does."""

    per_call: int = 100

    @property
    def certs_per_call(self) -> int:
        return self.per_call

    def prepare_all(self, csrs: list[bytes]) -> list[Any]:
        from fastca.proto import bulk_pb2

        elements = [self.prepare(csr) for csr in csrs]
        calls = max(1, len(elements) // self.per_call)
        return [bulk_pb2.BulkCertificateRequest(
                    requests=[elements[(c * self.per_call + i) % len(elements)] for i in range(self.per_call)])
                for c in range(calls)]

    async def connect(self, process_index: int, connection_index: int, call_timeout_s: float) -> Connection:
        from fastca.proto import bulk_pb2_grpc

        channel, headers = await self._open(process_index, connection_index)
        return _BulkConnection(channel, bulk_pb2_grpc.BulkCertificateServiceStub(channel), headers, call_timeout_s)


class _IstioConnection:
    def __init__(self, channel: Any, stub: Any, headers: tuple[tuple[str, str], ...], timeout_s: float) -> None:
        self._channel = channel
        self._stub = stub
        self._headers = headers
        self._timeout_s = timeout_s

    async def call(self, prepared: Any) -> None:
        import grpc

        try:
            response = await self._stub.CreateCertificate(prepared, metadata=self._headers, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            raise CallFailed(error.code().name) from None
        if not response.cert_chain:
            raise CallFailed("EMPTY_CHAIN")

    async def close(self) -> None:
        await self._channel.close()


class _BulkConnection(_IstioConnection):
    async def call(self, prepared: Any) -> None:
        import grpc

        try:
            response = await self._stub.CreateCertificates(prepared, metadata=self._headers, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            raise CallFailed(error.code().name) from None
        if len(response.results) != len(prepared.requests):
            raise CallFailed("MISSING_RESULTS")
        for result in response.results:
            if result.code != 0:
                raise CallFailed(f"ELEMENT_{_status_name(result.code)}")


def _status_name(code: int) -> str:
    import grpc

    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)     # every thread of this process
    return usage.ru_utime + usage.ru_stime


class _Window:
    """Where a worker records what completed inside the measured window."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self.latencies = array("d")
        self.error_latencies = array("d")
        self.errors: Counter[str] = Counter()

    def record(self, done: float, latency: float, code: str | None, service_latency: float) -> None:
        """``latency`` counts from the scheduled send time (a server that falls
        behind is charged for the wait); ``service_latency`` from the actual
        send, which says how fast a refusal came back."""
        if self.start <= done < self.end:
            if code is None:
                self.latencies.append(latency)
            else:
                self.errors[code] += 1
                self.error_latencies.append(service_latency)


async def _drive(connection: Connection, prepared: list[Any], first: int, stride: int, window: _Window,
                 schedule: tuple[float, float] | None) -> None:
    """One connection: one call in flight, until the window closes."""
    index, sent = first, 0
    while True:
        now = time.monotonic()
        if now >= window.end:
            return
        if schedule is None:
            began = now
        else:
            phase, interval = schedule
            began = phase + sent * interval
            if began > now:
                await asyncio.sleep(began - now)
        sent += 1
        sent_at = time.monotonic()
        try:
            await connection.call(prepared[index % len(prepared)])
            code = None
        except CallFailed as failure:
            code = failure.code
        except Exception as error:  # noqa: BLE001 - a client-side failure is counted, never fatal to the run
            code = f"CLIENT_{type(error).__name__}"
        done = time.monotonic()
        window.record(done, done - began, code, done - sent_at)
        index += stride
        if code is not None:
            await asyncio.sleep(_PAUSE_AFTER_ERROR_S)


async def _load_async(target: Target, spec: LoadSpec, process_index: int, csrs: list[bytes],
                      go: Callable[[], float]) -> dict[str, Any]:
    prepare_all = getattr(target, "prepare_all", None)
    prepared = prepare_all(csrs) if prepare_all is not None else [target.prepare(csr) for csr in csrs]
    count = spec.connections_of(process_index)
    connections = await asyncio.gather(*(target.connect(process_index, i, spec.call_timeout_s)
                                         for i in range(count)))
    start_at = await asyncio.get_running_loop().run_in_executor(None, go)
    window = _Window(start_at + spec.warmup_s, start_at + spec.warmup_s + spec.duration_s)

    async def cpu_over_window() -> float:
        await asyncio.sleep(max(0.0, window.start - time.monotonic()))
        before = _own_cpu_seconds()
        await asyncio.sleep(max(0.0, window.end - time.monotonic()))
        return _own_cpu_seconds() - before

    def schedule(i: int) -> tuple[float, float] | None:
        if spec.rate is None:
            return None
        interval = spec.connections / spec.rate
        slot = (process_index + i * spec.processes) / spec.connections     # stagger every connection
        return start_at + slot * interval, interval

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    cpu_task = asyncio.create_task(cpu_over_window())
    drivers = [asyncio.create_task(_drive(c, prepared, i, count, window, schedule(i)))
               for i, c in enumerate(connections)]
    cpu_s = await cpu_task
    _, late = await asyncio.wait(drivers, timeout=spec.call_timeout_s + 5)
    for task in late:
        task.cancel()
    await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
    return {"latencies": window.latencies.tobytes(), "error_latencies": window.error_latencies.tobytes(),
            "errors": dict(window.errors), "cpu_s": cpu_s}


def _load_worker(target: Target, spec: LoadSpec, process_index: int, csrs: list[bytes],
                 go: Callable[[], float]) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_load_async(target, spec, process_index, csrs, go))


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its descendants (with their reaped
    children), from /proc: another process's CPU without touching it."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                text = handle.read()
        except OSError:               # it exited meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()     # the name may hold spaces or parentheses
        # fields[1] = ppid; fields[11:15] = utime, stime, cutime, cstime
        stats[int(entry)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / ticks)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _) in stats.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(stats[p][1] for p in tree if p in stats)


def machine_cpu_seconds() -> dict[str, float]:
    """Whole-machine CPU time by kind, from /proc/stat (all cores): ``busy``
    (user, nice, system, irq, softirq), ``steal`` (taken by the hypervisor
    for other guests: a shared machine's noise) and ``idle`` (idle, iowait)."""
    with open("/proc/stat") as handle:
        fields = [int(f) for f in handle.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    ticks = os.sysconf("SC_CLK_TCK")
    return {"busy": (user + nice + system + irq + softirq) / ticks, "steal": steal / ticks,
            "idle": (idle + iowait) / ticks}


def run_load(target: Target, spec: LoadSpec, csrs: list[bytes], *, server_pid: int | None,
             tick: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Drive ``target``; return the merged summary (stats.merge_load), with
    the server's CPU over the same window when its pid is known.
    ``tick(fraction)`` is called a few times a second for a progress bar."""
    args = [(target, spec, p, csrs[p::spec.processes]) for p in range(spec.processes)]
    with Parallel(_load_worker, args) as run:
        measured = measure_window(run.go(), spec, server_pid, tick)
        reports = run.results(timeout_s=spec.call_timeout_s + 60)
    return summarise(reports, spec, measured, certs_per_call=getattr(target, "certs_per_call", 1))


@dataclass(frozen=True)
class MeasuredWindow:
    """What the driver measured around the generator's window: the server's
    CPU (None without its pid) and the machine's, by kind."""

    server_cpu_s: float | None
    machine: dict[str, float]


def measure_window(start_at: float, spec: LoadSpec, server_pid: int | None,
                   tick: Callable[[float], None] | None) -> MeasuredWindow:
    """Block through a load that started at ``start_at`` (time.monotonic) and
    measure the server's and the machine's CPU over its measured window."""
    total_s = spec.warmup_s + spec.duration_s
    window_start, window_end = start_at + spec.warmup_s, start_at + total_s

    def wait_until(deadline: float) -> None:
        while time.monotonic() < deadline:
            sleep_until(min(deadline, time.monotonic() + _TICK_S))
            if tick is not None:
                tick(min(1.0, (time.monotonic() - start_at) / total_s))

    wait_until(window_start)
    server_before = process_tree_cpu_seconds(server_pid) if server_pid else None
    machine_before = machine_cpu_seconds()
    wait_until(window_end)
    server_after = process_tree_cpu_seconds(server_pid) if server_pid else None
    machine_after = machine_cpu_seconds()
    server_cpu_s = server_after - server_before if server_before is not None and server_after is not None else None
    return MeasuredWindow(server_cpu_s, {kind: machine_after[kind] - machine_before[kind] for kind in machine_after})


def summarise(reports: list[dict[str, Any]], spec: LoadSpec, measured: MeasuredWindow, *,
              certs_per_call: int = 1) -> dict[str, Any]:
    """The generator's reports and the window's CPU as one load summary."""
    cpus = os.cpu_count() or 1
    summary = merge_load(reports, duration_s=spec.duration_s, cpus=cpus, server_cpu_s=measured.server_cpu_s,
                         certs_per_call=certs_per_call)
    for kind in ("busy", "steal", "idle"):
        summary[f"machine_{kind}_share"] = measured.machine[kind] / (spec.duration_s * cpus)
    # CPU that neither side of the benchmark used: other tenants of a shared
    # machine (and this parent process). Large values make the run suspect.
    summary["machine_other_share"] = max(0.0, summary["machine_busy_share"] - summary["generator_cpu_share"]
                                         - summary.get("server_cpu_share", 0.0))
    summary["offered_rate"] = spec.rate
    return summary

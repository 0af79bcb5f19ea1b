"""Overload and soak runs of a real ``fastca serve`` (bench/README.md, targets 3 and 6).

    python -m bench stability overload [--factor 3] [--connections 512] [--queue-limit 128] [--json F]
    python -m bench stability soak [--fraction 0.8] [--minutes 10] [--json F]

Both start the bench's server (SoftHSM CA key, TLS, TokenReview, audit log,
``--workers``), measure its peak first (closed loop, 64 agent connections)
unless ``--peak`` is given, and sample every server process's resident
memory from /proc while they run.

overload: the peak run, then ``--factor`` x the peak offered by
``--connections`` paced connections (more callers than the per-worker queue
bound, so it fills), then the peak run again. It reports how fast the
refusals come back, what was still issued, the memory high-water mark and
whether the rate recovered.

soak: ``--fraction`` of the peak for ``--minutes``; it reports the rate,
latencies and each worker's memory over time, with its least-squares slope.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.fake_apiserver import FakeApiServer
from bench.fastca_server import FastcaServer
from bench.loadgen import IstioTarget, LoadSpec, make_csrs, run_load
from bench.native_load import run_native_load
from rich.console import Console
from rich.table import Table
from bench.stats import write_report

__all__ = ["main", "memory_summary"]

_PEAK_CONNECTIONS = 64
MEMORY_LIMIT_MB = 150          # bench/README.md, target 6, per process


class MemorySampler:
    """Samples the server's per-process RSS every ``interval_s`` on a thread."""

    def __init__(self, server: FastcaServer, interval_s: float) -> None:
        self._server = server
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.samples: list[tuple[float, dict[int, int]]] = []
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._started = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._started, self._server.rss_bytes()))
            self._stop.wait(self._interval_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic() - self._started, self._server.rss_bytes()))


def _slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 2 or len({t for t, _ in points}) < 2:
        return 0.0
    times, values = zip(*points)
    return statistics.linear_regression(times, values).slope * 60


def memory_summary(samples: list[tuple[float, dict[int, int]]], skip_s: float = 0.0) -> dict[str, Any]:
    """Per process: first, last and highest RSS (MB) after ``skip_s``, and the
    least-squares slope in MB per minute; plus the highest of any process."""
    per_pid: dict[int, list[tuple[float, float]]] = {}
    for at, by_pid in samples:
        if at < skip_s:
            continue
        for pid, rss in by_pid.items():
            per_pid.setdefault(pid, []).append((at, rss / 2**20))
    processes = {
        str(pid): {"first_mb": points[0][1], "last_mb": points[-1][1], "max_mb": max(v for _, v in points),
                   "slope_mb_per_min": _slope_per_minute(points), "samples": len(points)}
        for pid, points in sorted(per_pid.items())}
    highest = max((p["max_mb"] for p in processes.values()), default=float("nan"))
    return {"processes": processes, "max_mb": highest, "limit_mb": MEMORY_LIMIT_MB,
            "within_limit": highest < MEMORY_LIMIT_MB}


def _peak(server: FastcaServer, csrs: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    spec = LoadSpec(processes=args.processes, connections=_PEAK_CONNECTIONS, warmup_s=3.0,
                    duration_s=args.peak_seconds, call_timeout_s=args.call_timeout)
    return _load(args)(IstioTarget(server.address, server.root_pem), spec, csrs, server_pid=server.pid)


def _load(args: argparse.Namespace) -> Any:
    return run_native_load if args.generator == "native" else run_load


def _brief(load: dict[str, Any]) -> dict[str, Any]:
    keys = ("certs_per_s", "offered_rate", "errors", "latency_ms", "error_latency_ms", "server_cpu_share",
            "generator_cpu_share", "machine_other_share")
    return {key: load.get(key) for key in keys}


def run_overload(server: FastcaServer, csrs: list[bytes], args: argparse.Namespace, say: Any) -> dict[str, Any]:
    say("overload: peak (closed loop, 64 connections)")
    with MemorySampler(server, args.sample_seconds) as before_memory:
        before = _peak(server, csrs, args)
    peak = args.peak or before["certs_per_s"]
    offered = args.factor * peak
    say(f"overload: {args.factor:g}x peak = {offered:,.0f} calls/s over {args.connections} connections")
    spec = LoadSpec(processes=args.processes, connections=args.connections, warmup_s=3.0,
                    duration_s=args.phase_seconds, call_timeout_s=args.call_timeout, rate=offered)
    audited_before = server.issued_count()
    with MemorySampler(server, args.sample_seconds) as overload_memory:
        overload = _load(args)(IstioTarget(server.address, server.root_pem), spec, csrs, server_pid=server.pid)
    audited = server.issued_count() - audited_before
    say("overload: peak again, from the first second (recovery within 5 s)")
    recovery = _load(args)(IstioTarget(server.address, server.root_pem),
                           LoadSpec(processes=args.processes, connections=_PEAK_CONNECTIONS, warmup_s=0.0,
                                    duration_s=5.0, call_timeout_s=args.call_timeout),
                           csrs, server_pid=server.pid)
    after = _peak(server, csrs, args)
    refused = overload["errors"].get("RESOURCE_EXHAUSTED", 0)
    return {
        "peak_certs_per_s": peak,
        "offered_calls_per_s": offered,
        "before": _brief(before),
        "overload": _brief(overload),
        "refusals": {"resource_exhausted": refused,
                     "p50_ms": overload["error_latency_ms"]["p50"] if refused else None},
        # Certificates the audit log holds for the overload phase, against the
        # calls that received one: any excess went to callers who had left.
        "overload_audit": {"recorded": audited, "received": overload.get("all_ok"),
                           "recorded_not_received": (audited - overload["all_ok"])
                           if overload.get("all_ok") is not None else None},
        "recovery_first_5s": _brief(recovery),
        "recovery_first_5s_ratio": recovery["certs_per_s"] / before["certs_per_s"] if before["certs_per_s"] else None,
        "after": _brief(after),
        "recovered_ratio": after["certs_per_s"] / before["certs_per_s"] if before["certs_per_s"] else None,
        "memory_before": memory_summary(before_memory.samples),
        "memory_overload": memory_summary(overload_memory.samples),
    }


def run_soak(server: FastcaServer, csrs: list[bytes], args: argparse.Namespace, say: Any) -> dict[str, Any]:
    if args.peak:
        peak = args.peak
    else:
        say("soak: peak (closed loop, 64 connections)")
        peak = _peak(server, csrs, args)["certs_per_s"]
    rate = args.fraction * peak
    warmup_s = 10.0
    say(f"soak: {rate:,.0f} calls/s ({args.fraction:.0%} of {peak:,.0f}) for {args.minutes:g} min")
    spec = LoadSpec(processes=args.processes, connections=_PEAK_CONNECTIONS, warmup_s=warmup_s,
                    duration_s=args.minutes * 60, call_timeout_s=args.call_timeout, rate=rate)
    with MemorySampler(server, args.sample_seconds) as memory:
        load = _load(args)(IstioTarget(server.address, server.root_pem), spec, csrs, server_pid=server.pid)
    return {"peak_certs_per_s": peak, "load": _brief(load),
            "memory": memory_summary(memory.samples, skip_s=warmup_s),
            "memory_samples": [(round(at, 1), {str(pid): rss for pid, rss in by_pid.items()})
                               for at, by_pid in memory.samples]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["overload", "soak"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="fastca serve --workers [CPUs]")
    parser.add_argument("--processes", type=int, default=2, help="Python load generator processes [2]")
    parser.add_argument("--generator", choices=["python", "native"], default="python",
                        help="the Python generator, or bench/agentload (Go, grpc-go), which can offer 3x "
                             "the peak without taking the server's CPU [python]")
    parser.add_argument("--peak", type=float, help="the peak rate, if already known (skips measuring it)")
    parser.add_argument("--peak-seconds", type=float, default=15.0, help="length of a peak measurement [15]")
    parser.add_argument("--factor", type=float, default=3.0, help="overload: offered load over the peak [3]")
    parser.add_argument("--connections", type=int, default=512, help="overload: paced connections [512]")
    parser.add_argument("--queue-limit", type=int, default=128,
                        help="server.queue_limit and server.max_concurrent_rpcs per worker for the run "
                             "[128]; more callers than this must be refused, not queued")
    parser.add_argument("--phase-seconds", type=float, default=30.0, help="overload: measured seconds [30]")
    parser.add_argument("--fraction", type=float, default=0.8, help="soak: fraction of the peak [0.8]")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak: measured minutes [10]")
    parser.add_argument("--sample-seconds", type=float, default=5.0, help="RSS sampling interval [5]")
    parser.add_argument("--call-timeout", type=float, default=10.0, help="deadline of each call [10]")
    parser.add_argument("--csrs", type=int, default=2048, help="distinct RSA-2048 CSRs [2048]")
    parser.add_argument("--json", type=Path, help="write the report here")
    return parser


def _render(report: dict[str, Any], console: Console) -> None:
    console.print_json(json.dumps({k: v for k, v in report.items() if k != "memory_samples"}))
    memory = report.get("memory") or report.get("memory_overload")
    if memory:
        table = Table(title=f"Server memory (RSS, MB; limit {memory['limit_mb']} per process)")
        for column in ("pid", "first", "last", "max", "slope MB/min"):
            table.add_column(column, justify="right")
        for pid, p in memory["processes"].items():
            table.add_row(pid, f"{p['first_mb']:.1f}", f"{p['last_mb']:.1f}", f"{p['max_mb']:.1f}",
                          f"{p['slope_mb_per_min']:+.2f}")
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)

    def say(text: str) -> None:
        console.print(f"[dim]{dt.datetime.now():%H:%M:%S}[/] {text}")

    with tempfile.TemporaryDirectory(prefix="fastca-stability-") as tmp, ExitStack() as running:
        workdir = Path(tmp)
        say(f"setup: {args.csrs} RSA-2048 CSRs, CA, fastca serve --workers {args.workers}")
        csrs = make_csrs(args.csrs, "rsa-2048")
        api = running.enter_context(FakeApiServer(workdir))
        server = running.enter_context(FastcaServer(
            workdir / "fastca", api.url, api.ca_file, workers=args.workers,
            server_settings={"queue_limit": args.queue_limit, "max_concurrent_rpcs": args.queue_limit}))
        started = time.monotonic()
        result = (run_overload if args.mode == "overload" else run_soak)(server, csrs, args, say)
    report = {"meta": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                       "command": shlex.join(sys.argv), "cpus": os.cpu_count(), "workers": args.workers,
                       "generator": args.generator,
                       "queue_limit_per_worker": args.queue_limit,
                       "elapsed_s": round(time.monotonic() - started, 1)},
              **result}
    _render(report, Console())
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

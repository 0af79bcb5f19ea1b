"""fastca against a CA built the way istiod's is (bench/goca), in one run.

    python -m bench vs-istiod [--rounds 3] [--duration 20] [--connections 64] [--json F]

Both servers are driven by the native generator (bench/agentload: grpc-go,
istio-agent's client stack) at the same concurrency with the same
RSA-2048 agent CSRs, once with bearer-token authentication and once with a
client certificate on every connection (VM agents, PROV_CERT), on the main
port of each. fastca runs as ``fastca serve`` on its defaults (a P-256 key
in SoftHSM, one worker per CPU, the SQLite audit log); goca holds its P-256
key in memory and records nothing. Each round measures every cell back to
back; the report gives medians over rounds and the fastca/goca ratios of
certificates/s and of server CPU per certificate.
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
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.fake_apiserver import FakeApiServer
from bench.fastca_server import FastcaServer
from bench.go_peer import GoPeer
from bench.loadgen import IstioTarget, LoadSpec, make_csrs
from bench.native_load import run_native_load

__all__ = ["main", "measure"]

MODES = ("token", "client-cert")


def _cell(summary: dict[str, Any]) -> dict[str, Any]:
    return {"certs_per_s": summary["certs_per_s"], "errors": summary["errors"],
            "p50_ms": summary["latency_ms"]["p50"], "p99_ms": summary["latency_ms"]["p99"],
            "server_cpu_us_per_cert": summary.get("server_cpu_us_per_cert"),
            "generator_cpu_share": summary["generator_cpu_share"],
            "machine_other_share": summary["machine_other_share"]}


def measure(rounds: int, duration_s: float, connections: int, workdir: Path) -> dict[str, Any]:
    spec = LoadSpec(processes=1, connections=connections, warmup_s=5.0, duration_s=duration_s)
    csrs = make_csrs(2048, "rsa-2048")
    cells: dict[str, list[dict[str, Any]]] = {}
    with FakeApiServer(workdir) as api, FastcaServer(workdir / "fastca", api.url, api.ca_file) as fastca, \
            GoPeer(workdir, connections=connections) as goca:
        cert, key = fastca.client_identity("spiffe://cluster.local/ns/vm/sa/bench")
        fastca_targets = {
            "token": IstioTarget(fastca.address, fastca.root_pem),
            "client-cert": replace(IstioTarget(fastca.address, fastca.root_pem), client_cert_pem=cert,
                                   client_key_pem=key, use_tokens=False),
        }
        goca_targets = {"token": goca.target(), "client-cert": goca.target(client_certificate=True)}
        for round_index in range(rounds):
            order = [("fastca", fastca.pid), ("goca", goca.pid)]
            if round_index % 2:
                order.reverse()
            for mode in MODES:
                for name, pid in order:
                    target = (fastca_targets if name == "fastca" else goca_targets)[mode]
                    summary = run_native_load(target, spec, csrs, server_pid=pid)
                    cells.setdefault(f"{name}/{mode}", []).append(_cell(summary))
                    print(f"round {round_index + 1} {name:6} {mode:11} {summary['certs_per_s']:8,.0f}/s  "
                          f"p99 {summary['latency_ms']['p99']:6.1f} ms  "
                          f"server {summary.get('server_cpu_us_per_cert') or 0:6.0f} µs/cert  "
                          f"errors {summary['errors']}", flush=True)
    medians = {name: {key: statistics.median(c[key] for c in runs)
                      for key in ("certs_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_cert")}
               for name, runs in cells.items()}
    ratios = {}
    for mode in MODES:
        ours, peer = medians[f"fastca/{mode}"], medians[f"goca/{mode}"]
        ratios[f"{mode}/certs_per_s"] = ours["certs_per_s"] / peer["certs_per_s"]
        ratios[f"{mode}/server_cpu_per_cert"] = ours["server_cpu_us_per_cert"] / peer["server_cpu_us_per_cert"]
    return {"rounds": cells, "median": medians, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench vs-istiod", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per cell and round [20]")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastca-vs-istiod-") as tmp:
        report = measure(args.rounds, args.duration, args.connections, Path(tmp))
    report["meta"] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "command": shlex.join(["python -m bench vs-istiod", *argv]), "cpus": os.cpu_count(),
                      "elapsed_s": round(time.monotonic() - started, 1)}
    print(f"medians of {args.rounds} rounds, {args.connections} connections:")
    for name, median in report["median"].items():
        print(f"  {name:18} {median['certs_per_s']:8,.0f}/s  p50 {median['p50_ms']:5.1f} ms  "
              f"p99 {median['p99_ms']:6.1f} ms  server {median['server_cpu_us_per_cert']:6.0f} µs/cert")
    for name, value in report["ratios"].items():
        print(f"  fastca/goca {name}: {value:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

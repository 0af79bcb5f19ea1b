"""The fastca benchmark: the Istio path under agent-like load, the raw limits
underneath it and, when cfssl is installed, the peer, all in one invocation
(bench/README.md, "How the measurements are made").

    python -m bench run [--rounds 3] [--duration 30] [--connections 64] [--json out.json]
    fastca bench ...                  (the same, from a source checkout)

Sets up in a temporary directory: a CA (embedded SoftHSM token, --key-type),
a fake Kubernetes API server for TokenReview, ``fastca serve`` on 127.0.0.1
with TLS, a probe token, and ``cfssl serve`` with an in-memory CA key of the
same type. Each round runs the fastca load, the cfssl load and the probes
back to back; the report gives per-round figures, their medians, and the
medians of the per-round ratios. Loopback only; every phase is bounded.

The load comes from the Python generator (bench/loadgen.py) or, with
``--generator native``, from bench/agentload (Go, grpc-go), which spends
under half the CPU per call: on a 2-core machine that difference is the
server's (bench/RESULTS.md, third session).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.cfssl_peer import CfsslPeer
from bench.fake_apiserver import FakeApiServer
from bench.fastca_server import FastcaServer, serve_supports_workers
from bench.loadgen import BulkTarget, IstioTarget, LoadSpec, make_csrs, run_load
from bench.native_load import run_native_load
from bench.probes import (
    KEY_LABELS,
    ProbeToken,
    fastca_engine_rate,
    openssl_speed,
    pyca_issue_rate,
    softhsm_sign_rate,
)
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from bench.stats import compute_ratios, median_of_rounds, ratio, write_report

__all__ = ["build_parser", "main", "render", "run_bench"]

_PROBE_CSRS = 500                    # CSRs per pass of the pyca and engine probes
P99_TARGET_MS = 25.0                 # bench/README.md, target 3
HSM_BOUND_TARGET = 0.9               # bench/README.md, target 2
BULK_TARGET = 15000                  # bench/README.md, target 5, certificates/s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cpus = os.cpu_count() or 1
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the report gives medians [3]")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds of each load [30]")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each load [5]")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections in all [64]")
    parser.add_argument("--processes", type=int, default=2, help="Python load generator processes [2]")
    parser.add_argument("--generator", choices=["python", "native"], default="python",
                        help="who makes the load, for fastca and cfssl alike: the Python generator "
                             "(bench/loadgen.py), or bench/agentload (Go, grpc-go: istio-agent's own client "
                             "stack, a fraction of the CPU per call; needs golang-go and "
                             "golang-google-grpc-dev) [python]")
    parser.add_argument("--rate", type=float, help="pace the load to this many calls/s in all (overload and "
                        "latency-at-fraction-of-peak tests); default: closed loop")
    parser.add_argument("--key-type", choices=sorted(KEY_LABELS), default="ec-p256",
                        help="CA key type, in SoftHSM for fastca and in memory for cfssl [ec-p256]")
    parser.add_argument("--csr-key-type", choices=["rsa-2048", "ec-p256"], default="rsa-2048",
                        help="the agents' key type [rsa-2048, as istio-agent]")
    parser.add_argument("--csrs", type=int, default=2048, help="distinct CSRs, made before any timing [2048]")
    parser.add_argument("--call-timeout", type=float, default=10.0, help="deadline of each call, seconds [10]")
    parser.add_argument("--probe-seconds", type=float, default=2.0, help="measuring time of each probe [2]")
    parser.add_argument("--probe-processes", type=int, default=cpus, help=f"N of the N-process probes [{cpus}]")
    parser.add_argument("--server-workers", type=int,
                        help="pass --workers N to fastca serve (only if this fastca's serve has it)")
    parser.add_argument("--cfssl", action=argparse.BooleanOptionalAction, default=True,
                        help="run the cfssl peer when cfssl is installed [on]")
    parser.add_argument("--bulk", type=int, metavar="K",
                        help="drive fastca's bulk RPC with K CSRs per call instead of the Istio path "
                             "(bench/README.md, target 5; no cfssl run, which has no bulk call)")
    parser.add_argument("--json", type=Path, help="write the full report here")
    return parser


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("fastca", "grpcio", "cryptography", "python-pkcs11", "protobuf", "uvloop"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    for name, command in (("openssl", ["openssl", "version"]), ("softhsm", ["softhsm2-util", "--version"])):
        try:
            found[name] = subprocess.run(command, capture_output=True, text=True, timeout=10,
                                         check=False).stdout.strip()
        except OSError:
            found[name] = None
    found["cfssl"] = CfsslPeer.version()
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _probes(token: ProbeToken, args: argparse.Namespace, csrs: list[bytes],
            step: Callable[[str], None]) -> dict[str, float]:
    seconds, n = args.probe_seconds, args.probe_processes
    rates: dict[str, float] = {}
    for key_type, label in KEY_LABELS.items():
        step(f"probe: SoftHSM {label} C_Sign, 1 and {n} processes")
        rates[f"softhsm_{label}_1proc"] = softhsm_sign_rate(token, key_type, 1, seconds)
        rates[f"softhsm_{label}_nproc"] = softhsm_sign_rate(token, key_type, n, seconds)
    step("probe: openssl speed")
    rates.update(openssl_speed(seconds))
    step(f"probe: pyca CertificateBuilder, 1 and {n} processes")
    rates["pyca_issue_1proc"] = pyca_issue_rate(args.key_type, csrs, 1, seconds)
    rates["pyca_issue_nproc"] = pyca_issue_rate(args.key_type, csrs, n, seconds)
    step("probe: fastca engine offline (SoftHSM, no RPC)")
    rates["fastca_engine_softhsm_1proc"] = fastca_engine_rate(token, args.key_type, csrs, seconds)
    return rates


def _round_ratios(key_type: str, fastca: dict[str, Any], cfssl: dict[str, Any] | None,
                  probes: dict[str, float]) -> dict[str, float | None]:
    label = KEY_LABELS[key_type]
    references = {name: probes[name] for name in (f"softhsm_{label}_1proc", f"softhsm_{label}_nproc",
                                                  "pyca_issue_1proc", "pyca_issue_nproc",
                                                  "fastca_engine_softhsm_1proc")}
    ratios = compute_ratios(fastca["certs_per_s"], references, cfssl["certs_per_s"] if cfssl else None)
    # Load-independent: cfssl's server CPU per certificate over fastca's (> 1: fastca spends less).
    ratios["fastca_vs_cfssl_cpu_efficiency"] = ratio(cfssl["server_cpu_us_per_cert"],
                                                     fastca["server_cpu_us_per_cert"]) if cfssl else None
    return ratios


def run_bench(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Every round's measurements, their medians and the run's metadata."""
    if args.server_workers is not None and not serve_supports_workers():
        raise SystemExit("--server-workers: this fastca's `serve` has no --workers option (it runs one process)")
    spec = LoadSpec(processes=args.processes, connections=args.connections, warmup_s=args.warmup,
                    duration_s=args.duration, call_timeout_s=args.call_timeout, rate=args.rate)
    cfssl_status = ("disabled" if not args.cfssl or args.bulk else "ok" if CfsslPeer.available()
                    else "cfssl not installed")
    if args.generator == "native" and args.bulk:
        raise SystemExit("--generator native drives the Istio path and cfssl; the bulk RPC needs --generator python")
    load = run_native_load if args.generator == "native" else run_load
    phase = progress.add_task("setup", total=None)

    def step(text: str) -> None:
        progress.update(phase, description=text)

    def load_bar(text: str) -> Callable[[float], None]:
        task = progress.add_task(text, total=1.0)
        return lambda fraction: progress.update(task, completed=fraction)

    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fastca-bench-") as tmp:
        workdir = Path(tmp)
        step(f"setup: {args.csrs} {args.csr_key_type} CSRs")
        csrs = make_csrs(args.csrs, args.csr_key_type)
        step("setup: CA, fake API server, fastca serve, probe token")
        token = ProbeToken.create(workdir / "probe-token")
        with ExitStack() as running:
            api = running.enter_context(FakeApiServer(workdir))
            server = running.enter_context(FastcaServer(workdir / "fastca", api.url, api.ca_file,
                                                        key_type=args.key_type,
                                                        workers=args.server_workers))
            peer = None
            if cfssl_status == "ok":
                step("setup: cfssl serve")
                peer = running.enter_context(CfsslPeer(workdir / "cfssl", args.key_type, csrs[0]))
            for index in range(args.rounds):
                tag = f"round {index + 1}/{args.rounds}"
                step(f"{tag}: fastca load")
                target = (BulkTarget(server.address, server.root_pem, per_call=args.bulk) if args.bulk
                          else IstioTarget(server.address, server.root_pem))
                fastca = load(target, spec, csrs, server_pid=server.pid, tick=load_bar(f"{tag} fastca"))
                cfssl = None
                if peer is not None:
                    step(f"{tag}: cfssl load")
                    assert peer.target is not None
                    cfssl = load(peer.target, spec, csrs, server_pid=peer.pid, tick=load_bar(f"{tag} cfssl"))
                probes = _probes(token, args, csrs[:_PROBE_CSRS], lambda text, tag=tag: step(f"{tag}: {text}"))
                rounds.append({"fastca": fastca, "cfssl": cfssl, "probes": probes,
                               "ratios": _round_ratios(args.key_type, fastca, cfssl, probes)})
    step("done")
    medians = median_of_rounds([{k: v for k, v in r.items() if v is not None} for r in rounds])
    return {
        "meta": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv),
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "platform": platform.platform(),
            "versions": _versions(),
            "server_processes": args.server_workers or 1,
            "cfssl": cfssl_status,
        },
        "median": medians,
        "ratios": medians["ratios"],
        "targets": _targets(args, medians),
        "rounds": rounds,
    }


def _targets(args: argparse.Namespace, medians: dict[str, Any]) -> dict[str, Any]:
    """The load targets of bench/README.md, judged on the medians."""
    ratios = medians["ratios"]
    if args.bulk:
        out: dict[str, Any] = {"5_bulk_certs_per_s": {"value": medians["fastca"]["certs_per_s"],
                                                      "needs": f">= {BULK_TARGET}"}}
    else:
        out = {
            "1_istio_path_vs_cfssl": {"value": ratios.get("fastca_vs_cfssl"), "needs": ">= 1.0"},
            "3_p99_ms_at_full_load": {"value": medians["fastca"]["latency_ms"]["p99"],
                                      "needs": f"<= {P99_TARGET_MS}"},
        }
    if args.key_type == "rsa-2048" and not args.bulk:
        out["2_hsm_bound_vs_nproc_softhsm"] = {"value": ratios.get("fastca_vs_softhsm_rsa2048_nproc"),
                                              "needs": f">= {HSM_BOUND_TARGET}"}
    for target in out.values():
        value, needs = target["value"], target["needs"]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            target["met"] = None
        else:
            bound = float(needs.split()[1])
            target["met"] = value >= bound if needs.startswith(">=") else value <= bound
    return out


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _generator(options: dict[str, Any]) -> str:
    if options.get("generator") == "native":
        return "the native generator (agentload, grpc-go)"
    return f"{options['processes']} Python generator processes"


def render(report: dict[str, Any], console: Console) -> None:
    meta, medians = report["meta"], report["median"]
    options = meta["options"]
    console.print(f"[bold]fastca bench[/] {meta['date']}  {meta['cpus']} CPUs ({meta['cpu_model']})  "
                  f"median of {len(report['rounds'])} rounds; {options['connections']} connections over "
                  f"{_generator(options)}, {options['csr_key_type']} CSRs, "
                  f"{options['key_type']} CA key; fastca: {meta['server_processes']} server process(es), TLS, "
                  f"{'bulk RPC, ' + str(options['bulk']) + ' CSRs per call' if options.get('bulk') else 'Istio path'}, "
                  f"SoftHSM; cfssl: {meta['cfssl']}")
    served = [name for name in ("fastca", "cfssl") if medians.get(name) is not None]
    load = Table(title="Load (measured window; CPU shares are of the whole machine)")
    load.add_column("")
    for name in served:
        load.add_column(name, justify="right")
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("certs/s", lambda m: _fmt(m["certs_per_s"])),
        *((f"latency {p} ms", lambda m, p=p: _fmt(m["latency_ms"][p], 1)) for p in ("p50", "p90", "p99", "max")),
        ("errors", lambda m: ", ".join(f"{k}={v}" for k, v in m["errors"].items()) or "0"),
        ("server CPU µs/cert", lambda m: _fmt(m.get("server_cpu_us_per_cert"))),
        ("server CPU share", lambda m: f"{m.get('server_cpu_share', math.nan):.0%}"),
        ("generator CPU share", lambda m: f"{m['generator_cpu_share']:.0%}"),
        ("generator CPU µs/call", lambda m: _fmt(m["generator_cpu_us_per_call"])),
        ("machine busy / other / steal", lambda m: f"{m['machine_busy_share']:.0%} / "
         f"{m['machine_other_share']:.0%} / {m['machine_steal_share']:.0%}"),
    ]
    for label, cell in rows:
        load.add_row(label, *(cell(medians[name]) for name in served))
    console.print(load)
    limits = Table(title="Raw limits (same run)")
    limits.add_column("probe")
    limits.add_column("per second", justify="right")
    for name, rate in medians["probes"].items():
        limits.add_row(name, _fmt(rate))
    console.print(limits)
    ratios = Table(title="Ratios (median of per-round ratios)")
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    for name, value in report["ratios"].items():
        ratios.add_row(name, _fmt(value, 3))
    for name, target in report["targets"].items():
        verdict = {True: "[green]met[/]", False: "[red]not met[/]", None: "n/a"}[target["met"]]
        ratios.add_row(f"target {name} ({target['needs']})", f"{_fmt(target['value'], 3)} {verdict}")
    console.print(ratios)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        report = run_bench(args, progress)
    render(report, console)
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

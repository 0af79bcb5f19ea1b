"""CI's benchmark gate: a short run of bench/run.py (about a minute on 2
cores), its JSON written, and exit status 1 only when a ratio fell below
``--floor`` (default 50%) of the baseline's in ``--attempts`` runs in a
row (default 2). Absolute rates are never
judged: CI machines differ and are noisy; ratios to raw limits measured in
the same run are not.

    python -m bench ci-check [--json bench/out/ci.json] [--baseline bench/ci-baseline.json]
    python -m bench ci-check --update-baseline        # after an intended change, on the CI machine class

Checked ratios (fastca's Istio-path certs/s over ...): the raw SoftHSM P-256
C_Sign rate in one process, and pyca CertificateBuilder issuance in one
process. cfssl is not run: its own rate swung 2x between runs on a shared
2-vCPU machine, so its ratio could not gate anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from bench.run import build_parser, render, run_bench
from bench.stats import regressions, write_report

BENCH_DIR = Path(__file__).resolve().parent
CHECKED_RATIOS = ("fastca_vs_softhsm_p256_1proc", "fastca_vs_pyca_issue_1proc")
SHORT_RUN = ["--rounds", "1", "--duration", "15", "--warmup", "3", "--probe-seconds", "1", "--csrs", "1024",
             "--connections", "64", "--processes", "2", "--key-type", "ec-p256", "--csr-key-type", "rsa-2048",
             "--server-workers", "2", "--no-cfssl"]


def _measure(json_path: Path, console: Console) -> dict[str, Any]:
    bench_args = build_parser().parse_args([*SHORT_RUN, "--json", str(json_path)])
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        report = run_bench(bench_args, progress)
    render(report, console)
    write_report(report, json_path)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "out" / "ci.json")
    parser.add_argument("--baseline", type=Path, default=BENCH_DIR / "ci-baseline.json")
    parser.add_argument("--floor", type=float, default=0.5, help="fail below this fraction of a baseline ratio")
    parser.add_argument("--attempts", type=int, default=2,
                        help="a regression must show in this many runs in a row to fail [2]: one noisy "
                             "neighbour on a shared machine must not fail CI")
    parser.add_argument("--update-baseline", action="store_true", help="write this run's ratios as the baseline")
    args = parser.parse_args(argv)

    started = time.monotonic()
    console = Console()
    if args.update_baseline:
        report = _measure(args.json, console)
        current = {name: report["ratios"].get(name) for name in CHECKED_RATIOS}
        args.baseline.write_text(json.dumps({
            "written": report["meta"]["date"], "machine": f"{report['meta']['cpus']} CPUs, "
            f"{report['meta']['cpu_model']}", "command": " ".join(SHORT_RUN), "ratios": current}, indent=2) + "\n")
        console.print(f"baseline written to {args.baseline} ({time.monotonic() - started:.0f} s)")
        return 0
    baseline = json.loads(args.baseline.read_text())["ratios"]
    failed: list[str] = []
    for attempt in range(1, max(1, args.attempts) + 1):
        report = _measure(args.json, console)
        current = {name: report["ratios"].get(name) for name in CHECKED_RATIOS}
        failed = regressions(current, baseline, floor=args.floor)
        for name in CHECKED_RATIOS:
            console.print(f"  {name}: {current[name] or float('nan'):.3f} "
                          f"(baseline {baseline.get(name) or float('nan'):.3f})")
        if not failed:
            break
        console.print(f"[yellow]attempt {attempt}: below the floor[/]: " + "; ".join(failed))
    elapsed = time.monotonic() - started
    if failed:
        console.print("[red]benchmark regression[/]: " + "; ".join(failed))
        return 1
    console.print(f"[green]no ratio below {args.floor:.0%} of its baseline[/] ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pure arithmetic of the benchmark: merging the load workers' results,
percentiles, medians over rounds, ratios and the CI regression check.

No processes, and no I/O but write_report's one file: everything here is
unit-tested by test_bench_tools.py.
"""

from __future__ import annotations

import json
import math
import statistics
from array import array
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["compute_ratios", "median_of_rounds", "merge_load", "percentile", "ratio", "regressions",
           "write_report"]


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list; NaN if empty."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def merge_load(workers: Iterable[dict[str, Any]], *, duration_s: float, cpus: int,
               server_cpu_s: float | None, certs_per_call: int = 1) -> dict[str, Any]:
    """One load run's summary from its workers' reports.

    Each worker reports ``latencies`` (array('d') bytes, seconds, successful
    calls completed inside the measured window), ``error_latencies`` (failed
    calls, from their actual send), ``errors`` (gRPC code or
    HTTP status -> count, same window) and ``cpu_s`` (its own user+system CPU
    over the window). CPU shares are fractions of the whole machine
    (``cpus`` cores x ``duration_s``), so generator + server + rest = 1.
    ``certs_per_call``: certificates a successful call carries (bulk calls).
    """
    latencies: list[float] = []
    error_latencies: list[float] = []
    errors: Counter[str] = Counter()
    generator_cpu_s = 0.0
    for report in workers:
        samples = array("d")
        samples.frombytes(report["latencies"])
        latencies.extend(samples)
        failed = array("d")
        failed.frombytes(report.get("error_latencies", b""))
        error_latencies.extend(failed)
        errors.update(report["errors"])
        generator_cpu_s += report["cpu_s"]
    latencies.sort()
    error_latencies.sort()
    ok = len(latencies) * certs_per_call
    capacity_s = duration_s * cpus
    summary: dict[str, Any] = {
        "certs_per_s": ok / duration_s,
        "ok": ok,
        "calls_per_s": len(latencies) / duration_s,
        "errors": dict(sorted(errors.items())),
        "latency_ms": {name: percentile(latencies, q) * 1000
                       for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        # How fast refusals come back (RESOURCE_EXHAUSTED under overload must be quick).
        "error_latency_ms": {name: percentile(error_latencies, q) * 1000
                             for name, q in (("p50", 50), ("p99", 99), ("max", 100))},
        "generator_cpu_s": generator_cpu_s,
        "generator_cpu_share": generator_cpu_s / capacity_s,
        "generator_cpu_us_per_call": generator_cpu_s / max(len(latencies) + sum(errors.values()), 1) * 1e6,
    }
    if server_cpu_s is not None:
        summary.update({
            "server_cpu_s": server_cpu_s,
            "server_cpu_share": server_cpu_s / capacity_s,
            "server_cpu_us_per_cert": server_cpu_s / ok * 1e6 if ok else math.nan,
        })
    return summary


def median_of_rounds(rounds: list[Any]) -> Any:
    """Element-wise median of equally shaped nested dicts of numbers.

    A key missing from some rounds gets the median of the rounds that have
    it; a leaf with no number in any round (a text, None) is the first
    round's; NaNs are left out of a median; error
    counters are summed, not medianed (one round's errors must not vanish)."""
    first = rounds[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for r in rounds for k in r))
        merged = {}
        for key in keys:
            present = [r[key] for r in rounds if key in r]
            merged[key] = (dict(sum((Counter(p) for p in present), Counter())) if key == "errors"
                           else median_of_rounds(present))
        return merged
    numbers = [r for r in rounds if isinstance(r, (int, float)) and not isinstance(r, bool) and not math.isnan(r)]
    return statistics.median(numbers) if numbers else first


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator or math.isnan(numerator) or math.isnan(denominator):
        return None
    return numerator / denominator


def compute_ratios(fastca_rate: float, probes: dict[str, float], cfssl_rate: float | None) -> dict[str, float | None]:
    """fastca's Istio-path rate against each reference rate of the same round."""
    out = {"fastca_vs_cfssl": ratio(fastca_rate, cfssl_rate)}
    for name, rate in probes.items():
        out[f"fastca_vs_{name}"] = ratio(fastca_rate, rate)
    return out


def regressions(current: dict[str, float | None], baseline: dict[str, float | None], *,
                floor: float) -> list[str]:
    """The ratios that fell below ``floor`` x their baseline. A ratio absent
    on either side (cfssl not installed, say) is not checked."""
    failed = []
    for name, expected in sorted(baseline.items()):
        measured = current.get(name)
        if expected is None or measured is None:
            continue
        if measured < floor * expected:
            failed.append(f"{name}: {measured:.3f} < {floor:.0%} of baseline {expected:.3f}")
    return failed


def write_report(report: dict[str, Any], path: Path | None) -> None:
    """The report as indented JSON at ``path`` (its folder made), if given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")

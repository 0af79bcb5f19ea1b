"""Memory and cost of the issuance monitor (fastca.monitoring, issue #15).

    .venv/bin/python -m bench.monitor_memory [--identities 1000000] [--rounds 3]

1. Steady: a learned population of 20,000 identities (two pods each, half
   behind a node's ztunnel) renewing: the per-observation cost of the
   common case, median of ``--rounds`` rounds.
2. Flood: ``--identities`` distinct identities, each with its own key and
   CSR hash, from a few networks and nodes, through a tracker with the
   default bounds and no learning period (so every one also raises
   new_identity and is scored: the worst case for memory). Reports the
   tables' sizes, tracemalloc current/peak and the process RSS before and
   after, and the per-observation time (median of ``--rounds`` rounds, each
   a fresh tracker; tracemalloc only on the last, it slows Python down).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc

from fastca.monitoring import IssuanceMonitor, MonitoringConfig, Observation

T0 = 1_800_000_000.0
ZTUNNEL = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _flood_observations(count: int, seed: int):
    """Made one at a time, so the traced round holds only the tracker."""
    rng = random.Random(seed)
    for i in range(count):
        node = i % 64
        delegated = node % 2 == 1
        identity = f"spiffe://cluster.local/ns/ns-{i % 997}/sa/app-{i}"
        yield Observation(at=T0 + i * 0.01, identity=identity, caller=ZTUNNEL if delegated else identity,
                          impersonated=delegated, node=f"node-{node}", peer_ip=f"10.{node}.{i % 3}.{i % 250 + 1}",
                          spki_sha256=rng.randbytes(32), csr_sha256=rng.randbytes(32), ttl_seconds=86_400,
                          serial=f"{i:x}")


def steady(rounds: int) -> float:
    """µs per observation, steady renewals of a learned population."""
    rng = random.Random(7)
    monitor = IssuanceMonitor(MonitoringConfig(learning_seconds=0))
    pods = [(f"spiffe://cluster.local/ns/ns-{i % 50}/sa/app-{i}", p, i % 40) for i in range(20_000) for p in range(2)]
    at = T0

    def batch(start: float) -> list[Observation]:
        out = []
        for k, (identity, p, node) in enumerate(pods):
            delegated = node % 2 == 1
            out.append(Observation(at=start + k * 1.0, identity=identity, caller=ZTUNNEL if delegated else identity,
                                   impersonated=delegated, node=f"node-{node}",
                                   peer_ip=f"10.{node}.0.2" if delegated else f"10.{node}.1.{p + 10}",
                                   spki_sha256=rng.randbytes(32), csr_sha256=rng.randbytes(32),
                                   ttl_seconds=86_400, serial="1"))
        return out

    for _ in range(2):                  # learn every identity, then run past its history period
        for obs in batch(at):
            monitor.observe_issued(obs)
        at += 43_200
    timings = []
    for _ in range(rounds):
        observations = batch(at)
        at += 43_200
        gc.collect()
        started = time.perf_counter()
        for obs in observations:
            alerts = monitor.observe_issued(obs)
            if alerts:
                raise AssertionError(f"the steady population raised {alerts[0]}")
        timings.append((time.perf_counter() - started) / len(observations) * 1e6)
    return statistics.median(timings)


def _rss_round(count: int) -> tuple[float, float]:
    """RSS before/after a flood without tracemalloc (whose bookkeeping would count)."""
    gc.collect()
    before = _rss_kib()
    monitor = IssuanceMonitor(MonitoringConfig(learning_seconds=0))
    for obs in _flood_observations(count, seed=99):
        monitor.observe_issued(obs)
    gc.collect()
    after = _rss_kib()
    del monitor
    gc.collect()
    return before / 1024, after / 1024


def flood(count: int, rounds: int) -> dict:
    timings = []
    rss_before, rss_after = _rss_round(count)
    result: dict = {"rss_untraced": (rss_before, rss_after)}
    for round_no in range(rounds):
        traced = round_no == 0
        # timed rounds: built beforehand (only the tracker is timed); the traced round: made on the fly
        observations = _flood_observations(count, seed=round_no)
        if not traced:
            observations = list(observations)
        gc.collect()
        rss_before = _rss_kib()
        if traced:
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
        monitor = IssuanceMonitor(MonitoringConfig(learning_seconds=0))
        observe = monitor.observe_issued
        alerts = 0
        started = time.perf_counter()
        for obs in observations:
            alerts += len(observe(obs))
        elapsed = time.perf_counter() - started
        if not traced:
            timings.append(elapsed / count * 1e6)
        else:
            current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            del observations
            gc.collect()
            result |= {"sizes": monitor.sizes(), "alerts": alerts, "by_signal": monitor.alerts_by_signal,
                      "traced_current_mib": (current - base) / 2**20, "traced_peak_mib": (peak - base) / 2**20,
                      "rss_before_mib": rss_before / 1024, "rss_after_mib": _rss_kib() / 1024,
                      "traced_us": elapsed / count * 1e6}
        del monitor
    # the traced round is slower; the timing is the median of untraced rounds (at least one)
    if not timings:
        timings.append(result["traced_us"])
    result["us_per_observation"] = statistics.median(timings)
    result["rounds_timed"] = len(timings)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    config = MonitoringConfig()
    print(f"bounds: max_identities={config.max_identities} max_keys={config.max_keys} (each index) "
          f"max_callers={config.max_callers} max_peers={config.max_peers}")
    print(f"steady renewals, 20,000 learned identities x 2 pods: {steady(args.rounds):.2f} µs/observation "
          f"(median of {args.rounds})")
    r = flood(args.identities, args.rounds + 1)
    sizes = r["sizes"]
    rows = [
        ("distinct identities pushed", f"{args.identities:,}"),
        ("tracked identities", f"{sizes['identities']:,}"),
        ("scored subjects", f"{sizes['scored']:,}"),
        ("public-key index", f"{sizes['keys']:,}"),
        ("CSR-hash index", f"{sizes['csrs']:,}"),
        ("callers (caller@node)", f"{sizes['callers']:,}"),
        ("alerts raised", f"{r['alerts']:,} ({', '.join(f'{k}={v}' for k, v in r['by_signal'].items() if v)})"),
        ("tracemalloc current", f"{r['traced_current_mib']:.1f} MiB"),
        ("tracemalloc peak", f"{r['traced_peak_mib']:.1f} MiB"),
        ("RSS before / after", "{:.1f} / {:.1f} MiB (untraced round)".format(*r["rss_untraced"])),
        ("RSS before / after, traced", f"{r['rss_before_mib']:.1f} / {r['rss_after_mib']:.1f} MiB "
                                       "(includes tracemalloc's own bookkeeping)"),
        ("µs per observation", f"{r['us_per_observation']:.2f} (median of {r['rounds_timed']} untraced rounds; "
                               f"{r['traced_us']:.2f} traced, incl. making each observation)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()

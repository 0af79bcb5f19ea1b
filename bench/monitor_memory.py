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
   a fresh tracker; tracemalloc only on the first, it slows Python down).
3. Growth: the table sizes, tracemalloc current, the part of it that is
   the tracker's dicts themselves (hash tables and LRU links, from
   sys.getsizeof, without the objects they hold) and RSS at checkpoints
   during the flood (by default half of max_identities, max_identities,
   max_keys, half of ``--identities`` and all of it; ``--checkpoints`` to
   choose), so the plateau is visible once every table is at its bound.
   Derived: the bytes one pushed identity costs while nothing is evicted
   (its history, its score, one key and one CSR entry: the slope between the
   first two checkpoints), and the memory at the last checkpoint per 100,000
   of max_identities, at the run's max_keys / max_identities ratio.
   ``--max-identities`` and ``--max-keys`` change the flood's bounds, to
   check that the cost scales with them (and to size them).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
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


def default_checkpoints(count: int, config: MonitoringConfig) -> list[int]:
    """Where the growth is sampled: around the bounds, then up to ``count``."""
    points = {config.max_identities // 2, config.max_identities, config.max_keys, count // 2, count}
    return sorted(p for p in points if 0 < p <= count)


def _dicts_mib(monitor: IssuanceMonitor) -> float:
    """The tracker's dicts themselves (tables and LRU links, not what they hold)."""
    return sum(sys.getsizeof(value) for value in vars(monitor).values() if isinstance(value, dict)) / 2**20


def _rss_round(count: int, checkpoints: list[int], config: MonitoringConfig) -> tuple[float, float, dict[int, float]]:
    """RSS before/after a flood without tracemalloc (whose bookkeeping would
    count), and at each checkpoint (MiB, after a collection, as "after")."""
    gc.collect()
    before = _rss_kib()
    at_checkpoint: dict[int, float] = {}
    wanted = set(checkpoints)
    monitor = IssuanceMonitor(config)
    for n, obs in enumerate(_flood_observations(count, seed=99), 1):
        monitor.observe_issued(obs)
        if n in wanted:
            gc.collect()
            at_checkpoint[n] = _rss_kib() / 1024
    gc.collect()
    after = _rss_kib()
    del monitor
    gc.collect()
    return before / 1024, after / 1024, at_checkpoint


def flood(count: int, rounds: int, checkpoints: list[int], config: MonitoringConfig) -> dict:
    timings = []
    rss_before, rss_after, rss_at = _rss_round(count, checkpoints, config)
    result: dict = {"rss_untraced": (rss_before, rss_after), "rss_at": rss_at}
    wanted = set(checkpoints)
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
        monitor = IssuanceMonitor(config)
        observe = monitor.observe_issued
        alerts = 0
        growth = []
        started = time.perf_counter()
        if traced:     # the traced round's time is reported apart: counting and sampling may cost in it
            for n, obs in enumerate(observations, 1):
                alerts += len(observe(obs))
                if n in wanted:
                    growth.append((n, monitor.sizes(), (tracemalloc.get_traced_memory()[0] - base) / 2**20,
                                   _dicts_mib(monitor)))
        else:
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
                      "traced_us": elapsed / count * 1e6, "growth": growth}
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
    parser.add_argument("--checkpoints", type=lambda text: [int(p) for p in text.split(",") if p],
                        help="comma-separated observation counts to sample growth at "
                             "(default: max_identities/2, max_identities, max_keys, --identities/2, --identities)")
    parser.add_argument("--max-identities", type=int, help="the flood's max_identities (default: the default)")
    parser.add_argument("--max-keys", type=int, help="the flood's max_keys (default: the default)")
    args = parser.parse_args(argv)
    bounds = {name: value for name, value in (("max_identities", args.max_identities), ("max_keys", args.max_keys))
              if value is not None}
    config = MonitoringConfig(learning_seconds=0, **bounds)
    checkpoints = sorted({p for p in (args.checkpoints or default_checkpoints(args.identities, config))
                          if 0 < p <= args.identities})
    print(f"flood bounds: max_identities={config.max_identities} max_keys={config.max_keys} (each index) "
          f"max_callers={config.max_callers} max_peers={config.max_peers}")
    print(f"steady renewals, 20,000 learned identities x 2 pods: {steady(args.rounds):.2f} µs/observation "
          f"(median of {args.rounds})")
    r = flood(args.identities, args.rounds + 1, checkpoints, config)
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
    print_growth(r, config)


def print_growth(r: dict, config: MonitoringConfig) -> None:
    """The checkpoints as a table, and the costs derived from them."""
    growth = r["growth"]
    if not growth:
        return
    print("growth during the flood (tracemalloc: traced round; RSS: untraced round):")
    header = ("pushed", "identities", "scored", "keys", "csrs", "callers", "tracemalloc MiB", "of it dicts MiB",
              "RSS MiB")
    table = [header] + [(f"{n:,}", f"{z['identities']:,}", f"{z['scored']:,}", f"{z['keys']:,}", f"{z['csrs']:,}",
                         f"{z['callers']:,}", f"{mib:.1f}", f"{dicts:.1f}", f"{r['rss_at'].get(n, float('nan')):.1f}")
                        for n, z, mib, dicts in growth]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    traced = {n: mib for n, _, mib, _ in growth}
    half, ids = config.max_identities // 2, config.max_identities
    if half in traced and ids in traced and half < ids <= config.max_keys:
        per_identity = (traced[ids] - traced[half]) * 2**20 / (ids - half)
        print(f"  below the bounds, one pushed identity (history, score, one key, one CSR entry): "
              f"{per_identity:,.0f} B")
    last, sizes, mib, _ = growth[-1]
    if sizes["identities"] == config.max_identities and sizes["keys"] == config.max_keys:
        print(f"  at the bounds, after {last:,} pushed: {mib:.1f} MiB = {mib * 100_000 / config.max_identities:.1f} "
              f"MiB per 100,000 of max_identities (max_keys = {config.max_keys / config.max_identities:g} x)")


if __name__ == "__main__":
    main()

"""The issuance monitor's cost on the hot path: monitoring on against off, same run (issue #15).

    python -m bench monitoring-cost [--rounds 5] [--seconds 10] [--warmup 5] [--connections 64]
                                    [--key-type ec-p256] [--csrs 2048] [--on policy|watch] [--json F]

The embedded default, as bench/replicas.py's "embedded" cell: a ``fastca
init`` state (the CA key in its SoftHSM token, the SQLite audit log),
TokenReview against the bench's fake API server, the per-identity rate limit
off (bench/fastca_server.py), ``fastca serve`` with one worker per CPU.
Two sides, differing only in fastca.toml:

  off  no ``[monitoring]`` section (the default: off)
  on   ``[monitoring] enabled = true, learning_seconds = 0`` (every signal
       live from the start), everything else at its default (poll_seconds
       1, ...), and with ``--on policy`` (the default)
       ``[monitoring.policy.default] actions = ["shorten_ttl"]``, so every
       worker follows the log and admission reads the identity's score on
       every request; with ``--on watch`` no policy, so worker 0 alone
       follows the log

Each cell gets a fresh state directory (so the "on" side never replays an
earlier round's log at start: what is measured is the steady hot path), a
fresh server, one load from the grpc-go generator (bench/agentload: the
same connections, RSA-2048 agent CSRs, a token per connection, warm-up and
window for both sides, as bench.replicas.drive runs it), then the server
is stopped. Rounds alternate the order (off on, on off, ...) to cancel drift.

The generator cycles through ``--csrs`` distinct CSRs (2048, as in every
bench, signed by 32 keys). Its 64 token identities then share keys
(key_reuse, once per key) and, once the pool wraps, every CSR is sent again
(csr_replay on nearly every certificate: an alert, its log line and the flag
written to the audit record, and every identity high-risk, so shorten_ttl
acts on each request). Real agents sign a fresh CSR each time: ``--csrs``
larger than a cell's requests measures that case (no replay; no identity
reaches the threshold, so the policy check is the lookup alone).

For each cell: certificates/s, p50/p99, errors, server CPU per certificate
(the supervisor's process tree from /proc over the measured window), the
CPU of each server thread over the window (/proc/<pid>/task: Python 3.11
does not name its threads, so the monitor is told by its absence on the
"off" side), and from the "on" servers what the monitor did: records in the
audit log (every worker's monitor reads all of them), alerts ("issuance
alert" log lines, fastca_monitoring_alerts), requests the risk policy acted
on ("risk policy applied" lines), tracked and high-risk identities (the
metrics endpoints, scraped before the server stops).

The report gives medians per side, the median of the per-round ratios
on/off and the ratio of the medians, and each side's own spread (max/min
over its rounds) to judge the ratio against. Last, the monitor thread's
work is timed apart: the last "on" cell's audit log replayed, in this
process, into a fresh IssuanceMonitor with the same configuration (the
service's own replay_recent: SQLite reads plus scoring), and the reads alone,
per record.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from bench.fake_apiserver import FakeApiServer
from bench.fastca_server import FastcaServer
from bench.loadgen import IstioTarget, LoadSpec, make_csrs, process_tree_cpu_seconds
from bench.replicas import _own_cpu_seconds, _stop_on_sigterm, add_round_options, drive

__all__ = ["SIDES", "measure", "main", "monitoring_settings"]

SIDES = ("off", "on")
_TICKS = os.sysconf("SC_CLK_TCK")


ON_SIDES = ("policy", "watch")


def monitoring_settings(on: str = "policy") -> dict[str, Any]:
    """The "on" side's [monitoring] table: with a risk policy (every worker
    follows the log, admission reads a score per request), or watching only
    (worker 0 alone follows the log)."""
    settings: dict[str, Any] = {"enabled": True, "learning_seconds": 0}
    if on == "policy":
        settings["policy"] = {"default": {"actions": ["shorten_ttl"]}}
    return settings


def _thread_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of every thread of ``pids``, keyed "pid/tid"."""
    out: dict[str, float] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as handle:
                    fields = handle.read().rpartition(")")[2].split()
            except OSError:
                continue
            out[f"{pid}/{tid}"] = (int(fields[11]) + int(fields[12])) / _TICKS
    return out


def _serving(log: Path) -> dict[str, Any]:
    """The supervisor's "serving" event (it lists the workers' pids and metrics ports)."""
    for line in log.read_bytes().splitlines():
        if b'"serving"' in line and b'"workers"' in line:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "serving":
                return event
    return {}


def _count_lines(log: Path, *needles: bytes) -> dict[str, int]:
    counts = {needle.decode(): 0 for needle in needles}
    for line in log.read_bytes().splitlines():
        for needle in needles:
            if needle in line:
                counts[needle.decode()] += 1
    return counts


_METRIC = re.compile(r"^(fastca_monitoring_[a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$")


def _scrape(ports: list[int]) -> dict[str, float] | None:
    """The fastca_monitoring_* samples, summed over the workers (None: unreachable)."""
    out: dict[str, float] = {}
    try:
        for port in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                for line in response.read().decode().splitlines():
                    match = _METRIC.match(line)
                    if match and not match.group(1).endswith("_created"):
                        name = match.group(1) + (match.group(2) or "")
                        out[name] = out.get(name, 0.0) + float(match.group(3))
    except (OSError, ValueError):
        return None
    return out


def run_cell(side: str, directory: Path, api: FakeApiServer, spec: LoadSpec, csrs: list[bytes],
             key_type: str, on: str = "policy") -> tuple[dict[str, Any], FastcaServer]:
    """A fresh state and server for ``side``, one load, the server stopped."""
    server = FastcaServer(directory, api.url, api.ca_file, key_type=key_type)
    if side == "on":
        config_path = server.state / "fastca.toml"
        body = tomllib.loads(config_path.read_text())
        body["monitoring"] = monitoring_settings(on)
        config_path.write_text(tomli_w.dumps(body))
    snapshots: list[dict[str, float]] = []
    with server:
        serving = _serving(directory / "server.log")
        workers = [int(pid) for pid in serving.get("pids", [])]
        metrics_ports = [int(p) for p in (serving.get("ports", {}).get("metrics") or []) if p]

        def threads() -> float:
            snapshots.append(_thread_cpu(workers))
            return 0.0

        components: dict[str, Callable[[], float]] = {
            "replicas": lambda: process_tree_cpu_seconds(server.pid), "threads": threads, "bench": _own_cpu_seconds}
        summary = drive(IstioTarget(server.address, server.root_pem), spec, csrs, components)
        time.sleep(1.5)             # one more poll, so the monitors have read the whole window
        scraped = _scrape(metrics_ports) if side == "on" else None
    before, after = snapshots[0], snapshots[-1]
    thread_cpu = sorted(((after[k] - before.get(k, 0.0)) / spec.duration_s for k in after), reverse=True)
    lines = _count_lines(directory / "server.log", b'"issuance alert"', b'"risk policy applied"',
                         b'"issuance monitor')
    ok = summary["ok"]
    cell = {"certs_per_s": summary["certs_per_s"], "errors": summary["errors"],
            "p50_ms": summary["latency_ms"]["p50"], "p99_ms": summary["latency_ms"]["p99"],
            "server_cpu_us_per_cert": summary.get("server_cpu_us_per_cert"),
            "generator_cpu_us_per_cert": summary["cpu_us_per_cert"]["generator"],
            "server_cpu_share": summary["cpu_share"]["replicas"],
            "machine_busy_share": summary["machine_busy_share"], "machine_steal_share": summary["machine_steal_share"],
            "other_cpu_share": summary["cpu_share"]["other"],
            # Cores used by each server thread over the window, busiest first.
            "thread_cores": [round(t, 4) for t in thread_cpu if t > 0.0005],
            "audit_records": server.issued_count(), "received": summary["all_ok"], "ok_in_window": ok,
            "alert_lines": lines['"issuance alert"'], "risk_policy_lines": lines['"risk policy applied"'],
            "monitor_lines": lines['"issuance monitor'], "metrics": scraped}
    return cell, server


def monitor_work(state: Path, on: str = "policy") -> dict[str, Any]:
    """The monitor thread's work on ``state``'s log, timed in this process:
    the service's replay (SQLite reads and scoring), and the reads alone."""
    from fastca.audit.sqlite_log import AuditReader
    from fastca.monitoring import IssuanceMonitor, MonitoringConfig
    from fastca.monitoring.follower import LogCursor, Summaries
    from fastca.monitoring.service import replay_recent

    config = MonitoringConfig(**monitoring_settings(on))
    path = state / "audit.db"
    reader = AuditReader(path)
    try:
        end = reader.last_id()
        started = time.process_time()
        cursor = LogCursor(Summaries(reader), 0, clock=time.time)
        read = 0
        while cursor.last_id < end:
            rows = cursor.read(2000, until_id=end)
            if not rows:
                break
            read += len(rows)
        read_s = time.process_time() - started
        monitor = IssuanceMonitor(config)
        started = time.process_time()
        _, replayed = replay_recent(monitor, reader, config, time.time)
        both_s = time.process_time() - started
    finally:
        close = getattr(reader, "close", None)
        if close is not None:
            close()
    return {"records": replayed, "read_and_score_us_per_record": both_s / replayed * 1e6 if replayed else None,
            "read_us_per_record": read_s / read * 1e6 if read else None,
            "tracked_identities": monitor.tracked_identities}


def _spread(values: list[float]) -> float:
    return max(values) / min(values) if values and min(values) > 0 else float("nan")


def measure(rounds: int, seconds: float, connections: int, key_type: str, warmup_s: float,
            workdir: Path, *, csr_type: str = "rsa-2048", csr_count: int = 2048,
            on: str = "policy") -> dict[str, Any]:
    spec = LoadSpec(processes=1, connections=connections, warmup_s=warmup_s, duration_s=seconds)
    csrs = make_csrs(csr_count, csr_type)
    cells: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    last_on: FastcaServer | None = None
    with FakeApiServer(workdir) as api:
        for round_index in range(rounds):
            order = list(SIDES) if round_index % 2 == 0 else list(reversed(SIDES))
            for side in order:
                cell, server = run_cell(side, workdir / f"{side}-{round_index + 1}", api, spec, csrs, key_type,
                                        on)
                cells[side].append(cell)
                if side == "on":
                    last_on = server
                _print_cell(round_index, side, cell)
    work = monitor_work(last_on.state, on) if last_on is not None else {}
    medians = {side: {key: statistics.median(c[key] for c in runs)
                      for key in ("certs_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_cert",
                                  "generator_cpu_us_per_cert", "machine_busy_share", "other_cpu_share")}
               for side, runs in cells.items()}
    per_round = [on["certs_per_s"] / off["certs_per_s"] for off, on in zip(cells["off"], cells["on"])]
    cpu_per_round = [on["server_cpu_us_per_cert"] / off["server_cpu_us_per_cert"]
                     for off, on in zip(cells["off"], cells["on"])]
    ratios = {"on_over_off_per_round": per_round, "on_over_off": statistics.median(per_round),
              "ratio_of_medians": medians["on"]["certs_per_s"] / medians["off"]["certs_per_s"],
              "server_cpu_per_cert_on_over_off_per_round": cpu_per_round,
              "server_cpu_per_cert_on_over_off": statistics.median(cpu_per_round),
              "spread_off": _spread([c["certs_per_s"] for c in cells["off"]]),
              "spread_on": _spread([c["certs_per_s"] for c in cells["on"]])}
    return {"rounds": cells, "median": medians, "ratios": ratios, "monitor_work": work,
            "monitoring": monitoring_settings(on)}


def _print_cell(round_index: int, side: str, cell: dict[str, Any]) -> None:
    threads = " ".join(f"{t:.2f}" for t in cell["thread_cores"][:8])
    extra = (f"  records {cell['audit_records']:,} alerts {cell['alert_lines']} policy {cell['risk_policy_lines']:,}"
             if side == "on" else "")
    print(f"round {round_index + 1} {side:3} {cell['certs_per_s']:7,.0f}/s  p50 {cell['p50_ms']:5.1f}  "
          f"p99 {cell['p99_ms']:6.1f} ms  server {cell['server_cpu_us_per_cert']:4.0f} µs/cert  "
          f"busy {cell['machine_busy_share']:.0%} other {cell['other_cpu_share']:.0%}  "
          f"errors {cell['errors'] or '-'}  threads [{threads}]{extra}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench monitoring-cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_round_options(parser)
    parser.add_argument("--csrs", type=int, default=2048,
                        help="distinct CSRs the generator cycles through [2048, as every bench]; more than a "
                             "cell's requests and no CSR is sent twice (no csr_replay alerts)")
    parser.add_argument("--on", choices=ON_SIDES, default="policy",
                        help="the 'on' side: with a risk policy for the default signer (every worker follows "
                             "the log) or watching only (worker 0 follows it) [policy]")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with _stop_on_sigterm(), tempfile.TemporaryDirectory(prefix="fastca-monitoring-cost-") as tmp:
        report = measure(args.rounds, args.seconds, args.connections, args.key_type, args.warmup, Path(tmp),
                         csr_type=args.csr_type, csr_count=args.csrs, on=args.on)
    report["meta"] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "command": " ".join(["python -m bench monitoring-cost", shlex.join(argv)]).strip(),
                      "cpus": os.cpu_count(), "elapsed_s": round(time.monotonic() - started, 1)}
    print(f"medians of {args.rounds} rounds, {args.connections} connections, {args.seconds:g} s each:")
    for side, median in report["median"].items():
        print(f"  {side:3} {median['certs_per_s']:7,.0f}/s  p50 {median['p50_ms']:5.1f} ms  "
              f"p99 {median['p99_ms']:6.1f} ms  server {median['server_cpu_us_per_cert']:5.0f} µs/cert  "
              f"generator {median['generator_cpu_us_per_cert']:4.0f} µs/cert  busy {median['machine_busy_share']:.0%}"
              f"  other {median['other_cpu_share']:.0%}")
    r = report["ratios"]
    print(f"  on/off: {r['on_over_off']:.3f} median of per-round ratios "
          f"({' · '.join(f'{x:.3f}' for x in r['on_over_off_per_round'])}); ratio of medians "
          f"{r['ratio_of_medians']:.3f}; spread within a side (max/min): off {r['spread_off']:.3f}, "
          f"on {r['spread_on']:.3f}")
    print(f"  server CPU per certificate on/off: {r['server_cpu_per_cert_on_over_off']:.3f} "
          f"({' · '.join(f'{x:.3f}' for x in r['server_cpu_per_cert_on_over_off_per_round'])})")
    work = report["monitor_work"]
    if work.get("records"):
        print(f"  monitor work on the last 'on' log: {work['records']:,} records, "
              f"{work['read_and_score_us_per_record']:.1f} µs/record read and scored "
              f"({work['read_us_per_record']:.1f} µs the SQLite read alone), "
              f"{work['tracked_identities']} identities tracked")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

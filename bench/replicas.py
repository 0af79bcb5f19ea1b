"""Two `fastca serve` replicas against one, on this machine (issue #14).

    python -m bench replicas [--rounds 5] [--seconds 10] [--connections 64] [--key-type ec-p256]
                             [--warmup 5] [--no-embedded] [--json F]

One state directory (``fastca init``, its SoftHSM token holding the CA key),
one ``p11-kit server`` exporting that token on a Unix socket, one PostgreSQL
database (Debian's server, started by tests/audit/postgres.py in a temporary
directory), TokenReview against the bench's fake API server, the
per-identity rate limit off: the state is configured as bench/fastca_server.py
configures it, then pointed at the network HSM (p11-kit-client.so) and at
PostgreSQL (``[audit] database``, ``password_file``).

Configurations, each driven by the grpc-go generator (bench/agentload) with
the same connections, RSA-2048 agent CSRs, tokens and window:

  one       one ``fastca serve --workers 1`` on 127.0.0.1:P
  two       two ``fastca serve --workers 1`` on the same 127.0.0.1:P (SO_REUSEPORT)
  embedded  for reference: the embedded default, its own state (SQLite, SoftHSM
            loaded directly), ``fastca serve --workers 2`` (--no-embedded skips it)

Servers are started fresh for every configuration of every round (the
replicas of "one" and "two" share the port, so they cannot stay up side by
side), and stopped before the next; the p11-kit server, PostgreSQL and the
fake API server stay up for the whole run. The order alternates by round
(one two embedded, embedded two one, ...). For each cell: certificates/s,
p50/p99, errors by gRPC code, and CPU over the measured window of each
component (the replicas, p11-kit server with its p11-kit-remote children,
the postgres processes, the generator, this process with the fake API
server), per certificate. The report gives medians over rounds and the
median of the per-round ratios two/one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from bench.fake_apiserver import FakeApiServer
from bench.fastca_server import FastcaServer
from bench.loadgen import (IstioTarget, LoadSpec, MeasuredWindow, machine_cpu_seconds, make_csrs,
                           process_tree_cpu_seconds, summarise)
from bench.native_load import _await_ready, _report, _tail, agentload_binary, native_config
from bench.parallel import sleep_until
from bench.ports import free_loopback_port

__all__ = ["CONFIGURATIONS", "Backends", "Replicas", "drive", "main", "measure"]

CONFIGURATIONS = ("one", "two", "embedded")
_START_TIMEOUT_S = 60.0
_COMPONENTS = ("replicas", "p11kit", "postgres", "generator", "bench")


def _server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SOFTHSM2_CONF", None)      # the state directory names its own token configuration
    env.update(extra or {})
    return env


def _own_cpu_seconds() -> float:
    """This process (the fake API server's threads, the sampler): not its children."""
    times = os.times()
    return times.user + times.system


class Replicas:
    """``count`` ``fastca serve --workers 1`` on one state and one fixed
    address; ``with`` starts them all at once and waits for each to serve,
    and stops them all (SIGTERM, then SIGKILL) on the way out."""

    def __init__(self, state: Path, listen: str, count: int, env: dict[str, str], logs: Path) -> None:
        self._state, self._listen, self._count, self._env, self._logs = state, listen, count, env, logs
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log_files: list[Path] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def __enter__(self) -> Replicas:
        try:
            for _ in range(self._count):
                log = self._logs / f"replica-{time.monotonic_ns()}.log"
                with log.open("wb") as sink:
                    self.processes.append(subprocess.Popen(
                        [sys.executable, "-m", "fastca", "serve", "--state", str(self._state), "--listen",
                         self._listen, "--metrics", "127.0.0.1:0", "--workers", "1"],
                        stdout=sink, stderr=subprocess.STDOUT, env=_server_env(self._env)))
                self.log_files.append(log)
            deadline = time.monotonic() + _START_TIMEOUT_S
            waiting = set(range(self._count))
            while waiting:
                for index in list(waiting):
                    port = _serving_port(self.log_files[index])
                    if port is not None:
                        if f"127.0.0.1:{port}" != self._listen:
                            raise RuntimeError(f"replica {index} serves on {port}, not {self._listen}")
                        waiting.discard(index)
                    elif self.processes[index].poll() is not None:
                        raise RuntimeError(f"replica {index} exited {self.processes[index].returncode}:\n"
                                           f"{self.log_tail(index)}")
                if waiting and time.monotonic() > deadline:
                    raise RuntimeError(f"replicas {sorted(waiting)} did not serve in {_START_TIMEOUT_S:.0f} s")
                time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def issued(self) -> list[int]:
        """Certificates each replica logged as issued to callers (its own serving certificate excepted)."""
        counts = []
        for log in self.log_files:
            count = 0
            with log.open("rb") as handle:
                for line in handle:
                    if b'"certificate issued"' in line and b'"self"' not in line:
                        count += 1
            counts.append(count)
        return counts

    def log_tail(self, index: int, lines: int = 20) -> str:
        return "\n".join(self.log_files[index].read_text(errors="replace").splitlines()[-lines:])


def _serving_port(log: Path) -> int | None:
    with log.open("rb") as handle:
        for line in handle:
            if b'"serving"' not in line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "serving":
                return int(event["ports"]["grpc"])
    return None


class Backends:
    """What every configuration of a run shares: the fake API server, the
    replicas' state (network HSM, PostgreSQL), and the embedded default's
    own state. ``with Backends(dir, key_type) as b:`` then ``b.replicas(n)``
    and ``b.embedded()``; everything it started is stopped on the way out,
    on error too."""

    def __init__(self, workdir: Path, *, key_type: str = "ec-p256", embedded: bool = True) -> None:
        self.workdir = workdir
        self._key_type = key_type
        self._want_embedded = embedded
        self._stack = ExitStack()
        self.port = free_loopback_port()
        self.listen = f"127.0.0.1:{self.port}"

    def __enter__(self) -> Backends:
        # tests/ helpers: the real PostgreSQL of the audit tests and the
        # p11-kit server of the HSM recovery tests (bench runs from the repo root).
        from tests.audit.postgres import PostgresServer
        from tests.frontend.test_hsm_recovery import P11KIT_CLIENT, P11KitServer, _set_module

        try:
            self.api = self._stack.enter_context(FakeApiServer(self.workdir))
            # fastca init + the bench's configuration (TokenReview, no rate
            # limit), exactly as for the other benches; never entered here:
            # this state's servers are the replicas below.
            shared = FastcaServer(self.workdir / "shared", self.api.url, self.api.ca_file, key_type=self._key_type,
                                  workers=1)
            self.state = shared.state
            self.root_pem = shared.root_pem
            self.postgres = PostgresServer.start_new()
            self._stack.callback(self.postgres.close)
            self.database = self.postgres.new_database("bench")
            config_path = self.state / "fastca.toml"
            body = tomllib.loads(config_path.read_text())
            body["audit"] = {"database": self.database.url, "password_file": str(self.database.password_file)}
            config_path.write_text(tomli_w.dumps(body))
            self.hsm = P11KitServer(self.state)
            self.hsm.start()
            self._stack.callback(self._stop_hsm)
            _set_module(self.state, P11KIT_CLIENT)
            self.replica_env = {"P11_KIT_SERVER_ADDRESS": f"unix:path={self.hsm.socket}"}
            self.embedded_server = (FastcaServer(self.workdir / "embedded", self.api.url, self.api.ca_file,
                                                 key_type=self._key_type, workers=2)
                                    if self._want_embedded else None)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _stop_hsm(self) -> None:
        if self.hsm.process is not None and self.hsm.process.poll() is None:
            self.hsm.kill()

    def replicas(self, count: int) -> Replicas:
        return Replicas(self.state, self.listen, count, self.replica_env, self.workdir)

    def postmaster_pid(self) -> int:
        return int((self.postgres.data / "postmaster.pid").read_text().split()[0])

    def issued_in_postgres(self) -> int:
        """Certificates recorded for callers (the database is this run's own, made empty)."""
        (row,) = self.postgres.query(self.database.name,
                                     "SELECT count(*) FROM fastca_issuance WHERE credential_type != 'self'")
        return int(row[0])


def drive(target: IstioTarget, spec: LoadSpec, csrs: list[bytes],
          components: dict[str, Callable[[], float]]) -> dict[str, Any]:
    """One agentload run (as native_load.run_native_load), with the CPU of
    each named component (a function giving its CPU seconds so far) taken at
    the start and end of the measured window. The ``replicas`` component is
    the server. Adds ``cpu_s`` and ``cpu_us_per_cert`` by component (the
    generator's own report included) and ``other``: the machine's busy CPU
    that none of them account for."""
    binary = agentload_binary()
    with tempfile.TemporaryDirectory(prefix="agentload-") as tmp:
        workdir = Path(tmp)
        config = workdir / "config.json"
        config.write_text(json.dumps(native_config(target, spec, csrs, workdir)))
        errors = workdir / "stderr"
        with errors.open("wb") as sink, subprocess.Popen([str(binary), str(config)], stdin=subprocess.PIPE,
                                                          stdout=subprocess.PIPE, stderr=sink) as process:
            assert process.stdin is not None and process.stdout is not None
            try:
                _await_ready(process, errors)
                process.stdin.write(b"go\n")
                process.stdin.flush()
                start_at = time.monotonic()
                sleep_until(start_at + spec.warmup_s)
                before = {name: read() for name, read in components.items()}
                machine_before = machine_cpu_seconds()
                sleep_until(start_at + spec.warmup_s + spec.duration_s)
                after = {name: read() for name, read in components.items()}
                machine_after = machine_cpu_seconds()
                out, _ = process.communicate(timeout=spec.call_timeout_s + 60)
            except BaseException:
                process.kill()
                raise
            if process.returncode != 0:
                raise RuntimeError(f"agentload exited {process.returncode}: {_tail(errors)}")
    raw = json.loads(out)
    cpu = {name: after[name] - before[name] for name in components}
    machine = {kind: machine_after[kind] - machine_before[kind] for kind in machine_after}
    summary = summarise([_report(raw)], spec, MeasuredWindow(cpu.get("replicas"), machine))
    summary["all_ok"] = raw.get("all_ok")
    cpu["generator"] = summary["generator_cpu_s"]
    cpu["other"] = max(0.0, machine["busy"] - sum(cpu.values()))
    ok = summary["ok"]
    summary["cpu_s"] = cpu
    summary["cpu_us_per_cert"] = {name: (seconds / ok * 1e6 if ok else float("nan")) for name, seconds in cpu.items()}
    summary["cpu_share"] = {name: seconds / (spec.duration_s * (os.cpu_count() or 1)) for name, seconds in cpu.items()}
    return summary


def _cell(summary: dict[str, Any], issued_by_replica: list[int]) -> dict[str, Any]:
    total = sum(issued_by_replica)
    return {"certs_per_s": summary["certs_per_s"], "errors": summary["errors"],
            "p50_ms": summary["latency_ms"]["p50"], "p99_ms": summary["latency_ms"]["p99"],
            "server_cpu_us_per_cert": summary.get("server_cpu_us_per_cert"),
            "cpu_us_per_cert": summary["cpu_us_per_cert"], "cpu_share": summary["cpu_share"],
            "machine_busy_share": summary["machine_busy_share"], "machine_steal_share": summary["machine_steal_share"],
            "all_ok": summary["all_ok"],
            # How the kernel's SO_REUSEPORT hash spread the work (log lines, warm-up included).
            "replica_shares": [n / total for n in issued_by_replica] if total else []}


def run_configuration(name: str, backends: Backends, spec: LoadSpec, csrs: list[bytes]) -> dict[str, Any]:
    """Fresh servers for configuration ``name``, one load, the servers stopped."""
    postmaster = backends.postmaster_pid()
    hsm_pid = backends.hsm.process.pid if backends.hsm.process is not None else None

    def components(server_pids: Callable[[], list[int]]) -> dict[str, Callable[[], float]]:
        return {"replicas": lambda: sum(process_tree_cpu_seconds(pid) for pid in server_pids()),
                "p11kit": lambda: process_tree_cpu_seconds(hsm_pid) if hsm_pid else 0.0,
                "postgres": lambda: process_tree_cpu_seconds(postmaster),
                "bench": _own_cpu_seconds}

    if name == "embedded":
        server = backends.embedded_server
        assert server is not None
        with server:
            target = IstioTarget(server.address, server.root_pem)
            summary = drive(target, spec, csrs, components(lambda: [server.pid]))
        return _cell(summary, [])
    count = {"one": 1, "two": 2}[name]
    with backends.replicas(count) as replicas:
        target = IstioTarget(backends.listen, backends.root_pem)
        summary = drive(target, spec, csrs, components(lambda: replicas.pids))
        for index, process in enumerate(replicas.processes):
            if process.poll() is not None:
                raise RuntimeError(f"replica {index} died under load:\n{replicas.log_tail(index)}")
    return _cell(summary, replicas.issued())


def _round_order(round_index: int, configurations: list[str]) -> list[str]:
    return list(configurations) if round_index % 2 == 0 else list(reversed(configurations))


def measure(rounds: int, seconds: float, connections: int, key_type: str, warmup_s: float, workdir: Path, *,
            embedded: bool = True, csr_type: str = "rsa-2048") -> dict[str, Any]:
    spec = LoadSpec(processes=1, connections=connections, warmup_s=warmup_s, duration_s=seconds)
    csrs = make_csrs(2048, csr_type)
    configurations = [c for c in CONFIGURATIONS if embedded or c != "embedded"]
    cells: dict[str, list[dict[str, Any]]] = {c: [] for c in configurations}
    audit: dict[str, int] = {}
    with Backends(workdir, key_type=key_type, embedded=embedded) as backends:
        for round_index in range(rounds):
            for name in _round_order(round_index, configurations):
                cell = run_configuration(name, backends, spec, csrs)
                cells[name].append(cell)
                _print_cell(round_index, name, cell)
        audit = {"recorded_in_postgres": backends.issued_in_postgres(),
                 "received_by_generator": sum(c["all_ok"] or 0 for name in ("one", "two") for c in cells[name])}
    medians = {name: _median_cell(runs) for name, runs in cells.items()}
    per_round = [two["certs_per_s"] / one["certs_per_s"] for one, two in zip(cells["one"], cells["two"])
                 if one["certs_per_s"]]
    ratios = {"two_over_one_per_round": per_round,
              "two_over_one": statistics.median(per_round) if per_round else None}
    if embedded:
        ratios["two_over_embedded_per_round"] = [two["certs_per_s"] / emb["certs_per_s"]
                                                 for two, emb in zip(cells["two"], cells["embedded"])
                                                 if emb["certs_per_s"]]
        ratios["two_over_embedded"] = (statistics.median(ratios["two_over_embedded_per_round"])
                                       if ratios["two_over_embedded_per_round"] else None)
    return {"rounds": cells, "median": medians, "ratios": ratios, "audit": audit}


def _median_cell(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {key: statistics.median(r[key] for r in runs)
                           for key in ("certs_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_cert",
                                       "machine_busy_share", "machine_steal_share")}
    for group in ("cpu_us_per_cert", "cpu_share"):
        out[group] = {name: statistics.median(r[group][name] for r in runs) for name in runs[0][group]}
    errors: dict[str, int] = {}
    for r in runs:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    out["errors"] = errors
    return out


def _print_cell(round_index: int, name: str, cell: dict[str, Any]) -> None:
    per = cell["cpu_us_per_cert"]
    split = " / ".join(f"{s:.0%}" for s in cell["replica_shares"])
    print(f"round {round_index + 1} {name:8} {cell['certs_per_s']:7,.0f}/s  p50 {cell['p50_ms']:5.1f}  "
          f"p99 {cell['p99_ms']:6.1f} ms  µs/cert: replicas {per['replicas']:4.0f} p11kit {per['p11kit']:4.0f} "
          f"pg {per['postgres']:4.0f} gen {per['generator']:4.0f} bench {per['bench']:3.0f} "
          f"other {per['other']:3.0f}  busy {cell['machine_busy_share']:.0%}  "
          f"errors {cell['errors'] or '-'}" + (f"  split {split}" if split else ""), flush=True)


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (and SIGHUP) unwind like Ctrl-C, so every server is stopped."""
    def raise_exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_round_options(parser: argparse.ArgumentParser) -> None:
    """The options of a bench that alternates cells under the grpc-go generator."""
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell and round [10]")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the window [5]")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--key-type", default="ec-p256", help="the CA key (fastca init --key-type) [ec-p256]")
    parser.add_argument("--csr-type", default="rsa-2048", help="the agents' CSR keys [rsa-2048, as istio-agent]")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_round_options(parser)
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded default (SQLite, --workers 2)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with _stop_on_sigterm(), tempfile.TemporaryDirectory(prefix="fastca-replicas-") as tmp:
        report = measure(args.rounds, args.seconds, args.connections, args.key_type, args.warmup, Path(tmp),
                         embedded=not args.no_embedded, csr_type=args.csr_type)
    report["meta"] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "command": " ".join(["python -m bench replicas", shlex.join(argv)]).strip(), "cpus": os.cpu_count(),
                      "elapsed_s": round(time.monotonic() - started, 1)}
    print(f"medians of {args.rounds} rounds, {args.connections} connections, {args.seconds:g} s each:")
    for name, median in report["median"].items():
        per = median["cpu_us_per_cert"]
        print(f"  {name:8} {median['certs_per_s']:7,.0f}/s  p50 {median['p50_ms']:5.1f} ms  "
              f"p99 {median['p99_ms']:6.1f} ms  server {median['server_cpu_us_per_cert']:5.0f} µs/cert  "
              f"(p11kit {per['p11kit']:.0f}, postgres {per['postgres']:.0f}, generator {per['generator']:.0f}, "
              f"other {per['other']:.0f})  errors {median['errors'] or '-'}")
    ratios = report["ratios"]
    if ratios["two_over_one"] is not None:
        print(f"  two/one: {ratios['two_over_one']:.2f} (per round "
              f"{' · '.join(f'{r:.2f}' for r in ratios['two_over_one_per_round'])})")
    if ratios.get("two_over_embedded") is not None:
        print(f"  two/embedded: {ratios['two_over_embedded']:.2f}")
    print(f"  audit: {report['audit']['recorded_in_postgres']} certificates recorded in PostgreSQL, "
          f"{report['audit']['received_by_generator']} received by the generator (warm-up and drain included)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

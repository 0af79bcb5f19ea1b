"""bench/replicas.py's pieces against the real engines, briefly: one state
behind a p11-kit server and a PostgreSQL database, one replica and then two
on one port, the grpc-go generator for two seconds each. Needs what
`python -m bench replicas` needs (Debian's postgresql, p11-kit, p11-kit-modules,
golang-go, golang-google-grpc-dev)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bench.loadgen import LoadSpec, make_csrs
from bench.replicas import Backends, _round_order, run_configuration

pytestmark = pytest.mark.slow


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except FileNotFoundError:
        return True
    return text[text.rindex(")") + 2] == "Z"        # exited, not yet reaped by its (foreign) parent


def _tree(pid: int) -> list[int]:
    children = [int(c) for task in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return [pid, *(p for child in children for p in _tree(child))]


def test_one_then_two_replicas_share_the_port_the_hsm_and_the_database(tmp_path: Path):
    assert _round_order(0, ["one", "two", "embedded"]) == ["one", "two", "embedded"]
    assert _round_order(1, ["one", "two", "embedded"]) == ["embedded", "two", "one"]
    spec = LoadSpec(processes=1, connections=16, warmup_s=0.5, duration_s=2.0, call_timeout_s=10.0)
    csrs = make_csrs(64, "ec-p256", distinct_keys=2)
    with Backends(tmp_path, embedded=False) as backends:
        one = run_configuration("one", backends, spec, csrs)
        two = run_configuration("two", backends, spec, csrs)
        started = [*_tree(backends.hsm.process.pid), *_tree(backends.postmaster_pid())]
        recorded = backends.issued_in_postgres()
    for cell in (one, two):
        assert cell["errors"] == {} and cell["certs_per_s"] > 0
        # Signing went through the p11-kit server, records into PostgreSQL.
        assert cell["cpu_us_per_cert"]["p11kit"] > 0 and cell["cpu_us_per_cert"]["postgres"] > 0
        assert cell["cpu_us_per_cert"]["replicas"] > 0 and cell["cpu_us_per_cert"]["generator"] > 0
    # 16 connections over two replicas on one port: both served (all on one: p = 2^-15).
    assert one["replica_shares"] == [1.0]
    assert len(two["replica_shares"]) == 2 and min(two["replica_shares"]) > 0
    # Every certificate the generator received is in the one database, and nothing else.
    assert recorded == one["all_ok"] + two["all_ok"]
    # p11-kit server with its p11-kit-remote children, the postmaster with its backends: all stopped.
    assert len(started) > 2 and all(_gone(pid) for pid in started), [p for p in started if not _gone(p)]

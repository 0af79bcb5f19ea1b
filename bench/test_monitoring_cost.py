"""bench/monitoring_cost.py against the real engines, briefly: one round of
a monitoring-off and a monitoring-on cell (the embedded default, the grpc-go
generator for a second each), and the monitor's own work on the "on" log.
Needs what `python -m bench monitoring-cost` needs (golang-go,
golang-google-grpc-dev)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.monitoring_cost import measure, monitoring_settings

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("on", ["watch", "policy"])
def test_one_round_of_each_side(tmp_path: Path, on: str) -> None:
    report = measure(1, 1.0, 8, "ec-p256", 0.5, tmp_path, csr_count=400, on=on)
    off, served = report["rounds"]["off"][0], report["rounds"]["on"][0]
    assert off["certs_per_s"] > 0 and served["certs_per_s"] > 0
    assert served["alert_lines"] > 0                    # the "on" server did watch (new identities at least)
    assert served["audit_records"] > 0
    work = report["monitor_work"]
    # the whole log replayed: the agents' certificates and each worker's serving certificate
    assert served["audit_records"] < work["records"] <= served["audit_records"] + 8
    assert work["read_us_per_record"] > 0 and work["read_and_score_us_per_record"] >= work["read_us_per_record"]
    assert report["monitoring"] == monitoring_settings(on)
    assert ("policy" in report["monitoring"]) is (on == "policy")
    assert report["ratios"]["on_over_off"] > 0

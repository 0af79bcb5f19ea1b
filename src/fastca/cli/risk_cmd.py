"""`fastca risk` — the identities the issuance monitor scores highest now,
and why.

The scores are derived from the audit log exactly as a server process
derives them at start: the last ``[monitoring] replay_seconds`` of records
(at most ``replay_max_records``) through the same rules and weights. What
never reaches the log (impersonation refusals, failed authentication) is
only in the servers' alerts: their log lines and
``fastca_monitoring_alerts_total``.

Registered in cli/main.py as the ``risk`` command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fastca.cli.audit_cmd import open_state_audit_reader, section_config
from fastca.clock import SYSTEM_CLOCK
from fastca.monitoring import IssuanceMonitor
from fastca.monitoring.service import replay_recent

__all__ = ["risk"]

_out = Console(emoji=False)


def risk(
    state: Optional[Path] = typer.Option(None, "--state",
                                         help="state directory [default: $FASTCA_STATE_DIR or ./.fastca]"),
    top: int = typer.Option(20, min=1, help="how many of the highest scores to show"),
    identity: Optional[str] = typer.Option(None, help="explain this SPIFFE ID's score (shown even if 0)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Risk scores from the issuance monitor, highest first, with the signals behind each."""
    config = section_config(state, "audit", "monitoring").monitoring
    monitor = IssuanceMonitor(config, clock=SYSTEM_CLOCK)
    reader = open_state_audit_reader(state)
    try:
        _, records = replay_recent(monitor, reader, config, SYSTEM_CLOCK.now)
    finally:
        reader.close()
    now = SYSTEM_CLOCK.now()
    subjects = [identity] if identity is not None else [subject for subject, _, _ in monitor.top(top, now)]
    explained = [monitor.explain(subject, now) for subject in subjects]
    if as_json:
        print(json.dumps({"records_read": records, "window_seconds": config.replay_seconds,
                          "threshold": config.alert_threshold, "half_life_seconds": config.half_life_seconds,
                          "subjects": explained}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"risk scores from {records} record(s) of the last {config.replay_seconds:g} s "
                        f"(threshold {config.alert_threshold:g}, half-life {config.half_life_seconds:g} s)")
    for column in ("subject", "score", "high risk", "signals (newest first)"):
        table.add_column(column, overflow="fold")
    for entry in explained:
        signals = "; ".join(f"{s['signal']} (+{s['remaining']:.1f} now): {s['detail']}" for s in entry["signals"])
        table.add_row(entry["identity"], f"{entry['score']:.1f}", "yes" if entry["high_risk"] else "no",
                      signals or "-")
    _out.print(table)

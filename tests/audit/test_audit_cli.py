"""`fastca audit list | show`, through the typer sub-app."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastca.audit import SqliteAuditLog
from fastca.cli.audit_cmd import audit_app, parse_when, resolve_audit_path
from fastca.errors import ConfigurationError
from tests.audit._factory import T0, make_record

runner = CliRunner()


@pytest.fixture
def state(tmp_path: Path) -> tuple[Path, list]:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    records = [make_record(i) for i in range(30)]
    with SqliteAuditLog(state_dir / "audit.db") as log:
        log.record_many_sync(records)
    return state_dir, records


def test_list_json_newest_first(state) -> None:
    state_dir, records = state
    result = runner.invoke(audit_app, ["list", "--state", str(state_dir), "--limit", "3", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [r["serial"] for r in listed] == [r.serial for r in records[::-1][:3]]
    assert listed[0]["issued_at"] == records[-1].issued_at.isoformat()


def test_list_filters(state) -> None:
    state_dir, records = state
    result = runner.invoke(audit_app, ["list", "--state", str(state_dir), "--identity", records[5].identity,
                                       "--json"])
    assert [r["serial"] for r in json.loads(result.stdout)] == [records[5].serial]
    since = (T0 + dt.timedelta(seconds=27)).isoformat()
    result = runner.invoke(audit_app, ["list", "--state", str(state_dir), "--since", since, "--json"])
    assert [r["serial"] for r in json.loads(result.stdout)] == [records[i].serial for i in (29, 28, 27)]


def test_list_table(state) -> None:
    state_dir, records = state
    result = runner.invoke(audit_app, ["list", "--state", str(state_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert records[-1].serial in result.stdout and records[-1].identity in result.stdout
    assert "30 issued certificate(s)" in result.stdout


def test_show(state) -> None:
    state_dir, records = state
    wanted = records[7]
    result = runner.invoke(audit_app, ["show", wanted.serial.upper(), "--state", str(state_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == wanted.to_dict()
    result = runner.invoke(audit_app, ["show", wanted.serial, "--state", str(state_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and wanted.fingerprint_sha256 in result.stdout


def test_show_unknown_serial(state) -> None:
    state_dir, _ = state
    result = runner.invoke(audit_app, ["show", "abc123", "--state", str(state_dir)])
    assert result.exit_code == 1 and "no certificate with serial abc123" in result.stderr


def test_default_state_dir_and_configured_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = tmp_path / "elsewhere"
    state_dir.mkdir()
    (state_dir / "fastca.toml").write_text('trust_domain = "x"\n[audit]\npath = "logs/issued.db"\n')
    (state_dir / "logs").mkdir()
    record = make_record(1)
    with SqliteAuditLog(state_dir / "logs" / "issued.db") as log:
        log.record_many_sync([record])
    monkeypatch.setenv("FASTCA_STATE_DIR", str(state_dir))
    assert resolve_audit_path(None) == state_dir / "logs" / "issued.db"
    result = runner.invoke(audit_app, ["show", record.serial, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["serial"] == record.serial


def test_missing_log_is_a_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    result = runner.invoke(audit_app, ["list", "--state", str(tmp_path)])
    assert isinstance(result.exception, ConfigurationError)
    assert "no audit log" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_parse_when() -> None:
    now = dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc)
    assert parse_when("2h", now) == now - dt.timedelta(hours=2)
    assert parse_when("7d", now) == now - dt.timedelta(days=7)
    assert parse_when("2025-01-01T00:00:00Z") == T0
    assert parse_when("2025-01-01") == T0
    with pytest.raises(ConfigurationError):
        parse_when("yesterday")

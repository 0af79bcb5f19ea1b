"""`fastca audit list | show` — read the issuance audit log (read-only), in
whichever backend the state's configuration names (SQLite file or PostgreSQL).

Registered in cli/main.py with ``app.add_typer(audit_app, name="audit")``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

from fastca.audit.config import AuditConfig, audit_path, open_audit_reader
from fastca.audit.record import IssuanceRecord, normalize_serial
from fastca.audit.sqlite_log import AuditReader
from fastca.ca.state import CONFIG_FILE, default_state_dir
from fastca.errors import ConfigurationError

if TYPE_CHECKING:
    from fastca.audit.postgres_log import PostgresAuditReader
    from fastca.config import CAConfig

__all__ = ["audit_app", "audit_config", "section_config", "resolve_audit_path", "parse_when", "parse_duration",
           "open_state_audit_reader"]

audit_app = typer.Typer(no_args_is_help=True, help="Read the issuance audit log.")
_out = Console(emoji=False)
_err = Console(stderr=True, emoji=False, soft_wrap=True)

StateOption = typer.Option(None, "--state", help="state directory [default: $FASTCA_STATE_DIR or ./.fastca]")
_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def section_config(state: Optional[Path], *names: str) -> CAConfig:
    """A state directory's configuration with only the sections ``names`` of
    its fastca.toml read (the rest at defaults), with ``FASTCA_*`` overrides,
    as ``fastca serve`` reads them: a problem elsewhere in the file is not
    this command's."""
    state_dir = state if state is not None else default_state_dir()
    sections: dict[str, object] = {}
    config_file = state_dir / CONFIG_FILE
    if config_file.exists():
        try:
            data = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read {config_file}: {exc}") from None
        sections = {name: data[name] for name in names if name in data}
    from fastca.config import CAConfig

    return CAConfig.from_mapping(sections, source=str(config_file))


def audit_config(state: Optional[Path]) -> AuditConfig:
    """The ``[audit]`` section of a state directory's fastca.toml (if it has one)."""
    return section_config(state, "audit").audit


def resolve_audit_path(state: Optional[Path]) -> Path:
    """The SQLite audit database of a state directory: ``[audit] path`` in its
    fastca.toml (relative to the directory) if set, else audit.db."""
    state_dir = state if state is not None else default_state_dir()
    return audit_path(audit_config(state), state_dir)


def parse_duration(text: str) -> dt.timedelta | None:
    """30s, 30m, 2h, 7d, 1w, or plain seconds; None if ``text`` is neither."""
    text = text.strip()
    if text.isdigit():
        return dt.timedelta(seconds=int(text))
    match = _DURATION.match(text)
    return dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)]) if match else None


def parse_when(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """ISO 8601 (naive means UTC) or a duration ago: 30m, 2h, 7d, 1w."""
    ago = parse_duration(text) if not text.strip().isdigit() else None
    if ago is not None:
        now = now or dt.datetime.now(dt.timezone.utc)
        return now - ago
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigurationError(f"not a time: {text!r} (ISO 8601, e.g. 2025-01-31T12:00:00Z, or 30m, 2h, 7d)") \
            from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def open_state_audit_reader(state: Optional[Path]) -> AuditReader | PostgresAuditReader:
    """The reader of the backend the state's configuration names."""
    state_dir = state if state is not None else default_state_dir()
    config = audit_config(state)
    if config.database is None:
        path = audit_path(config, state_dir)
        if not path.exists():
            raise ConfigurationError(f"no audit log at {path} (nothing issued by a server with this state yet?)")
    return open_audit_reader(config, state_dir)


def _short_time(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ")


@audit_app.command("list")
def list_records(
    state: Optional[Path] = StateOption,
    identity: Optional[str] = typer.Option(None, help="only certificates for this SPIFFE ID"),
    since: Optional[str] = typer.Option(None, help="issued at or after: ISO 8601, or 30m / 2h / 7d ago"),
    until: Optional[str] = typer.Option(None, help="issued before: ISO 8601, or a duration ago"),
    limit: int = typer.Option(50, min=1, help="most records to show (newest first)"),
    flagged: bool = typer.Option(False, "--flagged", help="only certificates the issuance monitor flagged"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Issued certificates, newest first."""
    reader = open_state_audit_reader(state)
    try:
        records = reader.list(limit=limit, identity=identity,
                              since=parse_when(since) if since else None,
                              until=parse_when(until) if until else None, flagged=flagged)
    finally:
        reader.close()
    if as_json:
        print(json.dumps([record.to_dict() for record in records], indent=2))
        return
    from rich.table import Table

    kind = "flagged" if flagged else "issued"
    table = Table(title=f"{len(records)} {kind} certificate(s), newest first")
    columns = ["issued at", "serial", "identity", "key", "not after", "signer", "caller"]
    if flagged:
        columns.append("flags")
    for column in columns:
        table.add_column(column, overflow="fold")
    for record in records:
        caller = ", ".join(record.caller_identities) + (" (impersonated)" if record.impersonated else "")
        row = [_short_time(record.issued_at), record.serial, record.identity, record.key_type,
               _short_time(record.not_after), record.signer, caller]
        if flagged:
            row.append(", ".join(record.flags))
        table.add_row(*row)
    _out.print(table)


@audit_app.command("show")
def show(
    serial: str = typer.Argument(..., help="serial number, hex (colons and leading zeros allowed)"),
    state: Optional[Path] = StateOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Everything recorded about one certificate."""
    try:
        wanted = normalize_serial(serial)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    reader = open_state_audit_reader(state)
    try:
        record: IssuanceRecord | None = reader.get(wanted)
    finally:
        reader.close()
    if record is None:
        _err.print(f"no certificate with serial {wanted} in {reader.where}", highlight=False, markup=False)
        raise typer.Exit(1)
    described = record.to_dict()
    if as_json:
        print(json.dumps(described, indent=2))
        return
    from rich.table import Table

    table = Table(show_header=False, title=f"certificate {record.serial}")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in described.items():
        table.add_row(key.replace("_", " "), ", ".join(value) if isinstance(value, list) else str(value))
    _out.print(table)

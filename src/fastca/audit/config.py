"""The ``[audit]`` section of fastca.toml, and opening the log it names."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from fastca.audit.sqlite_log import SqliteAuditLog

__all__ = ["AuditConfig", "open_audit_log", "audit_path", "DEFAULT_AUDIT_FILE"]

DEFAULT_AUDIT_FILE = "audit.db"


class AuditConfig(BaseModel):
    """Where and how issuance records are kept.

        [audit]
        backend = "sqlite"
        path = "audit.db"        # relative to the state directory
        max_batch = 512          # records per transaction at most
        max_delay_ms = 2.0       # under load, how long a record waits for batch-mates
        queue_limit = 65536      # records waiting before requests get RESOURCE_EXHAUSTED
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["sqlite"] = "sqlite"
    path: str = DEFAULT_AUDIT_FILE
    max_batch: int = Field(512, ge=1, le=1_000_000)
    max_delay_ms: float = Field(2.0, ge=0, le=1000)
    queue_limit: int = Field(65536, ge=1)


def audit_path(config: AuditConfig, state_dir: Path) -> Path:
    path = Path(config.path).expanduser()
    return path if path.is_absolute() else Path(state_dir) / path


def open_audit_log(config: AuditConfig, state_dir: Path,
                   on_commit: Callable[[int, float], None] | None = None) -> SqliteAuditLog:
    """Open (creating if needed) the audit log ``config`` names."""
    path = audit_path(config, state_dir)
    if not Path(config.path).is_absolute():
        path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteAuditLog(path, max_batch=config.max_batch, max_delay_s=config.max_delay_ms / 1000,
                          queue_limit=config.queue_limit, on_commit=on_commit)

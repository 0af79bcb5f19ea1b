"""The ``[audit]`` section of fastca.toml, and opening the log it names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fastca.audit.sqlite_log import AuditReader, SqliteAuditLog

if TYPE_CHECKING:
    from fastca.audit.postgres_log import PostgresAuditLog, PostgresAuditReader

__all__ = ["AuditConfig", "open_audit_log", "open_audit_reader", "audit_path", "DEFAULT_AUDIT_FILE"]

DEFAULT_AUDIT_FILE = "audit.db"


class AuditConfig(BaseModel):
    """Where and how issuance records are kept.

        [audit]
        path = "audit.db"        # SQLite (the default): relative to the state directory
        # or PostgreSQL, shared by replicas (backend becomes "postgresql"):
        # database = "postgresql://fastca@db.example:5432/fastca?sslmode=verify-full"
        # password_file = "audit-db-password"   # 0600; or a libpq passfile (PGPASSFILE)
        max_batch = 512          # records per transaction at most
        max_delay_ms = 2.0       # under load, how long a record waits for batch-mates
        queue_limit = 65536      # records waiting before requests get RESOURCE_EXHAUSTED
    """

    # hide_input_in_errors: a refused URL may hold a password; errors never repeat it.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    path: str = DEFAULT_AUDIT_FILE
    database: str | None = None              # postgresql://user@host:port/dbname, never with a password
    password_file: str | None = None         # relative to the state directory
    connect_timeout_seconds: float = Field(5.0, gt=0, le=300)
    max_batch: int = Field(512, ge=1, le=1_000_000)
    max_delay_ms: float = Field(2.0, ge=0, le=1000)
    queue_limit: int = Field(65536, ge=1)

    @field_validator("database")
    @classmethod
    def _no_password_in_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from fastca.audit.postgres_log import check_database_url

        check_database_url(value)        # ValueError, with a message that never repeats the URL
        return value

    @model_validator(mode="after")
    def _backend_follows_database(self) -> AuditConfig:
        if self.database is not None:
            if "backend" in self.model_fields_set and self.backend != "postgresql":
                raise ValueError("[audit] database is a PostgreSQL URL: backend must be \"postgresql\" (or unset)")
            object.__setattr__(self, "backend", "postgresql")
        elif self.backend == "postgresql":
            raise ValueError("[audit] backend = \"postgresql\" needs database = \"postgresql://...\"")
        if self.password_file is not None and self.database is None:
            raise ValueError("[audit] password_file is for a PostgreSQL database; set database too")
        return self


def audit_path(config: AuditConfig, state_dir: Path) -> Path:
    path = Path(config.path).expanduser()
    return path if path.is_absolute() else Path(state_dir) / path


def _password_file(config: AuditConfig, state_dir: Path) -> Path | None:
    if config.password_file is None:
        return None
    path = Path(config.password_file).expanduser()
    return path if path.is_absolute() else Path(state_dir) / path


def open_audit_log(config: AuditConfig, state_dir: Path, on_commit: Callable[[int, float], None] | None = None
                   ) -> Union[SqliteAuditLog, PostgresAuditLog]:
    """Open (creating or migrating if needed) the audit log ``config`` names."""
    if config.database is not None:
        from fastca.audit.postgres_log import PostgresAuditLog

        return PostgresAuditLog(config.database, password_file=_password_file(config, state_dir),
                                connect_timeout=config.connect_timeout_seconds, max_batch=config.max_batch,
                                max_delay_s=config.max_delay_ms / 1000, queue_limit=config.queue_limit,
                                on_commit=on_commit)
    path = audit_path(config, state_dir)
    if not Path(config.path).is_absolute():
        path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteAuditLog(path, max_batch=config.max_batch, max_delay_s=config.max_delay_ms / 1000,
                          queue_limit=config.queue_limit, on_commit=on_commit)


def open_audit_reader(config: AuditConfig, state_dir: Path, *,
                      writable: bool = False) -> Union[AuditReader, PostgresAuditReader]:
    """Read access to the audit log ``config`` names (``writable``: also the
    issuance monitor's ``flag``); never creates one (ConfigurationError if
    there is none)."""
    if config.database is not None:
        from fastca.audit.postgres_log import PostgresAuditReader

        return PostgresAuditReader(config.database, password_file=_password_file(config, state_dir),
                                   connect_timeout=config.connect_timeout_seconds)
    return AuditReader(audit_path(config, state_dir), writable=writable)

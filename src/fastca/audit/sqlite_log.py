"""The embedded audit log: one SQLite file, one writer thread, group commit.

Every certificate is recorded durably before it is handed out: ``await
log.record(rec)`` returns only once the transaction holding ``rec`` is on disk
(WAL, ``synchronous=FULL``). The queue, the writer thread and group commit
are ``fastca.audit.group_commit``'s; this module is what speaks SQLite: the
connection, the schema (``PRAGMA user_version``), the transaction
(``BEGIN IMMEDIATE`` ... ``COMMIT``) and ``AuditReader``.

A failed transaction (disk full, I/O error) is rolled back and answered
with CANotReady; the next batch tries again on the same connection, so the
log recovers with the disk.

Several server processes may share one file: SQLite's locking serialises
their writers (``busy_timeout``), and each process keeps its own writer.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from fastca.audit.group_commit import GroupCommitLog
from fastca.audit.queries import COLUMNS, RecordQueries
from fastca.audit.record import IssuanceRecord
from fastca.errors import CANotReady, ConfigurationError

__all__ = ["SqliteAuditLog", "AuditReader", "SCHEMA_VERSION"]

SCHEMA_VERSION = 3
_BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS issuance (
    id                 INTEGER PRIMARY KEY,
    serial             TEXT    NOT NULL,
    identity           TEXT    NOT NULL,
    caller_identities  TEXT    NOT NULL,   -- JSON array
    credential_type    TEXT    NOT NULL,
    key_type           TEXT    NOT NULL,
    not_before         TEXT    NOT NULL,   -- ISO 8601 UTC, microseconds: fixed width, sorts as time
    not_after          TEXT    NOT NULL,
    signer             TEXT    NOT NULL,
    fingerprint_sha256 TEXT    NOT NULL,
    peer               TEXT    NOT NULL,
    request_id         TEXT    NOT NULL,
    issued_at          TEXT    NOT NULL,
    impersonated       INTEGER NOT NULL,
    cluster_id         TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS issuance_serial ON issuance (serial);
CREATE INDEX IF NOT EXISTS issuance_identity ON issuance (identity, issued_at);
CREATE INDEX IF NOT EXISTS issuance_issued_at ON issuance (issued_at);
"""
# Version 2: what the issuance monitor reads (fastca.monitoring) and the flags it sets.
_V2 = (
    "ALTER TABLE issuance ADD COLUMN spki_sha256 TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE issuance ADD COLUMN csr_sha256 TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE issuance ADD COLUMN flags TEXT NOT NULL DEFAULT ''",
    "CREATE INDEX IF NOT EXISTS issuance_flagged ON issuance (issued_at) WHERE flags <> ''",
)
# Version 3: the caller's Kubernetes node (the monitor's new_node and per-node fan-out).
_V3 = (
    "ALTER TABLE issuance ADD COLUMN node TEXT NOT NULL DEFAULT ''",
)

_INSERT = (f"INSERT INTO issuance ({', '.join(COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in COLUMNS)})")


class _Connection(Protocol):
    """What the writer needs of a connection (tests wrap one to inject faults)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...
    def executemany(self, sql: str, parameters: Any, /) -> Any: ...
    def close(self) -> None: ...


def _ts(value: dt.datetime) -> str:
    # "2025-01-31T12:00:00.000000+00:00"; IssuanceRecord keeps its times in UTC already.
    if value.tzinfo is not dt.timezone.utc:
        value = value.astimezone(dt.timezone.utc)
    return value.isoformat(timespec="microseconds")


_parse_ts = dt.datetime.fromisoformat
_json_string = json.encoder.encode_basestring_ascii   # type: ignore[attr-defined]


def _row(record: IssuanceRecord) -> tuple[Any, ...]:
    # Built on the writer thread for every record: kept cheap.
    return (record.serial, record.identity, "[" + ",".join(map(_json_string, record.caller_identities)) + "]",
            record.credential_type, record.key_type, _ts(record.not_before), _ts(record.not_after),
            record.signer, record.fingerprint_sha256, record.peer, record.request_id,
            _ts(record.issued_at), int(record.impersonated), record.cluster_id, record.spki_sha256,
            record.csr_sha256, ",".join(record.flags), record.node)


def _record(row: Sequence[Any]) -> IssuanceRecord:
    (serial, identity, callers, credential_type, key_type, not_before, not_after, signer, fingerprint,
     peer, request_id, issued_at, impersonated, cluster_id, spki_sha256, csr_sha256, flags, node) = row
    return IssuanceRecord(serial=serial, identity=identity, caller_identities=tuple(json.loads(callers)),
                          credential_type=credential_type, key_type=key_type,
                          not_before=_parse_ts(not_before), not_after=_parse_ts(not_after), signer=signer,
                          fingerprint_sha256=fingerprint, peer=peer, request_id=request_id,
                          issued_at=_parse_ts(issued_at), impersonated=bool(impersonated),
                          cluster_id=cluster_id, spki_sha256=spki_sha256, csr_sha256=csr_sha256,
                          flags=tuple(flags.split(",")) if flags else (), node=node)


def _connect_writer(path: Path) -> sqlite3.Connection:
    # Autocommit mode: the writer issues BEGIN IMMEDIATE / COMMIT itself.
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=True)
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.close()
        raise sqlite3.OperationalError(f"cannot switch {path} to WAL mode (got {mode})")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def _check_version(version: int, path: Path) -> None:
    if version > SCHEMA_VERSION:
        raise ConfigurationError(f"audit log {path} has schema version {version}; this fastca reads "
                                 f"up to {SCHEMA_VERSION} (upgrade fastca)")


def _migrate(conn: _Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    _check_version(version, path)
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]   # another process may have won
        _check_version(version, path)
        if version == 0:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        if version < 2:
            for statement in _V2:
                conn.execute(statement)
        if version < 3:
            for statement in _V3:
                conn.execute(statement)
        # Later versions: `if version < 4: ALTER ...` here, in order.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class AuditReader(RecordQueries):
    """Read-only access to an audit database (``writable``: also ``flag``,
    for the issuance monitor). Never creates one: a missing file is a
    ConfigurationError. Safe to use from any thread."""

    def __init__(self, path: str | Path, *, writable: bool = False) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        if not self.path.is_file():
            raise ConfigurationError(f"no audit log at {self.path}")
        try:
            mode = "rw" if writable else "ro"
            self._conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode={mode}", uri=True,
                                         check_same_thread=False, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot read the audit log {self.path}: {exc}") from None
        if version == 0:
            self._conn.close()
            raise ConfigurationError(f"{self.path} is not a fastca audit log")
        _check_version(version, self.path)
        self.schema_version = version
        self._lock = threading.Lock()

    def _query(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                raise CANotReady(f"audit log unavailable: {exc}") from None

    def _execute(self, sql: str, parameters: Sequence[Any]) -> int:
        with self._lock:
            try:
                return self._conn.execute(sql, parameters).rowcount
            except sqlite3.Error as exc:
                raise CANotReady(f"audit log unavailable: {exc}") from None

    _time = staticmethod(_ts)
    _record = staticmethod(_record)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SqliteAuditLog(GroupCommitLog[_Connection]):
    """The audit log the server writes, in one SQLite file (see the module
    docstrings). ``connect`` opens the writer's connection; tests pass a
    wrapper to inject faults."""

    def __init__(self, path: str | Path, *, max_batch: int = 512, max_delay_s: float = 0.002,
                 queue_limit: int = 65536, on_commit: Callable[[int, float], None] | None = None,
                 connect: Callable[[Path], _Connection] = _connect_writer) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self._connect = connect
        super().__init__(max_batch=max_batch, max_delay_s=max_delay_s, queue_limit=queue_limit,
                         on_commit=on_commit)

    def _open(self) -> _Connection:
        conn = self._connect(self.path)
        try:
            _migrate(conn, self.path)
        except BaseException:
            conn.close()
            raise
        return conn

    _row = staticmethod(_row)

    def _write(self, conn: _Connection, rows: list[Any]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except Exception:
                pass   # a failed COMMIT may have ended the transaction already
            raise

    def _new_reader(self) -> AuditReader:
        return AuditReader(self.path)

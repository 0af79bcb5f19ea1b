"""The audit log in PostgreSQL, for replicas that share one issuance registry.

The queue, the writer thread and group commit are
``fastca.audit.group_commit``'s, as for SQLite; this module is what speaks
PostgreSQL (psycopg 3, synchronous, on the writer thread):

- a batch is one transaction: ``COPY fastca_issuance FROM STDIN``, then
  ``COMMIT``; its records are reported committed only once COMMIT returned.
  Serials are UNIQUE (a constraint), so a duplicate fails its whole batch,
  and two replicas can never both record one serial;
- a connection the database dropped (a restart, a failover, a network cut)
  is replaced: the batch is tried once more on a new connection, and while
  the database cannot be reached each batch fails with CANotReady on its own;
- the schema is versioned in ``fastca_schema_version`` and migrated under
  ``pg_advisory_xact_lock``, so replicas starting together migrate it once;
  a database whose version is newer than this fastca knows is refused
  (ConfigurationError), as a newer SQLite file is.

Secrets: a password written in the URL is refused (it would sit in
fastca.toml, in the environment, in logs). The password comes from
``password_file`` (a private file, read like the PKCS#11 PIN file, at every
connect) or from libpq's own means: a passfile (``PGPASSFILE``,
``passfile=`` in the URL, ``~/.pgpass``), client certificates, peer auth.
Messages name the database as ``postgresql://user@host:port/dbname``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import psycopg
from psycopg.conninfo import conninfo_to_dict

from fastca.audit.group_commit import GroupCommitLog
from fastca.audit.queries import COLUMNS, RecordQueries
from fastca.audit.record import IssuanceRecord
from fastca.errors import CANotReady, ConfigurationError
from fastca.signing.secret_file import read_secret_file

__all__ = ["PostgresAuditLog", "PostgresAuditReader", "SCHEMA_VERSION", "check_database_url", "describe_database"]

SCHEMA_VERSION = 3
TABLE = "fastca_issuance"
VERSION_TABLE = "fastca_schema_version"
# pg_advisory_xact_lock's key for migrations: b"fastcaAU" as a big-endian int64.
MIGRATION_LOCK = int.from_bytes(b"fastcaAU", "big")
_PASSWORD_MAX_BYTES = 4096
_DEFAULT_CONNECT_TIMEOUT = 5

# Each version's statements, applied in order, each version in the
# transaction that records it.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        f"""CREATE TABLE {TABLE} (
            id                 bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            serial             text        NOT NULL CONSTRAINT {TABLE}_serial_key UNIQUE
                                           CHECK (serial ~ '^[0-9a-f]+$'),
            identity           text        NOT NULL,
            caller_identities  text[]      NOT NULL,
            credential_type    text        NOT NULL,
            key_type           text        NOT NULL,
            not_before         timestamptz NOT NULL,
            not_after          timestamptz NOT NULL,
            signer             text        NOT NULL,
            fingerprint_sha256 text        NOT NULL,
            peer               text        NOT NULL,
            request_id         text        NOT NULL,
            issued_at          timestamptz NOT NULL,
            impersonated       boolean     NOT NULL,
            cluster_id         text        NOT NULL
        )""",
        f"CREATE INDEX {TABLE}_identity ON {TABLE} (identity, issued_at)",
        f"CREATE INDEX {TABLE}_issued_at ON {TABLE} (issued_at)",
    ),
    # What the issuance monitor reads (fastca.monitoring) and the flags it sets.
    2: (
        f"ALTER TABLE {TABLE} ADD COLUMN spki_sha256 text NOT NULL DEFAULT ''",
        f"ALTER TABLE {TABLE} ADD COLUMN csr_sha256 text NOT NULL DEFAULT ''",
        f"ALTER TABLE {TABLE} ADD COLUMN flags text NOT NULL DEFAULT ''",
        f"CREATE INDEX {TABLE}_flagged ON {TABLE} (issued_at) WHERE flags <> ''",
    ),
    # The caller's Kubernetes node (the monitor's new_node and per-node fan-out).
    3: (
        f"ALTER TABLE {TABLE} ADD COLUMN node text NOT NULL DEFAULT ''",
    ),
}
assert max(_MIGRATIONS) == SCHEMA_VERSION

_COPY = f"COPY {TABLE} ({', '.join(COLUMNS)}) FROM STDIN"

_REFUSED_PASSWORD = ("a password in the audit database URL is refused (it would be kept in fastca.toml, the "
                     "environment and logs): remove it, and set [audit] password_file to a file only its owner "
                     "can read, or use a libpq passfile (PGPASSFILE, or passfile= in the URL)")


def check_database_url(url: str) -> dict[str, str]:
    """libpq's parameters of a ``postgresql://`` URL, if it has no password.
    Errors never repeat the URL (it may hold the password being refused)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise ValueError("the audit database must be a postgresql:// URL, "
                         "e.g. postgresql://fastca@db.example:5432/fastca")
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    if "@" in authority and ":" in authority.rpartition("@")[0]:
        raise ValueError(_REFUSED_PASSWORD)
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        raise ValueError("the audit database URL is not a valid PostgreSQL URL "
                         "(see libpq's connection URIs; the URL is not repeated here)") from None
    if "password" in params:
        raise ValueError(_REFUSED_PASSWORD)
    return {key: str(value) for key, value in params.items()}


def describe_database(params: dict[str, str]) -> str:
    """``postgresql://user@host:port/dbname``, for messages (never a secret)."""
    user = params.get("user", "")
    host = params.get("host", params.get("hostaddr", ""))
    port = params.get("port", "")
    return (f"postgresql://{user + '@' if user else ''}{host}{':' + port if port else ''}"
            f"/{params.get('dbname', '')}")


class _Database:
    """How to reach the database: checked parameters, the password file."""

    def __init__(self, url: str, password_file: str | Path | None, connect_timeout: float) -> None:
        try:
            self.params = check_database_url(url)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self.url = url
        self.where = describe_database(self.params)
        self.password_file = Path(password_file) if password_file is not None else None
        self.connect_timeout = connect_timeout

    def connect(self, *, autocommit: bool) -> psycopg.Connection[Any]:
        extra: dict[str, Any] = {}
        if self.password_file is not None:
            secret = read_secret_file(self.password_file, "audit database password file", _PASSWORD_MAX_BYTES)
            password = secret.decode("utf-8", "strict").rstrip("\r\n")
            if not password:
                raise ConfigurationError(f"the audit database password file {self.password_file} is empty")
            extra["password"] = password
        if "connect_timeout" not in self.params:
            extra["connect_timeout"] = max(1, round(self.connect_timeout))
        if "application_name" not in self.params:
            extra["application_name"] = "fastca"
        try:
            return psycopg.connect(self.url, autocommit=autocommit, **extra)
        except psycopg.Error as exc:
            raise CANotReady(f"audit log unavailable: cannot connect to {self.where}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _current_version(conn: psycopg.Connection[Any]) -> int:
    """The schema version recorded in the database; 0 if it has none."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (VERSION_TABLE,)).fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute(f"SELECT coalesce(max(version), 0) FROM {VERSION_TABLE}").fetchone()
    return int(row[0]) if row else 0


def _check_version(version: int, where: str) -> None:
    if version > SCHEMA_VERSION:
        raise ConfigurationError(f"audit database {where} has schema version {version}; this fastca knows "
                                 f"up to {SCHEMA_VERSION} (upgrade fastca)")


def migrate(conn: psycopg.Connection[Any], where: str) -> int:
    """Bring the schema to SCHEMA_VERSION, once even when replicas start
    together; returns how many versions this call applied."""
    with conn.transaction():
        version = _current_version(conn)
    _check_version(version, where)
    if version == SCHEMA_VERSION:
        return 0          # the common case: no lock, no DDL (a role without CREATE is fine)
    applied = 0
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} ("
                     "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        version = _current_version(conn)       # another replica may have migrated while we waited
        _check_version(version, where)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target]:
                conn.execute(statement)
            conn.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (%s)", (target,))
            applied += 1
    return applied


def _row(record: IssuanceRecord) -> tuple[Any, ...]:
    return (record.serial, record.identity, list(record.caller_identities), record.credential_type,
            record.key_type, record.not_before, record.not_after, record.signer, record.fingerprint_sha256,
            record.peer, record.request_id, record.issued_at, record.impersonated, record.cluster_id,
            record.spki_sha256, record.csr_sha256, ",".join(record.flags), record.node)


def _record(row: Sequence[Any]) -> IssuanceRecord:
    (serial, identity, callers, credential_type, key_type, not_before, not_after, signer, fingerprint,
     peer, request_id, issued_at, impersonated, cluster_id, spki_sha256, csr_sha256, flags, node) = row
    return IssuanceRecord(serial=serial, identity=identity, caller_identities=tuple(callers),
                          credential_type=credential_type, key_type=key_type, not_before=not_before,
                          not_after=not_after, signer=signer, fingerprint_sha256=fingerprint, peer=peer,
                          request_id=request_id, issued_at=issued_at, impersonated=impersonated,
                          cluster_id=cluster_id, spki_sha256=spki_sha256, csr_sha256=csr_sha256,
                          flags=tuple(flags.split(",")) if flags else (), node=node)


def _unusable(conn: psycopg.Connection[Any]) -> bool:
    return bool(conn.closed or conn.broken)


class PostgresAuditReader(RecordQueries):
    """Access to the audit tables: reads, and the issuance monitor's ``flag``. Never creates them: a database
    without them is a ConfigurationError. Safe to use from any thread; a
    dropped connection is replaced at the next query."""

    table = TABLE
    placeholder = "%s"
    _first_caller_sql = "caller_identities[1]"
    _epoch_sql = "extract(epoch from {column})::float8"

    def __init__(self, url: str, *, password_file: str | Path | None = None,
                 connect_timeout: float = _DEFAULT_CONNECT_TIMEOUT) -> None:
        self._database = _Database(url, password_file, connect_timeout)
        self.where = self._database.where
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = self._database.connect(autocommit=True)
        try:
            version = _current_version(self._conn)
        except psycopg.Error as exc:
            self.close()
            raise CANotReady(f"audit log unavailable: {self.where}: {_one_line(exc)}") from None
        if version == 0:
            self.close()
            raise ConfigurationError(f"{self.where} holds no fastca audit log (no server has written to it yet?)")
        try:
            _check_version(version, self.where)
        except ConfigurationError:
            self.close()
            raise
        self.schema_version = version

    def _query(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            if self._conn is None or _unusable(self._conn):
                self._conn = self._database.connect(autocommit=True)
            try:
                return self._conn.execute(sql, parameters).fetchall()
            except psycopg.Error as exc:
                raise CANotReady(f"audit log unavailable: {self.where}: {_one_line(exc)}") from None

    def _execute(self, sql: str, parameters: Sequence[Any]) -> int:
        with self._lock:
            if self._conn is None or _unusable(self._conn):
                self._conn = self._database.connect(autocommit=True)
            try:
                return self._conn.execute(sql, parameters).rowcount
            except psycopg.Error as exc:
                raise CANotReady(f"audit log unavailable: {self.where}: {_one_line(exc)}") from None

    _record = staticmethod(_record)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class PostgresAuditLog(GroupCommitLog[psycopg.Connection[Any]]):
    """The audit log the server writes, in PostgreSQL (see the module docstrings).

    ``database``: a ``postgresql://`` URL without a password;
    ``password_file``: where the password is, if libpq is not to find one itself.
    """

    def __init__(self, database: str, *, password_file: str | Path | None = None,
                 connect_timeout: float = _DEFAULT_CONNECT_TIMEOUT, max_batch: int = 512,
                 max_delay_s: float = 0.002, queue_limit: int = 65536,
                 on_commit: Callable[[int, float], None] | None = None) -> None:
        self._database = _Database(database, password_file, connect_timeout)
        self.where = self._database.where
        self.migrations_applied = 0
        super().__init__(max_batch=max_batch, max_delay_s=max_delay_s, queue_limit=queue_limit,
                         on_commit=on_commit)

    def _open(self) -> psycopg.Connection[Any]:
        conn = self._database.connect(autocommit=False)
        try:
            self.migrations_applied += migrate(conn, self.where)
        except psycopg.Error as exc:
            conn.close()
            raise CANotReady(f"audit log unavailable: cannot migrate {self.where}: {_one_line(exc)}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    _row = staticmethod(_row)

    def _write(self, conn: psycopg.Connection[Any], rows: list[Any]) -> None:
        try:
            with conn.cursor() as cursor, cursor.copy(_COPY) as copy:
                for row in rows:
                    copy.write_row(row)
            conn.commit()
        except BaseException:
            if not _unusable(conn):
                try:
                    conn.rollback()
                except Exception:
                    pass   # the connection went while rolling back; _lost sees it
            raise

    def _lost(self, conn: psycopg.Connection[Any], error: BaseException) -> bool:
        return _unusable(conn)

    def _new_reader(self) -> PostgresAuditReader:
        database = self._database
        return PostgresAuditReader(database.url, password_file=database.password_file,
                                   connect_timeout=database.connect_timeout)


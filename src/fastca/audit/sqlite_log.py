"""The embedded audit log: one SQLite file, one writer thread, group commit.

Every certificate is recorded durably before it is handed out: ``await
log.record(rec)`` returns only once the transaction holding ``rec`` is on disk
(WAL, ``synchronous=FULL``). Callers never touch SQLite; they queue records
and wait. The writer thread takes whatever is queued (up to ``max_batch``
records) into one transaction, so a burst of concurrent requests costs one
fsync. Under load (the previous commit carried more than one record) it also
waits up to ``max_delay_s`` for batch-mates; a lone request pays no delay.

Failures, as the caller sees them:
    queue full (``queue_limit`` records waiting)   Overloaded  -> RESOURCE_EXHAUSTED
    the transaction failed (disk full, I/O error)  CANotReady  -> UNAVAILABLE
    the log is closed                              CANotReady
A failed transaction is rolled back: none of its records is reported as
recorded, and the next batch tries again (so the log recovers with the disk).

Several server processes may share one file: SQLite's locking serialises
their writers (``busy_timeout``), and each process keeps its own writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from fastca.audit.record import IssuanceRecord, normalize_serial
from fastca.errors import CANotReady, ConfigurationError, Overloaded
from fastca.observability.logging import get_logger

_log = get_logger("fastca.audit")

__all__ = ["SqliteAuditLog", "AuditReader", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
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

_COLUMNS = ("serial", "identity", "caller_identities", "credential_type", "key_type", "not_before",
            "not_after", "signer", "fingerprint_sha256", "peer", "request_id", "issued_at",
            "impersonated", "cluster_id")
_INSERT = (f"INSERT INTO issuance ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM issuance"


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


def _parse_ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


_json_string = json.encoder.encode_basestring_ascii   # type: ignore[attr-defined]


def _row(record: IssuanceRecord) -> tuple[Any, ...]:
    # Built on the writer thread for every record: kept cheap.
    return (record.serial, record.identity, "[" + ",".join(map(_json_string, record.caller_identities)) + "]",
            record.credential_type, record.key_type, _ts(record.not_before), _ts(record.not_after),
            record.signer, record.fingerprint_sha256, record.peer, record.request_id,
            _ts(record.issued_at), int(record.impersonated), record.cluster_id)


def _record(row: Sequence[Any]) -> IssuanceRecord:
    (serial, identity, callers, credential_type, key_type, not_before, not_after, signer, fingerprint,
     peer, request_id, issued_at, impersonated, cluster_id) = row
    return IssuanceRecord(serial=serial, identity=identity, caller_identities=tuple(json.loads(callers)),
                          credential_type=credential_type, key_type=key_type,
                          not_before=_parse_ts(not_before), not_after=_parse_ts(not_after), signer=signer,
                          fingerprint_sha256=fingerprint, peer=peer, request_id=request_id,
                          issued_at=_parse_ts(issued_at), impersonated=bool(impersonated),
                          cluster_id=cluster_id)


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
        # Later versions: `if version < 2: ALTER ...` here, in order.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class AuditReader:
    """Read-only access to an audit database. Never creates one: a missing
    file is a ConfigurationError. Safe to use from any thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigurationError(f"no audit log at {self.path}")
        try:
            self._conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                         check_same_thread=False)
            self._conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot read the audit log {self.path}: {exc}") from None
        if version == 0:
            self._conn.close()
            raise ConfigurationError(f"{self.path} is not a fastca audit log")
        _check_version(version, self.path)
        self._lock = threading.Lock()

    def _query(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                raise CANotReady(f"audit log unavailable: {exc}") from None

    def list(self, limit: int = 50, identity: str | None = None, since: dt.datetime | None = None,
             until: dt.datetime | None = None) -> list[IssuanceRecord]:
        """Records, newest first; ``since`` inclusive, ``until`` exclusive."""
        where, parameters = [], []
        if identity is not None:
            where.append("identity = ?")
            parameters.append(identity)
        if since is not None:
            where.append("issued_at >= ?")
            parameters.append(_ts(_aware(since)))
        if until is not None:
            where.append("issued_at < ?")
            parameters.append(_ts(_aware(until)))
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY issued_at DESC, id DESC LIMIT ?"
        parameters.append(max(0, int(limit)))
        return [_record(row) for row in self._query(sql, parameters)]

    def get(self, serial: str | int) -> IssuanceRecord | None:
        rows = self._query(_SELECT + " WHERE serial = ? ORDER BY id DESC LIMIT 1", (normalize_serial(serial),))
        return _record(rows[0]) if rows else None

    def count(self) -> int:
        return int(self._query("SELECT count(*) FROM issuance")[0][0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


class _CallbackWaiter:
    __slots__ = ("on_done",)

    def __init__(self, on_done: Callable[[CANotReady | None], None]) -> None:
        self.on_done = on_done


class _Item:
    __slots__ = ("records", "waiter")

    def __init__(self, records: tuple[IssuanceRecord, ...], waiter: Any) -> None:
        self.records = records
        self.waiter = waiter   # _CallbackWaiter | asyncio.Future


def _resolve_futures(futures: list[asyncio.Future[None]], error: str | None) -> None:
    for future in futures:
        if future.done():          # the awaiting task was cancelled; its record stands anyway
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(CANotReady(error))


class SqliteAuditLog:
    """The audit log the server writes. See the module docstring.

    ``on_commit(records, seconds)`` is called on the writer thread after each
    successful commit (for ``Metrics.observe_audit_commit``). ``connect``
    opens the writer's connection; tests pass a wrapper to inject faults.
    """

    def __init__(self, path: str | Path, *, max_batch: int = 512, max_delay_s: float = 0.002,
                 queue_limit: int = 65536, on_commit: Callable[[int, float], None] | None = None,
                 connect: Callable[[Path], _Connection] = _connect_writer) -> None:
        if max_batch < 1 or queue_limit < 1 or max_delay_s < 0:
            raise ConfigurationError("audit log: max_batch and queue_limit must be >= 1, max_delay_s >= 0")
        self.path = Path(path)
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.queue_limit = queue_limit
        self._on_commit = on_commit
        self._connect = connect
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Item] = deque()
        self._pending = 0           # records queued, not yet taken by the writer
        self._closing = False
        self._commits = 0
        self._failed_commits = 0
        self._recorded = 0
        self._reader: AuditReader | None = None
        self._reader_lock = threading.Lock()
        started = threading.Event()
        startup_error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(started, startup_error),
                                        name="fastca-audit-writer", daemon=True)
        self._thread.start()
        started.wait()
        if startup_error:
            self._thread.join()
            error = startup_error[0]
            if isinstance(error, ConfigurationError):
                raise error
            raise CANotReady(f"audit log unavailable: cannot open {self.path}: {error}") from None

    # -- writing ---------------------------------------------------------

    async def record(self, record: IssuanceRecord) -> None:
        """Return once ``record`` is committed; raise Overloaded (queue full)
        or CANotReady (the commit failed, or the log is closed)."""
        await self.record_many((record,))

    async def record_many(self, records: Iterable[IssuanceRecord]) -> None:
        """All of ``records`` in one queue entry (one transaction, normally)."""
        batch = tuple(records)
        if not batch:
            return
        future = asyncio.get_running_loop().create_future()
        self._enqueue(_Item(batch, future))
        await future

    def record_many_sync(self, records: Iterable[IssuanceRecord], timeout: float | None = None) -> None:
        """Blocking form of record_many, for threads, the CLI and tests."""
        batch = tuple(records)
        if not batch:
            return
        committed = threading.Event()
        errors: list[CANotReady | None] = []

        def on_done(error: CANotReady | None) -> None:
            errors.append(error)
            committed.set()

        self._enqueue(_Item(batch, _CallbackWaiter(on_done)))
        if not committed.wait(timeout):
            raise CANotReady(f"audit log unavailable: no commit within {timeout} s")
        if errors[0] is not None:
            raise errors[0]

    def record_many_then(self, records: Iterable[IssuanceRecord],
                         on_done: Callable[[CANotReady | None], None]) -> None:
        """Queue ``records`` as one entry and return at once; ``on_done(None)``
        runs on the writer thread once they are committed, ``on_done(error)``
        if the transaction failed. Raises Overloaded or CANotReady (and then
        never calls ``on_done``) if they cannot be queued. The pipeline uses
        this so a batch's certificates wait for their commit without a
        thread of their own."""
        batch = tuple(records)
        if not batch:
            on_done(None)
            return
        self._enqueue(_Item(batch, _CallbackWaiter(on_done)))

    def _enqueue(self, item: _Item) -> None:
        size = len(item.records)
        with self._cond:
            if self._closing:
                raise CANotReady("audit log unavailable: the log is closed")
            if self._pending + size > self.queue_limit:
                raise Overloaded(f"audit queue full ({self._pending} records waiting)")
            self._queue.append(item)
            self._pending += size
            self._cond.notify()

    # -- the writer thread -----------------------------------------------

    def _run(self, started: threading.Event, startup_error: list[BaseException]) -> None:
        try:
            conn = self._connect(self.path)
            try:
                _migrate(conn, self.path)
            except BaseException:
                conn.close()
                raise
        except BaseException as error:
            startup_error.append(error)
            started.set()
            return
        started.set()
        last_batch = 0
        try:
            while True:
                items = self._take(wait_for_mates=last_batch > 1)
                if items is None:
                    return
                last_batch = sum(len(item.records) for item in items)
                self._commit(conn, items)
        finally:
            conn.close()

    def _take(self, wait_for_mates: bool) -> list[_Item] | None:
        """The next batch: everything queued up to max_batch records; None once
        closing and drained."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            items, size = self._drain(self.max_batch)
            if wait_for_mates and size < self.max_batch and self.max_delay_s > 0 and not self._closing:
                deadline = time.monotonic() + self.max_delay_s
                while size < self.max_batch and not self._closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if not self._queue:
                        self._cond.wait(remaining)
                        continue
                    more, added = self._drain(self.max_batch - size)
                    items.extend(more)
                    size += added
            self._pending -= size
            return items

    def _drain(self, room: int) -> tuple[list[_Item], int]:
        # Called with the lock held. Always takes at least one item, even one
        # larger than the batch limit.
        items: list[_Item] = []
        size = 0
        queue = self._queue
        while queue and (size == 0 or size + len(queue[0].records) <= room):
            item = queue.popleft()
            items.append(item)
            size += len(item.records)
        return items, size

    def _commit(self, conn: _Connection, items: list[_Item]) -> None:
        rows = [_row(record) for item in items for record in item.records]
        started = time.perf_counter()
        error: str | None = None
        try:
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
        except Exception as exc:
            error = f"audit log unavailable: {type(exc).__name__}: {exc}"
            self._failed_commits += 1
            _log_failure(self.path, len(rows), exc)
        else:
            elapsed = time.perf_counter() - started
            self._commits += 1
            self._recorded += len(rows)
            if self._on_commit is not None:
                try:
                    self._on_commit(len(rows), elapsed)
                except Exception as exc:  # noqa: BLE001 - an observer must not fail committed records
                    _log.error("audit_commit_observer_failed", error=f"{type(exc).__name__}: {exc}")
        self._answer(items, error)

    @staticmethod
    def _answer(items: list[_Item], error: str | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for item in items:
            waiter = item.waiter
            if isinstance(waiter, _CallbackWaiter):
                try:
                    waiter.on_done(None if error is None else CANotReady(error))
                except Exception as exc:  # noqa: BLE001 - one waiter's bug must not strand the others
                    with contextlib.suppress(Exception):   # nor kill the writer, if logging fails too
                        _log.error("audit_waiter_failed", error=f"{type(exc).__name__}: {exc}")
            else:
                by_loop.setdefault(waiter.get_loop(), []).append(waiter)
        # One wake-up per event loop per batch, not one per record.
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_futures, futures, error)
            except RuntimeError:
                pass   # that loop is closed: nobody is waiting any more

    # -- lifecycle and counters --------------------------------------------

    def close(self) -> None:
        """Commit everything queued, then stop the writer. Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> SqliteAuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def commits(self) -> int:
        """Transactions committed so far (group commit: far fewer than records)."""
        return self._commits

    @property
    def failed_commits(self) -> int:
        return self._failed_commits

    @property
    def recorded(self) -> int:
        """Records committed by this instance."""
        return self._recorded

    @property
    def pending(self) -> int:
        """Records queued and not yet taken by the writer."""
        return self._pending

    # -- reading -------------------------------------------------------------

    def _read(self) -> AuditReader:
        with self._reader_lock:
            if self._reader is None:
                self._reader = AuditReader(self.path)
            return self._reader

    def list(self, limit: int = 50, identity: str | None = None, since: dt.datetime | None = None,
             until: dt.datetime | None = None) -> list[IssuanceRecord]:
        return self._read().list(limit=limit, identity=identity, since=since, until=until)

    def get(self, serial: str | int) -> IssuanceRecord | None:
        return self._read().get(serial)

    def count(self) -> int:
        return self._read().count()


def _log_failure(path: Path, records: int, exc: BaseException) -> None:
    _log.error("audit_commit_failed", path=str(path), records=records, error=f"{type(exc).__name__}: {exc}")

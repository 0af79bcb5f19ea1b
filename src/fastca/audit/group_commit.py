"""What every audit backend shares: the queue, the writer thread, group
commit and the answers.

Callers queue records and wait; they never touch the database. One writer
thread per log takes whatever is queued (up to ``max_batch`` records) into
one transaction, so a burst of concurrent requests costs one commit. Under
load (the previous commit carried more than one record) it also waits up to
``max_delay_s`` for batch-mates; a lone request pays no delay. A record is
reported committed only after its transaction's COMMIT returned.

Failures, as the caller sees them:
    queue full (``queue_limit`` records waiting)   Overloaded  -> RESOURCE_EXHAUSTED
    the transaction failed                         CANotReady  -> UNAVAILABLE
    the log is closed                              CANotReady
A failed transaction is rolled back: none of its records is reported as
recorded, and the next batch tries again.

A backend (``SqliteAuditLog``, ``PostgresAuditLog``) supplies the parts that
speak to its database: ``_open`` (connect and migrate), ``_row`` (a record as
the backend's parameters), ``_write`` (one transaction), ``_lost`` (whether a
failure broke the connection) and ``_new_reader``. When ``_lost`` says so, the
connection is dropped and the batch is tried once more on a new one, unless
that connection was itself new (then the batch fails, and the next batch
connects again): a database that restarts is survived without restarting
fastca. Retrying is safe even when the lost connection may have committed
(a COMMIT whose answer never came), because a backend that retries has
serials UNIQUE: a retried batch that was in fact committed fails, it is not
recorded twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Callable, Generic, Iterable, Protocol, TypeVar

from fastca.audit.record import IssuanceRecord
from fastca.errors import CANotReady, ConfigurationError, Overloaded
from fastca.observability.logging import get_logger

_log = get_logger("fastca.audit")

__all__ = ["GroupCommitLog", "AuditReading"]

Conn = TypeVar("Conn")


class AuditReading(Protocol):
    """What the log's reading methods delegate to (a backend's reader)."""

    def list(self, limit: int = 50, identity: str | None = None, since: dt.datetime | None = None,
             until: dt.datetime | None = None) -> list[IssuanceRecord]: ...
    def get(self, serial: str | int) -> IssuanceRecord | None: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


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


class GroupCommitLog(ABC, Generic[Conn]):
    """The audit log the server writes. See the module docstring.

    ``on_commit(records, seconds)`` is called on the writer thread after each
    successful commit (for ``Metrics.observe_audit_commit``). A subclass sets
    ``where`` (what its messages name: a path, a URL without secrets) before
    calling ``__init__``, which opens the database on the writer thread and
    raises ConfigurationError or CANotReady if it cannot.
    """

    where: str

    def __init__(self, *, max_batch: int = 512, max_delay_s: float = 0.002, queue_limit: int = 65536,
                 on_commit: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1 or queue_limit < 1 or max_delay_s < 0:
            raise ConfigurationError("audit log: max_batch and queue_limit must be >= 1, max_delay_s >= 0")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.queue_limit = queue_limit
        self._on_commit = on_commit
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Item] = deque()
        self._pending = 0           # records queued, not yet taken by the writer
        self._closing = False
        self._commits = 0
        self._failed_commits = 0
        self._recorded = 0
        self._reconnects = 0
        self._reader: AuditReading | None = None
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
            if isinstance(error, (ConfigurationError, CANotReady)):
                raise error
            raise CANotReady(f"audit log unavailable: cannot open {self.where}: {error}") from None

    # -- what a backend supplies -------------------------------------------

    @abstractmethod
    def _open(self) -> Conn:
        """A connection whose schema is current (connect, then migrate)."""
        ...

    @abstractmethod
    def _row(self, record: IssuanceRecord) -> Any:
        """``record`` as the backend's insert takes it (runs on the writer thread, per record)."""
        ...

    @abstractmethod
    def _write(self, conn: Conn, rows: list[Any]) -> None:
        """One transaction holding ``rows``; returns only after its COMMIT,
        raises (having rolled back) otherwise."""
        ...

    def _lost(self, conn: Conn, error: BaseException) -> bool:
        """Whether ``error`` left ``conn`` unusable (drop it, connect again)."""
        return False

    def _close_connection(self, conn: Conn) -> None:
        conn.close()   # type: ignore[attr-defined]

    @abstractmethod
    def _new_reader(self) -> AuditReading:
        ...

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
            conn: Conn | None = self._open()
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
                conn = self._commit(conn, items)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    self._close_connection(conn)

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

    def _commit(self, conn: Conn | None, items: list[_Item]) -> Conn | None:
        """Write ``items`` in one transaction and answer them; the connection
        the next batch should use (None: connect again)."""
        rows = [self._row(record) for item in items for record in item.records]
        started = time.perf_counter()
        error: str | None = None
        fresh = conn is None
        while True:
            try:
                if conn is None:
                    self._reconnects += 1
                    conn = self._open()
                self._write(conn, rows)
            except Exception as exc:
                if conn is not None and self._lost(conn, exc):
                    with contextlib.suppress(Exception):
                        self._close_connection(conn)
                    conn = None
                    if not fresh:          # an old connection the database dropped: once more, on a new one
                        fresh = True
                        continue
                error = f"audit log unavailable: {type(exc).__name__}: {exc}"
                self._failed_commits += 1
                _log.error("audit_commit_failed", path=self.where, records=len(rows),
                           error=f"{type(exc).__name__}: {exc}")
            break
        if error is None:
            elapsed = time.perf_counter() - started
            self._commits += 1
            self._recorded += len(rows)
            if self._on_commit is not None:
                try:
                    self._on_commit(len(rows), elapsed)
                except Exception as exc:  # noqa: BLE001 - an observer must not fail committed records
                    _log.error("audit_commit_observer_failed", error=f"{type(exc).__name__}: {exc}")
        self._answer(items, error)
        return conn

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

    def __enter__(self):  # noqa: ANN204 - the subclass's own type
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
    def reconnects(self) -> int:
        """New connections the writer opened after losing one."""
        return self._reconnects

    @property
    def recorded(self) -> int:
        """Records committed by this instance."""
        return self._recorded

    @property
    def pending(self) -> int:
        """Records queued and not yet taken by the writer."""
        return self._pending

    # -- reading -------------------------------------------------------------

    def _read(self) -> AuditReading:
        with self._reader_lock:
            if self._reader is None:
                self._reader = self._new_reader()
            return self._reader

    def list(self, limit: int = 50, identity: str | None = None, since: dt.datetime | None = None,
             until: dt.datetime | None = None) -> list[IssuanceRecord]:
        return self._read().list(limit=limit, identity=identity, since=since, until=until)

    def get(self, serial: str | int) -> IssuanceRecord | None:
        return self._read().get(serial)

    def count(self) -> int:
        return self._read().count()

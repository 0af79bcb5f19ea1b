"""The audit log: group commit, durability, failures, back-pressure, reads."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastca.audit import (
    AuditConfig,
    AuditReader,
    IssuanceRecord,
    SqliteAuditLog,
    open_audit_log,
)
from fastca.audit.sqlite_log import SCHEMA_VERSION, _connect_writer
from fastca.errors import CANotReady, ConfigurationError
from tests.audit._factory import T0, make_record
from tests.audit._shared import (check_close_flushes_queued_records, check_group_commit,
                                 check_monitor_columns_tail_and_flags,
                                 check_queue_full_is_overloaded, check_round_trip)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


def test_round_trip_and_reads(db: Path) -> None:
    with SqliteAuditLog(db) as log:
        check_round_trip(log)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"issuance_serial", "issuance_identity", "issuance_issued_at"} <= indexes


def test_monitor_columns_tail_and_flags(db: Path) -> None:
    from fastca.audit.sqlite_log import AuditReader

    with SqliteAuditLog(db) as log:
        log.count()
        reader = AuditReader(db, writable=True)
        try:
            check_monitor_columns_tail_and_flags(log, reader)
        finally:
            reader.close()
    read_only = AuditReader(db)
    with pytest.raises(CANotReady):
        read_only.flag(read_only.list(limit=1)[0].serial, "csr_replay")
    read_only.close()


def test_a_version_1_log_is_migrated_and_keeps_its_records(db: Path) -> None:
    from fastca.audit.sqlite_log import _SCHEMA, AuditReader  # the version 1 schema, as first shipped

    with sqlite3.connect(db) as conn:
        conn.executescript(_SCHEMA)
        conn.execute("INSERT INTO issuance (serial, identity, caller_identities, credential_type, key_type, "
                     "not_before, not_after, signer, fingerprint_sha256, peer, request_id, issued_at, impersonated, "
                     "cluster_id) VALUES ('4a3f', 'spiffe://td/ns/a/sa/b', '[]', 'k8s-jwt', 'ec-p256', "
                     "'2025-01-01T00:00:00.000000+00:00', '2025-01-02T00:00:00.000000+00:00', 'default', 'ab', "
                     "'ipv4:1.2.3.4:5', 'r1', '2025-01-01T00:00:00.000000+00:00', 0, '')")
        conn.execute("PRAGMA user_version = 1")
    old = AuditReader(db)                        # a reader of the old file sees the new fields empty
    assert old.get("4a3f").flags == () and old.get("4a3f").spki_sha256 == "" and old.get("4a3f").node == ""
    assert old.list(flagged=True) == [] and len(old.list()) == 1
    [(_, summary)] = old.summaries_after(0)      # and so does the issuance monitor
    assert (summary.serial, summary.caller, summary.node, summary.spki_sha256, summary.ttl_seconds) == \
        ("4a3f", "", "", "", 86_400)
    old.close()
    with SqliteAuditLog(db) as log:
        assert log.count() == 1
        assert log.get("4a3f").identity == "spiffe://td/ns/a/sa/b"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        columns = {row[1] for row in conn.execute("PRAGMA table_info(issuance)")}
    assert {"spki_sha256", "csr_sha256", "flags", "node"} <= columns


def test_record_normalises_and_validates() -> None:
    record = make_record(1, serial="00:4A:3F")
    assert record.serial == "4a3f"
    with pytest.raises(ValueError):
        make_record(1, serial="not-hex")
    with pytest.raises(ValueError):
        make_record(1, issued_at=dt.datetime(2025, 1, 1))   # naive
    aware = make_record(1, issued_at=dt.datetime(2025, 1, 1, 3, tzinfo=dt.timezone(dt.timedelta(hours=3))))
    assert aware.issued_at == T0 and aware.issued_at.tzinfo == dt.timezone.utc
    assert record.to_dict()["caller_identities"] == list(record.caller_identities)


def test_from_issued() -> None:
    from fastca.authority import IssuedCertificate

    issued = IssuedCertificate(der=b"", pem="", chain=(), serial=0x4A3F, not_before=T0,
                               not_after=T0 + dt.timedelta(hours=1), identity="spiffe://td/ns/a/sa/b",
                               key_type="rsa-2048", fingerprint_sha256="AB" * 32)
    record = IssuanceRecord.from_issued(issued, caller_identities=["spiffe://td/ns/a/sa/b"],
                                        credential_type="mtls", signer="default", peer="ipv4:1.2.3.4:5",
                                        request_id="r1", issued_at=T0 + dt.timedelta(minutes=1))
    assert record.serial == "4a3f" and record.key_type == "rsa-2048" and record.fingerprint_sha256 == "ab" * 32
    assert record.issued_at == T0 + dt.timedelta(minutes=1) and not record.impersonated


def test_concurrent_records_are_group_committed(db: Path) -> None:
    check_group_commit(lambda **kw: SqliteAuditLog(db, **kw))


def test_lone_record_pays_no_batch_delay(db: Path) -> None:
    async def main() -> float:
        with SqliteAuditLog(db, max_delay_s=0.5) as log:
            await log.record(make_record(0))
            start = time.perf_counter()
            await log.record(make_record(1))
            return time.perf_counter() - start

    assert asyncio.run(main()) < 0.4


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_no_lost_records_when_killed(db: Path, mode: str) -> None:
    """docs/reliability.md, case 27: a serial the writer reported as recorded survives SIGKILL."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.audit._writer", str(db), mode], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed: list[str] = []
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n", proc.stderr.read() if proc.stderr else ""
        while len(printed) < 600:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "writer exited"
            printed.append(line)
        proc.send_signal(signal.SIGKILL)
        printed.extend(proc.stdout.readlines())   # what was already in the pipe
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    serials = [line.strip() for line in printed if line.endswith("\n")]
    reader = AuditReader(db)
    try:
        missing = [s for s in serials if reader.get(s) is None]
        assert not missing, f"{len(missing)} of {len(serials)} acknowledged records lost"
        assert reader.count() >= len(serials)
    finally:
        reader.close()


class _FaultyConnection:
    """A real connection whose COMMIT fails while ``fail`` is set (disk full)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.fail = False

    def execute(self, sql: str, *args: object) -> object:
        if self.fail and sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, rows: object) -> object:
        return self._conn.executemany(sql, rows)

    def close(self) -> None:
        self._conn.close()


def test_commit_failure_reports_nothing_recorded(db: Path) -> None:
    faulty: list[_FaultyConnection] = []

    def connect(path: Path) -> _FaultyConnection:
        faulty.append(_FaultyConnection(_connect_writer(path)))
        return faulty[0]

    log = SqliteAuditLog(db, connect=connect)
    try:
        good = make_record(0)
        log.record_many_sync([good])
        faulty[0].fail = True
        doomed = [make_record(i) for i in range(1, 200)]

        async def main() -> list[object]:
            return await asyncio.gather(*(log.record(r) for r in doomed), return_exceptions=True)

        results = asyncio.run(main())
        assert all(isinstance(r, CANotReady) for r in results), results
        assert "audit log unavailable" in str(results[0]) and results[0].public_message == "CA is not ready"
        with pytest.raises(CANotReady):
            log.record_many_sync([make_record(500)])
        assert log.count() == 1 and all(log.get(r.serial) is None for r in doomed)
        assert log.failed_commits >= 1
        # The disk has room again: the log recovers.
        faulty[0].fail = False
        later = make_record(600)
        log.record_many_sync([later])
        assert log.get(later.serial) == later and log.count() == 2
    finally:
        log.close()


def test_real_disk_full_fails_closed(db: Path) -> None:
    """SQLite's own SQLITE_FULL (max_page_count stands in for a full disk)."""
    SqliteAuditLog(db).close()
    with sqlite3.connect(db) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]

    def connect(path: Path) -> sqlite3.Connection:
        conn = _connect_writer(path)
        conn.execute(f"PRAGMA max_page_count = {pages + 3}")
        return conn

    acknowledged: list[IssuanceRecord] = []
    with SqliteAuditLog(db, connect=connect) as log:
        with pytest.raises(CANotReady, match="full"):
            for i in range(10_000):
                batch = [make_record(i * 10 + k) for k in range(10)]
                log.record_many_sync(batch)
                acknowledged.extend(batch)
        assert acknowledged and log.count() == len(acknowledged)
        assert all(log.get(r.serial) == r for r in acknowledged)


def test_queue_full_is_overloaded(db: Path) -> None:
    gate = threading.Event()
    SqliteAuditLog(db).close()        # schema in place: only record batches meet the gate

    class _Slow:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self._conn = conn

        def execute(self, sql: str, *args: object) -> object:
            if sql == "BEGIN IMMEDIATE":
                gate.wait(10)
            return self._conn.execute(sql, *args)

        def executemany(self, sql: str, rows: object) -> object:
            return self._conn.executemany(sql, rows)

        def close(self) -> None:
            self._conn.close()

    log = SqliteAuditLog(db, queue_limit=10, connect=lambda p: _Slow(_connect_writer(p)))
    try:
        check_queue_full_is_overloaded(log, gate.set)
    finally:
        gate.set()
        log.close()


def test_close_flushes_and_is_idempotent(db: Path) -> None:
    log = SqliteAuditLog(db, max_batch=7)
    done: list[BaseException | None] = []

    def writer(records: list[IssuanceRecord]) -> None:
        try:
            log.record_many_sync(records)
            done.append(None)
        except BaseException as exc:   # noqa: BLE001
            done.append(exc)

    threads = [threading.Thread(target=writer, args=([make_record(t * 100 + i) for i in range(5)],))
               for t in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    log.close()
    assert done == [None] * 20
    with pytest.raises(CANotReady):
        log.record_many_sync([make_record(0)])
    reader = AuditReader(db)
    assert reader.count() == 100
    reader.close()


def test_close_flushes_queued_async_records(db: Path) -> None:
    check_close_flushes_queued_records(lambda: SqliteAuditLog(db))


def test_cancelled_waiter_does_not_break_the_writer(db: Path) -> None:
    async def main() -> None:
        with SqliteAuditLog(db) as log:
            task = asyncio.ensure_future(log.record(make_record(0)))
            await asyncio.sleep(0)
            task.cancel()
            await log.record(make_record(1))
            await asyncio.sleep(0.01)
            assert log.count() == 2     # the cancelled one is recorded anyway: harmless

    asyncio.run(main())


def test_newer_schema_is_refused(db: Path) -> None:
    SqliteAuditLog(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigurationError, match="schema version"):
        SqliteAuditLog(db)
    with pytest.raises(ConfigurationError, match="schema version"):
        AuditReader(db)


def test_reader_never_creates_a_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no audit log"):
        AuditReader(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    with pytest.raises(ConfigurationError, match="not a fastca audit log"):
        AuditReader(other)


def test_unopenable_path_is_ca_not_ready(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(CANotReady, match="audit log unavailable"):
        SqliteAuditLog(tmp_path / "dir.db")


def test_config_and_open(tmp_path: Path) -> None:
    config = AuditConfig.model_validate({"path": "logs/audit.db", "max_batch": 64, "max_delay_ms": 1.5,
                                         "queue_limit": 1000})
    log = open_audit_log(config, tmp_path)
    try:
        assert log.path == tmp_path / "logs" / "audit.db"
        assert (log.max_batch, log.max_delay_s, log.queue_limit) == (64, 0.0015, 1000)
    finally:
        log.close()
    assert AuditConfig().path == "audit.db" and AuditConfig().backend == "sqlite"
    with pytest.raises(ValueError):
        AuditConfig.model_validate({"backend": "postgres"})
    with pytest.raises(ValueError):
        AuditConfig.model_validate({"max_batch": 0})
    with pytest.raises(ValueError):
        AuditConfig.model_validate({"unknown": 1})


def test_record_many_then_answers_on_the_writer_thread_and_survives_a_broken_callback(db: Path) -> None:
    answered: list[tuple[str, object, bool]] = []
    done = threading.Event()

    def broken(error: object) -> None:
        answered.append(("broken", error, threading.current_thread().name == "fastca-audit-writer"))
        raise RuntimeError("a bug in the waiter")

    def fine(error: object) -> None:
        answered.append(("fine", error, threading.current_thread().name == "fastca-audit-writer"))
        done.set()

    with SqliteAuditLog(db) as log:
        log.record_many_then([make_record(1), make_record(2)], broken)
        log.record_many_then([make_record(3)], fine)
        assert done.wait(10)
        log.record_many_sync([make_record(4)], timeout=10)     # the writer is still alive
        assert log.count() == 4
        called = []
        log.record_many_then([], called.append)                # nothing to record: answered at once
        assert called == [None]
    assert answered == [("broken", None, True), ("fine", None, True)]


def test_the_authoritys_direct_record_equals_the_checked_one() -> None:
    """IssuanceRecord.of fills a record directly (it runs per certificate);
    what it makes must be exactly what the normalising constructor makes."""
    from fastca.audit.record import IssuanceContext
    from fastca.authority import IssuedCertificate

    issued = IssuedCertificate(der=b"", pem="", chain=(), serial=0x4A3F00, not_before=T0,
                               not_after=T0 + dt.timedelta(hours=1), identity="spiffe://td/ns/a/sa/b",
                               key_type="ec-p256", fingerprint_sha256="ab" * 32)
    context = IssuanceContext(caller_identities=("spiffe://td/ns/a/sa/b",), credential_type="k8s-tokenreview",
                              signer="default", peer="ipv4:1.2.3.4:5", request_id="r9", impersonated=True,
                              cluster_id="Kubernetes")
    direct = IssuanceRecord.of(issued, context, T0)
    checked = IssuanceRecord.from_issued(issued, caller_identities=context.caller_identities,
                                         credential_type=context.credential_type, signer=context.signer,
                                         peer=context.peer, request_id=context.request_id, impersonated=True,
                                         cluster_id="Kubernetes", issued_at=T0)
    assert direct == checked and direct.to_dict() == checked.to_dict()

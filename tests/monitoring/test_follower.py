"""Following the audit log as the issuance monitor does: the peer address
made bare, a record made an Observation, and the cursor that returns every
record exactly once in id order, on SQLite and on a real PostgreSQL whose
transactions commit out of id order (a late commit is picked up, a
rolled-back id is given up after ``gap_seconds``, at most ``max_gaps`` are
remembered)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import psycopg
import pytest

from fastca.audit import AuditReader, IssuanceRecord, SqliteAuditLog
from fastca.audit.postgres_log import TABLE, PostgresAuditLog, PostgresAuditReader
from fastca.audit.queries import COLUMNS
from fastca.clock import ManualClock
from fastca.errors import CANotReady
from fastca.monitoring.follower import LogCursor, bare_peer_ip, monitored, observation_of
from tests.audit._factory import T0, make_record
from tests.audit.conftest import pg_database, postgres  # noqa: F401 - the real PostgreSQL fixtures
from tests.audit.postgres import TestDatabase

# What PostgresAuditLog._write sends: one COPY per batch, in the writer's column order.
_COPY = f"COPY {TABLE} ({', '.join(COLUMNS)}) FROM STDIN"


# -- bare_peer_ip ------------------------------------------------------------


@pytest.mark.parametrize(("peer", "bare"), [
    ("ipv4:10.1.2.3:5000", "10.1.2.3"),
    ("ipv4:127.0.0.1:443", "127.0.0.1"),
    ("ipv6:[fd00::1]:5000", "fd00::1"),
    ("ipv6:[::ffff:10.0.0.1]:443", "::ffff:10.0.0.1"),
    ("ipv6:%5B::1%5D:443", "::1"),                    # gRPC percent-encodes the brackets
    ("ipv6:%5bfd00:1::2%5d:8443", "fd00:1::2"),
    ("unix:/run/fastca/agent.sock", ""),
    ("unix-abstract:fastca", ""),
    ("local", ""),
    ("", ""),
])
def test_bare_peer_ip(peer: str, bare: str) -> None:
    assert bare_peer_ip(peer) == bare


# -- observation_of / monitored: through each backend's Summaries ----------------


@pytest.fixture(params=["sqlite", "postgresql"])
def any_log(request, tmp_path: Path):
    """(writer, reader) of a real audit log of each backend."""
    if request.param == "sqlite":
        path = tmp_path / "audit.db"
        log, reader = SqliteAuditLog(path), AuditReader(path)
    else:
        database = request.getfixturevalue("pg_database")
        log = PostgresAuditLog(database.url, password_file=database.password_file)
        reader = PostgresAuditReader(database.url, password_file=database.password_file)
    try:
        yield log, reader
    finally:
        reader.close()
        log.close()


def _observed(any_log, record: IssuanceRecord):
    log, reader = any_log
    before = reader.last_id()
    log.record_many_sync([record])
    [(_, summary)] = reader.summaries_after(before)
    return summary, observation_of(summary)


def test_observation_of_maps_every_field(any_log) -> None:
    record = dataclasses.replace(
        make_record(3), caller_identities=("spiffe://cluster.local/ns/istio-system/sa/ztunnel",
                                           "spiffe://cluster.local/ns/other/sa/second"),
        impersonated=True, peer="ipv6:[fd00:10::7]:41000",
        not_before=T0, not_after=T0 + dt.timedelta(hours=2, seconds=5),
        issued_at=T0 + dt.timedelta(seconds=12, microseconds=250_000))
    summary, obs = _observed(any_log, record)
    assert summary.credential_type == record.credential_type and monitored(summary)
    assert abs(obs.at - (T0.timestamp() + 12.25)) < 1e-3             # decoded by the database
    assert obs.identity == record.identity
    assert obs.caller == "spiffe://cluster.local/ns/istio-system/sa/ztunnel"      # the first one
    assert obs.impersonated is True
    assert obs.node == record.node == "node-0"
    assert obs.peer_ip == "fd00:10::7"
    assert obs.ttl_seconds == 7205 and type(obs.ttl_seconds) is int
    assert isinstance(obs.spki_sha256, bytes) and obs.spki_sha256 == bytes.fromhex(record.spki_sha256)
    assert isinstance(obs.csr_sha256, bytes) and obs.csr_sha256 == bytes.fromhex(record.csr_sha256)
    assert len(obs.spki_sha256) == len(obs.csr_sha256) == 32
    assert obs.serial == record.serial


def test_observation_of_a_plain_factory_record(any_log) -> None:
    record = make_record(4)
    _, obs = _observed(any_log, record)
    assert obs.caller == record.caller_identities[0] == obs.identity
    assert obs.impersonated is False
    assert obs.peer_ip == "10.0.0.4"
    assert obs.ttl_seconds == 86_400
    assert abs(obs.at - record.issued_at.timestamp()) < 1e-3


def test_a_record_without_hashes_or_caller(any_log) -> None:
    record = dataclasses.replace(make_record(5), spki_sha256="", csr_sha256="", caller_identities=(),
                                 peer="local", node="")
    _, obs = _observed(any_log, record)
    assert obs.spki_sha256 == b"" and obs.csr_sha256 == b""
    assert obs.caller == "" and obs.peer_ip == "" and obs.node == ""


def test_the_servers_own_certificate_is_not_monitored() -> None:
    assert monitored(make_record(1)) is True
    assert monitored(dataclasses.replace(make_record(1), credential_type="mtls")) is True
    assert monitored(dataclasses.replace(make_record(1), credential_type="self")) is False


# -- LogCursor on SQLite -------------------------------------------------------


@pytest.fixture
def sqlite_log(tmp_path: Path):
    path = tmp_path / "audit.db"
    log = SqliteAuditLog(path)
    reader = AuditReader(path)
    try:
        yield log, reader
    finally:
        reader.close()
        log.close()


def _clock() -> ManualClock:
    return ManualClock(T0 + dt.timedelta(days=1))


def test_cursor_returns_every_record_once_in_id_order(sqlite_log) -> None:
    log, reader = sqlite_log
    first = [make_record(i) for i in range(7)]
    log.record_many_sync(first[:4])
    log.record_many_sync(first[4:])
    cursor = LogCursor(reader, 0, clock=_clock().now)
    batches = []
    while rows := cursor.read(limit=3):
        batches.append(rows)
    assert [len(rows) for rows in batches] == [3, 3, 1]
    seen = [row for rows in batches for row in rows]
    ids = [key for key, _ in seen]
    assert [record for _, record in seen] == first
    assert ids == sorted(set(ids)) and cursor.last_id == ids[-1] == reader.last_id()
    assert cursor.open_gaps == 0
    assert cursor.read(limit=3) == []

    later = [make_record(i) for i in range(7, 9)]
    log.record_many_sync(later)
    assert [record for _, record in cursor.read(limit=3)] == later
    assert cursor.read() == [] and cursor.open_gaps == 0

    # A cursor from an id sees only what follows it.
    tail = LogCursor(reader, ids[4], clock=_clock().now)
    assert [record for _, record in tail.read()] == first[5:] + later


def test_cursor_stops_at_until_id_and_keeps_the_rest(sqlite_log) -> None:
    log, reader = sqlite_log
    records = [make_record(i) for i in range(6)]
    log.record_many_sync(records)
    ids = [key for key, _ in reader.after(0)]
    cursor = LogCursor(reader, 0, clock=_clock().now)
    assert cursor.read(until_id=ids[2]) == list(zip(ids[:3], records[:3]))
    assert cursor.last_id == ids[2]
    assert cursor.read(limit=2, until_id=ids[2]) == []
    assert cursor.read(limit=2) == list(zip(ids[3:5], records[3:5]))
    assert cursor.read() == [(ids[5], records[5])]
    assert cursor.open_gaps == 0


# -- LogCursor on a real PostgreSQL: commits out of id order ---------------------


def _connect(db: TestDatabase) -> psycopg.Connection:
    password = db.password_file.read_text().strip()
    return psycopg.connect(db.url, password=password, autocommit=False)


def _insert(conn: psycopg.Connection, *records: IssuanceRecord) -> list[int]:
    """Insert as the writer does (COPY, in its transaction, not committed);
    the ids the rows took, as that transaction sees them."""
    with conn.cursor() as cursor, cursor.copy(_COPY) as copy:
        for record in records:
            copy.write_row(PostgresAuditLog._row(record))
    rows = conn.execute(f"SELECT id FROM {TABLE} WHERE serial = ANY(%s) ORDER BY id",
                        ([r.serial for r in records],)).fetchall()
    return [int(row[0]) for row in rows]


@pytest.fixture
def pg_log(pg_database: TestDatabase):  # noqa: F811 - the imported fixture
    log = PostgresAuditLog(pg_database.url, password_file=pg_database.password_file)    # creates the schema
    reader = PostgresAuditReader(pg_database.url, password_file=pg_database.password_file)
    first, second = _connect(pg_database), _connect(pg_database)
    try:
        yield log, reader, first, second
    finally:
        first.close()
        second.close()
        reader.close()
        log.close()


def test_postgres_late_commit_is_read_and_a_rolled_back_id_is_given_up(pg_log) -> None:
    log, reader, first, second = pg_log
    log.record_many_sync([make_record(i) for i in range(2)])
    clock = ManualClock(T0)
    cursor = LogCursor(reader, reader.last_id(), clock=clock.now, gap_seconds=30.0)
    assert cursor.read() == []

    late, on_time = make_record(10), make_record(11)
    (late_id,) = _insert(first, late)                 # takes id n, not committed
    (on_time_id,) = _insert(second, on_time)          # takes id n + 1 ...
    second.commit()                                   # ... and commits first
    assert on_time_id == late_id + 1
    assert cursor.read() == [(on_time_id, on_time)]
    assert cursor.open_gaps == 1
    clock.advance(5)
    assert cursor.read() == [] and cursor.open_gaps == 1        # still open: looked up again, not there yet

    first.commit()
    after_that = make_record(12)
    (after_id,) = _insert(second, after_that)
    second.commit()
    assert cursor.read() == [(late_id, late), (after_id, after_that)]      # the late one, once
    assert cursor.open_gaps == 0
    assert cursor.read() == []

    # A rolled-back insert leaves an id that never appears: given up after gap_seconds.
    lost, kept = make_record(13), make_record(14)
    (lost_id,) = _insert(first, lost)
    first.rollback()
    (kept_id,) = _insert(second, kept)
    second.commit()
    assert kept_id == lost_id + 1
    assert cursor.read() == [(kept_id, kept)]
    assert cursor.open_gaps == 1
    clock.advance(30.0)
    assert cursor.read() == [] and cursor.open_gaps == 1        # exactly gap_seconds: still waited for
    clock.advance(0.5)
    assert cursor.read() == [] and cursor.open_gaps == 0        # past it: given up
    assert reader.get(lost.serial) is None

    # The cursor goes on as before.
    more = make_record(15)
    log.record_many_sync([more])
    assert [record for _, record in cursor.read()] == [more]
    assert cursor.open_gaps == 0
    assert reader.count() == 7


def test_postgres_at_most_max_gaps_are_remembered_the_oldest_given_up(pg_log) -> None:
    log, reader, first, second = pg_log
    clock = ManualClock(T0)
    cursor = LogCursor(reader, reader.last_id(), clock=clock.now, gap_seconds=30.0, max_gaps=3)
    late = [make_record(i) for i in range(20, 25)]
    late_ids = _insert(first, *late)                    # five ids in one open transaction
    on_time = make_record(25)
    (on_time_id,) = _insert(second, on_time)
    second.commit()
    assert late_ids == list(range(on_time_id - 5, on_time_id))
    assert cursor.read() == [(on_time_id, on_time)]
    assert cursor.open_gaps == 3                        # the newest three of the five
    first.commit()
    assert cursor.read() == list(zip(late_ids[2:], late[2:]))
    assert cursor.open_gaps == 0
    assert cursor.read() == []


class _FailingAfter:
    """The real reader whose next ``after`` fails (the database went away
    between the cursor's two queries)."""

    def __init__(self, reader) -> None:
        self._reader = reader
        self.fail_next = False

    def with_ids(self, ids):
        return self._reader.with_ids(ids)

    def after(self, last_id: int, limit: int = 2000):
        if self.fail_next:
            self.fail_next = False
            raise CANotReady("audit log unavailable (injected)")
        return self._reader.after(last_id, limit)


def test_postgres_a_failed_read_loses_no_late_record(pg_log) -> None:
    log, reader, first, second = pg_log
    source = _FailingAfter(reader)
    cursor = LogCursor(source, reader.last_id(), clock=ManualClock(T0).now)
    late, on_time = make_record(20), make_record(21)
    (late_id,) = _insert(first, late)
    (on_time_id,) = _insert(second, on_time)
    second.commit()
    assert cursor.read() == [(on_time_id, on_time)] and cursor.open_gaps == 1
    first.commit()
    source.fail_next = True
    with pytest.raises(CANotReady):
        cursor.read()
    assert cursor.open_gaps == 1                     # still remembered...
    assert cursor.read() == [(late_id, late)]        # ...and read once the database answers
    assert cursor.open_gaps == 0

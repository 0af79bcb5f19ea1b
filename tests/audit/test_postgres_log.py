"""The audit log in a real PostgreSQL: group commit, the UNIQUE serial,
surviving a database restart, migrations under a lock, and secrets."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fastca.audit import AuditConfig, open_audit_log, open_audit_reader
from fastca.audit.postgres_log import SCHEMA_VERSION, PostgresAuditLog, PostgresAuditReader
from fastca.config import CAConfig
from fastca.errors import CANotReady, ConfigurationError
from tests.audit._factory import make_record
from tests.audit._shared import (check_close_flushes_queued_records, check_group_commit,
                                 check_monitor_columns_tail_and_flags,
                                 check_queue_full_is_overloaded, check_round_trip)
from tests.audit.postgres import ROLE, PostgresServer, TestDatabase


def _log(db: TestDatabase, **kwargs) -> PostgresAuditLog:
    return PostgresAuditLog(db.url, password_file=db.password_file, **kwargs)


def test_round_trip_types_and_indexes(postgres: PostgresServer, pg_database: TestDatabase) -> None:
    with _log(pg_database) as log:
        check_round_trip(log)
        assert log.migrations_applied == SCHEMA_VERSION
    types = dict(postgres.query(pg_database.name, "SELECT column_name, data_type FROM information_schema.columns "
                                                  "WHERE table_name = 'fastca_issuance'"))
    assert types["issued_at"] == types["not_before"] == types["not_after"] == "timestamp with time zone"
    assert types["caller_identities"] == "ARRAY" and types["impersonated"] == "boolean"
    indexes = {row[0] for row in postgres.query(pg_database.name,
                                                "SELECT indexname FROM pg_indexes WHERE tablename = 'fastca_issuance'")}
    assert {"fastca_issuance_serial_key", "fastca_issuance_identity", "fastca_issuance_issued_at"} <= indexes
    unique = postgres.query(pg_database.name, "SELECT contype FROM pg_constraint "
                                              "WHERE conname = 'fastca_issuance_serial_key'")
    assert unique == [("u",)]
    assert postgres.query(pg_database.name, "SELECT version FROM fastca_schema_version ORDER BY version") == \
        [(v,) for v in range(1, SCHEMA_VERSION + 1)]


def test_monitor_columns_tail_and_flags(pg_database: TestDatabase) -> None:
    with _log(pg_database) as log:
        log.count()      # opens (and migrates) before the reader looks
        reader = PostgresAuditReader(pg_database.url, password_file=pg_database.password_file)
        try:
            check_monitor_columns_tail_and_flags(log, reader)
        finally:
            reader.close()


def test_a_version_1_database_is_migrated_and_keeps_its_records(postgres: PostgresServer,
                                                                 pg_database: TestDatabase) -> None:
    from fastca.audit.postgres_log import _MIGRATIONS, VERSION_TABLE

    statements = [*_MIGRATIONS[1], f"CREATE TABLE {VERSION_TABLE} (version integer PRIMARY KEY, "
                                   "applied_at timestamptz NOT NULL DEFAULT now())",
                  f"INSERT INTO {VERSION_TABLE} (version) VALUES (1)",
                  "INSERT INTO fastca_issuance (serial, identity, caller_identities, credential_type, key_type, "
                  "not_before, not_after, signer, fingerprint_sha256, peer, request_id, issued_at, impersonated, "
                  "cluster_id) VALUES ('4a3f', 'spiffe://td/ns/a/sa/b', '{}', 'k8s-jwt', 'ec-p256', now(), now(), "
                  "'default', 'ab', 'ipv4:1.2.3.4:5', 'r1', now(), false, '')",
                  # Made as the server's role would have made them (the admin runs the statements here).
                  f"ALTER TABLE fastca_issuance OWNER TO {ROLE}", f"ALTER TABLE {VERSION_TABLE} OWNER TO {ROLE}"]
    with postgres.admin(pg_database.name) as conn:
        for statement in statements:
            conn.execute(statement)
    old_reader = PostgresAuditReader(pg_database.url, password_file=pg_database.password_file)
    try:
        assert old_reader.get("4a3f").flags == () and old_reader.get("4a3f").spki_sha256 == ""
        assert old_reader.get("4a3f").node == ""
        assert old_reader.list(flagged=True) == [] and len(old_reader.list()) == 1
        [(_, summary)] = old_reader.summaries_after(0)      # and so does the issuance monitor
        assert (summary.serial, summary.caller, summary.node, summary.spki_sha256) == ("4a3f", "", "", "")
    finally:
        old_reader.close()
    with _log(pg_database) as log:
        assert log.count() == 1 and log.migrations_applied == SCHEMA_VERSION - 1
        assert log.get("4a3f").identity == "spiffe://td/ns/a/sa/b" and log.get("4a3f").csr_sha256 == ""


def test_concurrent_records_are_group_committed(pg_database: TestDatabase) -> None:
    check_group_commit(lambda **kw: _log(pg_database, **kw))


def test_duplicate_serial_fails_only_its_batch(pg_database: TestDatabase) -> None:
    with _log(pg_database) as log:
        first = [make_record(i) for i in range(5)]
        log.record_many_sync(first)
        clash = [make_record(10), make_record(11, serial=first[2].serial), make_record(12)]
        with pytest.raises(CANotReady, match="UniqueViolation"):
            log.record_many_sync(clash)
        within = [make_record(20, serial="abc"), make_record(21, serial="ABC")]     # one batch, one serial twice
        with pytest.raises(CANotReady):
            log.record_many_sync(within)
        after = [make_record(30), make_record(31)]
        log.record_many_sync(after)
        assert log.count() == 7
        assert log.get(clash[0].serial) is None and log.get(clash[2].serial) is None and log.get("abc") is None
        assert log.get(first[2].serial) == first[2] and log.get(after[1].serial) == after[1]
        assert log.failed_commits == 2


def test_database_restart_is_survived_by_the_same_log(postgres: PostgresServer,
                                                       pg_database: TestDatabase) -> None:
    with _log(pg_database, connect_timeout=2) as log:
        log.record_many_sync([make_record(0)])
        postgres.stop()
        try:
            for i in range(3):       # each batch fails on its own, none is reported recorded
                with pytest.raises(CANotReady, match="audit log unavailable"):
                    log.record_many_sync([make_record(100 + i)], timeout=30)
        finally:
            postgres.start()
        later = [make_record(200 + i) for i in range(10)]
        log.record_many_sync(later, timeout=30)
        assert log.count() == 11 and all(log.get(r.serial) == r for r in later)
        assert log.reconnects >= 1


def test_a_connection_the_database_drops_is_replaced_without_failing_the_batch(
        postgres: PostgresServer, pg_database: TestDatabase) -> None:
    with _log(pg_database) as log:
        log.record_many_sync([make_record(0)])
        with postgres.admin() as admin:       # what a failover or an idle-connection reaper does
            killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = %s AND application_name = 'fastca'",
                                   (pg_database.name,)).fetchone()[0]
        assert killed >= 1
        log.record_many_sync([make_record(1)], timeout=30)
        assert log.count() == 2 and log.failed_commits == 0 and log.reconnects == 1


def test_concurrent_first_opens_migrate_exactly_once(postgres: PostgresServer,
                                                     pg_database: TestDatabase) -> None:
    barrier = threading.Barrier(8)
    logs: list[PostgresAuditLog] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            logs.append(_log(pg_database))
        except BaseException as exc:   # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == [] and len(logs) == 8
        assert sorted(log.migrations_applied for log in logs) == [0] * 7 + [SCHEMA_VERSION]   # one opener migrated
        for i, log in enumerate(logs):
            log.record_many_sync([make_record(i)])
        assert logs[0].count() == 8
    finally:
        for log in logs:
            log.close()
    assert postgres.query(pg_database.name, "SELECT version FROM fastca_schema_version ORDER BY version") == \
        [(v,) for v in range(1, SCHEMA_VERSION + 1)]


def test_newer_schema_is_refused(postgres: PostgresServer, pg_database: TestDatabase) -> None:
    _log(pg_database).close()
    postgres.query(pg_database.name, "INSERT INTO fastca_schema_version (version) VALUES (%s) RETURNING version",
                   SCHEMA_VERSION + 1)
    with pytest.raises(ConfigurationError, match="schema version"):
        _log(pg_database)
    with pytest.raises(ConfigurationError, match="schema version"):
        PostgresAuditReader(pg_database.url, password_file=pg_database.password_file)


def test_reader_never_creates_the_tables(postgres: PostgresServer, pg_database: TestDatabase) -> None:
    with pytest.raises(ConfigurationError, match="no fastca audit log"):
        PostgresAuditReader(pg_database.url, password_file=pg_database.password_file)
    assert postgres.query(pg_database.name, "SELECT to_regclass('fastca_issuance')") == [(None,)]


SECRET = "Sup3r-s3cret-pw"


@pytest.mark.parametrize("url", [
    f"postgresql://fastca:{SECRET}@db.example:5432/fastca",
    f"postgres://fastca:{SECRET}@db.example/fastca?sslmode=require",
    f"postgresql://fastca@db.example/fastca?password={SECRET}",
    f"postgresql://fastca:{SECRET}%zz@db.example/fastca",        # malformed too: still never echoed
])
def test_password_in_the_url_is_refused_without_echo(url: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError) as caught:
        CAConfig.from_mapping({"audit": {"database": url}}, source="fastca.toml")
    message = str(caught.value)
    assert SECRET not in message and "password" in message and "password_file" in message
    with pytest.raises(ConfigurationError) as caught:
        PostgresAuditLog(url)
    assert SECRET not in str(caught.value) and "password" in str(caught.value)
    monkeypatch.setenv("FASTCA_AUDIT__DATABASE", url)
    with pytest.raises(ConfigurationError) as caught:
        CAConfig.from_mapping({}, source="fastca.toml")
    assert SECRET not in str(caught.value) and "audit.database" in str(caught.value)
    with pytest.raises(ValueError) as raised:         # the model itself hides the input too
        AuditConfig(database=url)
    assert SECRET not in str(raised.value)


def test_config_selects_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = AuditConfig(database="postgresql://fastca@db.example/fastca", password_file="pw")
    assert config.backend == "postgresql" and AuditConfig().backend == "sqlite"
    with pytest.raises(ValueError):
        AuditConfig(backend="postgresql")
    with pytest.raises(ValueError):
        AuditConfig(backend="sqlite", database="postgresql://fastca@db.example/fastca")
    with pytest.raises(ValueError):
        AuditConfig(password_file="pw")
    with pytest.raises(ValueError, match="postgresql:// URL"):
        AuditConfig(database="mysql://x@y/z")
    monkeypatch.setenv("FASTCA_AUDIT__DATABASE", "postgresql://fastca@db.example/fastca")
    loaded = CAConfig.from_mapping({"audit": {"password_file": "pw", "max_batch": 64}}).audit
    assert (loaded.backend, loaded.database, loaded.password_file, loaded.max_batch) == \
        ("postgresql", "postgresql://fastca@db.example/fastca", "pw", 64)


def test_password_file_is_required_to_be_private(pg_database: TestDatabase, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-passfile"))
    leaky = tmp_path / "leaky"
    leaky.write_bytes(pg_database.password_file.read_bytes())
    leaky.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600") as caught:
        PostgresAuditLog(pg_database.url, password_file=leaky)
    assert pg_database.password_file.read_text().strip() not in str(caught.value)
    with pytest.raises(CANotReady, match="password"):     # scram-sha-256 and nothing to answer it with
        PostgresAuditLog(pg_database.url)
    # Relative to the state directory, through the configuration.
    (tmp_path / "pw").write_bytes(pg_database.password_file.read_bytes())
    (tmp_path / "pw").chmod(0o600)
    config = AuditConfig(database=pg_database.url, password_file="pw")
    with open_audit_log(config, tmp_path) as log:
        log.record_many_sync([make_record(1)])
    reader = open_audit_reader(config, tmp_path)
    try:
        assert reader.count() == 1
    finally:
        reader.close()


def test_libpq_passfile_works(postgres: PostgresServer, pg_database: TestDatabase, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{postgres.port}:{pg_database.name}:fastca:{postgres.role_password}\n")
    passfile.chmod(0o600)
    with PostgresAuditLog(f"{pg_database.url}?passfile={passfile}") as log:
        log.record_many_sync([make_record(1)])
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    with PostgresAuditLog(pg_database.url) as log:
        log.record_many_sync([make_record(2)])
        assert log.count() == 2


def test_queue_full_is_overloaded(postgres: PostgresServer, pg_database: TestDatabase) -> None:
    log = _log(pg_database, queue_limit=10)
    admin = postgres.admin(pg_database.name)
    try:
        admin.execute("BEGIN")
        admin.execute("LOCK TABLE fastca_issuance IN ACCESS EXCLUSIVE MODE")   # the writer's COPY waits
        check_queue_full_is_overloaded(log, lambda: admin.execute("ROLLBACK"))
    finally:
        admin.close()
        log.close()


def test_close_flushes_queued_records(pg_database: TestDatabase) -> None:
    check_close_flushes_queued_records(lambda: _log(pg_database))


def test_unreachable_database_at_startup_is_ca_not_ready(pg_database: TestDatabase) -> None:
    with socket_closed_port() as port:
        url = pg_database.url.replace(pg_database.url.split("@")[1].split("/")[0], f"127.0.0.1:{port}")
        started = time.monotonic()
        with pytest.raises(CANotReady, match=r"cannot connect to postgresql://fastca@127\.0\.0\.1"):
            PostgresAuditLog(url, password_file=pg_database.password_file, connect_timeout=2)
        assert time.monotonic() - started < 10


class socket_closed_port:
    """A loopback port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))        # bound, never listening: connections are refused
        return self._sock.getsockname()[1]

    def __exit__(self, *exc_info: object) -> None:
        self._sock.close()


"""The issuance monitor beside a server: a thread following a real SQLite
audit log. The recent log is replayed at start (scored, never reported);
what is recorded later is reported by the reporting process (the alert
counter, one "issuance alert" log line, the flag on the certificate's audit
record) and only scored by the others; refusals are reported by the process
that refused; an audit log that cannot be opened or read is retried every
poll without ending the thread."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from fastca.audit import AuditReader, IssuanceRecord, SqliteAuditLog
from fastca.clock import ManualClock
from fastca.errors import CANotReady
from fastca.monitoring import SIGNALS, Alert, IssuanceMonitor, MonitoringConfig, caller_subject
from fastca.monitoring.service import MonitoringService, observe_rows, replay_recent
from fastca.observability.metrics import Metrics
from tests.audit._factory import T0, make_record

TD = "spiffe://cluster.local"
ALICE = f"{TD}/ns/shop/sa/alice"
BOB = f"{TD}/ns/shop/sa/bob"
DAVE = f"{TD}/ns/shop/sa/dave"
ERIN = f"{TD}/ns/shop/sa/erin"
ZTUNNEL = f"{TD}/ns/istio-system/sa/ztunnel"
NOW = T0 + dt.timedelta(hours=1)          # the services' clock: the records below are minutes old
WAIT = 5.0


def config(**overrides: Any) -> MonitoringConfig:
    return MonitoringConfig(**{"enabled": True, "learning_seconds": 0, "poll_seconds": 0.05, **overrides})


def record(i: int, identity: str, *, spki: str | None = None, **changes: Any) -> IssuanceRecord:
    """A workload's own certificate (it is its own caller)."""
    base = dataclasses.replace(make_record(i, identity=identity), caller_identities=(identity,))
    if spki is not None:
        changes["spki_sha256"] = spki
    return dataclasses.replace(base, **changes)


def eventually(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


def counted(metrics: Metrics) -> dict[str, float]:
    """fastca_monitoring_alerts_total by signal, from the Prometheus text."""
    text = metrics.render().decode()
    return {sample.labels["signal"]: sample.value
            for family in text_string_to_metric_families(text) if family.name == "fastca_monitoring_alerts"
            for sample in family.samples if sample.name == "fastca_monitoring_alerts_total"}


def new_metrics(service: MonitoringService) -> Metrics:
    """As the server wires it: every signal's counter present from 0."""
    metrics = service._metrics
    monitor = service.monitor
    metrics.track_monitoring(top=lambda: 0.0, high_risk=monitor.high_risk_count,
                             tracked=lambda: monitor.tracked_identities, signals=SIGNALS)
    return metrics


def events(captured: list[dict], name: str) -> list[dict]:
    return [event for event in captured if event.get("event") == name]


@pytest.fixture
def audit(tmp_path: Path):
    path = tmp_path / "audit.db"
    log = SqliteAuditLog(path)
    reader = AuditReader(path)                 # the test's own look at the records
    try:
        yield path, log, reader
    finally:
        reader.close()
        log.close()


@pytest.fixture
def services():
    """Services to stop at the end, whatever happened."""
    started: list[MonitoringService] = []
    yield started
    for service in started:
        service.stop()


def start(services: list, path: Path, *, reports: bool, open_reader: Callable[[], Any] | None = None,
          cfg: MonitoringConfig | None = None) -> tuple[MonitoringService, Metrics, list[Alert]]:
    alerts: list[Alert] = []
    service = MonitoringService(cfg or config(), open_reader or (lambda: AuditReader(path, writable=True)),
                                clock=ManualClock(NOW), reports=reports, metrics=Metrics(),
                                on_alert=alerts.append)
    metrics = new_metrics(service)
    services.append(service)
    service.start()
    return service, metrics, alerts


# -- observe_rows / replay_recent ------------------------------------------------


def test_observe_rows_skips_the_servers_own_certificates(audit) -> None:
    _path, log, reader = audit
    monitor = IssuanceMonitor(config(weights={"new_identity": 0}), clock=ManualClock(NOW))
    alice = record(1, ALICE)
    own = record(2, f"{TD}/ns/fastca/sa/server", spki=alice.spki_sha256, credential_type="self")
    bob = record(3, BOB, spki=alice.spki_sha256)
    log.record_many_sync([alice, own, bob])
    raised = observe_rows(monitor, reader.summaries_after(0))
    assert [(a.signal, a.identity, a.serial) for a in raised] == [("key_reuse", BOB, bob.serial)]
    assert monitor.tracked_identities == 2
    assert monitor.score(own.identity) == 0.0


def test_replay_recent_reads_only_the_recent_past_and_ends_at_the_end(audit) -> None:
    path, log, reader = audit
    old = record(0, ALICE, issued_at=NOW - dt.timedelta(days=2))
    recent = [record(1, BOB, issued_at=NOW - dt.timedelta(minutes=5), spki=old.spki_sha256),
              record(2, DAVE, issued_at=NOW - dt.timedelta(minutes=1))]
    log.record_many_sync([old, *recent])
    monitor = IssuanceMonitor(config(), clock=ManualClock(NOW))
    cursor, replayed = replay_recent(monitor, reader, config(replay_seconds=86_400), ManualClock(NOW).now)
    assert replayed == 2
    assert cursor.last_id == reader.last_id() and cursor.read() == []
    assert monitor.tracked_identities == 2
    assert monitor.alerts_by_signal["key_reuse"] == 0            # alice's key was never seen: too old
    # replay_seconds = 0: nothing read, the cursor at the end.
    cursor, replayed = replay_recent(IssuanceMonitor(config()), reader, config(replay_seconds=0),
                                     ManualClock(NOW).now)
    assert replayed == 0 and cursor.last_id == reader.last_id()


# -- MonitoringService -----------------------------------------------------------


def test_replayed_history_is_scored_reported_only_if_unflagged_and_new_records_are_reported(audit, services) -> None:
    """At start the history is scored; what it raises was reported by whoever
    ran then (its flag is there) unless nobody did (no flag yet: reported now,
    once). Then every new alert is reported once, by the reporting process."""
    path, log, reader = audit
    alice = record(1, ALICE)
    bob = record(2, BOB, spki=alice.spki_sha256)           # a key reuse, in the history
    dave = record(3, DAVE)
    log.record_many_sync([alice, bob, dave])
    # A previous reporter flagged (so reported) all of it but dave's arrival.
    writable = AuditReader(path, writable=True)
    for serial, signal in ((alice.serial, "new_identity"), (bob.serial, "new_identity"), (bob.serial, "key_reuse")):
        assert writable.flag(serial, signal)
    writable.close()

    with structlog.testing.capture_logs() as captured:
        reporting, metrics, alerts = start(services, path, reports=True)
        assert reporting.replayed.wait(WAIT)
        reporting.poll_now()
        eventually(lambda: reporting.records_seen == 3, "the history replayed")
        assert reporting.score(BOB) > 0 and reporting.score(BOB) > reporting.score(DAVE) > 0
        assert [e["records"] for e in events(captured, "issuance monitor replayed the recent audit log")] == [3]
        # Only what nobody had reported is reported, late.
        assert [(a.signal, a.identity) for a in alerts] == [("new_identity", DAVE)]
        assert reader.get(dave.serial).flags == ("new_identity",)
        assert [e["signal"] for e in events(captured, "issuance alert")] == ["new_identity"]
        assert counted(metrics)["new_identity"] == 1.0 and sum(counted(metrics).values()) == 1.0
        assert set(counted(metrics)) == set(SIGNALS)

        # Dave, known already, now with alice's key: reported, once.
        reused = record(4, DAVE, spki=alice.spki_sha256)
        log.record_many_sync([reused])
        reporting.poll_now()
        eventually(lambda: len(alerts) == 2, "the key reuse reported")
        assert [(a.signal, a.identity, a.serial) for a in alerts[1:]] == [("key_reuse", DAVE, reused.serial)]
        assert counted(metrics)["key_reuse"] == 1.0
        assert sum(counted(metrics).values()) == 2.0
        assert reader.get(reused.serial).flags == ("key_reuse",)
        assert {r.serial for r in reader.list(flagged=True)} == {alice.serial, bob.serial, dave.serial, reused.serial}
        line = events(captured, "issuance alert")[-1]
        assert line["log_level"] == "warning"
        assert (line["signal"], line["subject"], line["serial"], line["caller"]) == \
            ("key_reuse", DAVE, reused.serial, DAVE)
        # The subject's score just after the alert, at the certificate's time.
        at = reused.issued_at.timestamp()
        assert line["score"] == round(alerts[1].score, 1) == round(reporting.monitor.score(DAVE, at), 1) > 40
        assert reporting.records_seen == 4

        # A refusal, never in the log, is reported by the process that refused it.
        reporting.refused_impersonation(ZTUNNEL, ERIN, "10.0.0.9", "node-1")
        reporting.poll_now()
        eventually(lambda: len(alerts) == 3, "the refusal reported")
        assert (alerts[2].signal, alerts[2].identity, alerts[2].caller, alerts[2].serial) == \
            ("node_impersonation", ERIN, ZTUNNEL, "")
        assert counted(metrics)["node_impersonation"] == 1.0
        assert reporting.score(ERIN) == 50.0 == reporting.score(caller_subject(ZTUNNEL, "node-1"))
        assert len(reader.list(flagged=True)) == 4                                 # no serial: no flag

        # Another process, not reporting, derives the same scores from the log alone.
        quiet, quiet_metrics, quiet_alerts = start(services, path, reports=False)
        assert quiet.replayed.wait(WAIT)
        eventually(lambda: quiet.records_seen == 4, "the other process replayed the log")
        for identity in (ALICE, BOB, DAVE):
            assert quiet.score(identity) == pytest.approx(reporting.score(identity))
        assert quiet.score(DAVE) > 0
        assert quiet.score(ERIN) == 0.0                   # the refusal was the other process's

        # A second reporting process over the same log (a replica) raises the
        # same alerts and reports none of them: their flags are there.
        twin, twin_metrics, twin_alerts = start(services, path, reports=True)
        assert twin.replayed.wait(WAIT)
        eventually(lambda: twin.records_seen == 4, "the twin replayed the log")
        assert twin.monitor.alerts_by_signal["key_reuse"] == 2 and twin_alerts == []
        assert set(counted(twin_metrics).values()) == {0.0}
        twin.stop()

        # The reporting one stops (its thread joined); the quiet one sees the next
        # key reuse, scores it, and reports nothing.
        reporting.stop()
        assert not reporting._thread.is_alive()
        again = record(5, ERIN, spki=alice.spki_sha256)
        log.record_many_sync([again])
        quiet.poll_now()
        eventually(lambda: quiet.records_seen == 5, "the quiet process read the new record")
        assert quiet.score(ERIN) > 0
        assert quiet.monitor.alerts_by_signal["key_reuse"] >= 2      # raised (history and now), not reported
        assert quiet_alerts == []
        assert set(counted(quiet_metrics).values()) == {0.0}
        assert reader.get(again.serial).flags == ()
        assert len(reader.list(flagged=True)) == 4
        assert len(events(captured, "issuance alert")) == 3            # the reporting process's three
        quiet.stop()
        assert not quiet._thread.is_alive()
    assert events(captured, "issuance monitor step failed") == []


def test_authentication_failures_from_one_peer_are_reported_once(audit, services) -> None:
    path, _log, _reader = audit
    service, metrics, alerts = start(services, path, reports=True)
    assert service.replayed.wait(WAIT)
    service.authentication_failed("")                      # no address: nothing to count
    for _ in range(25):                                    # threshold 20
        service.authentication_failed("10.9.9.9")
    service.refused_impersonation(ZTUNNEL, ERIN, "10.0.0.9", "node-2")      # after them in the queue
    service.poll_now()
    eventually(lambda: any(a.signal == "node_impersonation" for a in alerts), "the queue drained")
    assert [a.signal for a in alerts] == ["auth_failures", "node_impersonation"]
    assert "10.9.9.9" in alerts[0].detail and alerts[0].identity == ""
    assert counted(metrics)["auth_failures"] == 1.0


class FlakyOpener:
    """The real reader opener, failing as a database that is away does while ``down``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.down = True
        self.calls = 0
        self.failures = 0

    def __call__(self) -> AuditReader:
        self.calls += 1
        if self.down:
            self.failures += 1
            raise CANotReady("audit log unavailable: the database is away (injected)")
        return AuditReader(self.path, writable=True)


def test_an_audit_log_that_cannot_be_opened_is_retried_every_poll(audit, services) -> None:
    path, log, reader = audit
    alice = record(1, ALICE)
    log.record_many_sync([alice])
    opener = FlakyOpener(path)
    with structlog.testing.capture_logs() as captured:
        service, metrics, alerts = start(services, path, reports=True, open_reader=opener)
        eventually(lambda: opener.failures >= 4, "polled again while the log is away")
        assert service._thread.is_alive()
        assert not service.replayed.is_set() and service.records_seen == 0
        (lost,) = events(captured, "issuance monitor cannot read the audit log; retrying")   # once per outage
        assert lost["log_level"] == "error" and "injected" in lost["reason"]

        opener.down = False
        assert service.replayed.wait(WAIT)
        eventually(lambda: service.records_seen == 1, "the log replayed once it opened")
        assert len(events(captured, "issuance monitor reading the audit log again")) == 1

        reused = record(2, BOB, spki=alice.spki_sha256)
        log.record_many_sync([reused])
        service.poll_now()
        eventually(lambda: any(a.signal == "key_reuse" for a in alerts), "the key reuse reported")
        assert reader.get(reused.serial).flags == ("new_identity", "key_reuse")
        assert counted(metrics)["key_reuse"] == 1.0
        calls = opener.calls
        service.stop()
        assert not service._thread.is_alive()
        assert opener.calls == calls                      # opened once it could, never again
    assert events(captured, "issuance monitor step failed") == []


class FlakyReader:
    """The real reader whose follow-up reads fail while ``down``."""

    def __init__(self, reader: AuditReader) -> None:
        self._reader = reader
        self.down = False
        self.failed_reads = 0
        self.closed = threading.Event()

    def summaries_after(self, last_id: int, limit: int = 2000):
        if self.down:
            self.failed_reads += 1
            raise CANotReady("audit log unavailable: disk I/O error (injected)")
        return self._reader.summaries_after(last_id, limit)

    def close(self) -> None:
        self.closed.set()
        self._reader.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


def test_a_log_that_fails_to_read_is_read_again_without_losing_records(audit, services) -> None:
    path, log, reader = audit
    readers: list[FlakyReader] = []

    def open_reader() -> FlakyReader:
        readers.append(FlakyReader(AuditReader(path, writable=True)))
        return readers[-1]

    with structlog.testing.capture_logs() as captured:
        service, metrics, alerts = start(services, path, reports=True, open_reader=open_reader)
        assert service.replayed.wait(WAIT)
        (flaky,) = readers
        alice = record(1, ALICE)
        log.record_many_sync([alice])
        service.poll_now()
        eventually(lambda: service.records_seen == 1, "the first record read")

        flaky.down = True
        written = [record(2, BOB, spki=alice.spki_sha256), record(3, DAVE)]
        log.record_many_sync(written)
        eventually(lambda: flaky.failed_reads >= 3, "read again at every poll")
        assert service.records_seen == 1 and service._thread.is_alive()
        assert len(events(captured, "issuance monitor cannot read the audit log; retrying")) == 1

        flaky.down = False
        service.poll_now()
        eventually(lambda: service.records_seen == 3, "the records written during the outage read")
        assert readers == [flaky]                         # the same reader and cursor: nothing read twice
        assert [(a.signal, a.identity) for a in alerts] == \
            [("new_identity", ALICE), ("new_identity", BOB), ("key_reuse", BOB), ("new_identity", DAVE)]
        assert reader.get(written[0].serial).flags == ("new_identity", "key_reuse")
        assert counted(metrics)["new_identity"] == 3.0 and counted(metrics)["key_reuse"] == 1.0
        assert len(events(captured, "issuance monitor reading the audit log again")) == 1

        # A second outage is reported too (the first one's end was noticed).
        flaky.down = True
        service.poll_now()
        eventually(lambda: len(events(captured, "issuance monitor cannot read the audit log; retrying")) == 2,
                   "the second outage logged")
        flaky.down = False
        service.poll_now()
        eventually(lambda: len(events(captured, "issuance monitor reading the audit log again")) == 2,
                   "the second recovery logged")
        service.stop()
        assert flaky.closed.is_set()
    assert events(captured, "issuance monitor step failed") == []


def test_refusals_are_reported_while_the_audit_log_is_away(audit, services) -> None:
    path, _log, _reader = audit
    opener = FlakyOpener(path)
    service, metrics, alerts = start(services, path, reports=True, open_reader=opener)
    service.refused_impersonation(ZTUNNEL, ALICE, "10.0.0.9", "node-1")
    service.poll_now()
    eventually(lambda: [a.signal for a in alerts] == ["node_impersonation"], "the refusal reported")
    assert opener.down and not service.replayed.is_set()
    assert counted(metrics)["node_impersonation"] == 1.0


def test_a_record_the_monitor_cannot_read_is_skipped_alone(audit) -> None:
    """A hash column that is not hex (a hand-edited row): that record is
    logged and skipped, the rest of its batch is observed."""
    _path, log, reader = audit
    alice = record(1, ALICE)
    broken = dataclasses.replace(record(2, BOB), csr_sha256="not hex")
    log.record_many_sync([alice, broken, record(3, DAVE, spki=alice.spki_sha256)])
    monitor = IssuanceMonitor(config(), clock=ManualClock(NOW))
    with structlog.testing.capture_logs() as captured:
        raised = observe_rows(monitor, reader.summaries_after(0))
    assert [(a.signal, a.identity) for a in raised] == \
        [("new_identity", ALICE), ("new_identity", DAVE), ("key_reuse", DAVE)]
    (skipped,) = events(captured, "audit record not observed")
    assert skipped["serial"] == broken.serial

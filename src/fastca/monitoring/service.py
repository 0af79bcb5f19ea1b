"""The issuance monitor running beside a server: one thread follows the
audit log into an ``IssuanceMonitor`` and reports what it raises.

Every server process runs one, so each has every identity's score at hand
for policy (a read without a lock) without asking anyone: the scores are
derived from the log, which all workers, and all replicas on a shared
PostgreSQL log, write to. One process per server reports (``reports``):
the flag on the audit record that raised the alert, and, if that flag was
not there yet, the alert counter and one structured log line. The flag is
added once whoever tries (fastca.audit.queries.flag), so an alert is
reported once however many replicas raise it, and one raised while no
reporter was running (a restart) is reported when the next one catches up.
Refusals (an impersonation the node authorizer denied, failed
authentication) never reach the log; the process that refused reports them
itself.

At start the thread first replays the recent log (``replay_seconds``, at
most ``replay_max_records``), so a restarted process knows the mesh again
and policy sees the same scores in every worker; what it raises there is
reported only if nobody flagged it before.
"""

from __future__ import annotations

import collections
import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from fastca.audit.queries import RecordQueries
from fastca.clock import SYSTEM_CLOCK, Clock
from fastca.errors import FastcaError
from fastca.monitoring.config import MonitoringConfig
from fastca.monitoring.follower import LogCursor, Summaries, monitored, observation_of
from fastca.monitoring.tracker import Alert, IssuanceMonitor
from fastca.observability.logging import get_logger

__all__ = ["MonitoringService", "AlertSink"]

log = get_logger("fastca.monitoring")

# Records per read: each read's scoring holds the GIL for a few milliseconds at
# most before the thread lets the event loop in again (bench/RESULTS.md, #15).
_READ_LIMIT = 256
_MAX_PENDING_REFUSALS = 10_000


class AlertSink(Protocol):
    """Where reported alerts are counted (fastca.observability.metrics.Metrics)."""

    def monitoring_alert(self, signal: str) -> None: ...


class MonitoringService:
    """``open_reader()`` opens a writable audit reader (it may raise
    FastcaError while the database is away: retried every poll)."""

    def __init__(self, config: MonitoringConfig, open_reader: Callable[[], RecordQueries], *,
                 clock: Clock = SYSTEM_CLOCK, reports: bool = True, follows_log: bool = True,
                 metrics: AlertSink | None = None, on_alert: Callable[[Alert], None] | None = None) -> None:
        """``follows_log`` False: only this process's refusals are observed
        (and reported); the scores from the log are another process's."""
        self.config = config
        self.follows_log = follows_log
        self.monitor = IssuanceMonitor(config, clock=clock)
        self._open_reader = open_reader
        self._clock = clock
        self.reports = reports
        self._metrics = metrics
        self._on_alert = on_alert
        self._reader: RecordQueries | None = None
        self._cursor: LogCursor | None = None
        self._refusals: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=_MAX_PENDING_REFUSALS)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self.replayed = threading.Event()        # set once the start-up replay is done
        self.records_seen = 0

    # -- the request path (event loop): cheap, never blocks (risk policy reads ``monitor`` itself)

    def score(self, identity: str) -> float:
        return self.monitor.score(identity)

    def refused_impersonation(self, caller: str, identity: str, peer_ip: str, node: str) -> None:
        self._refusals.append(("node_impersonation", self._clock.now(), caller, identity, peer_ip, node))

    def authentication_failed(self, peer_ip: str) -> None:
        if peer_ip:
            self._refusals.append(("auth_failure", self._clock.now(), peer_ip))

    # -- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fastca-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._close_reader()

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        close = getattr(reader, "close", None)
        if close is not None:
            close()

    def poll_now(self) -> None:
        """Read the log now rather than at the next poll (tests, shutdown)."""
        self._wake.set()

    # -- the monitoring thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except FastcaError as error:
                self._lost(error)
            except Exception:       # a bug here must not end monitoring for the process's life
                log.exception("issuance monitor step failed")
            self._wake.wait(self.config.poll_seconds)
            self._wake.clear()

    def _step(self) -> None:
        # Refusals first: they never wait for the audit log.
        self._drain_refusals()
        if not self.follows_log:
            return
        if self._cursor is None:
            self._reader = self._open_reader()
            self._cursor = self._replay(self._reader)
            self.replayed.set()
        while True:
            rows = self._cursor.read(_READ_LIMIT)
            if self._down_since is not None:
                log.info("issuance monitor reading the audit log again")
                self._down_since = None
            self._observe(rows, report=self.reports)
            if len(rows) < _READ_LIMIT or self._stop.is_set():
                break
            time.sleep(0)       # the GIL to the event loop between reads

    def _replay(self, reader: RecordQueries) -> LogCursor:
        """A cursor at the end of the log, with the recent past already seen
        (reported when it happened, by whoever ran then: only scored now)."""
        cursor, replayed = replay_recent(self.monitor, reader, self.config, self._clock.now,
                                         stop=self._stop.is_set,
                                         on_alerts=self._report_all if self.reports else None)
        self.records_seen += replayed
        if replayed:
            log.info("issuance monitor replayed the recent audit log", records=replayed,
                     tracked_identities=self.monitor.tracked_identities)
        return cursor

    def _observe(self, rows: list[tuple[int, Any]], *, report: bool) -> None:
        for alert in observe_rows(self.monitor, rows):
            if report:
                self._report(alert)
        self.records_seen += len(rows)

    def _drain_refusals(self) -> None:
        monitor = self.monitor
        while self._refusals:
            item = self._refusals.popleft()
            if item[0] == "node_impersonation":
                _, at, caller, identity, peer_ip, node = item
                alerts = monitor.observe_refused(at, caller, identity, peer_ip, "node_impersonation", node=node)
            else:
                alerts = monitor.observe_auth_failure(item[1], item[2])
            for alert in alerts:
                self._report(alert)

    def _report_all(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            self._report(alert)

    def _report(self, alert: Alert) -> None:
        """Flag the record, then count and log the alert unless its flag was
        there already (another replica, or an earlier run, reported it)."""
        if alert.serial and self._reader is not None:
            try:
                if not self._reader.flag(alert.serial, alert.signal):
                    return
            except FastcaError as error:        # reported unflagged rather than not at all
                log.error("could not flag the audit record", serial=alert.serial, signal=alert.signal,
                          reason=str(error))
        if self._metrics is not None:
            self._metrics.monitoring_alert(alert.signal)
        log.warning("issuance alert", signal=alert.signal, subject=alert.identity, caller=alert.caller,
                    serial=alert.serial, score=round(alert.score, 1), detail=alert.detail)
        if self._on_alert is not None:
            self._on_alert(alert)

    def _lost(self, error: FastcaError) -> None:
        now = self._clock.now()
        if self._down_since is None:
            self._down_since = now
            log.error("issuance monitor cannot read the audit log; retrying", reason=str(error))
        if self._cursor is None:        # opened, but the replay failed: open afresh next time
            self._close_reader()


def observe_rows(monitor: IssuanceMonitor, rows: list[tuple[int, Any]]) -> list[Alert]:
    """Feed (id, record) rows to ``monitor``; the alerts they raised."""
    observe = monitor.observe_issued
    raised: list[Alert] = []
    for key, record in rows:
        if not monitored(record):
            continue
        try:
            observation = observation_of(record)
        except ValueError as error:     # a hash column that is not hex: that record alone is skipped
            log.error("audit record not observed", id=key, serial=record.serial, reason=str(error))
            continue
        alerts = observe(observation)
        if alerts:
            raised.extend(alerts)
    return raised


def replay_recent(monitor: IssuanceMonitor, reader: RecordQueries, config: MonitoringConfig,
                  clock: Callable[[], float], *, stop: Callable[[], bool] = lambda: False,
                  on_alerts: Callable[[list[Alert]], None] | None = None) -> tuple[LogCursor, int]:
    """Score the last ``replay_seconds`` of the log (at most
    ``replay_max_records``) into ``monitor``, handing what it raises to
    ``on_alerts``; (a cursor at the end of what was read, records read).
    What a server process does at start and what ``fastca risk`` shows."""
    end = reader.last_id()
    since = dt.datetime.fromtimestamp(clock() - config.replay_seconds, dt.timezone.utc)
    start = max(reader.id_before(since), end - config.replay_max_records) if config.replay_seconds else end
    cursor = LogCursor(Summaries(reader), start, clock=clock)
    replayed = 0
    while cursor.last_id < end and not stop():
        rows = cursor.read(_READ_LIMIT, until_id=end)
        if not rows:
            break
        alerts = observe_rows(monitor, rows)
        if alerts and on_alerts is not None:
            on_alerts(alerts)
        replayed += len(rows)
        time.sleep(0)
    return cursor, replayed

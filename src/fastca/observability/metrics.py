"""Prometheus metrics: fastca's own, and the names Istio users already chart.

Each ``Metrics`` owns its ``CollectorRegistry`` (never the global one), so
several instances and tests do not collide. Three groups of series:

* ``fastca_*``: requests, issuance latency, batch sizes, HSM signing time,
  queue depth, CA expiry, audit commit time, authentication failures.
* Istio's ``citadel_server_*`` exactly as istiod exports them: no ``_total``
  suffix. prometheus_client renames counters (``x`` -> ``x_total``), so these
  come from a custom collector as *untyped* series with the exact name:
  ``citadel_server_csr_count 3``. PromQL's ``rate()`` works on them as on
  any counter; the values only ever grow.
* go-grpc-prometheus's ``grpc_server_handled_total`` and
  ``grpc_server_handling_seconds`` (with its ``grpc_type="unary"`` label).

No series carries a secret or an identity: label values are method names,
status codes, signer names and short reason words. Unexpected label values
(anything not a short word) collapse to ``other`` to bound cardinality.
``_created`` series are left out.

Every recording method is thread-safe. The per-call ones (``csr_received``,
``issued``, ``observe_issuance``, ``request_finished``) are plain integer
updates, rendered only when /metrics is scraped: they run on the event loop
of a process's front end, and prometheus_client's locked counters and
histograms cost several times more on that one thread.
"""

from __future__ import annotations

import bisect
import datetime as dt
import re
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
                                    UnknownMetricFamily)
from prometheus_client.exposition import start_http_server as _start_http_server
from prometheus_client.registry import Collector

__all__ = ["Metrics", "SIGN_ERROR_KINDS", "ISSUANCE_BUCKETS"]

SIGN_ERROR_KINDS = ("CA_NOT_READY", "CSR_ERROR", "TTL_ERROR", "CERT_GEN_ERROR")

# 100 µs .. 1 s, roughly 1-2-5 per decade, plus a tail for overload.
ISSUANCE_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
                    2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
COMMIT_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5)

_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.\-/]{1,64}$")


def _label(value: str) -> str:
    return value if isinstance(value, str) and _LABEL_VALUE.match(value) else "other"


def _timestamp(value: dt.datetime) -> float:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


class _Tally:
    """A histogram (and its count) kept as plain integers: ``observe`` is a
    bisect and two additions. Updated under the GIL by one thread at a time
    (the event loop); read at scrape time, where a torn read of a sum
    against its buckets is harmless."""

    __slots__ = ("bounds", "buckets", "total", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.buckets):
            running += count
            out.append((bound, running))
        return out


class _CallCollector(Collector):
    """The per-call series, from Metrics' integers: fastca_requests_total,
    fastca_issuance_seconds, grpc_server_handled_total, grpc_server_handling_seconds."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        calls = list(m._calls.items())
        requests = CounterMetricFamily("fastca_requests", "RPCs handled, by method and gRPC status code.",
                                       labels=["method", "code"])
        handled = CounterMetricFamily("grpc_server_handled", "Total number of RPCs completed on the server, "
                                      "regardless of success or failure.",
                                      labels=["grpc_type", "grpc_service", "grpc_method", "grpc_code"])
        for (service, method, code), tally in calls:
            requests.add_metric([method, code], tally.count)
            handled.add_metric(["unary", service, method, code], tally.count)
        yield requests
        yield handled
        seconds = HistogramMetricFamily("grpc_server_handling_seconds", "Histogram of response latency "
                                        "(seconds) of gRPC that had been application-level handled by the server.",
                                        labels=["grpc_type", "grpc_service", "grpc_method"])
        merged: dict[tuple[str, str], _Tally] = {}
        for (service, method, _), tally in calls:
            into = merged.setdefault((service, method), _Tally(tally.bounds))
            into.buckets = [a + b for a, b in zip(into.buckets, tally.buckets)]
            into.total += tally.total
            into.count += tally.count
        for (service, method), tally in merged.items():
            seconds.add_metric(["unary", service, method], tally.cumulative(), tally.total)
        yield seconds
        issuance = HistogramMetricFamily("fastca_issuance_seconds",
                                         "Time from a CSR's arrival to its certificate (or error), seconds.")
        issuance.add_metric([], m._issuance.cumulative(), m._issuance.total)
        yield issuance


class _WithoutCreated(Collector):
    """Re-exposes a registry without prometheus_client's ``*_created`` series
    (go-grpc-prometheus and istiod have none)."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self._inner = inner

    def collect(self) -> Iterable[Metric]:
        for metric in self._inner.collect():
            suffix = metric.name + "_created"
            if any(sample.name == suffix for sample in metric.samples):
                metric.samples = [sample for sample in metric.samples if sample.name != suffix]
            yield metric


class _CitadelCollector(Collector):
    """Istio's citadel_server_* series under their exact names."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        with m._lock:
            csr, auth_failures, issued = m._csr_count, m._auth_failure_count, m._success_count
            sign_errors = dict(m._sign_err_count)
            root_expiry, chain_expiry = m._root_expiry, m._chain_expiry
        yield UnknownMetricFamily("citadel_server_csr_count", "The number of CSRs received by the CA server.",
                                  value=csr)
        yield UnknownMetricFamily("citadel_server_authentication_failure_count",
                                  "The number of authentication failures.", value=auth_failures)
        yield UnknownMetricFamily("citadel_server_success_cert_issuance_count",
                                  "The number of certificates issuance that have succeeded.", value=issued)
        family = UnknownMetricFamily("citadel_server_csr_sign_err_count",
                                     "The number of errors occurred when signing the CSR.", labels=["error"])
        for kind in SIGN_ERROR_KINDS:
            family.add_metric([kind], sign_errors[kind])
        yield family
        if root_expiry is not None:
            yield GaugeMetricFamily("citadel_server_root_cert_expiry_timestamp",
                                    "The unix timestamp, in seconds, when the root cert will expire.",
                                    value=root_expiry)
        if chain_expiry is not None:
            yield GaugeMetricFamily("citadel_server_cert_chain_expiry_timestamp",
                                    "The unix timestamp, in seconds, when the CA cert chain will expire.",
                                    value=chain_expiry)


class Metrics:
    """The server's metrics. ``default_signer`` names the signer whose CA
    expiry the citadel_* gauges report."""

    def __init__(self, default_signer: str = "default") -> None:
        self.default_signer = default_signer
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._call_index: dict[tuple[str, str, str], _Tally] = {}    # as the caller names them
        self._csr_count = 0
        self._auth_failure_count = 0
        self._success_count = 0
        self._sign_err_count = {kind: 0 for kind in SIGN_ERROR_KINDS}
        self._root_expiry: float | None = None
        self._chain_expiry: float | None = None
        self._server: object | None = None
        self._server_thread: threading.Thread | None = None

        inner = CollectorRegistry(auto_describe=False)
        self._calls: dict[tuple[str, str, str], _Tally] = {}
        self._issuance = _Tally(ISSUANCE_BUCKETS)
        self._batch = Histogram("fastca_batch_size", "Certificates signed per batch.", buckets=BATCH_BUCKETS,
                                registry=inner)
        self._hsm_sign = Histogram("fastca_hsm_sign_seconds", "Time to sign one batch in the HSM, seconds.",
                                   ["signer"], buckets=ISSUANCE_BUCKETS, registry=inner)
        self._queue_depth = Gauge("fastca_queue_depth", "Requests waiting for a batch.", registry=inner)
        self._ca_expiry = Gauge("fastca_ca_expiry_timestamp_seconds",
                                "Unix time at which a signer's root or certificate chain expires.",
                                ["signer", "kind"], registry=inner)
        self._audit_commit = Histogram("fastca_audit_commit_seconds",
                                       "Time to commit one audit transaction (group commit), seconds.",
                                       buckets=COMMIT_BUCKETS, registry=inner)
        self._signer_ready = Gauge("fastca_signer_ready",
                                   "1 while a signer's last health probe signed and verified, else 0 "
                                   "(its HSM is gone or being waited for).", ["signer"], registry=inner)
        self._rotation_phase = Gauge("fastca_ca_rotation_phase",
                                     "1 for the phase of the signer's CA rotation that this server is in "
                                     "(steady, awaiting-certificate, distributing, signing-with-new-key, "
                                     "old-root-retired), 0 for the others.", ["signer", "phase"], registry=inner)
        self._auth_failures = Counter("fastca_authentication_failures",
                                      "Requests whose credentials were rejected, by reason.", ["reason"],
                                      registry=inner)
        # Labelled by configured peer names only ([trust.peers] sources): bounded.
        self._peer_ok = Gauge("fastca_trust_peer_ok",
                              "1 if a peer's last sync fetched a bundle that passed validation, else 0.", ["peer"],
                              registry=inner)
        self._peer_in_bundle = Gauge("fastca_trust_peer_in_bundle",
                                     "1 while a peer's roots are in the trust bundle (its last good bundle, "
                                     "within the grace period), else 0.", ["peer"], registry=inner)
        self._peer_certificates = Gauge("fastca_trust_peer_certificates",
                                        "Certificates of a peer in the trust bundle.", ["peer"], registry=inner)
        self._peer_last_success = Gauge("fastca_trust_peer_last_success_timestamp_seconds",
                                        "Unix time of a peer's last good sync (0: never).", ["peer"], registry=inner)
        self._peer_refusals = Counter("fastca_trust_peer_refusals",
                                      "Peer syncs that kept the last good bundle, by reason (fetch, too_large, "
                                      "malformed, not_ca, expired, empty).", ["peer", "reason"], registry=inner)
        self._bundle_certificates = Gauge("fastca_trust_bundle_certificates",
                                          "Certificates in a signer's trust bundle (own roots and peers').",
                                          ["signer"], registry=inner)
        self._monitoring_alerts = Counter("fastca_monitoring_alerts",
                                          "Issuance-monitoring alerts raised, by signal (a fixed set of names).",
                                          ["signal"], registry=inner)
        self._monitoring_top = Gauge("fastca_monitoring_top_risk_score",
                                     "The highest risk score of any identity now (which one: `fastca risk`).",
                                     registry=inner)
        self._monitoring_high = Gauge("fastca_monitoring_high_risk_identities",
                                      "Identities (and node callers) at or above the alert threshold now.",
                                      registry=inner)
        self._monitoring_tracked = Gauge("fastca_monitoring_tracked_identities",
                                         "Identities the issuance monitor keeps history for (bounded by "
                                         "[monitoring] max_identities).", registry=inner)
        self.registry.register(_WithoutCreated(inner))
        self.registry.register(_CallCollector(self))
        self.registry.register(_CitadelCollector(self))

    # -- the Istio CA contract ---------------------------------------------

    def csr_received(self) -> None:
        self._csr_count += 1          # the event loop's own: see the module docstring

    def authentication_failed(self, reason: str) -> None:
        """``reason``: a short word such as "no_credential", "token_invalid"."""
        with self._lock:
            self._auth_failure_count += 1
        self._auth_failures.labels(_label(reason)).inc()

    def issued(self, count: int = 1) -> None:
        self._success_count += count

    def sign_error(self, kind: str) -> None:
        """``kind``: one of SIGN_ERROR_KINDS (Istio's ``error`` label values)."""
        if kind not in self._sign_err_count:
            raise ValueError(f"sign error kind must be one of {SIGN_ERROR_KINDS}, not {kind!r}")
        with self._lock:
            self._sign_err_count[kind] += 1

    # -- RPCs --------------------------------------------------------------

    def request_finished(self, service: str, method: str, code: str, seconds: float) -> None:
        """One finished RPC: ``service`` as in the gRPC path
        ("istio.v1.auth.IstioCertificateService"), ``method`` ("CreateCertificate"),
        ``code`` a grpc.StatusCode name ("OK", "UNAVAILABLE", ...)."""
        tally = self._call_index.get((service, method, code))
        if tally is None:
            tally = self._call_tally(service, method, code)
        tally.observe(seconds)

    def _call_tally(self, service: str, method: str, code: str) -> _Tally:
        # Series by cleaned label values (exported), found by the names as given.
        key = (_label(service), _label(method), _label(code))
        tally = self._calls.get(key)
        if tally is None:
            tally = self._calls[key] = _Tally(ISSUANCE_BUCKETS)
        if len(self._call_index) < 1024:    # bounded: codes and methods are few
            self._call_index[(service, method, code)] = tally
        return tally

    # -- the pipeline --------------------------------------------------------

    def observe_issuance(self, seconds: float) -> None:
        self._issuance.observe(seconds)

    def observe_batch(self, size: int) -> None:
        self._batch.observe(size)

    def observe_hsm_sign(self, signer: str, seconds: float) -> None:
        self._hsm_sign.labels(_label(signer)).observe(seconds)

    def set_queue_depth(self, n: int) -> None:
        self._queue_depth.set(n)

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        """Read the depth when scraped (a plain int read, safe from the HTTP thread)."""
        self._queue_depth.set_function(depth)

    def observe_audit_commit(self, seconds: float) -> None:
        self._audit_commit.observe(seconds)

    def audit_committed(self, records: int, seconds: float) -> None:
        """Shaped as SqliteAuditLog's ``on_commit`` callback."""
        self._audit_commit.observe(seconds)

    # -- issuance monitoring ---------------------------------------------------

    def monitoring_alert(self, signal: str) -> None:
        self._monitoring_alerts.labels(_label(signal)).inc()

    def track_monitoring(self, top: Callable[[], float], high_risk: Callable[[], int],
                         tracked: Callable[[], int], signals: Sequence[str]) -> None:
        """Read the monitor when scraped; every signal's counter starts at 0."""
        self._monitoring_top.set_function(top)
        self._monitoring_high.set_function(high_risk)
        self._monitoring_tracked.set_function(tracked)
        for signal in signals:
            self._monitoring_alerts.labels(_label(signal))

    # -- CA lifecycle --------------------------------------------------------

    def set_rotation_phase(self, signer: str, phase: str, phases: Sequence[str]) -> None:
        label = _label(signer)
        for name in phases:
            self._rotation_phase.labels(label, name).set(1 if name == phase else 0)

    def set_signer_ready(self, signer: str, ready: bool) -> None:
        self._signer_ready.labels(_label(signer)).set(1 if ready else 0)

    def trust_peer(self, peer: str, *, ok: bool, in_bundle: bool, certificates: int,
                   last_success: float | None) -> None:
        label = _label(peer)
        self._peer_ok.labels(label).set(1 if ok else 0)
        self._peer_in_bundle.labels(label).set(1 if in_bundle else 0)
        self._peer_certificates.labels(label).set(certificates)
        self._peer_last_success.labels(label).set(last_success or 0)

    def trust_peer_refused(self, peer: str, reason: str) -> None:
        self._peer_refusals.labels(_label(peer), reason).inc()

    def set_trust_bundle_size(self, signer: str, certificates: int) -> None:
        self._bundle_certificates.labels(_label(signer)).set(certificates)

    def set_ca_expiry(self, signer: str, root_not_after: dt.datetime, chain_not_after: dt.datetime) -> None:
        """``root_not_after``: the earliest expiry in the root bundle;
        ``chain_not_after``: the earliest in the signing cert + intermediates."""
        root, chain = _timestamp(root_not_after), _timestamp(chain_not_after)
        label = _label(signer)
        self._ca_expiry.labels(label, "root").set(root)
        self._ca_expiry.labels(label, "chain").set(chain)
        if signer == self.default_signer:
            with self._lock:
                self._root_expiry, self._chain_expiry = root, chain

    # -- exposition ----------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text format (what /metrics serves by default)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def start_http_server(self, host: str = "0.0.0.0", port: int = 15014) -> tuple[object, threading.Thread]:
        """Serve /metrics for this registry on a daemon thread. ``port=0``
        picks a free port: read it from ``server.server_address[1]``."""
        if self._server is not None:
            raise RuntimeError("the metrics server is already running")
        server, thread = _start_http_server(port, addr=host, registry=self.registry)
        self._server, self._server_thread = server, thread
        return server, thread

    def stop(self) -> None:
        """Stop the HTTP server (idempotent)."""
        server, thread = self._server, self._server_thread
        self._server = self._server_thread = None
        if server is not None:
            server.shutdown()        # type: ignore[attr-defined]
            server.server_close()    # type: ignore[attr-defined]
        if thread is not None:
            thread.join(timeout=5)

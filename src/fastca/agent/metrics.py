"""The agent's metrics: Istio's agent names exactly as istio-agent exports
them (no ``_total``; see docs/istio-contract.md), and ``fastca_agent_*``.

Same approach as the server's metrics: an own registry, Istio's names from a
custom collector as untyped series, label values limited to resource names
the agent serves (a handful), never identities or key material.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.exposition import start_http_server as _start_http_server
from prometheus_client.registry import Collector

__all__ = ["AgentMetrics"]


class _IstioAgentCollector(Collector):
    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        with m._lock:
            outgoing, failed = m._outgoing, m._failed
            expiries = dict(m._expiry)
        family = UnknownMetricFamily("istio_agent_num_outgoing_requests",
                                     "Number of total outgoing requests (e.g. to a token exchange server, CA, etc.)",
                                     labels=["request_type"])
        family.add_metric(["csr"], outgoing)
        yield family
        family = UnknownMetricFamily("istio_agent_num_failed_outgoing_requests",
                                     "Number of failed outgoing requests (e.g. to a token exchange server, CA, etc.)",
                                     labels=["request_type"])
        family.add_metric(["csr"], failed)
        yield family
        gauge = GaugeMetricFamily("istio_agent_cert_expiry_seconds",
                                  "The time remaining, in seconds, before the certificate chain will expire.",
                                  labels=["resource_name"])
        now = time.time()
        for name, not_after in expiries.items():
            gauge.add_metric([name], not_after - now)
        yield gauge


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._outgoing = 0
        self._failed = 0
        self._expiry: dict[str, float] = {}
        self._rotations = Counter("fastca_agent_rotations", "Certificates obtained (first issue and rotations).",
                                  ["resource_name"], registry=self.registry)
        self._rotation_failures = Counter("fastca_agent_rotation_failures",
                                          "Failed attempts to obtain or rotate a certificate.", ["resource_name"],
                                          registry=self.registry)
        self._pushes = Counter("fastca_agent_sds_pushes", "SDS responses sent to Envoy.", ["resource_name"],
                               registry=self.registry)
        self._nacks = Counter("fastca_agent_sds_nacks", "SDS responses Envoy rejected.", registry=self.registry)
        self._health = Gauge("fastca_agent_cert_healthy",
                             "1 when the certificate is valid, rotating on time and not near expiry; 0 is an alert.",
                             ["resource_name"], registry=self.registry)
        self.registry.register(_IstioAgentCollector(self))
        self._server = None
        self._pushed_seen: dict[str, int] = defaultdict(int)
        self._nacks_seen = 0

    def csr_sent(self) -> None:
        with self._lock:
            self._outgoing += 1

    def csr_failed(self, resource_name: str) -> None:
        with self._lock:
            self._failed += 1
        self._rotation_failures.labels(resource_name).inc()

    def certificate_obtained(self, resource_name: str, not_after: float) -> None:
        with self._lock:
            self._expiry[resource_name] = not_after
        self._rotations.labels(resource_name).inc()

    def sds_pushes(self, by_name: dict[str, int]) -> None:
        """Take the SDS server's cumulative push counts, counting only the increase."""
        for name, total in by_name.items():
            increase = total - self._pushed_seen[name]
            if increase > 0:
                self._pushes.labels(name).inc(increase)
                self._pushed_seen[name] = total

    def sds_nacks(self, total: int) -> None:
        """Take the SDS server's cumulative NACK count, counting only the increase."""
        if total > self._nacks_seen:
            self._nacks.inc(total - self._nacks_seen)
            self._nacks_seen = total

    def set_health(self, resource_name: str, healthy: bool) -> None:
        self._health.labels(resource_name).set(1 if healthy else 0)

    def forget_health(self, resource_name: str) -> None:
        """Stop exporting the health of a resource no longer served."""
        try:
            self._health.remove(resource_name)
        except KeyError:
            pass

    def start_http_server(self, host: str, port: int) -> int:
        server, _thread = _start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

"""`fastca agent`: wires the secret source (CA-backed manager, or a mounted
directory), the SDS server, metrics and the certificate-health check."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from cryptography import x509

from fastca.agent.caclient import CAClient
from fastca.agent.config import AgentConfig
from fastca.agent.files import MountedDirectory
from fastca.agent.manager import SecretManager
from fastca.agent.metrics import AgentMetrics
from fastca.agent.sds import SdsServer
from fastca.agent.secrets import WORKLOAD_CERT, SecretUnavailable
from fastca.errors import ConfigurationError
from fastca.observability.logging import get_logger

__all__ = ["Agent", "run_agent"]

log = get_logger("fastca.agent")
# Event kinds that mean "the CA did not give us a certificate".
_FAILURES = {"fetch_failed", "rotation_failed", "response_invalid"}


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self._client: CAClient | None = None
        self.source: SecretManager | MountedDirectory
        if config.mounted_dir is not None:
            self.source = MountedDirectory(config.mounted_dir, on_event=self._on_event,
                                           read_timeout=config.file_read_timeout_seconds)
        else:
            self._client = self._ca_client()
            self.source = SecretManager(
                self._client, spiffe_id=config.spiffe_id, key_type=config.key_type,
                ttl_seconds=int(config.ttl_seconds), rotation_ratio=config.rotation_ratio,
                jitter=config.rotation_jitter, backoff_max=config.backoff_max_seconds,
                output_dir=config.output_dir, on_event=self._on_event,
                file_read_timeout=config.file_read_timeout_seconds, root_poll_interval=config.root_poll_seconds)
        self.sds = SdsServer(self.source, socket_path=config.socket)
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics_port: int | None = None
        self._last_failure: dict[str, float] = {}
        self._health_reported: set[str] = set()     # resource names with a cert_healthy series

    def _ca_client(self) -> CAClient:
        config = self.config
        root_pem = None
        if not config.plaintext:
            if config.ca_root is None:
                raise ConfigurationError("the CA's root is needed for TLS: --ca-root FILE (or CA_ROOT_CA); "
                                         "an address ending in :15010 means plaintext")
            try:
                root_pem = config.ca_root.read_bytes()
            except OSError as exc:
                raise ConfigurationError(f"cannot read the CA root {config.ca_root}: {exc.strerror}") from None
        client_cert = (config.client_cert, config.client_key) if config.client_cert is not None else None
        return CAClient(config.ca_addr, root_pem=root_pem, token_file=config.token_file,
                        cluster_id=config.cluster_id, cert_signer=config.cert_signer, client_cert=client_cert,
                        server_name=config.ca_server_name, on_event=self._on_event)

    def _on_event(self, kind: str, name: str, **details: Any) -> None:
        if kind == "csr_sent":
            self.metrics.csr_sent()
        elif kind == "issued":
            self.metrics.certificate_obtained(name, float(details["not_after"]))
            self._last_failure.pop(name, None)
        elif kind == "file_loaded" and name == WORKLOAD_CERT:
            self._last_failure.pop(name, None)
        elif kind in _FAILURES or kind == "file_invalid":
            self.metrics.csr_failed(name)
            self._last_failure[name] = time.time()
        safe = {k: v for k, v in details.items() if isinstance(v, (str, int, float, bool)) or v is None}
        level = (log.warning if kind in _FAILURES or kind == "root_poll_failed" or kind.endswith(("invalid", "error"))
                 else log.info)
        level(kind.replace("_", " "), resource=name, **safe)

    async def start(self) -> None:
        await self.source.start()
        await self.sds.start()
        if self.config.metrics_listen:
            host, _, port = self.config.metrics_listen.rpartition(":")
            self.metrics_port = self.metrics.start_http_server(host.strip("[]"), int(port))
        self._tasks.append(asyncio.create_task(self._health_loop()))
        log.info("agent serving SDS", socket=str(self.config.socket), identity=self.config.spiffe_id,
                 ca=None if self.config.mounted_dir else self.config.ca_addr, metrics_port=self.metrics_port)

    async def check_health(self) -> dict[str, bool]:
        """The seed's certificate-health alert: a served certificate that is
        within the alert window of expiry, or whose last attempt to obtain or
        rotate it failed, is unhealthy (metric 0 + a warning). So is every
        file-backed resource being served whose last read failed, was
        refused or is stuck (it may still serve its last good content)."""
        self.metrics.sds_pushes(dict(self.sds.pushes))
        self.metrics.sds_nacks(self.sds.nacks)
        results: dict[str, bool] = {}
        for name in (WORKLOAD_CERT,):
            try:
                item = await self.source.get(name)
            except SecretUnavailable as exc:
                results[name] = False
                log.warning("certificate health alert", resource=name, reason=str(exc))
                continue
            not_after = x509.load_pem_x509_certificate(item.certificate_chain).not_valid_after_utc.timestamp()
            remaining = not_after - time.time()
            failing = name in self._last_failure
            healthy = remaining > self.config.expiry_alert_seconds and not failing
            if not healthy:
                log.warning("certificate health alert", resource=name, seconds_to_expiry=int(remaining),
                            rotation_failing=failing)
            results[name] = healthy
        for name, problem in self.source.file_health().items():
            if problem:
                log.warning("certificate health alert", resource=name, reason=problem)
            results[name] = results.get(name, True) and not problem
        for name, healthy in results.items():
            self.metrics.set_health(name, healthy)
        for name in self._health_reported - results.keys():
            self.metrics.forget_health(name)         # released: no longer served
        self._health_reported = set(results)
        return results

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval_seconds)
            try:
                await self.check_health()
            except Exception as exc:  # the check must never take the agent down
                log.error("certificate health check failed", reason=str(exc))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.sds.stop(1.0)
        await self.source.stop()
        if self._client is not None:
            await self._client.close()
        self.metrics.stop()
        log.info("agent stopped")

    async def run_until_signalled(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await self.stop()


def run_agent(config: AgentConfig) -> None:
    import uvloop

    uvloop.run(Agent(config).run_until_signalled())



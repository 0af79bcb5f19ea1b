"""`fastca serve`: the gRPC server Istio agents call, with health,
reflection, metrics and a graceful shutdown.

One process, one event loop (uvloop). What happens on SIGTERM, in order:
health goes NOT_SERVING, the listeners stop taking calls and in-flight calls
finish (up to the grace period), the batchers drain, the audit log flushes,
the signers close.
"""

from __future__ import annotations

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from fastca.audit.config import open_audit_log
from fastca.authn.config import build_authenticators, build_node_authorizer
from fastca.ca.material import LoadedCA, load_ca
from fastca.config import CAConfig, resolve_path
from fastca.errors import ConfigurationError, FastcaError
from fastca.frontend._proto import istio_ca_pb2, istio_ca_pb2_grpc
from fastca.frontend.istio_ca import SERVICE, IstioCertificateServicer, SignerRuntime
from fastca.frontend.serving_cert import ServingCertificate
from fastca.observability.logging import get_logger
from fastca.observability.metrics import Metrics
from fastca.pipeline.batcher import Batcher
from fastca.pipeline.issuer import IssueRequest, Issuer
from fastca.policy.request import RequestPolicy

__all__ = ["CAServer", "DEFAULT_SIGNER"]

DEFAULT_SIGNER = "default"
_HEALTH_PROBE_INTERVAL_S = 10.0
_RENEWAL_CHECK_INTERVAL_S = 60.0

log = get_logger("fastca.server")


def _grpc_options(config: CAConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.server.max_receive_message_bytes),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        # Agents ping every 30 s while a call is in flight; grpcio's default
        # answers pings closer than 5 min with GOAWAY too_many_pings.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


@dataclass
class _Signer:
    loaded: LoadedCA
    issuer: Issuer
    probe_csr: bytes


class CAServer:
    def __init__(self, state_dir: Path, config: CAConfig | None = None) -> None:
        self._state_dir = state_dir
        self._config = config or CAConfig.load(state_dir)
        self._server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._tasks: list[asyncio.Task[None]] = []
        self._signers: dict[str, _Signer] = {}
        self._runtimes: dict[str, SignerRuntime] = {}
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="issue")
        self.metrics = Metrics()
        self._audit = None
        self._node_authorizer = None
        self.ports: dict[str, int] = {}
        self.serving: ServingCertificate | None = None
        self._stopped = asyncio.Event()

    # -- start -------------------------------------------------------------------

    def _load_signers(self) -> None:
        config = self._config
        sources = {DEFAULT_SIGNER: self._state_dir}
        for name, named in config.signers.items():
            if name == DEFAULT_SIGNER:
                raise ConfigurationError(f"signer name {DEFAULT_SIGNER!r} is reserved for the state directory's CA")
            sources[name] = resolve_path(self._state_dir, named.state_dir)
        probe_key = ec.generate_private_key(ec.SECP256R1())
        probe_csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
                     .sign(probe_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
        for name, directory in sources.items():
            loaded = load_ca(directory)
            issuance = config.issuance if name == DEFAULT_SIGNER else loaded.config.issuance
            issuer = Issuer(loaded.material, loaded.signer, issuance,
                            sign_observer=lambda seconds, name=name: self.metrics.observe_hsm_sign(name, seconds))
            self._signers[name] = _Signer(loaded, issuer, probe_csr)
            batcher = Batcher(issuer, self._executor, max_batch=config.server.batch_max,
                              max_delay_s=config.server.batch_delay_us / 1e6, queue_limit=config.server.queue_limit,
                              observe_batch=lambda size, _seconds: self.metrics.observe_batch(size))
            self._runtimes[name] = SignerRuntime(name, loaded.material, batcher)
            material = loaded.material
            chain_not_after = min([material.signing_cert.not_valid_after_utc,
                                   *(c.not_valid_after_utc for c in material.intermediates)])
            self.metrics.set_ca_expiry(name, min(r.not_valid_after_utc for r in material.roots), chain_not_after)

    async def start(self) -> None:
        config = self._config
        self._load_signers()
        default = self._signers[DEFAULT_SIGNER]
        material = default.loaded.material
        self._audit = open_audit_log(config.audit, self._state_dir, on_commit=self.metrics.audit_committed)
        authenticators = build_authenticators(config.authn, trust_domain=config.trust_domain,
                                              roots=list(material.roots), base_dir=self._state_dir)
        node_authorizer = build_node_authorizer(config.authn, trust_domain=config.trust_domain,
                                                base_dir=self._state_dir)
        if node_authorizer is not None and hasattr(node_authorizer, "start"):
            await node_authorizer.start()
        self._node_authorizer = node_authorizer

        servicer = IstioCertificateServicer(
            trust_domain=config.trust_domain, authenticators=authenticators, node_authorizer=node_authorizer,
            policy=RequestPolicy(config.policy), signers=self._runtimes, default_signer=DEFAULT_SIGNER,
            audit=self._audit, metrics=self.metrics)
        server = grpc.aio.server(options=_grpc_options(config))
        istio_ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [istio_ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)

        if config.server.plaintext:
            self.ports["grpc"] = server.add_insecure_port(config.server.listen)
        else:
            roots_pem = material.root_bundle_pem.encode()
            self.serving = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: ServingCertificate(
                    default.issuer, trust_domain=config.trust_domain, dns_names=config.server.serving_dns_names,
                    ttl_seconds=config.server.serving_cert_ttl_seconds, client_roots_pem=roots_pem))
            self.ports["grpc"] = server.add_secure_port(
                config.server.listen, self.serving.credentials(require_client_certificate=False, name="grpc"))
            if config.server.mtls_listen:
                self.ports["mtls"] = server.add_secure_port(
                    config.server.mtls_listen, self.serving.credentials(require_client_certificate=True, name="mtls"))
        if self.ports.get("grpc", 0) == 0:
            raise ConfigurationError(f"cannot listen on {config.server.listen}")
        await server.start()
        self._server = server
        if config.server.metrics_listen:
            host, _, port = config.server.metrics_listen.rpartition(":")
            server_and_thread = self.metrics.start_http_server(host.strip("[]"), int(port))
            self.ports["metrics"] = server_and_thread[0].server_address[1]  # type: ignore[attr-defined]
        await self._probe()
        self._tasks.append(asyncio.create_task(self._probe_loop()))
        if self.serving is not None:
            self._tasks.append(asyncio.create_task(self._renewal_loop()))
        log.info("serving", ports=self.ports, trust_domain=config.trust_domain, signers=sorted(self._signers))

    # -- health and renewal ------------------------------------------------------

    async def _probe(self) -> bool:
        """SERVING only if every signer can sign a throwaway certificate now
        (SPIRE's probe): the HSM answers and the signature verifies."""
        loop = asyncio.get_running_loop()
        healthy = True
        for name, signer in self._signers.items():
            try:
                await loop.run_in_executor(self._executor, signer.issuer.issue, IssueRequest(
                    signer.probe_csr, f"spiffe://{self._config.trust_domain}/ns/fastca/sa/health-probe",
                    ttl_seconds=60))
            except FastcaError as error:
                healthy = False
                log.error("health probe failed", signer=name, reason=str(error))
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._health.set("", status)
        await self._health.set(SERVICE, status)
        return healthy

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(_HEALTH_PROBE_INTERVAL_S)
            await self._probe()

    async def _renewal_loop(self) -> None:
        assert self.serving is not None
        while True:
            await asyncio.sleep(_RENEWAL_CHECK_INTERVAL_S)
            try:
                renewed = await asyncio.get_running_loop().run_in_executor(self._executor, self.serving.renew_if_due)
                if renewed:
                    log.info("serving certificate renewed",
                             not_after=self.serving.certificate.not_after.isoformat())
            except FastcaError as error:
                log.error("serving certificate renewal failed", reason=str(error))

    # -- stop --------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self._config.server.shutdown_grace_seconds if grace is None else grace
        for task in self._tasks:
            task.cancel()
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        for runtime in self._runtimes.values():
            await runtime.batcher.drain()
        if self._audit is not None:
            await self._audit.aclose()
        if self._node_authorizer is not None and hasattr(self._node_authorizer, "stop"):
            await self._node_authorizer.stop()
        for signer in self._signers.values():
            signer.loaded.close()
        self._executor.shutdown(wait=True)
        self.metrics.stop()
        log.info("stopped")

    async def run_until_signalled(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("shutting down", reason="signal")
        await self.stop()


def serve(state_dir: Path, config: CAConfig) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; the asyncio loop works too
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(CAServer(state_dir, config).run_until_signalled())



"""`fastca serve`: the gRPC server Istio agents call, with health,
reflection, metrics and a graceful shutdown.

``CAServer.from_state`` is the composition root: it loads the CA(s) of a
state directory and builds every collaborator; ``CAServer`` itself only
receives them (so tests hand it a fault-injecting signer, SPIRE-style).

One process, one event loop (uvloop). On SIGTERM, in order: health goes
NOT_SERVING, the listeners stop taking calls and in-flight calls finish (up
to the grace period), the batchers drain, the audit log flushes, the
signers close.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from fastca.audit.config import open_audit_log
from fastca.audit.record import IssuanceRecord
from fastca.authn.chain import AuthenticatorChain
from fastca.authn.config import build_authenticators, build_node_authorizer
from fastca.authn.node_authorizer import NodeAuthorizer
from fastca.ca.material import CAMaterial, load_ca
from fastca.config import CAConfig, resolve_path
from fastca.errors import ConfigurationError, FastcaError
from fastca.frontend._proto import bulk_pb2, bulk_pb2_grpc, istio_ca_pb2, istio_ca_pb2_grpc
from fastca.frontend.bulk import BulkCertificateServicer
from fastca.frontend.istio_ca import SERVICE, IssuanceService, IstioCertificateServicer, SignerRuntime, log_recorded
from fastca.frontend.serving_cert import ServingCertificate
from fastca.observability.logging import get_logger
from fastca.observability.metrics import Metrics
from fastca.pipeline.batcher import Batcher
from fastca.pipeline.issuer import IssueRequest, Issuer
from fastca.policy.request import RequestPolicy

__all__ = ["CAServer", "ServedSigner", "DEFAULT_SIGNER", "freeze_startup_heap", "serve"]

DEFAULT_SIGNER = "default"
_HEALTH_PROBE_INTERVAL_S = 10.0
_RENEWAL_CHECK_INTERVAL_S = 60.0
# Threads for signers without a thread of their own (in-memory keys) and for setup work.
_ISSUE_THREADS = 2

log = get_logger("fastca.server")

@dataclass
class ServedSigner:
    """A named signer and what the server needs of it."""

    name: str
    material: CAMaterial
    issuer: Issuer
    batcher: Batcher
    close: Callable[[], None]

def _grpc_options(config: CAConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.server.max_receive_message_bytes),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        # Agents ping every 30 s while a call is in flight; grpcio's default
        # answers pings closer than 5 min with GOAWAY too_many_pings.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 0),
    ]

def _probe_csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))

class CAServer:
    def __init__(self, config: CAConfig, *, signers: dict[str, ServedSigner], authenticators: AuthenticatorChain,
                 node_authorizer: NodeAuthorizer | None, audit: Any, metrics: Metrics,
                 executor: ThreadPoolExecutor) -> None:
        if DEFAULT_SIGNER not in signers:
            raise ConfigurationError(f"no {DEFAULT_SIGNER!r} signer")
        self._config = config
        self._signers = signers
        self._authenticators = authenticators
        self._node_authorizer = node_authorizer
        self._audit = audit
        self.metrics = metrics
        self._executor = executor
        self._health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._probe_csr = _probe_csr()
        self._stopped = False
        self.ports: dict[str, int] = {}
        self.serving: ServingCertificate | None = None

    @classmethod
    def from_state(cls, state_dir: Path, config: CAConfig) -> CAServer:
        """Load the state directory's CA (the default signer) and every named
        signer, and build the collaborators the configuration asks for."""
        metrics = Metrics()
        executor = ThreadPoolExecutor(max_workers=_ISSUE_THREADS, thread_name_prefix="issue")
        sources = {DEFAULT_SIGNER: state_dir}
        for name, named in config.signers.items():
            if name == DEFAULT_SIGNER:
                raise ConfigurationError(f"signer name {DEFAULT_SIGNER!r} is reserved for the state directory's CA")
            sources[name] = resolve_path(state_dir, named.state_dir)
        signers: dict[str, ServedSigner] = {}
        audit = None
        try:
            audit = open_audit_log(config.audit, state_dir, on_commit=metrics.audit_committed)
            for name, directory in sources.items():
                loaded = load_ca(directory)
                issuance = config.issuance if name == DEFAULT_SIGNER else loaded.config.issuance
                issuer = Issuer(loaded.material, loaded.signer, issuance,
                                sign_observer=lambda seconds, name=name: metrics.observe_hsm_sign(name, seconds))
                # A batch runs where its signer lives (the PKCS#11 thread), so it signs without a hand-off.
                home = loaded.signer.home_executor
                batcher = Batcher(issuer, home or executor, concurrency=1 if home else _ISSUE_THREADS,
                                  max_batch=config.server.batch_max,
                                  max_delay_s=config.server.batch_delay_us / 1e6,
                                  queue_limit=config.server.queue_limit, audit=audit, on_recorded=log_recorded,
                                  observe_batch=lambda size, _seconds: metrics.observe_batch(size))
                signers[name] = ServedSigner(name, loaded.material, issuer, batcher, loaded.close)
            default_material = signers[DEFAULT_SIGNER].material
            authenticators = build_authenticators(
                config.authn, trust_domain=config.trust_domain, roots=list(default_material.roots),
                intermediates=[default_material.signing_cert, *default_material.intermediates], base_dir=state_dir)
            node_authorizer = build_node_authorizer(config.authn, trust_domain=config.trust_domain,
                                                    base_dir=state_dir)
        except BaseException:
            for signer in signers.values():
                signer.close()
            if audit is not None:
                audit.close()
            executor.shutdown()
            raise
        return cls(config, signers=signers, authenticators=authenticators, node_authorizer=node_authorizer,
                   audit=audit, metrics=metrics, executor=executor)

    # -- start -------------------------------------------------------------------

    async def start(self) -> None:
        config = self._config
        for signer in self._signers.values():
            material = signer.material
            chain_not_after = min([material.signing_cert.not_valid_after_utc,
                                   *(c.not_valid_after_utc for c in material.intermediates)])
            self.metrics.set_ca_expiry(signer.name, min(r.not_valid_after_utc for r in material.roots),
                                       chain_not_after)
        if self._node_authorizer is not None:
            await self._node_authorizer.start()

        issuance = IssuanceService(
            trust_domain=config.trust_domain, authenticators=self._authenticators,
            node_authorizer=self._node_authorizer, policy=RequestPolicy(config.policy),
            signers={name: SignerRuntime(name, s.material, s.batcher) for name, s in self._signers.items()},
            default_signer=DEFAULT_SIGNER, metrics=self.metrics)
        server = grpc.aio.server(options=_grpc_options(config),
                                 maximum_concurrent_rpcs=config.server.max_concurrent_rpcs)
        istio_ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(IstioCertificateServicer(issuance), server)
        bulk_pb2_grpc.add_BulkCertificateServiceServicer_to_server(BulkCertificateServicer(issuance), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [istio_ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name,
             bulk_pb2.DESCRIPTOR.services_by_name["BulkCertificateService"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
        default = self._signers[DEFAULT_SIGNER]
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._add_ports, server, default.issuer, default.material.root_bundle_pem.encode())
        except RuntimeError as error:   # grpcio's "Failed to bind"
            raise ConfigurationError(f"cannot listen on {config.server.listen}: {error}") from None
        if self.ports.get("grpc", 0) == 0:
            raise ConfigurationError(f"cannot listen on {config.server.listen}")
        if self.serving is not None:
            await self._record_serving_certificate()
        await server.start()
        self._server = server
        if config.server.metrics_listen:
            host, _, port = config.server.metrics_listen.rpartition(":")
            server_and_thread = self.metrics.start_http_server(host.strip("[]"), int(port))
            self.ports["metrics"] = server_and_thread[0].server_address[1]  # type: ignore[attr-defined]
        await self.probe()
        self._tasks.append(asyncio.create_task(self._probe_loop()))
        if self.serving is not None:
            self._tasks.append(asyncio.create_task(self._renewal_loop()))
        log.info("serving", ports=self.ports, trust_domain=config.trust_domain, signers=sorted(self._signers))

    def _add_ports(self, server: grpc.aio.Server, issuer: Issuer, roots_pem: bytes) -> None:
        config = self._config
        if config.server.plaintext:
            self.ports["grpc"] = server.add_insecure_port(config.server.listen)
            return
        self.serving = ServingCertificate(
            issuer, trust_domain=config.trust_domain, dns_names=config.server.serving_dns_names,
            ip_addresses=config.server.listen_ip_addresses(),
            ttl_seconds=config.server.serving_cert_ttl_seconds, client_roots_pem=roots_pem)
        self.ports["grpc"] = server.add_secure_port(
            config.server.listen, self.serving.credentials(require_client_certificate=False, name="grpc"))
        if config.server.mtls_listen:
            self.ports["mtls"] = server.add_secure_port(
                config.server.mtls_listen, self.serving.credentials(require_client_certificate=True, name="mtls"))

    async def _record_serving_certificate(self) -> None:
        # The server's own certificate is an issued certificate like any other.
        assert self.serving is not None
        await self._audit.record(IssuanceRecord.from_issued(
            self.serving.certificate, caller_identities=(), credential_type="self", signer=DEFAULT_SIGNER,
            peer="", request_id="serving-certificate"))

    # -- health and renewal ------------------------------------------------------

    async def probe(self) -> bool:
        """SERVING only if every signer can sign a throwaway certificate now
        (SPIRE's probe): the HSM answers and the signature verifies. The
        throwaway certificate is discarded, never returned, so not audited."""
        loop = asyncio.get_running_loop()
        healthy = True
        for name, signer in self._signers.items():
            try:
                await loop.run_in_executor(self._executor, signer.issuer.issue, IssueRequest(
                    self._probe_csr, f"spiffe://{self._config.trust_domain}/ns/fastca/sa/health-probe",
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
            await self.probe()

    async def _renewal_loop(self) -> None:
        assert self.serving is not None
        while True:
            await asyncio.sleep(_RENEWAL_CHECK_INTERVAL_S)
            try:
                renewed = await asyncio.get_running_loop().run_in_executor(self._executor, self.serving.renew_if_due)
                if renewed:
                    await self._record_serving_certificate()
                    log.info("serving certificate renewed",
                             not_after=self.serving.certificate.not_after.isoformat())
            except FastcaError as error:
                log.error("serving certificate renewal failed", reason=str(error))

    # -- stop --------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        grace = self._config.server.shutdown_grace_seconds if grace is None else grace
        for task in self._tasks:
            task.cancel()
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        for signer in self._signers.values():
            await signer.batcher.drain()
        await self._audit.aclose()
        await self._authenticators.aclose()
        if self._node_authorizer is not None:
            await self._node_authorizer.stop()
        for signer in self._signers.values():
            signer.close()
        self._executor.shutdown(wait=True)
        self.metrics.stop()
        log.info("stopped")

    async def run_until_signalled(self) -> None:
        # Handlers first: a SIGTERM that arrives while starting (right after
        # "serving" is logged, say) still gets the graceful shutdown.
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await self.start()
        except BaseException:
            await self.stop(grace=0)
            raise
        log.info("startup heap frozen", objects=freeze_startup_heap())
        await stop.wait()
        log.info("shutting down", reason="signal")
        await self.stop()

def freeze_startup_heap() -> int:
    """Take what is alive once a server process is up (modules, configuration,
    CA material, grpc's objects: ~80k tracked objects) out of the cyclic
    collector's reach, for good; return how many. A full collection holds the
    GIL, so every thread of the worker waits it out: under load they took
    46-63 ms each, every few seconds, and 2-7 ms once only what requests
    allocate is walked. For the process's entry points, not for a library
    caller: anything frozen that later becomes cyclic garbage is never freed."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def serve(state_dir: Path, config: CAConfig) -> None:
    import uvloop

    server = CAServer.from_state(state_dir, config)
    uvloop.run(server.run_until_signalled())

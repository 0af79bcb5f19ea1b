"""`fastca serve`: the gRPC server Istio agents call, with health,
reflection, metrics and a graceful shutdown.

``CAServer.from_state`` is the composition root: it loads the CA(s) of a
state directory as Authorities and builds every collaborator on one clock;
``CAServer`` itself only receives them (so tests hand it an Authority over a
fault-injecting signer, SPIRE-style).

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
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from fastca.audit.config import open_audit_log
from fastca.authn.chain import AuthenticatorChain
from fastca.authn.config import build_authenticators, build_node_authorizer
from fastca.authn.node_authorizer import NodeAuthorizer
from fastca.authority import Admission, Authorities, Authority, load_authority
from fastca.clock import SYSTEM_CLOCK, Clock
from fastca.config import CAConfig, resolve_path
from fastca.errors import ConfigurationError, FastcaError
from fastca.frontend.bulk import BulkCertificateServicer
from fastca.frontend.istio_ca import SERVICE, IssuanceService, IstioCertificateServicer, log_recorded
from fastca.frontend.serving_cert import ServingCertificate
from fastca.observability.logging import get_logger
from fastca.observability.metrics import Metrics
from fastca.policy.request import RequestPolicy
from fastca.proto import bulk_pb2, bulk_pb2_grpc, istio_ca_pb2, istio_ca_pb2_grpc

__all__ = ["CAServer", "DEFAULT_SIGNER", "freeze_startup_heap", "serve"]

DEFAULT_SIGNER = "default"
_HEALTH_PROBE_INTERVAL_S = 10.0
_RENEWAL_CHECK_INTERVAL_S = 60.0
# Threads for signers without a thread of their own (in-memory keys) and for setup work.
_ISSUE_THREADS = 2

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
    ]


class CAServer:
    def __init__(self, config: CAConfig, *, authorities: Authorities, authenticators: AuthenticatorChain,
                 node_authorizer: NodeAuthorizer | None, audit: Any, metrics: Metrics,
                 executor: ThreadPoolExecutor, clock: Clock = SYSTEM_CLOCK) -> None:
        self._config = config
        self.authorities = authorities
        self._authenticators = authenticators
        self._node_authorizer = node_authorizer
        self._audit = audit
        self.metrics = metrics
        self._executor = executor
        self.clock = clock
        self._health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self.ports: dict[str, int] = {}
        self.serving: ServingCertificate | None = None

    @classmethod
    def from_state(cls, state_dir: Path, config: CAConfig, clock: Clock = SYSTEM_CLOCK) -> CAServer:
        """The composition root: load the state directory's CA (the default
        signer) and every named signer as Authorities, and build the
        collaborators the configuration asks for, all on one clock."""
        metrics = Metrics()
        executor = ThreadPoolExecutor(max_workers=_ISSUE_THREADS, thread_name_prefix="issue")
        sources = {DEFAULT_SIGNER: state_dir}
        for name, named in config.signers.items():
            if name == DEFAULT_SIGNER:
                raise ConfigurationError(f"signer name {DEFAULT_SIGNER!r} is reserved for the state directory's CA")
            sources[name] = resolve_path(state_dir, named.state_dir)
        loaded: list[Authority] = []
        audit = None
        node_authorizer = None
        try:
            audit = open_audit_log(config.audit, state_dir, on_commit=metrics.audit_committed)
            node_authorizer = build_node_authorizer(config.authn, trust_domain=config.trust_domain,
                                                    base_dir=state_dir)
            policy = RequestPolicy(config.policy, clock=clock)
            for name, directory in sources.items():
                admission = Admission(signer=name, trust_domain=config.trust_domain, policy=policy,
                                      node_authorizer=node_authorizer)
                loaded.append(load_authority(
                    name, directory, admission=admission, audit=audit, clock=clock,
                    issuance=config.issuance if name == DEFAULT_SIGNER else None, server=config.server,
                    executor=executor, on_recorded=log_recorded,
                    observe_sign=lambda seconds, name=name: metrics.observe_hsm_sign(name, seconds),
                    observe_batch=lambda size, _seconds: metrics.observe_batch(size)))
            authorities = Authorities(loaded, DEFAULT_SIGNER)
            default_material = authorities.default.material
            authenticators = build_authenticators(
                config.authn, trust_domain=config.trust_domain, roots=list(default_material.roots),
                intermediates=[default_material.signing_cert, *default_material.intermediates], base_dir=state_dir,
                clock=clock)
        except BaseException:
            for authority in loaded:
                authority.close()
            if audit is not None:
                audit.close()
            executor.shutdown()
            raise
        return cls(config, authorities=authorities, authenticators=authenticators, node_authorizer=node_authorizer,
                   audit=audit, metrics=metrics, executor=executor, clock=clock)

    # -- start -------------------------------------------------------------------

    async def start(self) -> None:
        config = self._config
        for authority in self.authorities:
            material = authority.material
            self.metrics.set_ca_expiry(authority.name, min(r.not_valid_after_utc for r in material.roots),
                                       material.valid_until)
        if self._node_authorizer is not None:
            await self._node_authorizer.start()

        issuance = IssuanceService(authenticators=self._authenticators, authorities=self.authorities,
                                   metrics=self.metrics)
        server = grpc.aio.server(options=_grpc_options(config),
                                 maximum_concurrent_rpcs=config.server.max_concurrent_rpcs)
        istio_ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(IstioCertificateServicer(issuance), server)
        bulk_pb2_grpc.add_BulkCertificateServiceServicer_to_server(BulkCertificateServicer(issuance), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [istio_ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name,
             bulk_pb2.DESCRIPTOR.services_by_name["BulkCertificateService"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
        default = self.authorities.default
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._add_ports, server, default, default.material.root_bundle_pem.encode())
        except RuntimeError as error:   # grpcio's "Failed to bind"
            raise ConfigurationError(f"cannot listen on {config.server.listen}: {error}") from None
        if self.ports.get("grpc", 0) == 0:
            raise ConfigurationError(f"cannot listen on {config.server.listen}")
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
        log.info("serving", ports=self.ports, trust_domain=config.trust_domain, signers=self.authorities.names())

    def _add_ports(self, server: grpc.aio.Server, authority: Authority, roots_pem: bytes) -> None:
        config = self._config
        if config.server.plaintext:
            self.ports["grpc"] = server.add_insecure_port(config.server.listen)
            return
        self.serving = ServingCertificate(
            authority, trust_domain=config.trust_domain, dns_names=config.server.serving_dns_names,
            ip_addresses=config.server.listen_ip_addresses(),
            ttl_seconds=config.server.serving_cert_ttl_seconds, client_roots_pem=roots_pem)
        self.ports["grpc"] = server.add_secure_port(
            config.server.listen, self.serving.credentials(require_client_certificate=False, name="grpc"))
        if config.server.mtls_listen:
            self.ports["mtls"] = server.add_secure_port(
                config.server.mtls_listen, self.serving.credentials(require_client_certificate=True, name="mtls"))

    # -- health and renewal ------------------------------------------------------

    async def probe(self) -> bool:
        """SERVING only if every Authority can sign a throwaway certificate now
        (SPIRE's probe): the HSM answers and the signature verifies."""
        loop = asyncio.get_running_loop()
        healthy = True
        for authority in self.authorities:
            try:
                await loop.run_in_executor(self._executor, authority.probe)
            except FastcaError as error:
                healthy = False
                log.error("health probe failed", signer=authority.name, reason=str(error))
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
        await self.authorities.drain()
        await self._audit.aclose()
        await self._authenticators.aclose()
        if self._node_authorizer is not None:
            await self._node_authorizer.stop()
        self.authorities.close()
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
    GIL, so every thread of the worker waits it out, and walking the startup
    heap made those pauses the tail of the latency (bench/RESULTS.md, third
    session). For the process's entry points, not for a library
    caller: anything frozen that later becomes cyclic garbage is never freed."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def serve(state_dir: Path, config: CAConfig, clock: Clock = SYSTEM_CLOCK) -> None:
    import uvloop

    server = CAServer.from_state(state_dir, config, clock)
    uvloop.run(server.run_until_signalled())

"""`fastca serve`: the CA's ports on the native front end (uvloop, OpenSSL,
nghttp2 under Cython), with health, reflection, metrics and a graceful
shutdown.

``CAServer.from_state`` is the composition root: it loads the CA(s) of a
state directory as Authorities and builds every collaborator on one clock;
``CAServer`` itself only receives them (so tests hand it an Authority over a
fault-injecting signer, SPIRE-style).

One process, one event loop (uvloop). On SIGTERM, in order: health goes
NOT_SERVING, every connection gets GOAWAY and calls in flight finish (up to
the grace period), the batchers drain, the audit log flushes, the signers
close.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fastca.audit.config import open_audit_log, open_audit_reader
from fastca.authn.chain import AuthenticatorChain
from fastca.authn.config import build_authenticators, build_node_authorizer
from fastca.authn.node_authorizer import NodeAuthorizer
from fastca.authority import Admission, Authorities, Authority, load_authority
from fastca.ca.rotation import CAView
from fastca.clock import SYSTEM_CLOCK, Clock
from fastca.config import CAConfig, resolve_path
from fastca.errors import ConfigurationError, FastcaError
from fastca.frontend._grpc import RESOURCE_EXHAUSTED, UNAVAILABLE, Call, Limits
from fastca.frontend.ca_follow import CAFollower
from fastca.frontend.bulk import BULK_METHOD, BULK_SERVICE, CreateCertificates
from fastca.frontend.health import HEALTH_SERVICE, HealthCheck, HealthState, HealthWatch
from fastca.frontend.istio_ca import METHOD, SERVICE, STATUS_NAMES, CreateCertificate, IssuanceService, log_recorded
from fastca.frontend.native import Endpoint, Listener, bind_socket, server_tls_context
from fastca.frontend.reflection import REFLECTION_SERVICE, ServerReflection
from fastca.frontend.serving_cert import ServingCertificate
from fastca.frontend.trust_bundle import TRUST_BUNDLE_METHOD, TRUST_BUNDLE_SERVICE, GetTrustBundle
from fastca.monitoring import SIGNALS, MonitoringConfig
from fastca.monitoring.service import MonitoringService
from fastca.observability.logging import get_logger
from fastca.observability.metrics import Metrics
from fastca.policy.request import RequestPolicy
from fastca.policy.risk import RiskPolicy
from fastca.trust.bundle import TrustBundle

if TYPE_CHECKING:
    from fastca.trust.kubernetes import KubernetesTrustPublisher
    from fastca.trust.peers import PeerSync

__all__ = ["CAServer", "DEFAULT_SIGNER", "freeze_startup_heap", "serve"]

DEFAULT_SIGNER = "default"
_HEALTH_PROBE_INTERVAL_S = 10.0
# How often a signer that lost its HSM is looked at (a cheap flag; a full
# probe, which is also the recovery attempt, when it is down).
_SIGNER_CHECK_INTERVAL_S = 1.0
_RENEWAL_CHECK_INTERVAL_S = 60.0
# Threads for signers without a thread of their own (in-memory keys) and for setup work.
_ISSUE_THREADS = 2

log = get_logger("fastca.server")


class _Admission:
    """The worker-wide bound on calls held at once (``server.max_concurrent_rpcs``)
    and the refusal of new calls while shutting down, checked by the core
    before any handler sees a call."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.closing = False


class ClientTrust:
    """What a client certificate may chain to: the default signer's own roots
    (old and new while a rotation is under way) through any signing or
    intermediate certificate in use. The mTLS authenticator reads it on each
    verification; the TLS contexts are handed its PEM when it changes."""

    def __init__(self, roots: Sequence[x509.Certificate], intermediates: Sequence[x509.Certificate]) -> None:
        self.roots = tuple(roots)
        self.intermediates = tuple(intermediates)

    @property
    def pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (*self.roots, *self.intermediates))


class CAServer:
    def __init__(self, config: CAConfig, *, authorities: Authorities, authenticators: AuthenticatorChain,
                 node_authorizer: NodeAuthorizer | None, audit: Any, metrics: Metrics,
                 executor: ThreadPoolExecutor, clock: Clock = SYSTEM_CLOCK,
                 trust_publisher: KubernetesTrustPublisher | None = None,
                 peer_sync: PeerSync | None = None, state_dirs: dict[str, Path] | None = None,
                 client_trust: ClientTrust | None = None, monitoring: MonitoringService | None = None) -> None:
        self._config = config
        self.authorities = authorities
        self._authenticators = authenticators
        self._node_authorizer = node_authorizer
        self._audit = audit
        self.metrics = metrics
        self._executor = executor
        self.clock = clock
        self.health = HealthState([SERVICE, BULK_SERVICE])
        self.endpoint: Endpoint | None = None
        self._listeners: list[Listener] = []
        self._admission = _Admission(config.server.max_concurrent_rpcs)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self.ports: dict[str, int] = {}
        self.serving: ServingCertificate | None = None
        self._unready: dict[str, str] = {}      # signer name -> why its last probe failed
        # The root bundle as a ConfigMap in every namespace, under a Lease ([trust.kubernetes]).
        self.trust_publisher = trust_publisher
        # Each signer's live bundle (own roots + [trust.peers]): what its responses end with.
        self.trust_bundles: dict[str, TrustBundle] = {}
        for authority in authorities:
            bundle = TrustBundle(authority.material.roots)
            bundle.subscribe(authority.set_root_bundle)
            bundle.subscribe(lambda pem, bundle=bundle, name=authority.name: self._bundle_changed(name, bundle))
            self.trust_bundles[authority.name] = bundle
            metrics.set_trust_bundle_size(authority.name, len(bundle.certificates))
        if trust_publisher is not None:
            self.trust_bundles[authorities.default.name].subscribe(trust_publisher.set_bundle)
        self.peer_sync = peer_sync
        # The issuance monitor following the audit log ([monitoring]); its scores feed risk policy.
        self.monitoring = monitoring
        if monitoring is not None:
            monitor = monitoring.monitor
            metrics.track_monitoring(top=lambda: next((score for _, score, _ in monitor.top(1)), 0.0),
                                     high_risk=monitor.high_risk_count,
                                     tracked=lambda: monitor.tracked_identities, signals=SIGNALS)
        default = authorities.default.material
        self.client_trust = client_trust or ClientTrust(default.roots, (default.signing_cert, *default.intermediates))
        self._tls_contexts: list[Any] = []
        # Each signer's state directory, followed for a CA rotation's phases.
        self.followers = [CAFollower(authority, state_dirs[authority.name], self.trust_bundles[authority.name],
                                     clock=clock, executor=executor, metrics=metrics, on_change=self._ca_changed)
                          for authority in authorities if state_dirs and authority.name in state_dirs]

    @classmethod
    def from_state(cls, state_dir: Path, config: CAConfig, clock: Clock = SYSTEM_CLOCK, *,
                   reports_alerts: bool = True) -> CAServer:
        """The composition root: load the state directory's CA (the default
        signer) and every named signer as Authorities, and build the
        collaborators the configuration asks for, all on one clock.
        ``reports_alerts``: this process reports the issuance monitor's alerts
        (one worker per server does)."""
        metrics = Metrics()
        executor = ThreadPoolExecutor(max_workers=_ISSUE_THREADS, thread_name_prefix="issue")
        sources = {DEFAULT_SIGNER: state_dir}
        for name, named in config.signers.items():
            if name == DEFAULT_SIGNER:
                raise ConfigurationError(f"signer name {DEFAULT_SIGNER!r} is reserved for the state directory's CA")
            sources[name] = resolve_path(state_dir, named.state_dir)
        unknown = sorted(set(config.monitoring.policy) - set(sources))
        if unknown:
            raise ConfigurationError(f"[monitoring.policy] names no configured signer: {', '.join(unknown)} "
                                     f"(the signers are {', '.join(sorted(sources))})")
        loaded: list[Authority] = []
        audit = None
        node_authorizer = None
        peer_sync = None
        monitoring = None
        try:
            audit = open_audit_log(config.audit, state_dir, on_commit=metrics.audit_committed)
            if config.monitoring.enabled:
                # The process that reports follows the log; so does every process
                # when risk policy needs the scores. The others observe only
                # their own refusals.
                monitoring = MonitoringService(
                    config.monitoring, lambda: open_audit_reader(config.audit, state_dir, writable=True),
                    clock=clock, reports=reports_alerts, metrics=metrics,
                    follows_log=reports_alerts or bool(config.monitoring.policy))
            node_authorizer = build_node_authorizer(config.authn, trust_domain=config.trust_domain,
                                                    base_dir=state_dir)
            policy = RequestPolicy(config.policy, clock=clock)
            for name, directory in sources.items():
                admission = Admission(signer=name, trust_domain=config.trust_domain, policy=policy,
                                      node_authorizer=node_authorizer,
                                      risk=_risk_policy(config.monitoring, name, monitoring))
                loaded.append(load_authority(
                    name, directory, admission=admission, audit=audit, clock=clock,
                    issuance=config.issuance if name == DEFAULT_SIGNER else None, server=config.server,
                    executor=executor, on_recorded=log_recorded,
                    observe_sign=lambda seconds, name=name: metrics.observe_hsm_sign(name, seconds),
                    observe_batch=lambda size, _seconds: metrics.observe_batch(size), wait_for_signer=True))
            authorities = Authorities(loaded, DEFAULT_SIGNER)
            default_material = authorities.default.material
            client_trust = ClientTrust(default_material.roots,
                                       (default_material.signing_cert, *default_material.intermediates))
            authenticators = build_authenticators(
                config.authn, trust_domain=config.trust_domain, roots=lambda: client_trust.roots,
                intermediates=lambda: client_trust.intermediates, base_dir=state_dir, clock=clock)
            if config.trust.peers.sources:
                from fastca.trust.peers import PeerSync

                peer_sync = PeerSync(config.trust.peers, state_dir, metrics=metrics, clock=clock.now)
        except BaseException:
            for authority in loaded:
                authority.close()
            if audit is not None:
                audit.close()
            executor.shutdown()
            raise
        trust_publisher = None
        if config.trust.kubernetes.enabled:     # kubernetes-asyncio is imported only when it is used
            from fastca.trust.kubernetes import KubernetesTrustPublisher

            trust_publisher = KubernetesTrustPublisher(config.trust.kubernetes, default_material.root_bundle_pem,
                                                       base_dir=state_dir)
        return cls(config, authorities=authorities, authenticators=authenticators, node_authorizer=node_authorizer,
                   audit=audit, metrics=metrics, executor=executor, clock=clock, trust_publisher=trust_publisher,
                   peer_sync=peer_sync, state_dirs=sources, client_trust=client_trust, monitoring=monitoring)

    # -- start -------------------------------------------------------------------

    async def start(self, on_waiting: Callable[[str], None] | None = None) -> None:
        """Open the ports. A signer whose HSM is not there yet is waited for
        first (the TLS ports need the serving certificate it signs): the
        metrics port is up meanwhile, ``fastca_signer_ready`` says 0 and
        ``on_waiting`` hears why, once per attempt."""
        config = self._config
        server = config.server
        for authority in self.authorities:
            material = authority.material
            self.metrics.set_ca_expiry(authority.name, min(r.not_valid_after_utc for r in material.roots),
                                       material.valid_until)
        self.metrics.track_queue_depth(lambda: sum(authority.depth for authority in self.authorities))
        if server.metrics_listen:
            host, _, port = server.metrics_listen.rpartition(":")
            server_and_thread = self.metrics.start_http_server(host.strip("[]"), int(port))
            self.ports["metrics"] = server_and_thread[0].server_address[1]  # type: ignore[attr-defined]
        while not await self.probe():
            reason = "; ".join(f"{name}: {why}" for name, why in self._unready.items())
            log.warning("waiting for the signers' HSM before opening the ports", reason=reason,
                        metrics_port=self.ports.get("metrics"))
            if on_waiting is not None:
                on_waiting(reason)
            await asyncio.sleep(_SIGNER_CHECK_INTERVAL_S)
        for follower in self.followers:
            # Before the ports open: a server started mid-rotation signs and
            # hands out roots as the plan says from its first response on.
            await follower.check()
        if self._node_authorizer is not None:
            await self._node_authorizer.start()
        if self.peer_sync is not None:
            # Before the ports open, so the first responses already carry the
            # peers' roots (each fetch is bounded by its source's timeout).
            self.peer_sync.on_change(self._peers_changed)
            await self.peer_sync.sync_once()
            self._tasks.append(asyncio.create_task(self.peer_sync.run(), name="trust-peer-sync"))
        loop = asyncio.get_running_loop()
        if self.monitoring is not None:
            self.monitoring.start()
        issuance = IssuanceService(authenticators=self._authenticators, authorities=self.authorities,
                                   metrics=self.metrics, monitoring=self.monitoring)
        routes = self._routes(issuance)
        limits = Limits(max_message_bytes=server.max_receive_message_bytes,
                        max_concurrent_streams=server.max_concurrent_streams,
                        max_header_list_bytes=server.max_metadata_bytes,
                        max_metadata_key_bytes=server.max_metadata_key_bytes,
                        max_metadata_value_bytes=server.max_metadata_value_bytes)
        self.endpoint = Endpoint(routes=routes, limits=limits, loop=loop,
                                 idle_timeout_s=server.idle_timeout_seconds,
                                 max_unauthenticated_calls=server.max_unauthenticated_calls,
                                 on_call_closed=self._call_closed)
        issuance.endpoint = self.endpoint
        await loop.run_in_executor(self._executor, self._make_listeners, self.authorities.default)
        for listener in self._listeners:
            await listener.start()
            self.ports[listener.name] = listener.port
        self._tasks.append(asyncio.create_task(self._probe_loop()))
        for follower in self.followers:
            self._tasks.append(asyncio.create_task(follower.run(server.ca_watch_seconds),
                                                   name=f"ca-follow-{follower.authority.name}"))
        if self.serving is not None:
            self._tasks.append(asyncio.create_task(self._renewal_loop()))
        if self.trust_publisher is not None:
            await self.trust_publisher.start()
        log.info("serving", ports=self.ports, trust_domain=config.trust_domain, signers=self.authorities.names())

    def _routes(self, issuance: IssuanceService) -> dict[str, Any]:
        admission = self._admission
        handlers = {
            f"/{SERVICE}/{METHOD}": CreateCertificate(issuance),
            f"/{BULK_SERVICE}/{BULK_METHOD}": CreateCertificates(
                issuance, max_requests=self._config.server.max_bulk_requests),
            f"/{HEALTH_SERVICE}/Check": HealthCheck(self.health),
            f"/{HEALTH_SERVICE}/Watch": HealthWatch(self.health),
            f"/{TRUST_BUNDLE_SERVICE}/{TRUST_BUNDLE_METHOD}": GetTrustBundle(self.authorities),
            f"/{REFLECTION_SERVICE}/ServerReflectionInfo": ServerReflection(
                [SERVICE, BULK_SERVICE, TRUST_BUNDLE_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE]),
        }
        return {path: _Bounded(handler, admission).named(path) for path, handler in handlers.items()}

    def _make_listeners(self, authority: Authority) -> None:
        """The sockets (SO_REUSEPORT: workers share them) and TLS contexts,
        with the serving certificate issued (and recorded) first."""
        assert self.endpoint is not None
        server = self._config.server
        timeout = server.handshake_timeout_seconds
        if server.plaintext:
            self._listeners.append(Listener(self.endpoint, "grpc", bind_socket(server.listen, reuse_port=True),
                                            None, timeout))
            return
        # Client certificates verify against the roots, through the CA's own chain.
        client_roots = self.client_trust.pem
        self.serving = ServingCertificate(
            authority, trust_domain=self._config.trust_domain, dns_names=server.serving_dns_names,
            ip_addresses=server.listen_ip_addresses(), ttl_seconds=server.serving_cert_ttl_seconds)
        main = self.serving.serve_on(server_tls_context(client_roots_pem=client_roots,
                                                        require_client_certificate=False))
        self._tls_contexts.append(main)
        self._listeners.append(Listener(self.endpoint, "grpc", bind_socket(server.listen, reuse_port=True),
                                        main, timeout))
        if server.mtls_listen:
            required = self.serving.serve_on(server_tls_context(client_roots_pem=client_roots,
                                                                require_client_certificate=True))
            self._tls_contexts.append(required)
            self._listeners.append(Listener(self.endpoint, "mtls", bind_socket(server.mtls_listen, reuse_port=True),
                                            required, timeout))

    def _call_closed(self, call: Call, answered: bool) -> None:
        handler = call.handler
        if isinstance(handler, _Bounded):       # a known method: its name is a bounded label
            handler.release(call)
            code = STATUS_NAMES.get(call.status_code, "CANCELLED")
            self.metrics.request_finished(handler.service, handler.method, code, time.monotonic() - call.started)

    # -- the trust bundle ---------------------------------------------------------

    def _peers_changed(self, peers: Any) -> None:
        for bundle in self.trust_bundles.values():
            bundle.set_peers(peers)

    def _bundle_changed(self, signer: str, bundle: TrustBundle) -> None:
        self.metrics.set_trust_bundle_size(signer, len(bundle.certificates))
        log.info("trust bundle changed", signer=signer, version=bundle.version,
                 certificates=len(bundle.certificates), peers=bundle.peer_names())

    async def _ca_changed(self, authority: Authority, view: CAView, switched: bool) -> None:
        """A rotation moved on for ``authority``: metrics, and for the default
        signer the client-certificate trust and the serving certificate."""
        material = authority.material
        self.metrics.set_ca_expiry(authority.name, min(r.not_valid_after_utc for r in view.roots),
                                   material.valid_until)
        if authority is not self.authorities.default:
            return
        self.client_trust.roots, self.client_trust.intermediates = view.roots, view.intermediates
        # A TLS store only grows (ssl cannot remove a CA from a live context): a
        # retired root is still accepted by the handshake, and the mTLS
        # authenticator, which verifies against client_trust, refuses it.
        for context in self._tls_contexts:
            context.load_verify_locations(cadata=self.client_trust.pem.decode())
        if switched and self.serving is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.serving.renew)
            except FastcaError as error:
                log.error("serving certificate re-issue under the new key failed", reason=str(error))
            else:
                log.info("serving certificate re-issued under the new key",
                         not_after=self.serving.certificate.not_after.isoformat())

    # -- health and renewal ------------------------------------------------------

    async def probe(self) -> bool:
        """SERVING only if every Authority can sign a throwaway certificate now
        (SPIRE's probe): the HSM answers and the signature verifies. For a
        signer that lost its HSM this is also the attempt to recover."""
        loop = asyncio.get_running_loop()
        for authority in self.authorities:
            try:
                await loop.run_in_executor(self._executor, authority.probe)
            except FastcaError as error:
                if authority.name not in self._unready:
                    log.error("health probe failed", signer=authority.name, reason=str(error))
                self._unready[authority.name] = str(error)
            else:
                if self._unready.pop(authority.name, None) is not None:
                    log.info("signer ready again", signer=authority.name)
            self.metrics.set_signer_ready(authority.name, authority.name not in self._unready)
        healthy = not self._unready
        self.health.set_all(healthy)
        return healthy

    async def _probe_loop(self) -> None:
        """A full probe every _HEALTH_PROBE_INTERVAL_S; every second while a
        signer is down or says it lost its HSM (a call failed on it), so
        readiness follows the HSM within about a second both ways."""
        since_probe = 0.0
        while True:
            await asyncio.sleep(_SIGNER_CHECK_INTERVAL_S)
            since_probe += _SIGNER_CHECK_INTERVAL_S
            lost = any(not authority.signer_available for authority in self.authorities)
            if lost or self._unready or since_probe >= _HEALTH_PROBE_INTERVAL_S:
                since_probe = 0.0
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
        if self.trust_publisher is not None:
            await self.trust_publisher.stop()       # first: the Lease is released for the other replicas
        if self.peer_sync is not None:
            await self.peer_sync.close()
        self.health.shutdown()
        self._admission.closing = True
        for listener in self._listeners:
            listener.stop_accepting()
        if self.endpoint is not None:
            await self.endpoint.drain(grace)
        for listener in self._listeners:
            await listener.close()
        await self.authorities.drain()
        if self.monitoring is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.monitoring.stop)
        await self._audit.aclose()
        await self._authenticators.aclose()
        if self._node_authorizer is not None:
            await self._node_authorizer.stop()
        self.authorities.close()
        self._executor.shutdown(wait=True)
        self.metrics.stop()
        log.info("stopped")

    async def run_until_signalled(self, *, on_waiting: Callable[[str], None] | None = None,
                                  on_serving: Callable[[dict[str, int]], None] | None = None) -> None:
        """Start, serve until SIGTERM or SIGINT, stop gracefully. A signal
        while still waiting for the HSM ends the wait and the process."""
        # Handlers first: a SIGTERM that arrives while starting (right after
        # "serving" is logged, say) still gets the graceful shutdown.
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        starting = asyncio.ensure_future(self.start(on_waiting))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("shutting down", reason="signal before serving")
                starting.cancel()
                await self.stop(grace=0)
                return
            starting.result()
        except BaseException:
            starting.cancel()
            stopping.cancel()
            await self.stop(grace=0)
            raise
        log.info("startup heap frozen", objects=freeze_startup_heap())
        if on_serving is not None:
            on_serving(self.ports)
        await stopping
        log.info("shutting down", reason="signal")
        await self.stop()


class _Bounded:
    """A method handler behind the worker's bounds: at most
    ``max_concurrent_rpcs`` calls held at once (RESOURCE_EXHAUSTED past it),
    none accepted while shutting down (UNAVAILABLE); the method's own
    ``accepts`` (its queue bound) after that. Counts each call it let in."""

    __slots__ = ("_handler", "_admission", "streaming", "service", "method", "_counted")

    def __init__(self, handler: Any, admission: _Admission) -> None:
        self._handler = handler
        self._admission = admission
        self.streaming = handler.streaming
        self.service, self.method = "", ""
        self._counted: set[Call] = set()

    def named(self, path: str) -> _Bounded:
        self.service, _, self.method = path.strip("/").partition("/")
        return self

    def accepts(self, call: Call) -> bool:
        admission = self._admission
        if admission.closing:
            call.fail(UNAVAILABLE, "server shutting down")
            return False
        if admission.in_flight >= admission.limit:
            call.fail(RESOURCE_EXHAUSTED, "server overloaded, retry later")
            return False
        if not self._handler.accepts(call):
            return False
        admission.in_flight += 1
        self._counted.add(call)
        return True

    def release(self, call: Call) -> None:
        if call in self._counted:
            self._counted.discard(call)
            self._admission.in_flight -= 1

    def handle(self, call: Call) -> None:
        self._handler.handle(call)

    def start(self, call: Call) -> None:
        self._handler.start(call)

    def message(self, call: Call, message: bytes) -> None:
        self._handler.message(call, message)

    def half_close(self, call: Call) -> None:
        self._handler.half_close(call)


def _risk_policy(config: MonitoringConfig, signer: str, monitoring: MonitoringService | None) -> RiskPolicy | None:
    rule = config.policy.get(signer)
    threshold = config.threshold_for(signer)
    if rule is None or monitoring is None or threshold is None:
        return None
    return RiskPolicy(monitoring.monitor, threshold=threshold, actions=rule.actions,
                      shortened_ttl_seconds=rule.shortened_ttl_seconds)


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
    # Each call allocates many short-lived containers; collecting the young
    # generation less often walks fewer survivors per call, at the same memory
    # (refcounting frees nearly all of them first).
    gc.set_threshold(20_000, 50, 100)
    return gc.get_freeze_count()


def serve(state_dir: Path, config: CAConfig, clock: Clock = SYSTEM_CLOCK) -> None:
    import uvloop

    server = CAServer.from_state(state_dir, config, clock)
    uvloop.run(server.run_until_signalled())

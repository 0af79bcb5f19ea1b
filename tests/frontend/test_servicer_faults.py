"""The servicer in-process over real TLS with a real SoftHSM signer, wrapped
to inject the faults SoftHSM will not produce on demand: the contract's
INTERNAL and UNAVAILABLE rows, health following the signer, and the batch
queue bound (RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from fastca.audit.sqlite_log import SqliteAuditLog
from fastca.authn.chain import AuthenticatorChain
from fastca.authority import Authorities, Authority
from fastca.clock import SYSTEM_CLOCK
from fastca.config import CAConfig, IssuanceConfig
from fastca.errors import CANotReady
from fastca.frontend.server import CAServer
from fastca.observability.metrics import Metrics
from tests.authn.apikey_plugin import ApiKeyAuthenticator
from tests.authority._support import admission
from tests.conftest import agent_csrs
from tests.frontend.agent_client import AgentClient

API_KEY = "servicer-fault-key"


class FaultySigner:
    """The real signer, until told to fail one way or another."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.mode: str | None = None
        self.gate: threading.Event | None = None
        self.entered = 0                 # sign_many calls begun
        self.signed: list[int] = []      # batch sizes signed

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def close(self) -> None:
        pass       # the session's CA owns the real signer

    def sign_many(self, data):
        self.entered += 1
        if self.gate is not None:
            self.gate.wait(30)
        self.signed.append(len(data))
        if self.mode == "unavailable":
            raise CANotReady("HSM unavailable while signing: DeviceError")
        signatures = self._inner.sign_many(data)
        if self.mode == "garbage":
            return [bytes(len(s)) for s in signatures]
        return signatures


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextlib.contextmanager
def _serving(ca, state, clock=SYSTEM_CLOCK, **server_settings):
    """A CAServer whose default Authority signs with the SoftHSM CA wrapped in FaultySigner."""
    signer = FaultySigner(ca.signer)
    material = ca.material
    config = CAConfig.from_mapping({"server": {"listen": "127.0.0.1:0", "metrics_listen": None,
                                               **server_settings}})
    executor = ThreadPoolExecutor(2)
    audit = SqliteAuditLog(state / "audit.db")
    authority = Authority("default", material, signer, issuance=IssuanceConfig(), admission=admission(),
                          audit=audit, clock=clock, executor=executor, batch_max=2, batch_delay_s=0.0002,
                          queue_limit=config.server.queue_limit)
    authenticators = AuthenticatorChain([ApiKeyAuthenticator(
        {hashlib.sha256(API_KEY.encode()).hexdigest(): "spiffe://cluster.local/ns/faults/sa/test"})])
    server = CAServer(config, authorities=Authorities([authority], "default"),
                      authenticators=authenticators, node_authorizer=None,
                      audit=audit, metrics=Metrics(), executor=executor, clock=clock)
    loop = LoopThread()
    loop.run(server.start())
    client = AgentClient(f"localhost:{server.ports['grpc']}", material.root_bundle_pem.encode(),
                         extra_headers=(("x-api-key", API_KEY),))
    try:
        yield server, signer, client, loop
    finally:
        signer.mode, signer.gate = None, None
        loop.run(server.stop(grace=1))
        loop.close()


@pytest.fixture(scope="module")
def harness(ec_token_ca, tmp_path_factory):
    with _serving(ec_token_ca, tmp_path_factory.mktemp("faults"), queue_limit=4) as served:
        yield served


def _health(client: AgentClient) -> int:
    from grpc_health.v1 import health_pb2_grpc

    with client.channel() as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_signer_returning_bad_signatures_is_internal(harness):
    server, signer, client, loop = harness
    signer.mode = "garbage"
    try:
        assert _code(lambda: client.create_certificate(agent_csrs()[0].pem)) == grpc.StatusCode.INTERNAL
    finally:
        signer.mode = None
    assert len(client.create_certificate(agent_csrs()[0].pem)) == 2     # and it keeps serving


def test_hsm_unavailable_is_unavailable_and_health_follows(harness):
    server, signer, client, loop = harness
    assert _health(client) == health_pb2.HealthCheckResponse.SERVING
    signer.mode = "unavailable"
    try:
        assert _code(lambda: client.create_certificate(agent_csrs()[0].pem)) == grpc.StatusCode.UNAVAILABLE
        assert loop.run(server.probe()) is False
        assert _health(client) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        signer.mode = None
    assert loop.run(server.probe()) is True
    assert _health(client) == health_pb2.HealthCheckResponse.SERVING


def test_queue_bound_answers_resource_exhausted_at_once(harness):
    """A stuck HSM: past the queue bound (4) callers get RESOURCE_EXHAUSTED
    immediately instead of waiting; when the HSM returns, the queued ones finish."""
    server, signer, client, loop = harness
    results = _stuck_calls(client, signer, 10, 6)
    assert sorted(results) == ["OK"] * 4 + ["RESOURCE_EXHAUSTED"] * 6


def _stuck_calls(client: AgentClient, signer: FaultySigner, count: int, refused: int) -> list[str]:
    """``count`` concurrent calls while the HSM is stuck; returns once ``refused``
    of them were refused, then lets the HSM go and returns every outcome."""
    signer.gate = threading.Event()
    results: list[str] = []

    def call() -> None:
        try:
            client.create_certificate(agent_csrs()[0].pem, timeout=30)
            results.append("OK")
        except grpc.RpcError as error:
            results.append(error.code().name)

    threads = [threading.Thread(target=call) for _ in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while results.count("RESOURCE_EXHAUSTED") < refused and time.monotonic() < deadline:
        time.sleep(0.01)
    before_release = list(results)
    signer.gate.set()
    for thread in threads:
        thread.join(30)
    signer.gate = None
    assert "OK" not in before_release
    return results


def test_concurrent_call_bound_refuses_before_the_handler(ec_token_ca, tmp_path):
    """The worker's bound on calls held at once (server.max_concurrent_rpcs)
    refuses the excess as soon as their headers are in, before any handler,
    and the held calls finish when the HSM returns."""
    with _serving(ec_token_ca, tmp_path, max_concurrent_rpcs=3, queue_limit=100) as (server, signer, client, _):
        results = _stuck_calls(client, signer, 9, 6)
        assert sorted(results) == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 6
        assert len(client.create_certificate(agent_csrs()[1].pem)) == 2     # serving normally again


def test_callers_who_left_before_signing_get_nothing_signed_or_recorded(ec_token_ca, tmp_path):
    """While the HSM holds one batch, one queued caller's deadline passes and
    another cancels (RST_STREAM): neither request reaches the signer or the
    audit log; the held call and later ones are served."""
    from fastca.audit.sqlite_log import AuditReader
    from fastca.proto import istio_ca_pb2, istio_ca_pb2_grpc

    with _serving(ec_token_ca, tmp_path, queue_limit=100) as (server, signer, client, _):
        # The server's own serving certificate was signed and recorded at start.
        entered, signed = signer.entered, len(signer.signed)
        with contextlib.closing(AuditReader(tmp_path / "audit.db")) as audit:
            recorded = audit.count()
        signer.gate = threading.Event()
        held: list[object] = []
        first = threading.Thread(target=lambda: held.append(client.create_certificate(agent_csrs()[0].pem)))
        first.start()
        deadline = time.monotonic() + 10
        while signer.entered < entered + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert signer.entered == entered + 1           # the first call is in the HSM, held

        assert _code(lambda: client.create_certificate(agent_csrs()[1].pem, timeout=0.5)) \
            == grpc.StatusCode.DEADLINE_EXCEEDED
        request = istio_ca_pb2.IstioCertificateRequest(csr=agent_csrs()[2].pem.decode(), validity_duration=3600)
        with client.channel() as channel:
            pending = istio_ca_pb2_grpc.IstioCertificateServiceStub(channel).CreateCertificate.future(
                request, metadata=[("clusterid", "Kubernetes"), ("x-api-key", API_KEY)], timeout=30)
            time.sleep(0.3)                            # it reached the server's queue
            assert pending.cancel()

        signer.gate.set()
        first.join(30)
        assert len(held) == 1 and len(held[0]) == 2
        signer.gate = None
        assert len(client.create_certificate(agent_csrs()[3].pem)) == 2
        assert signer.signed[signed:] == [1, 1]        # the held call's batch, then the last call's
        with contextlib.closing(AuditReader(tmp_path / "audit.db")) as audit:
            assert audit.count() == recorded + 2


def test_a_ca_outside_its_validity_is_failed_precondition(ec_token_ca, tmp_path):
    """The server's one clock, injected: before the CA's NotBefore and after
    its NotAfter every call gets FAILED_PRECONDITION with the reason (and no
    certificate that could not verify); in between, certificates."""
    import datetime as dt

    from fastca.clock import ManualClock

    root = ec_token_ca.material.signing_cert
    clock = ManualClock(dt.datetime.now(dt.timezone.utc))
    with _serving(ec_token_ca, tmp_path, clock=clock) as (server, signer, client, loop):
        assert len(client.create_certificate(agent_csrs()[2].pem)) == 2
        for moment, reason in ((root.not_valid_before_utc - dt.timedelta(days=1), "not valid"),
                               (root.not_valid_after_utc + dt.timedelta(seconds=1), "not valid")):
            clock.set(moment)
            with pytest.raises(grpc.RpcError) as refused:
                client.create_certificate(agent_csrs()[2].pem)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason in refused.value.details()
            assert loop.run(server.probe()) is False
        clock.set(root.not_valid_before_utc + dt.timedelta(days=1))
        assert len(client.create_certificate(agent_csrs()[2].pem)) == 2
        assert loop.run(server.probe()) is True

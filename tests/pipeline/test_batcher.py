"""The batcher with the real issuer, an in-memory signer and the real SQLite audit log."""

import asyncio
import datetime as dt
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fastca.audit.record import IssuanceContext
from fastca.audit.sqlite_log import SqliteAuditLog, _connect_writer
from fastca.ca.certificates import self_signed_root
from fastca.ca.material import validate_material
from fastca.config import IssuanceConfig
from fastca.errors import CANotReady, InvalidRequest, Overloaded, SigningFailed
from fastca.pipeline.batcher import Batcher
from fastca.pipeline.issuer import IssuedCertificate, IssueRequest, Issuer
from fastca.signing.software import SoftwareSigner
from tests.conftest import agent_csrs

ID = "spiffe://cluster.local/ns/batch/sa/test"


class RecordingIssuer(Issuer):
    def __init__(self, *args, gate: threading.Event | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []
        self.gate = gate

    def issue_many(self, requests):
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(len(requests))
        return super().issue_many(requests)


@pytest.fixture
def issuer_parts():
    signer = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))
    now = dt.datetime.now(dt.timezone.utc)
    root = self_signed_root(signer, "cluster.local", now=now)
    return validate_material(root, [], [root], now), signer


def test_concurrent_requests_share_batches(issuer_parts):
    issuer = RecordingIssuer(*issuer_parts, IssuanceConfig())
    with ThreadPoolExecutor(2) as executor:
        batcher = Batcher(issuer, executor, max_batch=16, max_delay_s=0.005, queue_limit=1000)

        async def main():
            return await asyncio.gather(*(batcher.submit(IssueRequest(agent_csrs()[i % 12].pem, ID))
                                          for i in range(64)))

        results = asyncio.run(main())
    assert len(results) == 64 and all(r.identity == ID for r in results)
    assert sum(issuer.batches) == 64 and max(issuer.batches) == 16 and len(issuer.batches) <= 8


def test_one_bad_request_fails_alone(issuer_parts):
    issuer = RecordingIssuer(*issuer_parts, IssuanceConfig())
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(issuer, executor, max_batch=8, max_delay_s=0.005, queue_limit=100)

        async def main():
            return await asyncio.gather(batcher.submit(IssueRequest(agent_csrs()[0].pem, ID)),
                                        batcher.submit(IssueRequest(b"junk", ID)),
                                        batcher.submit(IssueRequest(agent_csrs()[1].pem, ID)),
                                        return_exceptions=True)

        good, bad, also_good = asyncio.run(main())
    assert isinstance(bad, InvalidRequest)
    assert good.identity == ID and also_good.identity == ID


def test_queue_bound_and_drain(issuer_parts):
    gate = threading.Event()
    issuer = RecordingIssuer(*issuer_parts, IssuanceConfig(), gate=gate)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(issuer, executor, max_batch=2, max_delay_s=0.001, queue_limit=3)

        async def main():
            waiting = [asyncio.ensure_future(batcher.submit(IssueRequest(agent_csrs()[0].pem, ID))) for _ in range(3)]
            await asyncio.sleep(0.05)
            assert batcher.depth == 3
            with pytest.raises(Overloaded):
                await batcher.submit(IssueRequest(agent_csrs()[0].pem, ID))
            gate.set()
            drain = asyncio.ensure_future(batcher.drain())
            results = await asyncio.gather(*waiting)
            await drain
            with pytest.raises(CANotReady):
                await batcher.submit(IssueRequest(agent_csrs()[0].pem, ID))
            return results

        results = asyncio.run(main())
    assert len(results) == 3 and batcher.depth == 0


def test_cancelled_caller_is_not_issued(issuer_parts):
    gate = threading.Event()
    issuer = RecordingIssuer(*issuer_parts, IssuanceConfig(), gate=gate)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(issuer, executor, max_batch=1, max_delay_s=0.001, queue_limit=10)

        async def main():
            first = asyncio.ensure_future(batcher.submit(IssueRequest(agent_csrs()[0].pem, ID)))
            await asyncio.sleep(0.02)            # first is in flight, blocked on the gate
            second = asyncio.ensure_future(batcher.submit(IssueRequest(agent_csrs()[1].pem, ID + "2")))
            await asyncio.sleep(0)
            second.cancel()
            gate.set()
            await first
            await batcher.drain()

        asyncio.run(main())
    assert issuer.batches == [1]


@pytest.fixture
def audit(tmp_path: Path):
    log = SqliteAuditLog(tmp_path / "audit.db")
    yield log
    log.close()


def _context(i: int = 0) -> IssuanceContext:
    return IssuanceContext(caller_identities=(f"{ID}-caller",), credential_type="k8s-jwt", signer="default",
                           peer=f"ipv4:127.0.0.1:{40000 + i}", request_id=f"req-{i}", cluster_id="Kubernetes")


class _CommitFails:
    """The real writer connection, whose COMMIT fails while ``fail`` is set (a full disk)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.fail = False

    def execute(self, sql, *args):
        if self.fail and sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def executemany(self, sql, rows):
        return self._conn.executemany(sql, rows)

    def close(self):
        self._conn.close()


def test_certificates_are_recorded_before_they_are_returned(issuer_parts, audit):
    issuer = RecordingIssuer(*issuer_parts, IssuanceConfig())
    observed: list[list] = []
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(issuer, executor, max_batch=8, max_delay_s=0.005, queue_limit=100, audit=audit,
                          on_recorded=observed.append)

        async def main():
            async def one(i):
                issued = await batcher.submit(IssueRequest(agent_csrs()[i % 12].pem, ID), _context(i))
                # Committed before the caller sees it: readable at once, by another connection.
                assert audit.get(issued.serial) is not None
                return issued

            return await asyncio.gather(*(one(i) for i in range(20)))

        results = asyncio.run(main())
    assert audit.count() == 20
    for i, issued in enumerate(results):
        record = audit.get(issued.serial)
        assert record.request_id == f"req-{i}" and record.peer == f"ipv4:127.0.0.1:{40000 + i}"
        assert record.identity == ID and record.caller_identities == (f"{ID}-caller",)
        assert record.fingerprint_sha256 == issued.fingerprint_sha256 and record.not_after == issued.not_after
    assert sorted(r.serial for batch in observed for r in batch) == sorted(f"{r.serial:x}" for r in results)
    assert len(observed) == len(issuer.batches)


def test_failed_commit_returns_no_certificate_and_the_log_recovers(issuer_parts, tmp_path: Path):
    connections: list[_CommitFails] = []

    def connect(path):
        connections.append(_CommitFails(_connect_writer(path)))
        return connections[-1]

    issuer = RecordingIssuer(*issuer_parts, IssuanceConfig())
    audit = SqliteAuditLog(tmp_path / "audit.db", connect=connect)
    observed: list[list] = []
    try:
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(issuer, executor, max_batch=4, max_delay_s=0.002, queue_limit=100, audit=audit,
                              on_recorded=observed.append)

            async def attempt(n):
                return await asyncio.gather(*(batcher.submit(IssueRequest(agent_csrs()[i % 12].pem, ID), _context(i))
                                              for i in range(n)), return_exceptions=True)

            connections[0].fail = True
            refused = asyncio.run(attempt(6))
            assert all(isinstance(r, CANotReady) for r in refused), refused
            assert "audit log unavailable" in str(refused[0])
            assert audit.count() == 0 and observed == [] and sum(issuer.batches) == 6   # signed, never handed out
            connections[0].fail = False
            recovered = asyncio.run(attempt(3))
            assert all(isinstance(r, IssuedCertificate) for r in recovered)
            assert audit.count() == 3
    finally:
        audit.close()


def test_full_audit_queue_is_overloaded(issuer_parts, tmp_path: Path):
    issuer = RecordingIssuer(*issuer_parts, IssuanceConfig())
    audit = SqliteAuditLog(tmp_path / "audit.db", queue_limit=2)
    try:
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(issuer, executor, max_batch=8, max_delay_s=0.005, queue_limit=100, audit=audit)

            async def main():
                return await asyncio.gather(*(batcher.submit(IssueRequest(agent_csrs()[i].pem, ID), _context(i))
                                              for i in range(5)), return_exceptions=True)

            results = asyncio.run(main())
        # The first request goes alone (a quiet server skips the window); the
        # other four share a batch, and four records cannot fit a queue of two:
        # refused whole, retryable.
        assert issuer.batches == [1, 4]
        assert isinstance(results[0], IssuedCertificate)
        assert all(isinstance(r, Overloaded) for r in results[1:]), results
        assert audit.count() == 1
    finally:
        audit.close()


def test_submit_many_keeps_order_and_refuses_only_what_does_not_fit(issuer_parts, audit):
    issuer = RecordingIssuer(*issuer_parts, IssuanceConfig())
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(issuer, executor, max_batch=4, max_delay_s=0.002, queue_limit=6, audit=audit)
        requests = [(IssueRequest(agent_csrs()[i % 12].pem, f"{ID}/{i}"), _context(i)) for i in range(8)]
        requests[2] = (IssueRequest(b"junk", f"{ID}/2"), _context(2))
        outcomes = asyncio.run(batcher.submit_many(requests))
    assert len(outcomes) == 8
    assert isinstance(outcomes[2], InvalidRequest)
    assert all(isinstance(o, Overloaded) for o in outcomes[6:])
    for i in (0, 1, 3, 4, 5):
        assert outcomes[i].identity == f"{ID}/{i}"
        assert audit.get(outcomes[i].serial).request_id == f"req-{i}"
    assert audit.count() == 5 and batcher.depth == 0

    # With no room at all, every element is refused on its own; the call itself is not.
    gate = threading.Event()
    stuck = RecordingIssuer(*issuer_parts, IssuanceConfig(), gate=gate)
    with ThreadPoolExecutor(1) as executor:
        full = Batcher(stuck, executor, max_batch=4, max_delay_s=0.002, queue_limit=2, audit=audit)

        async def no_room():
            holding = asyncio.ensure_future(full.submit_many(requests[:2]))
            await asyncio.sleep(0.05)
            refused = await full.submit_many(requests[3:6])
            gate.set()
            return refused, await holding

        refused, held = asyncio.run(no_room())
    assert len(refused) == 3 and all(isinstance(o, Overloaded) for o in refused)
    assert all(isinstance(o, IssuedCertificate) for o in held)


def test_requests_without_context_are_refused_when_recording(issuer_parts, audit):
    issuer = RecordingIssuer(*issuer_parts, IssuanceConfig())
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(issuer, executor, max_batch=4, max_delay_s=0.002, queue_limit=6, audit=audit)
        with pytest.raises(TypeError):
            asyncio.run(batcher.submit(IssueRequest(agent_csrs()[0].pem, ID)))
    assert issuer.batches == []


def test_a_failing_observer_does_not_withhold_certificates(issuer_parts, audit):
    issuer = RecordingIssuer(*issuer_parts, IssuanceConfig())

    def broken(records):
        raise ValueError("observer bug")

    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(issuer, executor, max_batch=4, max_delay_s=0.002, queue_limit=6, audit=audit,
                          on_recorded=broken)
        issued = asyncio.run(batcher.submit(IssueRequest(agent_csrs()[0].pem, ID), _context()))
    assert x509.load_der_x509_certificate(issued.der).serial_number == issued.serial
    assert audit.get(issued.serial) is not None


class ExplodingIssuer(Issuer):
    def issue_many(self, requests):
        raise KeyError("a bug in the issuer")


def test_an_issuer_bug_fails_the_batch_and_the_batcher_goes_on(issuer_parts):
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(ExplodingIssuer(*issuer_parts, IssuanceConfig()), executor, max_batch=4,
                          max_delay_s=0.002, queue_limit=10)

        async def main():
            first = await asyncio.gather(*(batcher.submit(IssueRequest(agent_csrs()[i].pem, ID)) for i in range(3)),
                                         return_exceptions=True)
            second = await asyncio.gather(batcher.submit(IssueRequest(agent_csrs()[0].pem, ID)),
                                          return_exceptions=True)
            await batcher.drain()
            return first + second

        results = asyncio.run(main())
    assert all(isinstance(r, SigningFailed) and "KeyError" in str(r) for r in results), results
    assert batcher.depth == 0


def test_a_lone_request_skips_the_window_and_load_still_batches(issuer_parts):
    issuer = RecordingIssuer(*issuer_parts, IssuanceConfig())
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(issuer, executor, max_batch=16, max_delay_s=0.5, queue_limit=1000)

        async def main():
            loop = asyncio.get_running_loop()
            lone = []
            for i in range(3):
                started = loop.time()
                await batcher.submit(IssueRequest(agent_csrs()[i].pem, ID))
                lone.append(loop.time() - started)
            burst = await asyncio.gather(*(batcher.submit(IssueRequest(agent_csrs()[i % 12].pem, ID))
                                           for i in range(40)))
            return lone, burst

        lone, burst = asyncio.run(main())
    # A quiet server does not hold a request for the 0.5 s window...
    assert max(lone) < 0.25, lone
    assert issuer.batches[:3] == [1, 1, 1]
    # ...and a burst after the quiet spell is still batched, not sent one by one.
    assert len(burst) == 40 and sum(issuer.batches[3:]) == 40
    assert max(issuer.batches[3:]) == 16 and len(issuer.batches) - 3 <= 5


def test_requests_arriving_while_the_thread_is_busy_leave_as_one_batch(issuer_parts):
    # The PKCS#11 thread is busy with a batch; requests keep arriving over
    # several batch windows. They wait in the batcher, not in the executor's
    # queue, and go together the moment the thread is free.
    gate = threading.Event()
    issuer = RecordingIssuer(*issuer_parts, IssuanceConfig(), gate=gate)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(issuer, executor, max_batch=64, max_delay_s=0.002, queue_limit=1000, concurrency=1)

        async def main():
            first = asyncio.ensure_future(batcher.submit(IssueRequest(agent_csrs()[0].pem, ID)))
            await asyncio.sleep(0.02)               # first is on the thread, blocked on the gate
            later = []
            for i in range(20):                     # 20 requests over ~10 windows
                later.append(asyncio.ensure_future(batcher.submit(IssueRequest(agent_csrs()[i % 12].pem, ID))))
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.01)
            assert issuer.batches == [] and batcher.depth == 21
            gate.set()
            return await asyncio.gather(first, *later)

        results = asyncio.run(main())
    assert len(results) == 21 and all(r.identity == ID for r in results)
    assert issuer.batches == [1, 20]


class CountingIssuer(RecordingIssuer):
    """Counts the batches inside issue_many at once (before the gate)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0

    def issue_many(self, requests):
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            return super().issue_many(requests)
        finally:
            with self.lock:
                self.inside -= 1


@pytest.mark.parametrize("concurrency", [1, 2])
def test_at_most_concurrency_batches_are_issued_at_once(issuer_parts, concurrency):
    gate = threading.Event()
    issuer = CountingIssuer(*issuer_parts, IssuanceConfig(), gate=gate)
    with ThreadPoolExecutor(4) as executor:
        batcher = Batcher(issuer, executor, max_batch=2, max_delay_s=0.001, queue_limit=1000,
                          concurrency=concurrency)

        async def main():
            calls = [asyncio.ensure_future(batcher.submit(IssueRequest(agent_csrs()[i].pem, ID))) for i in range(8)]
            await asyncio.sleep(0.05)
            gate.set()
            return await asyncio.gather(*calls)

        results = asyncio.run(main())
    assert len(results) == 8 and sum(issuer.batches) == 8
    assert issuer.most_inside == concurrency
    with pytest.raises(ValueError):
        Batcher(issuer, executor, max_batch=2, max_delay_s=0.001, queue_limit=10, concurrency=0)

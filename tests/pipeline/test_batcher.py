"""The batcher with the real issuer and an in-memory signer."""

import asyncio
import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fastca.ca.certificates import self_signed_root
from fastca.ca.material import validate_material
from fastca.config import IssuanceConfig
from fastca.errors import CANotReady, InvalidRequest, Overloaded
from fastca.pipeline.batcher import Batcher
from fastca.pipeline.issuer import IssueRequest, Issuer
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

"""Collects concurrent requests into batches for the issuer.

A batch closes when it holds ``max_batch`` requests or ``max_delay`` after
its first request arrived, whichever comes first, and is issued on a worker
thread (the native core and the PKCS#11 thread do the work without the
GIL, so the event loop keeps serving meanwhile). The number of requests
waiting or in flight is bounded: past ``queue_limit`` a request is refused
at once with Overloaded (RESOURCE_EXHAUSTED, which agents retry).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Callable

from fastca.errors import CANotReady, FastcaError, Overloaded, SigningFailed
from fastca.pipeline.issuer import IssuedCertificate, IssueRequest, Issuer

__all__ = ["Batcher"]


class Batcher:
    def __init__(self, issuer: Issuer, executor: Executor, *, max_batch: int, max_delay_s: float,
                 queue_limit: int, observe_batch: Callable[[int, float], None] | None = None) -> None:
        self._issuer = issuer
        self._executor = executor
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._queue_limit = queue_limit
        self._observe_batch = observe_batch
        self._pending: list[tuple[IssueRequest, asyncio.Future[IssuedCertificate]]] = []
        self._outstanding = 0
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def depth(self) -> int:
        return self._outstanding

    async def submit(self, request: IssueRequest) -> IssuedCertificate:
        if self._closed:
            raise CANotReady("the server is shutting down")
        if self._outstanding >= self._queue_limit:
            raise Overloaded(f"issuance queue full ({self._queue_limit})")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[IssuedCertificate] = loop.create_future()
        self._pending.append((request, future))
        self._outstanding += 1
        try:
            if len(self._pending) >= self._max_batch:
                self._flush()
            elif self._timer is None:
                self._timer = loop.call_later(self._max_delay_s, self._flush)
            return await future
        finally:
            self._outstanding -= 1

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
            # A caller that gave up (deadline, cancellation) is not issued a certificate.
            batch = [(request, future) for request, future in batch if not future.done()]
            if batch:
                task = asyncio.get_running_loop().create_task(self._issue(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

    async def _issue(self, batch: list[tuple[IssueRequest, asyncio.Future[IssuedCertificate]]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()

        def issue_live() -> tuple[list[asyncio.Future[IssuedCertificate]], list]:
            # Checked again on the worker thread: a caller whose deadline
            # passed while the batch waited for a thread costs no signature.
            live = [(request, future) for request, future in batch if not future.done()]
            if not live:
                return [], []
            return [future for _, future in live], self._issuer.issue_many([request for request, _ in live])

        try:
            futures, results = await loop.run_in_executor(self._executor, issue_live)
        except FastcaError as error:
            futures, results = [future for _, future in batch], [error] * len(batch)
        except Exception as error:  # a bug must fail this batch's calls, not hang them
            futures = [future for _, future in batch]
            results = [SigningFailed(f"issuer error: {type(error).__name__}: {error}")] * len(batch)
        if self._observe_batch is not None and futures:
            self._observe_batch(len(futures), time.perf_counter() - started)
        for future, result in zip(futures, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def drain(self) -> None:
        """Stop taking requests and finish every one already taken."""
        self._closed = True
        self._flush()
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

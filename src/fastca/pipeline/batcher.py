"""Collects concurrent requests into batches for the issuer, then records them.

A batch closes when it holds ``max_batch`` requests or ``max_delay`` after
its first request arrived, whichever comes first. It is issued on a worker
thread (the native core and the PKCS#11 thread do the work without the
GIL, so the event loop keeps serving meanwhile); the batch's certificates
then go to the audit log as one entry, and the callers are answered once
that entry is committed: a certificate is never returned unrecorded. Each
batch costs the event loop one hand-off each way, however many requests it
carries; the per-certificate work happens off the loop.

At most ``concurrency`` batches are being issued at once (1 for a signer's
own PKCS#11 thread). While they are, new requests wait here rather than in
the executor's queue, and the next batch leaves the moment a thread is free
with everything that arrived meanwhile. Under load batches so grow with the
load, instead of queueing up behind the thread as many small ones, each
paying the per-batch costs (measured: batches of 4 waiting 22 ms for the
PKCS#11 thread, before).

The number of requests waiting or in flight is bounded: past
``queue_limit`` a request is refused at once with Overloaded
(RESOURCE_EXHAUSTED, which agents retry).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Protocol

from fastca.audit.record import IssuanceContext, IssuanceRecord
from fastca.errors import CANotReady, FastcaError, Overloaded, SigningFailed
from fastca.observability.logging import get_logger
from fastca.pipeline.issuer import IssuedCertificate, IssueRequest, Issuer

__all__ = ["AuditSink", "Batcher", "Outcome"]

Outcome = IssuedCertificate | FastcaError

log = get_logger("fastca.pipeline")


class AuditSink(Protocol):
    """What the batcher needs of an audit log (SqliteAuditLog)."""

    def record_many_then(self, records: Sequence[IssuanceRecord],
                         on_done: Callable[[CANotReady | None], None]) -> None: ...


class _Call:
    """One submit or submit_many call: its future resolves when every one
    of its requests has an outcome."""

    __slots__ = ("future", "outcomes", "remaining")

    def __init__(self, future: asyncio.Future[list[Outcome]], size: int) -> None:
        self.future = future
        self.outcomes: list[Outcome | None] = [None] * size
        self.remaining = size


# A request in a batch: what to issue, who asked, whose call it is, and where in that call.
_Entry = tuple[IssueRequest, IssuanceContext | None, _Call, int]


class Batcher:
    """``audit``: where each batch's certificates are recorded before they are
    returned (None only where nothing is returned to a client, as in tests of
    the issuer). ``on_recorded(records)`` runs after each commit, on the audit
    writer's thread (the per-issuance log lines). ``observe_batch(size,
    seconds)`` runs on the event loop. ``concurrency``: how many batches may
    be issued at once, i.e. the threads ``executor`` gives this batcher."""

    def __init__(self, issuer: Issuer, executor: Executor, *, max_batch: int, max_delay_s: float,
                 queue_limit: int, audit: AuditSink | None = None,
                 on_recorded: Callable[[list[IssuanceRecord]], None] | None = None,
                 observe_batch: Callable[[int, float], None] | None = None,
                 concurrency: int = 1,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._issuer = issuer
        self._executor = executor
        self._concurrency = concurrency
        self._issuing = 0            # batches on a thread now (<= concurrency)
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._queue_limit = queue_limit
        self._audit = audit
        self._on_recorded = on_recorded
        self._observe_batch = observe_batch
        self._clock = clock
        self._pending: list[_Entry] = []
        self._outstanding = 0
        self._timer: asyncio.TimerHandle | None = None
        self._recent_batch = 1.0     # moving average of batch sizes: is anyone likely to join?
        self._batches_in_flight = 0
        self._idle: asyncio.Event | None = None
        self._closed = False

    @property
    def depth(self) -> int:
        return self._outstanding

    async def submit(self, request: IssueRequest, context: IssuanceContext | None = None) -> IssuedCertificate:
        """Issue (and record) one certificate, or raise the request's error."""
        outcome = (await self._submit([(request, context)], all_or_nothing=True))[0]
        if isinstance(outcome, FastcaError):
            raise outcome
        return outcome

    async def submit_many(self, requests: Sequence[tuple[IssueRequest, IssuanceContext | None]]) -> list[Outcome]:
        """One outcome per request, in order. Requests beyond the queue's
        room are refused individually with Overloaded; the rest go on."""
        if not requests:
            return []
        return await self._submit(requests, all_or_nothing=False)

    async def _submit(self, requests: Sequence[tuple[IssueRequest, IssuanceContext | None]],
                      all_or_nothing: bool) -> list[Outcome]:
        if self._closed:
            raise CANotReady("the server is shutting down")
        if self._audit is not None and any(context is None for _, context in requests):
            raise TypeError("every request needs an IssuanceContext: this batcher records what it issues")
        room = self._queue_limit - self._outstanding
        if room <= 0 or (all_or_nothing and room < len(requests)):
            full = Overloaded(f"issuance queue full ({self._queue_limit})")
            if all_or_nothing:
                raise full
            return [full] * len(requests)
        taken = min(room, len(requests))
        loop = asyncio.get_running_loop()
        call = _Call(loop.create_future(), taken)
        for index in range(taken):
            request, context = requests[index]
            self._pending.append((request, context, call, index))
        self._outstanding += taken
        try:
            if len(self._pending) >= self._max_batch or self._alone(taken):
                self._flush()
            elif self._timer is None and self._issuing < self._concurrency:
                # (With every thread busy, the next free one takes these.)
                self._timer = loop.call_later(self._max_delay_s, self._flush)
            outcomes = await call.future
        finally:
            self._outstanding -= taken
        if taken < len(requests):
            refused = Overloaded(f"issuance queue full ({self._queue_limit})")
            outcomes = [*outcomes, *([refused] * (len(requests) - taken))]
        return outcomes

    # -- on the event loop -----------------------------------------------------

    def _alone(self, taken: int) -> bool:
        """Whether these requests should go now rather than wait for the batch
        window: nothing else is waiting or in flight, and recent batches were
        of one (a quiet server). Under load batches are in flight and the
        average is high, so requests wait and batch; a lone request on a
        quiet server does not pay the window (measured: p50 at 25% of peak
        5.6 -> 3.2 ms)."""
        return self._recent_batch < 1.5 and self._batches_in_flight == 0 and len(self._pending) == taken

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._pending and self._issuing < self._concurrency:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
            # A caller that gave up (deadline, cancellation) is not issued a certificate.
            batch = [entry for entry in batch if not entry[2].future.done()]
            if not batch:
                continue
            self._batches_in_flight += 1
            self._issuing += 1
            self._recent_batch += 0.2 * (len(batch) - self._recent_batch)
            try:
                self._executor.submit(self._run_batch, loop, batch, time.perf_counter())
            except (RuntimeError, FastcaError):   # the executor is shut down, or belongs to another process
                self._issuing -= 1
                self._resolve(batch, [CANotReady("the server is shutting down")] * len(batch), None)
        self._note_if_idle()

    def _thread_free(self) -> None:
        """A batch left its thread (issued and handed to the audit log): the
        next one goes now, with everything that arrived meanwhile."""
        self._issuing -= 1
        if self._pending:
            self._flush()

    def _resolve(self, batch: list[_Entry], outcomes: Sequence[Outcome], started: float | None) -> None:
        for (_, _, call, index), outcome in zip(batch, outcomes):
            call.outcomes[index] = outcome
            call.remaining -= 1
            if call.remaining == 0 and not call.future.done():
                call.future.set_result(call.outcomes)  # type: ignore[arg-type]
        self._batches_in_flight -= 1
        if started is not None and self._observe_batch is not None:
            self._observe_batch(len(batch), time.perf_counter() - started)
        self._note_if_idle()

    def _note_if_idle(self) -> None:
        if self._idle is not None and self._batches_in_flight == 0 and not self._pending:
            self._idle.set()

    async def drain(self) -> None:
        """Stop taking requests and finish every one already taken."""
        self._closed = True
        self._flush()
        while self._batches_in_flight or self._pending:
            self._idle = asyncio.Event()
            await self._idle.wait()

    # -- on a worker thread -----------------------------------------------------

    def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Entry], started: float) -> None:
        try:
            self._issue_and_record(loop, batch, started)
        finally:
            try:
                loop.call_soon_threadsafe(self._thread_free)
            except RuntimeError:
                pass   # the loop is closed: nothing waits for this thread any more

    def _issue_and_record(self, loop: asyncio.AbstractEventLoop, batch: list[_Entry], started: float) -> None:
        def answer(outcomes: Sequence[Outcome]) -> None:
            try:
                loop.call_soon_threadsafe(self._resolve, batch, outcomes, started)
            except RuntimeError:
                pass   # the loop is closed: nobody is waiting any more

        try:
            # Checked again here: a caller whose deadline passed while the
            # batch waited for a thread costs no signature.
            live = [i for i, entry in enumerate(batch) if not entry[2].future.done()]
            outcomes: list[Outcome] = [CANotReady("the request was cancelled")] * len(batch)
            for i, outcome in zip(live, self._issuer.issue_many([batch[i][0] for i in live]) if live else ()):
                outcomes[i] = outcome
        except FastcaError as error:
            answer([error] * len(batch))
            return
        except Exception as error:  # a bug must fail this batch's calls, not hang them
            answer([SigningFailed(f"issuer error: {type(error).__name__}: {error}")] * len(batch))
            return
        if self._audit is None:
            answer(outcomes)
            return
        self._record_then_answer(batch, outcomes, answer)

    def _record_then_answer(self, batch: list[_Entry], outcomes: list[Outcome],
                            answer: Callable[[Sequence[Outcome]], None]) -> None:
        assert self._audit is not None
        issued_at = self._clock()
        recorded: list[int] = []
        records: list[IssuanceRecord] = []
        try:
            for i, outcome in enumerate(outcomes):
                if isinstance(outcome, IssuedCertificate):
                    context = batch[i][1]
                    assert context is not None
                    records.append(IssuanceRecord.of(outcome, context, issued_at))
                    recorded.append(i)
        except Exception as error:  # noqa: BLE001 - no record, so no certificate leaves
            failed = SigningFailed(f"audit record error: {type(error).__name__}: {error}")
            answer([failed if isinstance(outcome, IssuedCertificate) else outcome for outcome in outcomes])
            return
        if not records:
            answer(outcomes)
            return

        def committed(error: CANotReady | None) -> None:
            try:
                if error is not None:
                    for i in recorded:
                        outcomes[i] = error
                elif self._on_recorded is not None:
                    try:
                        self._on_recorded(records)
                    except Exception as exc:  # noqa: BLE001 - an observer must not withhold recorded certificates
                        log.error("issuance observer failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                # Even if logging itself fails (a closed stderr), the callers are answered.
                answer(outcomes)

        try:
            self._audit.record_many_then(records, committed)
        except FastcaError as error:   # the audit queue is full or the log is closed
            for i in recorded:
                outcomes[i] = error
            answer(outcomes)

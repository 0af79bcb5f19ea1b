"""A generic micro-batcher: collects items submitted on an event loop into
batches and runs each batch on a worker thread.

It knows nothing of what the items are. Its owner gives it ``run_batch(items,
done)``, called on ``executor`` with the batch's live items; ``run_batch``
must call ``done(results)`` exactly once, one result per item, from any
thread and at any time (the Authority calls it once the batch's audit commit
is on disk, from the audit writer's thread). Results go back to their
submitters on the event loop, one hand-off per batch.

A batch closes when it holds ``max_batch`` items or ``max_delay_s`` after its
first item arrived, whichever comes first. At most ``concurrency`` batches
are running at once (1 for a signer with a thread of its own); while they
are, new items wait here, and the next batch leaves the moment a thread is
free with everything that arrived meanwhile, so under load batches grow with
the load instead of queueing up as many small ones. On a quiet server (no
batch in flight, recent batches of one) an item goes at once instead of
waiting out the window.

The number of items waiting or running is bounded: past ``queue_limit`` an
item is refused at once with Overloaded (RESOURCE_EXHAUSTED, which agents
retry). An item whose submitter gave up (a cancelled await, an abandoned
``Ticket``) is dropped before it reaches ``run_batch``, and again on the
thread just before it runs: no work is done for a caller that left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

from fastca.errors import CANotReady, FastcaError, Overloaded, SigningFailed
from fastca.observability.logging import get_logger

__all__ = ["Batcher", "Ticket"]

T = TypeVar("T")
R = TypeVar("R")
RunBatch = Callable[[list[T], Callable[[Sequence[R]], None]], None]

log = get_logger("fastca.batching")


class Ticket:
    """A callback submission's handle: ``abandon()`` when the caller goes
    away (its deadline passed, its stream was reset); the item is then
    dropped if it has not run yet, and its callback is never called."""

    __slots__ = ("abandoned", "_on_done")

    def __init__(self, on_done: Callable[[object], None]) -> None:
        self.abandoned = False
        self._on_done = on_done

    def abandon(self) -> None:
        self.abandoned = True


class _Call:
    """One submit/submit_many/submit_then: resolved once every item of it has a result."""

    __slots__ = ("future", "ticket", "results", "remaining")

    def __init__(self, size: int, future: asyncio.Future | None, ticket: Ticket | None) -> None:
        self.future = future
        self.ticket = ticket
        self.results: list[object] = [None] * size
        self.remaining = size

    @property
    def gone(self) -> bool:
        if self.ticket is not None:
            return self.ticket.abandoned
        return self.future is not None and self.future.done()

    def finish(self) -> None:
        if self.ticket is not None:
            if not self.ticket.abandoned:
                self.ticket._on_done(self.results[0])
        elif self.future is not None and not self.future.done():
            self.future.set_result(self.results)


# An item in a batch: the item, whose call it is, and where in that call.
_Entry = tuple[object, _Call, int]


class Batcher(Generic[T, R]):
    """``observe_batch(size, seconds)`` runs on the event loop after each batch."""

    def __init__(self, run_batch: RunBatch, executor: Executor, *, max_batch: int, max_delay_s: float,
                 queue_limit: int, concurrency: int = 1,
                 observe_batch: Callable[[int, float], None] | None = None) -> None:
        if concurrency < 1 or max_batch < 1 or queue_limit < 1:
            raise ValueError("concurrency, max_batch and queue_limit must be at least 1")
        self._run = run_batch
        self._executor = executor
        self._concurrency = concurrency
        self._running = 0            # batches on a thread now (<= concurrency)
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._queue_limit = queue_limit
        self._observe_batch = observe_batch
        self._pending: list[_Entry] = []
        self._outstanding = 0        # items taken and not yet resolved
        self._timer: asyncio.TimerHandle | None = None
        self._recent_batch = 1.0     # moving average of batch sizes: is anyone likely to join?
        self._in_flight = 0          # batches submitted and not yet resolved
        self._idle: asyncio.Event | None = None
        self._closed = False

    @property
    def depth(self) -> int:
        """Items waiting or running."""
        return self._outstanding

    @property
    def full(self) -> bool:
        return self._outstanding >= self._queue_limit

    async def submit(self, item: T) -> R:
        """The item's result (raises Overloaded / CANotReady if it cannot be taken)."""
        return (await self._submit_awaitable([item], all_or_nothing=True))[0]  # type: ignore[return-value]

    async def submit_many(self, items: Sequence[T]) -> list[R | Overloaded]:
        """One result per item, in order; items beyond the queue's room are
        refused individually with Overloaded and the rest go on."""
        if not items:
            return []
        return await self._submit_awaitable(list(items), all_or_nothing=False)  # type: ignore[return-value]

    def submit_then(self, item: T, on_done: Callable[[R], None]) -> Ticket:
        """Submit without a coroutine: ``on_done(result)`` runs on the event
        loop unless the returned ticket was abandoned first. Raises Overloaded
        or CANotReady at once if the item cannot be taken."""
        ticket = Ticket(on_done)  # type: ignore[arg-type]
        self.submit_ticket(item, ticket)
        return ticket

    def submit_ticket(self, item: T, ticket: Ticket) -> None:
        """``submit_then`` with a ticket made beforehand (so the item can know
        its own ticket before any thread sees it)."""
        self._check_room(1)
        self._take([item], _Call(1, None, ticket), asyncio.get_running_loop())

    # -- on the event loop -----------------------------------------------------

    def _check_room(self, wanted: int) -> int:
        if self._closed:
            raise CANotReady("the server is shutting down")
        room = self._queue_limit - self._outstanding
        if room < wanted:
            raise Overloaded(f"issuance queue full ({self._queue_limit})")
        return room

    async def _submit_awaitable(self, items: list[object], all_or_nothing: bool) -> list[object]:
        if all_or_nothing:
            room = self._check_room(len(items))
        else:
            room = self._check_room(0)
            if room <= 0:
                return [Overloaded(f"issuance queue full ({self._queue_limit})")] * len(items)
        taken = min(room, len(items))
        loop = asyncio.get_running_loop()
        call = _Call(taken, loop.create_future(), None)
        self._take(items[:taken], call, loop)
        results = await call.future   # type: ignore[misc]
        if taken < len(items):
            refused = Overloaded(f"issuance queue full ({self._queue_limit})")
            results = [*results, *([refused] * (len(items) - taken))]
        return results

    def _take(self, items: Sequence[object], call: _Call, loop: asyncio.AbstractEventLoop) -> None:
        for index, item in enumerate(items):
            self._pending.append((item, call, index))
        self._outstanding += len(items)
        if len(self._pending) >= self._max_batch or self._quiet(len(items)):
            self._flush()
        elif self._timer is None and self._running < self._concurrency:
            # (With every thread busy, the next free one takes these.)
            self._timer = loop.call_later(self._max_delay_s, self._flush)

    def _quiet(self, taken: int) -> bool:
        """Nothing else waiting or in flight and recent batches of one: a lone
        item on a quiet server does not pay the batch window."""
        return self._recent_batch < 1.5 and self._in_flight == 0 and len(self._pending) == taken

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._pending and self._running < self._concurrency:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
            batch = self._live(batch)
            if not batch:
                continue
            self._in_flight += 1
            self._running += 1
            self._recent_batch += 0.2 * (len(batch) - self._recent_batch)
            try:
                self._executor.submit(self._run_on_thread, loop, batch, time.perf_counter())
            except (RuntimeError, FastcaError):   # the executor is shut down, or belongs to another process
                self._running -= 1
                self._resolve(batch, [CANotReady("the server is shutting down")] * len(batch), None)
        self._note_if_idle()

    def _live(self, batch: list[_Entry]) -> list[_Entry]:
        """The entries whose callers still wait; the others are resolved as gone."""
        live = [entry for entry in batch if not entry[1].gone]
        if len(live) != len(batch):
            for _, call, _ in batch:
                if call.gone:
                    self._outstanding -= 1
        return live

    def _thread_free(self) -> None:
        self._running -= 1
        if self._pending:
            self._flush()

    def _resolve(self, batch: list[_Entry], results: Sequence[object], started: float | None) -> None:
        for (_, call, index), result in zip(batch, results):
            call.results[index] = result
            call.remaining -= 1
            self._outstanding -= 1
            if call.remaining == 0:
                call.finish()
        self._in_flight -= 1
        if started is not None and self._observe_batch is not None:
            self._observe_batch(len(batch), time.perf_counter() - started)
        self._note_if_idle()

    def _note_if_idle(self) -> None:
        if self._idle is not None and self._in_flight == 0 and not self._pending:
            self._idle.set()

    async def drain(self) -> None:
        """Stop taking items and finish every one already taken."""
        self._closed = True
        self._flush()
        while self._in_flight or self._pending:
            self._idle = asyncio.Event()
            await self._idle.wait()

    # -- on a worker thread -----------------------------------------------------

    def _run_on_thread(self, loop: asyncio.AbstractEventLoop, batch: list[_Entry], started: float) -> None:
        answered = False

        def answer(results: Sequence[object]) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            try:
                loop.call_soon_threadsafe(self._resolve, batch, results, started)
            except RuntimeError:
                pass   # the loop is closed: nobody is waiting any more

        try:
            # Checked again here: a caller who left while the batch waited for
            # a thread costs no work.
            live = [i for i, entry in enumerate(batch) if not entry[1].gone]
            results: list[object] = [CANotReady("the request was cancelled")] * len(batch)

            def done(live_results: Sequence[object]) -> None:
                if len(live_results) != len(live):
                    failed = SigningFailed(f"batch returned {len(live_results)} results for {len(live)} items")
                    answer([failed] * len(batch))
                    return
                for i, result in zip(live, live_results):
                    results[i] = result
                answer(results)

            if live:
                self._run([batch[i][0] for i in live], done)  # type: ignore[arg-type]
            else:
                answer(results)
        except FastcaError as error:
            answer([error] * len(batch))
        except Exception as error:  # a bug must fail this batch's calls, not hang them
            log.error("batch failed", error=f"{type(error).__name__}: {error}")
            answer([SigningFailed(f"batch error: {type(error).__name__}: {error}")] * len(batch))
        finally:
            try:
                loop.call_soon_threadsafe(self._thread_free)
            except RuntimeError:
                pass   # the loop is closed: nothing waits for this thread any more

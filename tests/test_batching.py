"""The generic micro-batcher, with a run_batch of its own (it knows nothing
of certificates): batch sizes, the queue bound, callers who leave, the quiet
server, the busy thread, concurrency, and bugs in run_batch."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastca.batching import Batcher
from fastca.errors import CANotReady, FastcaError, Overloaded, SigningFailed


class Doubling:
    """run_batch: doubles each item, remembering batch sizes; optionally
    held at a gate, answering from another thread, or failing."""

    def __init__(self, gate: threading.Event | None = None, answer_later: bool = False, bug: Exception | None = None):
        self.batches: list[list[int]] = []
        self.gate = gate
        self.answer_later = answer_later
        self.bug = bug
        self.lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0

    def __call__(self, items, done):
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            if self.gate is not None:
                self.gate.wait(10)
            if self.bug is not None:
                raise self.bug
            self.batches.append(list(items))
            results = [item * 2 if item >= 0 else ValueError_(item) for item in items]
            if self.answer_later:     # as the audit commit does: from another thread, after returning
                threading.Timer(0.01, done, args=(results,)).start()
            else:
                done(results)
        finally:
            with self.lock:
                self.inside -= 1

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


class ValueError_(FastcaError):
    pass


def _batcher(run, executor, **settings) -> Batcher:
    options = dict(max_batch=16, max_delay_s=0.005, queue_limit=1000)
    options.update(settings)
    return Batcher(run, executor, **options)


def test_concurrent_items_share_batches_and_results_come_back_in_place():
    run = Doubling(answer_later=True)
    with ThreadPoolExecutor(2) as executor:
        batcher = _batcher(run, executor, concurrency=2)

        async def main():
            return await asyncio.gather(*(batcher.submit(i) for i in range(64)))

        results = asyncio.run(main())
    assert results == [2 * i for i in range(64)]
    assert sum(run.sizes) == 64 and max(run.sizes) == 16 and len(run.sizes) <= 8 and batcher.depth == 0


def test_one_items_error_stays_its_own():
    run = Doubling()
    with ThreadPoolExecutor(1) as executor:
        batcher = _batcher(run, executor)
        results = asyncio.run(batcher.submit_many([1, -1, 3]))
    assert results[0] == 2 and results[2] == 6 and isinstance(results[1], ValueError_)


def test_queue_bound_and_drain():
    gate = threading.Event()
    run = Doubling(gate=gate)
    with ThreadPoolExecutor(1) as executor:
        batcher = _batcher(run, executor, max_batch=2, max_delay_s=0.001, queue_limit=3)

        async def main():
            waiting = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
            await asyncio.sleep(0.05)
            assert batcher.depth == 3 and batcher.full
            with pytest.raises(Overloaded):
                await batcher.submit(9)
            with pytest.raises(Overloaded):
                batcher.submit_then(9, lambda result: None)
            gate.set()
            drain = asyncio.ensure_future(batcher.drain())
            results = await asyncio.gather(*waiting)
            await drain
            with pytest.raises(CANotReady):
                await batcher.submit(1)
            return results

        results = asyncio.run(main())
    assert results == [0, 2, 4] and batcher.depth == 0


def test_submit_many_keeps_order_and_refuses_only_what_does_not_fit():
    gate = threading.Event()
    run = Doubling(gate=gate)
    with ThreadPoolExecutor(1) as executor:
        batcher = _batcher(run, executor, max_batch=4, queue_limit=6)

        async def main():
            holding = asyncio.ensure_future(batcher.submit_many([100, 101]))
            await asyncio.sleep(0.05)
            partly = asyncio.ensure_future(batcher.submit_many(list(range(6))))
            await asyncio.sleep(0.05)
            refused = await batcher.submit_many([7, 8])      # no room at all: each refused, the call is not
            gate.set()
            return await holding, await partly, refused

        held, partly, refused = asyncio.run(main())
    assert held == [200, 202]
    assert partly[:4] == [0, 2, 4, 6] and all(isinstance(r, Overloaded) for r in partly[4:])
    assert len(refused) == 2 and all(isinstance(r, Overloaded) for r in refused)


def test_a_cancelled_caller_is_not_run():
    gate = threading.Event()
    run = Doubling(gate=gate)
    with ThreadPoolExecutor(1) as executor:
        batcher = _batcher(run, executor, max_batch=1, max_delay_s=0.001, queue_limit=10)

        async def main():
            first = asyncio.ensure_future(batcher.submit(1))
            await asyncio.sleep(0.02)            # first is running, blocked on the gate
            second = asyncio.ensure_future(batcher.submit(2))
            await asyncio.sleep(0)
            second.cancel()
            gate.set()
            await first
            await batcher.drain()

        asyncio.run(main())
    assert run.batches == [[1]] and batcher.depth == 0


def test_submit_then_calls_back_on_the_loop_and_an_abandoned_ticket_is_dropped():
    gate = threading.Event()
    run = Doubling(gate=gate)
    with ThreadPoolExecutor(1) as executor:
        batcher = _batcher(run, executor, max_batch=1, max_delay_s=0.001, queue_limit=10)

        async def main():
            loop = asyncio.get_running_loop()
            seen: list[tuple[int, bool]] = []
            done = asyncio.Event()

            def on_done(result):
                seen.append((result, loop is asyncio.get_running_loop()))
                done.set()

            batcher.submit_then(5, on_done)
            await asyncio.sleep(0.02)             # 5 is running, held at the gate
            left = batcher.submit_then(6, lambda result: seen.append((result, False)))
            left.abandon()                        # its caller went away (deadline, reset stream)
            gate.set()
            await done.wait()
            await batcher.drain()
            return seen

        seen = asyncio.run(main())
    assert seen == [(10, True)] and run.batches == [[5]] and batcher.depth == 0


def test_a_lone_item_skips_the_window_and_load_still_batches():
    run = Doubling()
    with ThreadPoolExecutor(1) as executor:
        batcher = _batcher(run, executor, max_delay_s=0.5)

        async def main():
            loop = asyncio.get_running_loop()
            lone = []
            for i in range(3):
                started = loop.time()
                await batcher.submit(i)
                lone.append(loop.time() - started)
            burst = await asyncio.gather(*(batcher.submit(i) for i in range(40)))
            return lone, burst

        lone, burst = asyncio.run(main())
    # A quiet server does not hold an item for the 0.5 s window...
    assert max(lone) < 0.25, lone
    assert run.sizes[:3] == [1, 1, 1]
    # ...and a burst after the quiet spell is still batched, not sent one by one.
    assert len(burst) == 40 and sum(run.sizes[3:]) == 40
    assert max(run.sizes[3:]) == 16 and len(run.sizes) - 3 <= 5


def test_items_arriving_while_the_thread_is_busy_leave_as_one_batch():
    # The thread is busy; items keep arriving over several batch windows. They
    # wait in the batcher, not in the executor's queue, and go together the
    # moment the thread is free.
    gate = threading.Event()
    run = Doubling(gate=gate)
    with ThreadPoolExecutor(1) as executor:
        batcher = _batcher(run, executor, max_batch=64, max_delay_s=0.002, concurrency=1)

        async def main():
            first = asyncio.ensure_future(batcher.submit(0))
            await asyncio.sleep(0.02)
            later = []
            for i in range(1, 21):
                later.append(asyncio.ensure_future(batcher.submit(i)))
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.01)
            assert run.batches == [] and batcher.depth == 21
            gate.set()
            return await asyncio.gather(first, *later)

        results = asyncio.run(main())
    assert results == [2 * i for i in range(21)] and run.sizes == [1, 20]


@pytest.mark.parametrize("concurrency", [1, 2])
def test_at_most_concurrency_batches_run_at_once(concurrency):
    gate = threading.Event()
    run = Doubling(gate=gate)
    with ThreadPoolExecutor(4) as executor:
        batcher = _batcher(run, executor, max_batch=2, max_delay_s=0.001, concurrency=concurrency)

        async def main():
            calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(8)]
            await asyncio.sleep(0.05)
            gate.set()
            return await asyncio.gather(*calls)

        results = asyncio.run(main())
    assert len(results) == 8 and sum(run.sizes) == 8 and run.most_inside == concurrency
    with pytest.raises(ValueError):
        Batcher(run, executor, max_batch=2, max_delay_s=0.001, queue_limit=10, concurrency=0)


def test_a_bug_in_run_batch_fails_its_batch_and_the_batcher_goes_on():
    run = Doubling(bug=KeyError("a bug"))
    with ThreadPoolExecutor(1) as executor:
        batcher = _batcher(run, executor, max_batch=4, max_delay_s=0.002, queue_limit=10)

        async def main():
            first = await asyncio.gather(*(batcher.submit(i) for i in range(3)))
            run.bug = None
            second = await batcher.submit(4)
            await batcher.drain()
            return first, second

        first, second = asyncio.run(main())
    assert all(isinstance(r, SigningFailed) and "KeyError" in str(r) for r in first), first
    assert second == 8 and batcher.depth == 0


def test_a_run_batch_that_loses_results_fails_the_batch():
    def lossy(items, done):
        done([item for item in items][:-1])

    with ThreadPoolExecutor(1) as executor:
        batcher = _batcher(lossy, executor, max_batch=4)
        results = asyncio.run(batcher.submit_many([1, 2, 3]))
    assert all(isinstance(r, SigningFailed) for r in results)

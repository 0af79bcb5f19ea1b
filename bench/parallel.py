"""Run one function in several spawned processes that start their timed
part together.

Each process gets its own interpreter (spawn, not fork: PKCS#11 libraries
and gRPC must not be inherited across fork). A worker is called as
``fn(*args, go)``: it does its setup (connect, open the token...), then
calls ``go()``, which blocks until every worker is ready and returns the
common start time (``time.monotonic()`` is one clock for all processes on
Linux); what it returns is sent back to the parent.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any, Self

__all__ = ["Parallel", "run_parallel", "sleep_until"]

_GO_LEAD_S = 0.2           # from "everyone is ready" to the common start


def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _child(fn: Callable[..., Any], args: tuple, index: int, ready: Any, go_event: Any, start_at: Any,
           results: Any, ready_timeout_s: float) -> None:
    def go() -> float:
        ready.put(index)
        if not go_event.wait(ready_timeout_s):
            raise TimeoutError("the parent never said go")
        return start_at.value

    try:
        results.put((index, True, fn(*args, go)))
    except BaseException:  # noqa: BLE001 - whatever it is, the parent must hear of it
        results.put((index, False, traceback.format_exc()))


class Parallel:
    """``with Parallel(fn, [args...]) as run: start = run.go(); ...; run.results()``"""

    def __init__(self, fn: Callable[..., Any], args_per_process: list[tuple], *, ready_timeout_s: float = 120.0):
        context = multiprocessing.get_context("spawn")
        self._ready = context.Queue()
        self._results = context.Queue()
        self._go = context.Event()
        self._start_at = context.Value("d", 0.0)
        self._ready_timeout_s = ready_timeout_s
        self._processes = [
            context.Process(target=_child, daemon=True,
                            args=(fn, args, i, self._ready, self._go, self._start_at, self._results, ready_timeout_s))
            for i, args in enumerate(args_per_process)]

    def __enter__(self) -> Self:
        for process in self._processes:
            process.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        for process in self._processes:
            if exc_type is not None and process.is_alive():
                process.terminate()
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)

    def go(self) -> float:
        """Wait until every worker is ready; return the common start time.
        A worker that fails during its setup is reported at once."""
        deadline = time.monotonic() + self._ready_timeout_s
        ready = 0
        while ready < len(self._processes):
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not get ready in time")
            try:
                self._ready.get(timeout=0.2)
                ready += 1
            except queue.Empty:
                self._raise_early_failure()
        self._start_at.value = time.monotonic() + _GO_LEAD_S
        self._go.set()
        return self._start_at.value

    def results(self, timeout_s: float) -> list[Any]:
        """Every worker's return value, in worker order."""
        deadline = time.monotonic() + timeout_s
        collected: dict[int, Any] = {}
        while len(collected) < len(self._processes):
            try:
                index, ok, value = self._results.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(self._processes) - len(collected)} workers did not finish in time")
                dead = [i for i, p in enumerate(self._processes) if p.exitcode not in (None, 0) and i not in collected]
                if dead:
                    raise RuntimeError(f"workers {dead} died without a result") from None
                continue
            if not ok:
                raise RuntimeError(f"worker {index} failed:\n{value}")
            collected[index] = value
        return [collected[i] for i in range(len(self._processes))]

    def _raise_early_failure(self) -> None:
        try:
            index, ok, value = self._results.get_nowait()
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in self._processes):
                raise RuntimeError("a worker died before it was ready") from None
            return
        raise RuntimeError(f"worker {index} {'finished' if ok else 'failed'} before it was ready:\n{value}")


def run_parallel(fn: Callable[..., Any], args_per_process: list[tuple], *, timeout_s: float) -> list[Any]:
    with Parallel(fn, args_per_process) as run:
        run.go()
        return run.results(timeout_s)

"""`fastca serve --workers N`: N server processes sharing one port.

grpcio opens its listening sockets with SO_REUSEPORT, so N processes bound
to the same address share the incoming connections (the kernel spreads
them), each with its own event loop, its own PKCS#11 initialisation and
login, and its own signing session. Workers are started with the "spawn"
method: nothing PKCS#11 ever crosses a fork, and the supervisor itself
never touches PKCS#11.

The supervisor restarts a worker that dies (at most ``_MAX_RESTARTS`` in
``_RESTART_WINDOW_S``, then it gives up and stops everything, since a
worker that keeps dying is a configuration or HSM problem, not a blip) and
forwards SIGTERM to all of them for a graceful shutdown.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

from fastca.config import CAConfig
from fastca.errors import ConfigurationError
from fastca.observability.logging import configure_logging, get_logger

__all__ = ["supervise"]

_MAX_RESTARTS = 5
_RESTART_WINDOW_S = 60.0
_STARTUP_TIMEOUT_S = 120.0

log = get_logger("fastca.supervisor")


def _worker_config(config: CAConfig, index: int) -> CAConfig:
    """Each worker has its own metrics endpoint (its own registry): the
    configured port plus the worker's index (port 0 stays "any"). Only
    worker 0 runs the trust-bundle publisher."""
    metrics = config.server.metrics_listen
    if metrics:
        host, _, port = metrics.rpartition(":")
        metrics = f"{host}:{int(port) + index if int(port) else 0}"
    update: dict[str, Any] = {"server": config.server.model_copy(update={"metrics_listen": metrics})}
    if index and config.trust.kubernetes.enabled:
        # One process per replica contends for the trust-bundle Lease: worker 0.
        update["trust"] = config.trust.model_copy(
            update={"kubernetes": config.trust.kubernetes.model_copy(update={"enabled": False})})
    return config.model_copy(update=update)


def _worker_main(state_dir: str, config_data: dict[str, Any], index: int, ready: Any) -> None:
    import asyncio

    import uvloop

    from fastca.frontend.server import CAServer

    configure_logging()
    config = CAConfig.from_mapping(config_data, source="worker configuration")

    async def run() -> None:
        # One worker reports the issuance monitor's alerts; every one keeps the scores.
        server = CAServer.from_state(Path(state_dir), config, reports_alerts=index == 0)
        # Each attempt while the HSM is awaited tells the supervisor this
        # worker is alive and why it is not serving yet.
        await server.run_until_signalled(on_waiting=lambda reason: ready.put((index, None, reason)),
                                         on_serving=lambda ports: ready.put((index, os.getpid(), ports)))

    uvloop.run(run())


class _Supervisor:
    def __init__(self, state_dir: Path, config: CAConfig, workers: int) -> None:
        self._state_dir = state_dir
        self._config = config
        self._count = workers
        self._context = multiprocessing.get_context("spawn")
        self._ready = self._context.Queue()
        self._processes: dict[int, multiprocessing.process.BaseProcess] = {}
        self._restarts: deque[float] = deque()
        self._stopping = False

    def _start(self, index: int) -> None:
        data = _worker_config(self._config, index).model_dump(mode="json")
        process = self._context.Process(target=_worker_main, name=f"fastca-worker-{index}",
                                        args=(str(self._state_dir), data, index, self._ready))
        process.start()
        self._processes[index] = process

    def _await_ready(self, indexes: set[int]) -> dict[int, tuple[int, dict[str, int]]]:
        reported: dict[int, tuple[int, dict[str, int]]] = {}
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while indexes - set(reported):
            if self._stopping:
                raise ConfigurationError("stopped before every worker was serving")
            if time.monotonic() > deadline:
                raise ConfigurationError("workers did not start in time")
            for index in indexes - set(reported):
                if not self._processes[index].is_alive():
                    raise ConfigurationError(f"worker {index} exited during start "
                                             f"(code {self._processes[index].exitcode}); see its log above")
            try:
                index, pid, ports = self._ready.get(timeout=0.2)
            except queue.Empty:
                continue
            if pid is None:
                # Waiting for its HSM: not stuck, so no deadline while it says so.
                deadline = time.monotonic() + _STARTUP_TIMEOUT_S
                continue
            reported[index] = (pid, ports)
        return reported

    def run(self) -> int:
        # A port of 0 ("any") is chosen here, once, for every worker: a socket
        # bound to it with SO_REUSEPORT holds it (without listening, so it
        # takes no connections) until the supervisor exits.
        reserved: list[socket.socket] = []
        updates: dict[str, str] = {}
        for key in ("listen", "mtls_listen"):
            address = getattr(self._config.server, key)
            if address and address.rpartition(":")[2] == "0":
                held, updates[key] = _reserve_port(address)
                reserved.append(held)
        if updates:
            server = self._config.server.model_copy(update=updates)
            self._config = self._config.model_copy(update={"server": server})
        try:
            return self._run()
        finally:
            for held in reserved:
                held.close()

    def _run(self) -> int:
        port = self._config.server.listen.rpartition(":")[2]
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            # One after the other: SoftHSM's file store was seen to miss its
            # token now and then when two processes initialised it at once.
            reported = {}
            for index in range(self._count):
                self._start(index)
                reported.update(self._await_ready({index}))
        except BaseException:
            self._stop_all()
            raise
        log.info("serving", workers=self._count, pids=[pid for pid, _ in reported.values()],
                 ports={"grpc": int(port), "metrics": [ports.get("metrics") for _, ports in
                                                        sorted(reported.values(), key=lambda r: r[0])]},
                 worker_ports={index: ports for index, (_, ports) in reported.items()})
        while not self._stopping:
            time.sleep(0.2)
            for index, process in list(self._processes.items()):
                if self._stopping or process.is_alive():
                    continue
                if not self._may_restart():
                    log.error("workers keep dying; stopping", worker=index, exit_code=process.exitcode)
                    self._stop_all()
                    return 1
                log.error("worker died; restarting", worker=index, pid=process.pid, exit_code=process.exitcode)
                self._start(index)
                try:
                    pid, _ = self._await_ready({index})[index]
                except ConfigurationError as error:
                    log.error("worker restart failed", worker=index, reason=str(error))
                    continue
                log.info("worker restarted", worker=index, pid=pid)
        self._stop_all()
        log.info("stopped")
        return 0

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > _RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= _MAX_RESTARTS:
            return False
        self._restarts.append(now)
        return True

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self._stopping:
            log.info("shutting down", reason="signal", workers=self._count)
        self._stopping = True

    def _stop_all(self) -> None:
        self._stopping = True
        for process in self._processes.values():
            if process.is_alive():
                process.terminate()            # SIGTERM: each worker shuts down gracefully
        deadline = time.monotonic() + self._config.server.shutdown_grace_seconds + 10
        for process in self._processes.values():
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


def _reserve_port(address: str) -> tuple[socket.socket, str]:
    """Bind ``host:0`` with SO_REUSEPORT; (the socket, ``host:port``)."""
    host = address.rpartition(":")[0]
    bare = host.strip("[]")
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(bare or None, 0, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise ConfigurationError(f"cannot listen on {address}: {error}") from None
    held = socket.socket(family, kind, proto)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(sockaddr)
    except OSError as error:
        held.close()
        raise ConfigurationError(f"cannot listen on {address}: {error.strerror}") from None
    return held, f"{host}:{held.getsockname()[1]}"


def supervise(state_dir: Path, config: CAConfig, workers: int) -> int:
    return _Supervisor(state_dir, config, workers).run()

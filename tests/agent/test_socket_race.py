"""No other user can ever connect to the SDS socket, not even while the agent
starts (issue 13): the agent starts again and again under ``umask 0`` in a
world-writable directory while a process running as ``nobody`` connects to
every path it can find there (and inside every directory it finds there) as
fast as it can.

Running a process as another user needs root: this test fails, loudly, when
it is not run as root, rather than passing without having tried."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest

from fastca.agent.sds import SdsServer
from tests.agent._fake_source import FakeSource, tls_item

NOBODY = 65534
STARTS = 200                  # a start/stop cycle takes a few milliseconds
# The name the agent binds inside its staging directory (sds._StagingDirectory).
# The attacker also connects to whatever it can list inside any directory, so
# the guess matters only for a directory it may enter but not read.
STAGING_SOCKET_NAME = "s"


@pytest.fixture(autouse=True)
def _root_required() -> None:
    if os.geteuid() != 0:
        pytest.fail("tests/agent/test_socket_race.py must run as root: it runs the attacker as uid "
                    f"{NOBODY} (nobody); running as uid {os.geteuid()}, nothing would be tested", pytrace=False)


def _attack(directory: Path, target: Path, ready_w: int, stop_r: int, result_w: int) -> None:
    """The other user (runs in the forked child): connect() to the socket
    path and to ``<entry>/s`` for every entry of the directory, until the
    parent closes ``stop_r``; reports ``attempts successes refused_for_permission``."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    os.set_blocking(stop_r, False)
    os.write(ready_w, b"r")
    attempts = successes = permission_denied = 0

    def try_connect(path: str) -> None:
        nonlocal attempts, successes, permission_denied
        attempts += 1
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            successes += 1
        except PermissionError:
            permission_denied += 1
        except OSError:
            pass
        finally:
            probe.close()

    def probe_directory() -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            try_connect(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if not is_dir:
                continue
            try_connect(os.path.join(entry.path, STAGING_SOCKET_NAME))
            try:
                inside = [e.path for e in os.scandir(entry.path)]
            except OSError:
                continue
            for path in inside:
                try_connect(path)

    loops = 0
    while True:
        loops += 1
        if loops % 32 == 0:
            try:
                if os.read(stop_r, 1) == b"":
                    break
            except BlockingIOError:
                pass
        try_connect(str(target))
        probe_directory()
    os.write(result_w, f"{attempts} {successes} {permission_denied}".encode())


def _run_attacker(directory: Path, target: Path) -> tuple[int, int, int, int]:
    """Fork the attacker; its pid and the ready, stop and result pipe ends."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                        # the child never returns into pytest
        code = 1
        try:
            os.close(stop_w)
            _attack(directory, target, ready_w, stop_r, result_w)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(stop_r)
    os.close(result_w)
    return pid, ready_r, stop_w, result_r


def test_no_other_user_can_connect_while_the_agent_starts() -> None:
    directory = Path(tempfile.mkdtemp(prefix="sds-race-", dir="/tmp"))
    os.chmod(directory, 0o777)                          # pre-existing, world-writable, no sticky bit
    target = directory / "socket"
    pid, ready_r, stop_w, result_r = _run_attacker(directory, target)
    served = 0

    async def start_and_stop_repeatedly() -> None:
        nonlocal served
        source = FakeSource(tls_item())
        for attempt in range(STARTS):
            server = SdsServer(source, socket_path=target)
            await asyncio.wait_for(server.start(), 5)
            try:
                assert stat.S_ISSOCK(target.lstat().st_mode)
                assert stat.S_IMODE(target.lstat().st_mode) == 0o600
                if attempt % 50 == 0:                   # it really serves, to its own user
                    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    probe.connect(str(target))
                    probe.close()
                    served += 1
            finally:
                await asyncio.wait_for(server.stop(0), 5)

    try:
        assert os.read(ready_r, 1) == b"r"              # the attacker is looping before the first start
        previous_umask = os.umask(0)
        try:
            asyncio.run(asyncio.wait_for(start_and_stop_repeatedly(), 60))
        finally:
            os.umask(previous_umask)
        time.sleep(0.05)
    finally:
        os.close(stop_w)
        result = os.read(result_r, 100).decode()
        _, status = os.waitpid(pid, 0)
        for fd in (ready_r, result_r):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, "the attacking process failed"
    attempts, successes, permission_denied = map(int, result.split())
    assert served == STARTS // 50
    # The attacker did reach the socket while it existed (so the test can fail)…
    assert permission_denied > 0, f"the attacker never found the socket ({attempts} attempts)"
    # …and never got in.
    assert successes == 0, f"another user connected {successes} times in {attempts} attempts"
    assert sorted(p.name for p in directory.iterdir()) == [], "the agent left files behind"
    directory.rmdir()

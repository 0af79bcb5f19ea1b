"""The embedded SoftHSM2 token: a token directory and configuration of its
own under the state directory, so fastca never touches the system's tokens.

softhsm2-util takes PINs either on its command line (where any user can read
them in the process listing) or at a terminal prompt; fastca answers the
prompt through a pseudo-terminal so the PINs never appear in argv.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import subprocess
import time
from pathlib import Path

from fastca.errors import ConfigurationError

__all__ = ["SOFTHSM_MODULE_CANDIDATES", "find_softhsm_module", "write_softhsm_conf", "init_token",
           "write_secret_file", "new_pin"]

SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
_TOKEN_INIT_TIMEOUT_S = 30.0


def find_softhsm_module() -> str:
    override = os.environ.get("FASTCA_SOFTHSM_MODULE")
    for path in ((override,) if override else SOFTHSM_MODULE_CANDIDATES):
        if path and os.path.exists(path):
            return path
    raise ConfigurationError("SoftHSM2 is not installed (apt-get install softhsm2), "
                             "or set FASTCA_SOFTHSM_MODULE to libsofthsm2.so")


def new_pin() -> str:
    return secrets.token_urlsafe(24)


def write_secret_file(path: Path, value: str) -> None:
    """Create a 0600 file atomically; the secret never exists world-readable."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    os.replace(tmp, path)


def write_softhsm_conf(state_dir: Path) -> Path:
    tokens = state_dir / "tokens"
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = state_dir / "softhsm2.conf"
    conf.write_text(
        "# SoftHSM2 configuration of fastca's embedded token (written by `fastca init`).\n"
        f"directories.tokendir = {tokens.resolve()}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n")
    return conf


def init_token(conf: Path, label: str, so_pin: str, user_pin: str) -> None:
    """Initialise a free SoftHSM slot as token ``label`` with the given PINs."""
    util = shutil.which("softhsm2-util")
    if util is None:
        raise ConfigurationError("softhsm2-util not found: apt-get install softhsm2")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    answers = [so_pin, so_pin, user_pin, user_pin]
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([util, "--init-token", "--free", "--label", label],
                                stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    finally:
        os.close(slave)
    transcript = b""
    deadline = time.monotonic() + _TOKEN_INIT_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal, it is exiting
                break
            if not chunk:
                break
            transcript += chunk
            if answers and transcript.rstrip().endswith(b"PIN:"):
                os.write(master, (answers.pop(0) + "\n").encode())
                transcript = b""
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise ConfigurationError("softhsm2-util did not finish initialising the token") from None
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        # The transcript after the prompts holds softhsm2-util's message, not a PIN
        # (PIN echo is masked with '*').
        message = transcript.decode(errors="replace").strip().splitlines()
        raise ConfigurationError(f"softhsm2-util --init-token failed: {message[-1] if message else proc.returncode}")

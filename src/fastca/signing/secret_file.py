"""Reading a file that holds a secret (a PKCS#11 PIN, a software CA key).

Such a file must be private to its owner: one that group or others can read
or write is refused, as ssh refuses an unprotected private key, because using
it silently keeps a secret that may already have leaked in service. The
check is made on the opened file (fstat), so a swap between check and read
cannot slip a different file in. Errors name the path, never the contents.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastca.errors import ConfigurationError

__all__ = ["read_secret_file"]


def read_secret_file(path: Path, what: str, max_bytes: int) -> bytes:
    """The contents of ``path`` (at most ``max_bytes``), if only its owner may access it."""
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & 0o077:
                raise ConfigurationError(
                    f"the {what} {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                    f"it holds a secret: run `chmod 600 {path}`")
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise ConfigurationError(f"the {what} {path} is larger than {max_bytes} bytes")
    return data

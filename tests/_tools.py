"""External programs the suite runs, found in one place.

A tool is looked up first in the project's virtual environment (next to the
interpreter running the tests: pip puts pkilint's commands there), then on the
system PATH. A missing tool fails the test with the install step that provides
it, never a bare FileNotFoundError and never a skip: CI runs with a scrubbed
environment (.ci/run), so anything found here came from dev/install or dev/test.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

__all__ = ["tool", "INSTALL_STEPS"]

# Which install step provides each tool the suite calls.
INSTALL_STEPS: dict[str, str] = {
    "lint_pkix_cert": "the test extras: .venv/bin/pip install -e '.[test]' (pkilint), done by dev/test",
    "lint_pkix_signer_signee_cert_chain": "the test extras: .venv/bin/pip install -e '.[test]' (pkilint), "
                                          "done by dev/test",
    "openssl": "apt-get install openssl (dev/install)",
    "certtool": "apt-get install gnutls-bin (dev/install)",
    "softhsm2-util": "apt-get install softhsm2 (dev/install)",
    "h2load": "apt-get install nghttp2-client (dev/test)",
}


def _venv_bin() -> Path:
    # Not resolved: .venv/bin/python is a symlink to the base interpreter,
    # and the venv's scripts live beside the link.
    return Path(sys.executable).parent


def tool(name: str) -> str:
    """The absolute path of ``name``; fails the calling test if it is missing."""
    candidate = _venv_bin() / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is not None:
        return found
    step = INSTALL_STEPS.get(name, "see README.md, 'Two commands'")
    pytest.fail(f"the test needs {name!r}, found neither in {_venv_bin()} nor on PATH "
                f"({os.environ.get('PATH', '')}); it comes from {step}", pytrace=False)

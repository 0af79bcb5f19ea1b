"""The suite's one way of finding external programs (tests/_tools.py)."""

import sys
from pathlib import Path

import pytest

from tests._tools import tool


def test_venv_tools_are_found_without_the_venv_on_path(monkeypatch):
    # CI runs with PATH scrubbed to the system's directories; pkilint lives in the venv only.
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    found = tool("lint_pkix_cert")
    assert Path(found).parent == Path(sys.executable).parent


def test_system_tools_come_from_path():
    assert Path(tool("openssl")).name == "openssl"


def test_a_missing_tool_fails_naming_its_install_step(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match=r"'certtool'.*apt-get install gnutls-bin"):
        tool("certtool")

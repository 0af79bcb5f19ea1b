"""The generated modules in fastca/proto are kept in the tree, so what they
demand of the installed runtime must be what pyproject.toml promises: a
user whose protobuf or grpcio is older than the generator gets pip's
resolution error at install time, not an ImportError at the first call."""

from __future__ import annotations

import importlib
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "src" / "fastca" / "proto"


def _requirement(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lower bound, exclusive upper bound) of a dependency in pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        match = re.fullmatch(rf"{re.escape(name)}>=([\d.]+),<([\d.]+)", spec.replace(" ", ""))
        if match:
            return (tuple(map(int, match.group(1).split("."))), tuple(map(int, match.group(2).split("."))))
    raise AssertionError(f"{name} has no '>=X,<Y' range in pyproject.toml")


def _generated_protobuf_version(path: Path) -> tuple[int, int, int]:
    text = path.read_text()
    match = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),"
                      r"\s*(\d+),", text)
    assert match, f"{path.name} has no runtime version check"
    return tuple(int(group) for group in match.groups())  # type: ignore[return-value]


def _generated_grpc_version(path: Path) -> tuple[int, ...]:
    match = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", path.read_text())
    assert match, f"{path.name} has no grpc version check"
    return tuple(map(int, match.group(1).split(".")))


@pytest.mark.parametrize("module", sorted(p.name for p in PROTO.glob("*_pb2.py")))
def test_protobuf_range_is_what_the_generated_code_needs(module):
    lower, upper = _requirement("protobuf")
    generated = _generated_protobuf_version(PROTO / module)
    # The runtime check demands the same major version and at least the generator's minor.patch.
    assert lower == generated and upper == (generated[0] + 1,), (lower, upper, generated)


@pytest.mark.parametrize("module", sorted(p.name for p in PROTO.glob("*_pb2_grpc.py")))
def test_grpcio_range_is_what_the_generated_stubs_need(module):
    lower, _ = _requirement("grpcio")
    assert lower == _generated_grpc_version(PROTO / module)


def test_an_older_protobuf_runtime_is_refused_with_the_upgrade_it_needs(monkeypatch):
    """What a user who forced an older protobuf would see: a clear VersionError
    naming the version to install (simulated: the runtime reports one minor
    version below the generator's)."""
    from google.protobuf import runtime_version

    major, minor, patch = _generated_protobuf_version(PROTO / "istio_ca_pb2.py")
    monkeypatch.setattr(runtime_version, "MINOR", minor - 1)
    for name in [m for m in sys.modules if m.startswith("fastca.proto.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(runtime_version.VersionError, match=f"{major}.{minor}.{patch}"):
        importlib.import_module("fastca.proto.istio_ca_pb2")

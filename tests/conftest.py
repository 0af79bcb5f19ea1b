"""Shared fixtures: a real SoftHSM2 token for the whole session, CAs whose
keys live in it, and the agent-made CSRs from tests/vectors.

SoftHSM reads its configuration once per process (at C_Initialize), so every
in-process test shares one token directory; tests that need the embedded
default's own token run `fastca` as a subprocess.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastca.ca import hsm, softhsm
from fastca.ca.certificates import self_signed_root
from fastca.ca.material import CAMaterial, validate_material
from fastca.signing.pkcs11 import Pkcs11Signer
from fastca.signing.pkcs11_uri import Pkcs11Uri

VECTORS = Path(__file__).parent / "vectors"
AGENT_CSRS = VECTORS / "agent-csrs"
TEST_TOKEN = "fastca-test"


@dataclass(frozen=True)
class AgentCsr:
    name: str
    pem: bytes
    key_pem: bytes
    spiffe_id: str


def agent_csrs(prefix: str = "") -> list[AgentCsr]:
    out = []
    for path in sorted(AGENT_CSRS.glob(f"{prefix}*.csr.pem")):
        stem = path.name[: -len(".csr.pem")]
        out.append(AgentCsr(stem, path.read_bytes(), (AGENT_CSRS / f"{stem}.key.pem").read_bytes(),
                            (AGENT_CSRS / f"{stem}.id").read_text().strip()))
    return out


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pkcs11Uri, str]:
    """(URI of the session's token with a PIN file, SoftHSM conf path)."""
    base = tmp_path_factory.mktemp("softhsm")
    conf = softhsm.write_softhsm_conf(base)
    pin = softhsm.new_pin()
    softhsm.write_secret_file(base / "pin", pin)
    softhsm.init_token(conf, TEST_TOKEN, softhsm.new_pin(), pin)
    # As a user of an existing SoftHSM would: the module finds its tokens
    # through SOFTHSM2_CONF (fastca's embedded token passes its own path).
    os.environ["SOFTHSM2_CONF"] = str(conf)
    uri = Pkcs11Uri(token=TEST_TOKEN, module_path=softhsm.find_softhsm_module(),
                    pin_source=f"file:{base / 'pin'}")
    return uri, str(conf)


@dataclass
class TokenCA:
    signer: Pkcs11Signer
    material: CAMaterial
    key_uri: Pkcs11Uri
    root_pem: Path


_CA_CACHE: dict[str, TokenCA] = {}


def token_ca(softhsm_token: tuple[Pkcs11Uri, str], key_type: str, tmp_dir: Path) -> TokenCA:
    """A self-signed CA whose key is generated in the session token."""
    if key_type in _CA_CACHE:
        return _CA_CACHE[key_type]
    base_uri, conf = softhsm_token
    uri = base_uri.with_object(f"ca-{key_type}", "private")
    hsm.generate_key(uri, key_type, conf)
    signer = Pkcs11Signer(uri, softhsm_conf=conf)
    now = dt.datetime.now(dt.timezone.utc)
    root = self_signed_root(signer, "cluster.local", now=now)
    material = validate_material(root, [], [root], now)
    root_pem = tmp_dir / f"root-{key_type}.pem"
    root_pem.write_text(material.root_bundle_pem)
    _CA_CACHE[key_type] = TokenCA(signer, material, uri, root_pem)
    return _CA_CACHE[key_type]


@pytest.fixture(scope="session")
def ca_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ca")


@pytest.fixture(scope="session", params=["ec-p256", "rsa-2048"])
def any_token_ca(request: pytest.FixtureRequest, softhsm_token, ca_tmp) -> TokenCA:
    return token_ca(softhsm_token, request.param, ca_tmp)


@pytest.fixture(scope="session")
def ec_token_ca(softhsm_token, ca_tmp) -> TokenCA:
    return token_ca(softhsm_token, "ec-p256", ca_tmp)


def run_fastca(*args: str, env: dict[str, str] | None = None, check: bool = True,
               input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, in its own process (its own PKCS#11 state)."""
    full_env = dict(os.environ)
    full_env.pop("SOFTHSM2_CONF", None)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "fastca", *args], capture_output=True, text=True,
                          env=full_env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"fastca {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc

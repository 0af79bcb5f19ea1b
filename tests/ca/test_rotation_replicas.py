"""Acceptance (issue 14, rotation): an intermediate under an upstream root,
rotated while two replicas serve one port (SO_REUSEPORT) from one state
directory, with the key generated in and used from one network HSM
(`p11-kit server` exporting the SoftHSM token; the replicas and the
command line load p11-kit-client.so). Both replicas follow the plan's
phases on their own, with no restart; once activated, every certificate
either of them returns is signed by the new intermediate and chains to the
upstream root, which the bundle carried all along."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
from cryptography import x509

from tests.ca._upstream import UpstreamRoot
from tests.conftest import agent_csrs, run_fastca
from tests.frontend.agent_client import AgentClient
from tests.frontend.conftest import apiserver, service_account_token, tokenreview_config, write_config  # noqa: F401
from tests.frontend.replicas import replicas_on_a_network_hsm
from tests._tools import tool
from tests.trust.test_replicas import _until

WATCH = 0.5


def _phase_of(replica) -> str:
    body = urllib.request.urlopen(f"http://127.0.0.1:{replica.ports['metrics']}/metrics", timeout=10).read().decode()
    on = [line for line in body.splitlines() if line.startswith("fastca_ca_rotation_phase{")
          and 'signer="default"' in line and line.endswith(" 1.0")]
    return on[0].split('phase="')[1].split('"')[0] if len(on) == 1 else "?"


def _chains(address: str, root_pem: bytes, count: int) -> list[list[str]]:
    """``count`` certificates, each over a new connection (either replica)."""
    csrs = [c.pem for c in agent_csrs()]
    out = []
    for n in range(count):
        client = AgentClient(address, root_pem, token=service_account_token("shop", "cart"))
        try:
            out.append(client.create_certificate(csrs[n % len(csrs)], timeout=10))
        except grpc.RpcError as error:
            raise AssertionError(f"call {n}: {error.code().name} {error.details()}") from None
    return out


def _verifies(chain: list[str], root_pem: bytes, tmp: Path) -> bool:
    (tmp / "leaf.pem").write_text(chain[0])
    (tmp / "mid.pem").write_text("".join(chain[1:-1]))
    (tmp / "root.pem").write_bytes(root_pem)
    proc = subprocess.run([tool("openssl"), "verify", "-CAfile", str(tmp / "root.pem"), "-untrusted",
                           str(tmp / "mid.pem"), str(tmp / "leaf.pem")], capture_output=True, text=True)
    return proc.returncode == 0


def _status(state: Path, env: dict[str, str]) -> dict:
    return json.loads(run_fastca("ca", "status", "--state", str(state), "--json", env=env).stdout)


def test_an_intermediate_rotates_under_two_replicas_and_a_network_hsm(tmp_path: Path, apiserver):  # noqa: F811
    state = tmp_path / "state"
    upstream = UpstreamRoot("Corp Root")
    run_fastca("init", "--state", str(state), "--csr-out", str(tmp_path / "first.csr"))
    upstream.sign_csr_into(tmp_path / "first.csr", tmp_path / "first")
    run_fastca("init", "--state", str(state), "--install-cert", str(tmp_path / "first" / "ca-cert.pem"),
               "--root", str(tmp_path / "first" / "root-cert.pem"))
    write_config(state, {"authn": {"tokenreview": [tokenreview_config(apiserver, tmp_path / "api-token")]},
                         "policy": {"rate_limit": {"per_identity_per_second": 0}},
                         "server": {"ca_watch_seconds": WATCH}})
    with replicas_on_a_network_hsm(state) as shared:
        replicas, address, env = shared.servers, shared.address, shared.env
        pids = [r.process.pid for r in replicas]
        first = x509.load_pem_x509_certificate((tmp_path / "first" / "ca-cert.pem").read_bytes())
        for chain in _chains(address, upstream.pem, 6):
            assert x509.load_pem_x509_certificate(chain[1].encode()) == first
            assert chain[-1].encode() == upstream.pem
        assert [_phase_of(r) for r in replicas] == ["steady", "steady"]

        # An intermediate cannot make its own root: the new key's CSR goes upstream.
        refused = run_fastca("ca", "rotate", "start", "--state", str(state), env=env, check=False)
        assert refused.returncode == 2 and "--csr-out" in refused.stderr
        run_fastca("ca", "rotate", "start", "--state", str(state), "--csr-out", str(tmp_path / "next.csr"),
                   "--activate-after", "1h", env=env)
        _until(lambda: [_phase_of(r) for r in replicas] == ["awaiting-certificate"] * 2, 10, "both replicas waiting")
        status = _status(state, env)
        assert status["phase"] == "awaiting-certificate"
        assert "object=fastca-ca-" in status["plan"]["next_key"]          # a new key in the same token
        upstream.sign_csr_into(tmp_path / "next.csr", tmp_path / "next")
        run_fastca("ca", "rotate", "install-cert", "--state", str(state), "--cert",
                   str(tmp_path / "next" / "ca-cert.pem"), "--root", str(tmp_path / "next" / "root-cert.pem"), env=env)
        _until(lambda: [_phase_of(r) for r in replicas] == ["distributing"] * 2, 10, "both replicas distributing")
        for chain in _chains(address, upstream.pem, 4):          # the old intermediate still signs
            assert x509.load_pem_x509_certificate(chain[1].encode()) == first

        run_fastca("ca", "rotate", "activate", "--state", str(state), env=env)
        took = _until(lambda: [_phase_of(r) for r in replicas] == ["signing-with-new-key"] * 2, 10,
                      "both replicas signing with the new key")
        print(f"both replicas switched {took:.2f}s after `rotate activate`")
        time.sleep(WATCH)
        second = x509.load_pem_x509_certificate((tmp_path / "next" / "ca-cert.pem").read_bytes())
        for chain in _chains(address, upstream.pem, 16):
            assert x509.load_pem_x509_certificate(chain[1].encode()) == second
            assert chain[-1].encode() == upstream.pem
        assert _verifies(chain, upstream.pem, tmp_path)
        for replica in replicas:
            assert any(e.get("event") == "signing with the rotated CA" for e in replica.log_events())
            issued = [e for e in replica.log_events() if e.get("event") == "certificate issued"
                      and e.get("credential") != "self"]
            assert issued, "each replica answered some of the calls"

        run_fastca("ca", "rotate", "finish", "--state", str(state), "--force", env=env)
        _until(lambda: [_phase_of(r) for r in replicas] == ["steady"] * 2, 10, "both replicas steady")
        for chain in _chains(address, upstream.pem, 4):
            assert x509.load_pem_x509_certificate(chain[1].encode()) == second
        assert [r.process.pid for r in replicas] == pids and all(r.process.poll() is None for r in replicas)

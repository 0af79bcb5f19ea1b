"""The command line as a user runs it."""

import json

import pytest
from cryptography import x509

from tests.conftest import AGENT_CSRS, VECTORS, run_fastca


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli") / "state"
    run_fastca("init", "--state", str(directory), "--trust-domain", "example.org")
    return directory


def test_issue_prints_istio_chain(state):
    identity = "spiffe://example.org/ns/default/sa/web"
    out = run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec384-0001.csr.pem"),
                     "--identity", identity, "--ttl", "3600").stdout
    certificates = x509.load_pem_x509_certificates(out.encode())
    assert len(certificates) == 2  # leaf, then the root bundle
    leaf, root = certificates
    assert root == x509.load_pem_x509_certificate((state / "root-cert.pem").read_bytes())
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == [identity]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() == 3600 + 120


def test_issue_rejects_bad_input_clearly(state, tmp_path):
    garbage = tmp_path / "garbage.csr"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n")
    proc = run_fastca("issue", "--state", str(state), "--csr", str(garbage),
                      "--identity", "spiffe://example.org/ns/a/sa/b", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("fastca: error:") and "Traceback" not in proc.stderr
    proc = run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0000.csr.pem"),
                      "--identity", "spiffe://Example.org/ns/a/sa/b", check=False)
    assert proc.returncode == 2 and "trust domain" in proc.stderr.lower()
    proc = run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0000.csr.pem"),
                      "--identity", "spiffe://example.org/ns/a/sa/b", "--ttl", str(10**9), check=False)
    assert proc.returncode == 2 and "max allowed TTL" in proc.stderr


def test_inspect_certificate_table_and_json(state):
    table = run_fastca("inspect", str(state / "root-cert.pem")).stdout
    for expected in ("O=example.org", "basicConstraints (critical)", "CA:TRUE", "sha256 fingerprint"):
        assert expected in table
    described = json.loads(run_fastca("inspect", str(state / "root-cert.pem"), "--json").stdout)
    assert described[0]["kind"] == "certificate" and described[0]["subject"] == "O=example.org"


def test_inspect_csr(tmp_path):
    described = json.loads(run_fastca("inspect", str(AGENT_CSRS / "rsa2048-0002.csr.pem"), "--json").stdout)[0]
    assert described["kind"] == "csr" and described["signature_valid"] is True
    assert described["key"] == "RSA 2048 (e=65537)"
    assert described["sans"] == ["URI:" + (AGENT_CSRS / "rsa2048-0002.id").read_text().strip()]


def test_inspect_chain_shows_every_certificate():
    described = json.loads(run_fastca("inspect", str(VECTORS / "istio/plugged-ca/workload-foo-cert.pem"),
                                      "--json").stdout)
    assert len(described) == 2


def test_inspect_rejects_non_certificates(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x30\x03\x02\x01")
    proc = run_fastca("inspect", str(junk), check=False)
    assert proc.returncode == 2 and "not a certificate or CSR" in proc.stderr


def test_issue_is_audited_with_the_cli_and_the_local_user(state):
    import os
    import pwd

    identity = "spiffe://example.org/ns/ops/sa/typed-by-hand"
    issued = json.loads(run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0003.csr.pem"),
                                   "--identity", identity, "--json").stdout)
    record = json.loads(run_fastca("audit", "show", issued["serial"], "--state", str(state), "--json").stdout)
    assert record["serial"] == issued["serial"] and record["identity"] == identity
    assert record["credential_type"] == "cli"
    assert record["caller_identities"] == [f"unix:{pwd.getpwuid(os.geteuid()).pw_name}(uid={os.geteuid()})"]
    assert record["fingerprint_sha256"] == issued["sha256"]


def test_issue_refuses_to_sign_when_the_audit_log_cannot_be_written(state, tmp_path):
    import os

    before = run_fastca("audit", "list", "--state", str(state), "--json").stdout
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    proc = run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0003.csr.pem"),
                      "--identity", "spiffe://example.org/ns/ops/sa/x", check=False,
                      env={"FASTCA_AUDIT__PATH": str(blocked / "audit.db")})
    assert proc.returncode == 2 and "audit log" in proc.stderr and "BEGIN CERTIFICATE" not in proc.stdout
    assert run_fastca("audit", "list", "--state", str(state), "--json").stdout == before
    assert os.path.getsize(blocked) == 0


def test_risk_and_flagged_on_a_log_without_alerts(state, tmp_path):
    """`fastca risk` replays the log: one CSR issued by the operator for two
    identities is a replayed CSR and a key reuse (and, with no learning
    period configured, a new identity); nothing is flagged, since flags are
    the server's; a state without a log says so."""
    for identity in ("spiffe://example.org/ns/ops/sa/one", "spiffe://example.org/ns/ops/sa/two"):
        run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0002.csr.pem"),
                   "--identity", identity)
    env = {"FASTCA_MONITORING__LEARNING_SECONDS": "0"}
    report = json.loads(run_fastca("risk", "--state", str(state), "--json", env=env).stdout)
    assert report["records_read"] >= 2 and report["threshold"] == 50
    top = report["subjects"][0]
    assert top["identity"] == "spiffe://example.org/ns/ops/sa/two"
    assert [s["signal"] for s in top["signals"]] == ["csr_replay", "key_reuse", "new_identity"]   # newest first
    assert top["score"] == pytest.approx(75, abs=0.5) and top["high_risk"]
    table = run_fastca("risk", "--state", str(state), "--identity", "spiffe://example.org/ns/ops/sa/two",
                       env={**env, "COLUMNS": "400"}).stdout
    assert "key_reuse" in table and "was certified for spiffe://example.org/ns/ops/sa/one" in table
    assert json.loads(run_fastca("audit", "list", "--state", str(state), "--flagged", "--json").stdout) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = run_fastca("risk", "--state", str(empty), check=False)
    assert refused.returncode != 0 and "no audit log" in refused.stderr


@pytest.mark.parametrize(("monitoring", "message"), [
    ({"policy": {"default": {"actions": ["refuse"]}}}, "set [monitoring] enabled = true"),
    ({"enabled": True, "policy": {"payments": {"actions": ["refuse"]}}}, "names no configured signer: payments"),
    ({"enabled": True, "policy": {"default": {"actions": ["quarantine"]}}}, "monitoring.policy.default.actions"),
])
def test_serve_refuses_a_risk_policy_it_cannot_apply(tmp_path, monitoring, message):
    import tomllib

    import tomli_w

    state = tmp_path / "state"
    run_fastca("init", "--state", str(state))
    config = state / "fastca.toml"
    config.write_text(tomli_w.dumps({**tomllib.loads(config.read_text()), "monitoring": monitoring}))
    refused = run_fastca("serve", "--state", str(state), "--listen", "127.0.0.1:0", "--workers", "1", check=False)
    assert refused.returncode != 0 and message in refused.stderr, refused.stderr

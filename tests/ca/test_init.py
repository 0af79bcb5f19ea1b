"""`fastca init` end to end: real SoftHSM tokens, real files, the real CLI."""

import datetime as dt
from pathlib import Path
import json
import shutil
import stat
import os
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fastca.ca.init import InitOptions, init_ca
from fastca.ca.material import check_ca
from fastca.errors import ConfigurationError
from tests._tools import tool
from tests.conftest import AGENT_CSRS, VECTORS, run_fastca

PLUGGED = VECTORS / "istio" / "plugged-ca"


def _root(state):
    return x509.load_pem_x509_certificate((state / "root-cert.pem").read_bytes())


def test_embedded_default_creates_token_key_and_root(tmp_path):
    state = tmp_path / "state"
    out = json.loads(run_fastca("init", "--state", str(state), "--json").stdout)
    assert out["backend"] == "pkcs11" and out["trust_domain"] == "cluster.local"
    for name in ("fastca.toml", "root-cert.pem", "cert-chain.pem", "ca-cert.pem", "softhsm2.conf", "pin", "so-pin"):
        assert (state / name).exists(), name
    for secret in ("pin", "so-pin"):
        assert stat.S_IMODE((state / secret).stat().st_mode) == 0o600
    pin = (state / "pin").read_text().strip()
    assert pin not in (state / "fastca.toml").read_text()

    root = _root(state)
    assert root.subject == x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    assert root.issuer == root.subject
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == \
        x509.SubjectKeyIdentifier.from_public_key(root.public_key()).digest
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)
    root.verify_directly_issued_by(root)

    tokens = json.loads(run_fastca("hsm", "list", "--state", str(state), "--json").stdout)
    objects = [(o["label"], o["type"]) for t in tokens for o in t["objects"]]
    assert ("fastca-ca", "private") in objects and ("fastca-ca", "public") in objects
    assert all(pin not in o["uri"] for t in tokens for o in t["objects"])


def test_rerun_never_destroys_without_force(tmp_path):
    state = tmp_path / "state"
    run_fastca("init", "--state", str(state))
    before = (state / "root-cert.pem").read_bytes()
    proc = run_fastca("init", "--state", str(state), check=False)
    assert proc.returncode == 2
    assert "already holds a CA" in proc.stderr and "--force" in proc.stderr
    assert (state / "root-cert.pem").read_bytes() == before
    run_fastca("init", "--state", str(state), "--force", "--key-type", "rsa-2048")
    after = _root(state)
    assert (state / "root-cert.pem").read_bytes() != before
    assert isinstance(after.public_key(), rsa.RSAPublicKey) and after.public_key().key_size == 2048


def test_state_dir_from_environment(tmp_path):
    state = tmp_path / "from-env"
    run_fastca("init", env={"FASTCA_STATE_DIR": str(state)})
    assert (state / "fastca.toml").exists()


def test_import_istio_cacerts_then_issue_verifies_to_root(tmp_path):
    state = tmp_path / "state"
    run_fastca("init", "--state", str(state), "--import-istio-cacerts", str(PLUGGED))
    assert (state / "ca-cert.pem").read_bytes() == (PLUGGED / "ca-cert.pem").read_bytes()
    assert not (state / "ca-key.pem").exists()  # the key went into the token, not the state dir
    tokens = json.loads(run_fastca("hsm", "list", "--state", str(state), "--json").stdout)
    assert any(o["type"] == "private" and o["key_type"] == "RSA" for t in tokens for o in t["objects"])

    identity = "spiffe://cluster.local/ns/foo/sa/bar"
    out = run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "rsa2048-0000.csr.pem"),
                     "--identity", identity, "--json").stdout
    chain = json.loads(out)["cert_chain"]
    assert len(chain) >= 2 and all(element.endswith("\n") for element in chain)
    assert chain[-1] == (PLUGGED / "root-cert.pem").read_text()
    leaf_file = tmp_path / "leaf.pem"
    leaf_file.write_text(chain[0])
    untrusted = tmp_path / "untrusted.pem"
    untrusted.write_text("".join(chain[1:-1]))
    verify = subprocess.run([tool("openssl"), "verify", "-CAfile", str(PLUGGED / "root-cert.pem"),
                             "-untrusted", str(untrusted), str(leaf_file)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert leaf.issuer == x509.load_pem_x509_certificate((PLUGGED / "ca-cert.pem").read_bytes()).subject


def test_import_rejects_mismatched_key_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad-cacerts"
    shutil.copytree(PLUGGED, bad)
    other = rsa.generate_private_key(65537, 2048)
    (bad / "ca-key.pem").write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    state = tmp_path / "state"
    proc = run_fastca("init", "--state", str(state), "--import-istio-cacerts", str(bad), check=False)
    assert proc.returncode == 2 and "is not the key of" in proc.stderr
    assert not state.exists()


def test_csr_out_then_install_cert(tmp_path):
    state = tmp_path / "state"
    csr_file = tmp_path / "ca.csr"
    run_fastca("init", "--state", str(state), "--csr-out", str(csr_file), "--trust-domain", "corp.example")
    csr = x509.load_pem_x509_csr(csr_file.read_bytes())
    assert csr.is_signature_valid
    assert csr.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    proc = run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0000.csr.pem"),
                      "--identity", "spiffe://corp.example/ns/a/sa/b", check=False)
    assert proc.returncode == 2 and "install-cert" in proc.stderr

    upstream_key = ec.generate_private_key(ec.SECP384R1())
    upstream_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp Root")])
    now = dt.datetime.now(dt.timezone.utc)
    upstream = (x509.CertificateBuilder().subject_name(upstream_name).issuer_name(upstream_name)
                .public_key(upstream_key.public_key()).serial_number(1)
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(upstream_key.public_key()), critical=False)
                .sign(upstream_key, hashes.SHA384()))
    intermediate = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(upstream_name)
                    .public_key(csr.public_key()).serial_number(2)
                    .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                   critical=True)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
                    .sign(upstream_key, hashes.SHA384()))
    (tmp_path / "int.pem").write_bytes(intermediate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "root.pem").write_bytes(upstream.public_bytes(serialization.Encoding.PEM))
    run_fastca("init", "--state", str(state), "--install-cert", str(tmp_path / "int.pem"),
               "--root", str(tmp_path / "root.pem"))
    chain = json.loads(run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0000.csr.pem"),
                                  "--identity", "spiffe://corp.example/ns/a/sa/b", "--json").stdout)["cert_chain"]
    assert len(chain) == 3  # leaf, our intermediate, the upstream root
    (tmp_path / "leaf.pem").write_text(chain[0])
    (tmp_path / "mid.pem").write_text(chain[1])
    verify = subprocess.run([tool("openssl"), "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                             str(tmp_path / "mid.pem"), str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_install_cert_for_another_key_is_refused(tmp_path):
    state = tmp_path / "state"
    run_fastca("init", "--state", str(state), "--csr-out", str(tmp_path / "ca.csr"))
    proc = run_fastca("init", "--state", str(state), "--install-cert", str(PLUGGED / "ca-cert.pem"),
                      "--chain", str(PLUGGED / "cert-chain.pem"), "--root", str(PLUGGED / "root-cert.pem"),
                      check=False)
    assert proc.returncode == 2 and "not a certificate for this CA's key" in proc.stderr


def test_software_key_file_is_private(tmp_path):
    state = tmp_path / "state"
    run_fastca("init", "--state", str(state), "--software-key", "--key-type", "ec-p384")
    assert stat.S_IMODE((state / "ca-key.pem").stat().st_mode) == 0o600
    assert _root(state).public_key().curve.name == "secp384r1"


def test_existing_hsm_key_is_found_not_regenerated(softhsm_token, tmp_path):
    base, conf = softhsm_token
    uri = base.with_object("existing-hsm-key", "private")
    first = init_ca(tmp_path / "a", InitOptions(key_uri=str(uri)))
    root_a = _root(tmp_path / "a")
    init_ca(tmp_path / "b", InitOptions(key_uri=str(uri)))
    root_b = _root(tmp_path / "b")
    assert root_a.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
        == root_b.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert first.signer.key_uri == str(uri)
    check_ca(tmp_path / "a")


def test_unknown_key_type_rejected_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigurationError, match="unknown key type"):
        init_ca(tmp_path / "x", InitOptions(key_type="dsa-1024"))
    assert not (tmp_path / "x").exists()


def test_existing_softhsm_installation_via_bootstrap_script(tmp_path):
    """The "existing HSM" path as a user walks it: a token in a SoftHSM
    installation of its own (SOFTHSM2_CONF), then `fastca init --key-uri`."""
    import os
    import sys

    from fastca.ca import softhsm

    conf = softhsm.write_softhsm_conf(tmp_path / "system-hsm")
    env = {"SOFTHSM2_CONF": str(conf), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = Path(__file__).resolve().parents[2] / "hsm" / "bootstrap-softhsm-token"
    made = subprocess.run([str(script), "corp-hsm", str(tmp_path / "hsm.pin")], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)
    assert made.returncode == 0, made.stderr
    key_uri = made.stdout.strip()
    assert key_uri.startswith("pkcs11:token=corp-hsm;object=fastca-ca;type=private?")
    pin = (tmp_path / "hsm.pin").read_text().strip()
    assert pin not in key_uri
    state = tmp_path / "state"
    run_fastca("init", "--state", str(state), "--key-uri", key_uri, "--key-type", "ec-p384", env=env)
    assert _root(state).public_key().curve.name == "secp384r1"
    assert not (state / "tokens").exists()  # nothing embedded: the key lives in the user's installation
    out = run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0002.csr.pem"),
                     "--identity", "spiffe://cluster.local/ns/x/sa/y", env=env).stdout
    assert len(x509.load_pem_x509_certificates(out.encode())) == 2


def test_failed_init_leaves_nothing_half_written(tmp_path):
    state = tmp_path / "state"
    # The token is created, then the module cannot be found: the attempt fails late.
    proc = run_fastca("init", "--state", str(state), env={"FASTCA_SOFTHSM_MODULE": str(tmp_path / "missing.so")},
                      check=False)
    assert proc.returncode == 2 and "SoftHSM2" in proc.stderr
    assert sorted(p.name for p in state.iterdir()) == []
    run_fastca("init", "--state", str(state))
    assert (state / "fastca.toml").exists()


def test_stray_ca_files_without_config_need_force(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "root-cert.pem").write_text("left over\n")
    proc = run_fastca("init", "--state", str(state), check=False)
    assert proc.returncode == 2 and "no fastca.toml" in proc.stderr
    assert (state / "root-cert.pem").read_text() == "left over\n"
    run_fastca("init", "--state", str(state), "--force")
    assert (state / "fastca.toml").exists()


def _external_token(tmp_path: Path, label: str) -> tuple[dict[str, str], str]:
    """A token in a SoftHSM installation of its own; (environment, its user PIN)."""
    from fastca.ca import softhsm

    conf = softhsm.write_softhsm_conf(tmp_path / "hsm")
    pin = softhsm.new_pin()
    softhsm.init_token(conf, label, softhsm.new_pin(), pin)
    return {"SOFTHSM2_CONF": str(conf)}, pin


def test_pin_value_in_key_uri_moves_into_a_private_pin_file(tmp_path):
    """A PIN given inline works for every later start, and is kept only in a
    0600 file that pin-source names: never in fastca.toml, output or logs."""
    from fastca.ca.softhsm import find_softhsm_module

    env, pin = _external_token(tmp_path, "inline-pin")
    state = tmp_path / "state"
    key_uri = (f"pkcs11:token=inline-pin;object=fastca-ca;type=private?module-path={find_softhsm_module()}"
               f"&pin-value={pin}")
    init = run_fastca("init", "--state", str(state), "--key-uri", key_uri, env=env)
    config = (state / "fastca.toml").read_text()
    assert pin not in config and "pin-value" not in config
    assert f"pin-source=file:{(state / 'pin').resolve()}" in config
    assert stat.S_IMODE((state / "pin").stat().st_mode) == 0o600
    assert (state / "pin").read_text().strip() == pin
    issued = run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0001.csr.pem"),
                        "--identity", "spiffe://cluster.local/ns/x/sa/y", env=env)
    assert len(x509.load_pem_x509_certificates(issued.stdout.encode())) == 2
    from tests.frontend.conftest import start_server

    server = start_server(state, env=env)
    try:
        assert server.ports["grpc"] > 0
    finally:
        assert server.stop() == 0
    for text in (init.stdout, init.stderr, issued.stderr, server.log_file.read_text()):
        assert pin not in text


def test_a_pin_in_the_configuration_is_refused_without_echoing_it(tmp_path):
    state = tmp_path / "state"
    run_fastca("init", "--state", str(state))
    config = (state / "fastca.toml").read_text()
    secret = "pin-9f3a7c"
    (state / "fastca.toml").write_text(config.replace("&pin-source=", f"&pin-value={secret}&pin-source="))
    proc = run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0001.csr.pem"),
                      "--identity", "spiffe://cluster.local/ns/x/sa/y", check=False)
    assert proc.returncode == 2 and "pin-value" in proc.stderr and "chmod 600" in proc.stderr
    assert secret not in proc.stderr + proc.stdout


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o666])
def test_pin_file_readable_by_others_is_refused_everywhere(tmp_path, mode):
    """init, issue and serve alike name the file and the fix."""
    from fastca.ca.softhsm import find_softhsm_module

    env, pin = _external_token(tmp_path, f"perm-{mode:o}")
    pin_file = tmp_path / "hsm.pin"
    pin_file.write_text(pin + "\n")
    pin_file.chmod(mode)
    key_uri = (f"pkcs11:token=perm-{mode:o};object=fastca-ca;type=private?module-path={find_softhsm_module()}"
               f"&pin-source=file:{pin_file}")
    state = tmp_path / "state"
    refused = run_fastca("init", "--state", str(state), "--key-uri", key_uri, env=env, check=False)
    assert refused.returncode == 2
    assert str(pin_file) in refused.stderr and "chmod 600" in refused.stderr and pin not in refused.stderr
    pin_file.chmod(0o600)
    run_fastca("init", "--state", str(state), "--key-uri", key_uri, env=env)
    pin_file.chmod(mode)
    issue = run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0001.csr.pem"),
                       "--identity", "spiffe://cluster.local/ns/x/sa/y", env=env, check=False)
    assert issue.returncode == 2 and str(pin_file) in issue.stderr and "chmod 600" in issue.stderr
    serve = subprocess.run([sys.executable, "-m", "fastca", "serve", "--state", str(state), "--workers", "1",
                            "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
                           capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert serve.returncode != 0 and str(pin_file) in serve.stdout + serve.stderr
    assert "chmod 600" in serve.stdout + serve.stderr


def test_embedded_pin_file_loosened_by_hand_is_refused(tmp_path):
    state = tmp_path / "state"
    run_fastca("init", "--state", str(state))
    (state / "pin").chmod(0o644)
    proc = run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0001.csr.pem"),
                      "--identity", "spiffe://cluster.local/ns/x/sa/y", check=False)
    assert proc.returncode == 2 and str((state / "pin").resolve()) in proc.stderr and "chmod 600" in proc.stderr

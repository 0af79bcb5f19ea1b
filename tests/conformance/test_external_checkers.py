"""Every profile through parsers fastca did not write: OpenSSL, GnuTLS,
pkilint, and pyca's CertificateBuilder as a differential oracle."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from fastca.ca.material import validate_material
from fastca.authority import IssueRequest
from fastca.signing.software import SoftwareSigner
from tests._tools import tool as tool_path
from tests.authority._support import Issuing
from tests.conftest import VECTORS, agent_csrs, token_ca
from tests.conformance.profile import check_workload_certificate

CSR_KINDS = ["rsa2048", "ec256", "ec384"]
SPIFFE_FALSE_POSITIVE = "pkix.invalid_uri_syntax"


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def _pkilint_findings(tool: str, *files: Path) -> list[dict]:
    command = tool_path(tool)
    proc = _run([command, "lint", "-s", "ERROR", "-f", "JSON", *map(str, files)] if tool == "lint_pkix_cert"
                else [command, "lint", *map(str, files)])
    if tool != "lint_pkix_cert":
        return [] if proc.returncode == 0 else [{"output": proc.stdout + proc.stderr}]
    findings = []
    for result in json.loads(proc.stdout)["results"]:
        for finding in result["finding_descriptions"]:
            # The one documented false positive: pkilint's URI grammar rejects every spiffe:// URI.
            if finding["code"] == SPIFFE_FALSE_POSITIVE and "spiffe://" in (finding["message"] or ""):
                continue
            findings.append({"path": result["node_path"], **finding})
    return findings


@pytest.fixture(scope="module", params=["ec-p256", "ec-p384", "rsa-2048", "istio-plugged-ca"])
def ca(request, softhsm_token, ca_tmp):
    if request.param == "istio-plugged-ca":
        directory = VECTORS / "istio" / "plugged-ca"
        key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
        signing = x509.load_pem_x509_certificate((directory / "ca-cert.pem").read_bytes())
        roots = x509.load_pem_x509_certificates((directory / "root-cert.pem").read_bytes())
        material = validate_material(signing, [], roots, dt.datetime.now(dt.timezone.utc))
        root_pem = directory / "root-cert.pem"
        # Istio's 2018 sample CA certificates predate RFC 5280 strictness (no
        # critical BasicConstraints, no SKI/AKI): OpenSSL's -x509_strict judges
        # those, not our leaf, so it is kept for CAs fastca made.
        return material, SoftwareSigner(key), root_pem, False
    made = token_ca(softhsm_token, request.param, ca_tmp)
    return made.material, made.signer, made.root_pem, True


@pytest.mark.parametrize("kind", CSR_KINDS)
def test_issued_certificates_pass_every_checker(ca, kind, tmp_path):
    material, signer, root_pem, ours = ca
    issuer = Issuing(material, signer, tmp_path)
    strict = ["-x509_strict"] if ours else []
    for agent in agent_csrs(kind):
        issued = issuer.issue(IssueRequest(agent.pem, agent.spiffe_id))
        csr = x509.load_pem_x509_csr(agent.pem)
        spki = csr.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        check_workload_certificate(issued.der, issuer_subject_der=material.subject_der,
                                   issuer_ski=material.subject_key_id, identity=agent.spiffe_id,
                                   spki_der=spki, rsa_key=kind.startswith("rsa"))

        leaf = tmp_path / f"{agent.name}.pem"
        leaf.write_text(issued.pem)
        middle = tmp_path / f"{agent.name}-mid.pem"
        middle.write_text("".join(issued.chain[1:-1]) or issued.chain[-1])
        whole = tmp_path / f"{agent.name}-chain.pem"
        whole.write_text("".join(issued.chain[:-1]))

        openssl = _run([tool_path("openssl"), "verify", *strict, "-purpose", "sslclient", "-CAfile", str(root_pem),
                        "-untrusted", str(middle), str(leaf)])
        assert openssl.returncode == 0 and ": OK" in openssl.stdout, openssl.stdout + openssl.stderr

        gnutls = _run([tool_path("certtool"), "--verify", "--load-ca-certificate", str(root_pem), "--infile", str(whole)])
        assert gnutls.returncode == 0 and "Chain verification output: Verified" in gnutls.stdout, \
            gnutls.stdout + gnutls.stderr

        assert _pkilint_findings("lint_pkix_cert", leaf) == []
        signer_cert = tmp_path / f"{agent.name}-signer.pem"
        signer_cert.write_bytes(material.signing_cert.public_bytes(serialization.Encoding.PEM))
        assert _pkilint_findings("lint_pkix_signer_signee_cert_chain", signer_cert, leaf) == []


def _reference_tbs(issued_der: bytes, csr: x509.CertificateSigningRequest, material, identity: str) -> bytes:
    """The same certificate built by pyca from the same inputs (signed by a
    throwaway key of the CA's type: only the TBS is compared)."""
    ours = x509.load_der_x509_certificate(issued_der)
    ca_public = material.signing_cert.public_key()
    if isinstance(ca_public, ec.EllipticCurvePublicKey):
        throwaway = ec.generate_private_key(ca_public.curve)
        digest = hashes.SHA384() if ca_public.curve.name == "secp384r1" else hashes.SHA256()
    else:
        throwaway = rsa.generate_private_key(65537, 2048)
        digest = hashes.SHA256()
    is_rsa = isinstance(csr.public_key(), rsa.RSAPublicKey)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([]))
               .issuer_name(material.signing_cert.subject)
               .public_key(csr.public_key())
               .serial_number(ours.serial_number)
               .not_valid_before(ours.not_valid_before_utc)
               .not_valid_after(ours.not_valid_after_utc)
               .add_extension(x509.KeyUsage(True, False, is_rsa, False, False, False, False, False, False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier(material.subject_key_id, None, None), critical=False)
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True))
    return builder.sign(throwaway, digest).tbs_certificate_bytes


@pytest.mark.parametrize("kind", CSR_KINDS)
def test_tbs_matches_pyca_certificate_builder(ca, kind, tmp_path):
    material, signer, _, _ = ca
    issuer = Issuing(material, signer, tmp_path)
    agent = agent_csrs(kind)[0]
    issued = issuer.issue(IssueRequest(agent.pem, agent.spiffe_id))
    ours = asn1_x509.Certificate.load(issued.der)["tbs_certificate"]
    reference = asn1_x509.TbsCertificate.load(
        _reference_tbs(issued.der, x509.load_pem_x509_csr(agent.pem), material, agent.spiffe_id))
    for field in ("version", "serial_number", "signature", "validity", "subject", "subject_public_key_info"):
        assert ours[field].dump() == reference[field].dump(), field
    # pyca re-encodes the Name it was given; equal as names, and ours is the CA's own bytes.
    assert ours["issuer"].native == reference["issuer"].native
    assert [(e["extn_id"].dotted, e["critical"].native, e["extn_value"].contents) for e in ours["extensions"]] == \
        [(e["extn_id"].dotted, e["critical"].native, e["extn_value"].contents) for e in reference["extensions"]]

"""The agent's CSRs match what Istio's agent (Go crypto/x509) makes: checked
against tests/vectors/agent-csrs, made by Istio's agent code."""

from __future__ import annotations

import pytest
from asn1crypto import csr as asn1_csr
from asn1crypto import pem as asn1_pem
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fastca.agent.csr import agent_csr, new_key, private_key_pem
from tests.conftest import agent_csrs

FIXTURES = agent_csrs()


def _der(pem: bytes) -> bytes:
    _, _, der = asn1_pem.unarmor(pem)
    return der


def _shape(request: asn1_csr.CertificationRequest) -> dict:
    """Everything but the key, the signature value and the URI."""
    info = request["certification_request_info"]
    attributes = []
    for attribute in info["attributes"]:
        values = []
        for extensions in attribute["values"]:
            for extension in extensions:
                names = extension["extn_value"].parsed
                values.append((extension["extn_id"].dotted, extension["critical"].native,
                               [name.name for name in names]))
        attributes.append((attribute["type"].dotted, values))
    return {
        "version": info["version"].native,
        "subject": info["subject"].dump(),
        "subject_tags": [[(atv["type"].dotted, atv["value"].chosen.tag, atv["value"].native) for atv in rdn]
                         for rdn in info["subject"].chosen],
        "key_algorithm": info["subject_pk_info"]["algorithm"].dump(),
        "attributes": attributes,
        "signature_algorithm": request["signature_algorithm"].dump(),
    }


def _uris(request: asn1_csr.CertificationRequest) -> list[str]:
    out = []
    for attribute in request["certification_request_info"]["attributes"]:
        for extensions in attribute["values"]:
            for extension in extensions:
                out += [name.native for name in extension["extn_value"].parsed if name.name == "uniform_resource_identifier"]
    return out


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_structure_matches_istio_agent_csr(fixture):
    key = serialization.load_pem_private_key(fixture.key_pem, None)
    ours = asn1_csr.CertificationRequest.load(_der(agent_csr(key, "spiffe://other.domain/ns/x/sa/y")))
    theirs = asn1_csr.CertificationRequest.load(_der(fixture.pem))
    assert _shape(ours) == _shape(theirs)
    assert _uris(ours) == ["spiffe://other.domain/ns/x/sa/y"]
    assert _uris(theirs) == [fixture.spiffe_id]
    # The empty O= is a PrintableString (tag 19), the only subject attribute.
    assert _shape(ours)["subject_tags"] == [[("2.5.4.10", 19, "")]]


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_same_key_and_id_give_the_same_request_info(fixture):
    """With Istio's key and ID, the signed part is byte-identical; RSA
    (PKCS#1 v1.5, deterministic) gives the whole CSR byte for byte."""
    key = serialization.load_pem_private_key(fixture.key_pem, None)
    ours_pem = agent_csr(key, fixture.spiffe_id)
    ours = asn1_csr.CertificationRequest.load(_der(ours_pem))
    theirs = asn1_csr.CertificationRequest.load(_der(fixture.pem))
    assert ours["certification_request_info"].dump() == theirs["certification_request_info"].dump()
    assert x509.load_pem_x509_csr(ours_pem).is_signature_valid
    if isinstance(key, rsa.RSAPrivateKey):
        assert _der(ours_pem) == _der(fixture.pem)


@pytest.mark.parametrize("key_type,check", [
    ("rsa-2048", lambda k: isinstance(k, rsa.RSAPrivateKey) and k.key_size == 2048 and k.public_key().public_numbers().e == 65537),
    ("ec-p256", lambda k: isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp256r1"),
    ("ec-p384", lambda k: isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp384r1"),
])
def test_new_key_types(key_type, check):
    key = new_key(key_type)
    assert check(key)
    csr = x509.load_pem_x509_csr(agent_csr(key, "spiffe://cluster.local/ns/a/sa/b"))
    assert csr.is_signature_valid
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/a/sa/b"]
    assert len(csr.extensions) == 1
    assert private_key_pem(key).startswith(b"-----BEGIN PRIVATE KEY-----")
    assert new_key(key_type).private_numbers() != key.private_numbers()


def test_unknown_key_type_rejected():
    with pytest.raises(ValueError):
        new_key("rsa-1024")

"""CSR acceptance (docs/cert-profile.md; RELIABILITY.md cases 8, 9, 11)."""

from __future__ import annotations

import base64
import ipaddress
import pickle
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from fastca._native.testing import (
    E_CSR_ALGORITHM,
    E_CSR_ENCODING,
    E_CSR_KEY,
    E_CSR_MALFORMED,
    E_CSR_SIGNATURE,
    MAX_CSR_BYTES,
    DerWriter,
    NativeError,
    load_csr_der,
    parse_csr,
    verify_csr,
)

from .factories import (
    OID_ECDSA_SHA1,
    OID_MD5_RSA,
    OID_RSA_PSS,
    OID_SHA1_RSA,
    OID_SHA256_RSA,
    SPIFFE_ID,
    agent_csrs,
    algorithm_identifier,
    certification_request,
    extension,
    extension_request_attribute,
    hand_csr,
    pyca_csr,
    request_info,
    spki_of,
)

# Hostile input must be refused without a pathological scan; this bounds
# that behaviour (the refusal itself takes microseconds), it is not a speed target.
HOSTILE_INPUT_BOUND_S = 1.0


def refused(code: str, data: bytes, check=verify_csr, **kwargs) -> str:
    start = time.perf_counter()
    with pytest.raises(NativeError) as caught:
        check(data, **kwargs)
    assert time.perf_counter() - start < HOSTILE_INPUT_BOUND_S
    assert caught.value.code == code, str(caught.value)
    return str(caught.value)


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


# --- what Istio's agent sends -------------------------------------------------------

@pytest.mark.parametrize("agent", agent_csrs(), ids=lambda a: a.name)
def test_agent_csrs_verify_and_agree_with_pyca(agent):
    info = verify_csr(agent.pem)
    pyca = x509.load_pem_x509_csr(agent.pem)
    assert info.der == pyca.public_bytes(serialization.Encoding.DER)
    assert info.info == pyca.tbs_certrequest_bytes
    assert info.subject == pyca.subject.public_bytes()
    assert info.spki == pyca.public_key().public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    assert info.signature == pyca.signature
    assert info.signature_algorithm == pyca.signature_algorithm_oid._name
    assert info.uris == [agent.spiffe_id]
    assert info.dns_names == [] and info.emails == [] and info.ip_addresses == []
    assert info.requested_extensions == ["2.5.29.17"]
    assert info.key_bits == pyca.public_key().key_size
    if agent.name.startswith("rsa"):
        assert (info.key_type, info.curve, info.rsa_exponent) == ("rsa", None, 65537)
    else:
        assert info.key_type == "ec" and info.rsa_exponent is None
        assert info.curve == pyca.public_key().curve.name


@pytest.mark.parametrize("agent", agent_csrs("ec256")[:1] + agent_csrs("rsa")[:1], ids=lambda a: a.name)
def test_der_and_both_pem_labels_are_accepted(agent):
    der = der_of(agent.pem)
    new_label = agent.pem.replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
    crlf = agent.pem.replace(b"\n", b"\r\n")
    for form in (der, new_label, crlf, b"\n  " + agent.pem + b"\n\n"):
        assert load_csr_der(form) == der
        assert verify_csr(form).der == der


def test_requested_sans_and_extensions_are_reported_not_trusted(p256_key):
    pem = pyca_csr(p256_key, uris=(SPIFFE_ID, "spiffe://other/x"), dns=("a.example",),
                   extra_extensions=[(x509.BasicConstraints(ca=True, path_length=None), True),
                                     (x509.KeyUsage(True, False, False, False, False, True, False, False, False),
                                      False)])
    pem_with_ip = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
                                     x509.RFC822Name("a@b.example")]), critical=False,
    ).sign(p256_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    info = verify_csr(pem)
    assert info.uris == [SPIFFE_ID, "spiffe://other/x"]
    assert info.dns_names == ["a.example"]
    assert info.requested_extensions == ["2.5.29.17", "2.5.29.19", "2.5.29.15"]
    info = verify_csr(pem_with_ip)
    assert info.ip_addresses == [bytes([10, 1, 2, 3])]
    assert info.emails == ["a@b.example"]


@pytest.mark.parametrize("bits", [3072, 4096])
def test_larger_rsa_keys_are_accepted(bits):
    key = rsa.generate_private_key(65537, bits)
    info = verify_csr(pyca_csr(key, algorithm=hashes.SHA384()))
    assert (info.key_bits, info.signature_algorithm) == (bits, "sha384WithRSAEncryption")


def test_p384_with_sha512_and_rsa_without_parameters_are_accepted(p384_key, rsa_key):
    assert verify_csr(pyca_csr(p384_key, algorithm=hashes.SHA512())).signature_algorithm == "ecdsa-with-SHA512"
    assert verify_csr(hand_csr(rsa_key, null_parameters=False)).key_type == "rsa"


# --- case 8: no proof of possession -------------------------------------------------

@pytest.mark.parametrize("agent", agent_csrs("ec256")[:1] + agent_csrs("ec384")[:1] + agent_csrs("rsa")[:1],
                         ids=lambda a: a.name)
def test_flipped_signature_bit_fails_proof_of_possession(agent):
    der = bytearray(der_of(agent.pem))
    der[-1] ^= 0x01
    parse_csr(bytes(der))               # still a well-formed CSR
    assert "proof of possession" in refused(E_CSR_SIGNATURE, bytes(der))


def test_csr_signed_by_key_a_carrying_key_b_is_refused(rsa_key, p256_key):
    other_rsa = rsa.generate_private_key(65537, 2048)
    refused(E_CSR_SIGNATURE, hand_csr(rsa_key, spki=spki_of(other_rsa)))
    refused(E_CSR_SIGNATURE, hand_csr(p256_key, spki=spki_of(ec.generate_private_key(ec.SECP256R1()))))


def test_truncated_rsa_signature_is_refused(rsa_key):
    info = request_info(spki_of(rsa_key))
    signature = rsa_key.sign(info, padding.PKCS1v15(), hashes.SHA256())
    der = certification_request(info, algorithm_identifier(OID_SHA256_RSA, True), signature[1:])
    assert "length" in refused(E_CSR_SIGNATURE, der)


# --- case 9: algorithms and keys ------------------------------------------------------

def test_sha1_rsa_is_refused_with_advice(rsa_key):
    message = refused(E_CSR_ALGORITHM, hand_csr(rsa_key, algorithm_oid=OID_SHA1_RSA, hash_algorithm=hashes.SHA1()))
    assert message == "CSR signature algorithm sha1WithRSAEncryption is not allowed; use SHA-256 or stronger"


def test_md5_and_ecdsa_sha1_are_refused(rsa_key, p256_key):
    md5 = certification_request(request_info(spki_of(rsa_key)), algorithm_identifier(OID_MD5_RSA, True),
                                b"\x01" * 256)
    assert "md5WithRSAEncryption" in refused(E_CSR_ALGORITHM, md5)
    assert "ecdsa-with-SHA1" in refused(
        E_CSR_ALGORITHM, hand_csr(p256_key, algorithm_oid=OID_ECDSA_SHA1, hash_algorithm=hashes.SHA1()))


def test_rsa_pss_is_refused(rsa_key):
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
    der = hand_csr(rsa_key, algorithm_oid=OID_RSA_PSS, null_parameters=False, rsa_padding=pss)
    assert "RSASSA-PSS" in refused(E_CSR_ALGORITHM, der)


def test_unknown_and_mismatched_algorithms_are_refused(rsa_key, p256_key):
    assert "1.2.3.4" in refused(E_CSR_ALGORITHM, hand_csr(rsa_key, algorithm_oid="1.2.3.4"))
    assert "does not match" in refused(E_CSR_ALGORITHM, hand_csr(rsa_key, algorithm_oid="1.2.840.10045.4.3.2",
                                                                 null_parameters=False))
    assert "parameters" in refused(E_CSR_ALGORITHM, hand_csr(p256_key, null_parameters=True))


@pytest.mark.parametrize("bits, exponent, says", [
    (1024, 65537, "1024 bits"),
    (2048, 3, "65537"),
])
def test_weak_rsa_keys_are_refused(bits, exponent, says):
    key = rsa.generate_private_key(exponent, bits)
    assert says in refused(E_CSR_KEY, pyca_csr(key), check=parse_csr)


@pytest.mark.parametrize("curve, name", [(ec.SECP521R1(), "secp521r1"), (ec.SECP256K1(), "secp256k1"),
                                         (ec.SECP224R1(), "secp224r1")])
def test_other_curves_are_refused(curve, name):
    key = ec.generate_private_key(curve)
    assert f"EC curve {name} is not allowed" in refused(E_CSR_KEY, pyca_csr(key), check=parse_csr)


def test_ed25519_is_refused_as_algorithm_and_as_key(rsa_key):
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = ed25519.Ed25519PrivateKey.generate()
    info = request_info(spki_of(key))
    ed25519_signed = certification_request(info, bytes.fromhex("300506032b6570"), key.sign(info))
    assert "Ed25519" in refused(E_CSR_ALGORITHM, ed25519_signed, check=parse_csr)
    rsa_signed_ed25519_key = hand_csr(rsa_key, spki=spki_of(key))
    assert "Ed25519 keys are not allowed" in refused(E_CSR_KEY, rsa_signed_ed25519_key, check=parse_csr)


P256 = {
    "p": "ffffffff00000001000000000000000000000000ffffffffffffffffffffffff",
    "a": "ffffffff00000001000000000000000000000000fffffffffffffffffffffffc",
    "b": "5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604b",
    "g": "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
         "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5",
    "n": "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551",
}


def ec_spki(parameters: bytes, point: bytes) -> bytes:
    w = DerWriter()
    w.begin(0x30)
    w.begin(0x30)
    w.oid("1.2.840.10045.2.1")
    w.raw(parameters)
    w.end()
    w.primitive(0x03, b"\x00" + point)
    w.end()
    return w.getvalue()


def explicit_p256_parameters() -> bytes:
    """SpecifiedECDomain (RFC 3279) spelling out P-256: what pyca accepts."""
    w = DerWriter()
    w.begin(0x30)
    w.integer(b"\x01")
    w.begin(0x30)
    w.oid("1.2.840.10045.1.1")
    w.integer(bytes.fromhex(P256["p"]))
    w.end()
    w.begin(0x30)
    w.primitive(0x04, bytes.fromhex(P256["a"]))
    w.primitive(0x04, bytes.fromhex(P256["b"]))
    w.end()
    w.primitive(0x04, bytes.fromhex(P256["g"]))
    w.integer(bytes.fromhex(P256["n"]))
    w.integer(b"\x01")
    w.end()
    return w.getvalue()


def uncompressed_point(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def test_explicit_ec_parameters_are_refused(p256_key):
    der = hand_csr(p256_key, spki=ec_spki(explicit_p256_parameters(), uncompressed_point(p256_key)))
    assert "explicit" in refused(E_CSR_KEY, der, check=parse_csr)


def test_point_not_on_curve_is_refused_as_a_key_problem(p256_key):
    point = bytearray(uncompressed_point(p256_key))
    point[-1] ^= 0x01
    der = hand_csr(p256_key, spki=ec_spki(bytes.fromhex("06082a8648ce3d030107"), bytes(point)))
    assert parse_csr(der).curve == "secp256r1"      # only the curve check knows
    assert "not a point on its curve" in refused(E_CSR_KEY, der)


def test_compressed_point_and_missing_curve_are_refused(p256_key):
    compressed = p256_key.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.CompressedPoint)
    der = hand_csr(p256_key, spki=ec_spki(bytes.fromhex("06082a8648ce3d030107"), compressed))
    assert "uncompressed" in refused(E_CSR_KEY, der, check=parse_csr)
    der = hand_csr(p256_key, spki=ec_spki(b"\x05\x00", uncompressed_point(p256_key)))
    assert "name its curve" in refused(E_CSR_KEY, der, check=parse_csr)


# --- case 11: hostile framing ---------------------------------------------------------

@pytest.fixture(scope="module")
def agent_pem() -> bytes:
    return agent_csrs("ec256")[0].pem


def nested(depth: int) -> bytes:
    headers, n = [], 0
    for _ in range(depth):
        header = bytes([0x30, n]) if n < 0x80 else \
            bytes([0x30, 0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
        headers.append(header)
        n += len(header)
    return b"".join(reversed(headers))


def test_empty_and_blank_inputs_are_refused():
    assert "empty" in refused(E_CSR_ENCODING, b"")
    assert "empty" in refused(E_CSR_ENCODING, b" \n\t\r\n")


def test_trailing_bytes_are_refused(agent_pem):
    der = der_of(agent_pem)
    assert "trailing" in refused(E_CSR_ENCODING, der + b"\x00")
    assert "trailing" in refused(E_CSR_ENCODING, der + der)
    assert "after the PEM block" in refused(E_CSR_ENCODING, agent_pem + b"junk\n")


def test_two_pem_blocks_are_refused(agent_pem):
    assert "more than one PEM block" in refused(E_CSR_ENCODING, agent_pem + agent_pem)
    assert "more than one PEM block" in refused(E_CSR_ENCODING, agent_pem + b"\n" + agent_pem.replace(
        b"CERTIFICATE REQUEST", b"CERTIFICATE"))


@pytest.mark.parametrize("mangle", [
    lambda body: body.replace(b"M", b"!", 1),
    lambda body: body + b"=",
    lambda body: b"Proc-Type: 4,ENCRYPTED\n" + body,
    lambda body: body[:10] + b"=" + body[11:],
    lambda body: body[:5],
    lambda body: b"",
])
def test_base64_garbage_is_refused(agent_pem, mangle):
    lines = agent_pem.split(b"\n")
    body = b"\n".join(lines[1:-2])
    pem = lines[0] + b"\n" + mangle(body) + b"\n" + lines[-2] + b"\n"
    refused(E_CSR_ENCODING, pem)


def test_non_canonical_base64_padding_bits_are_refused():
    der = b"\x30\x00"
    text = base64.b64encode(der)            # MAA=
    assert text == b"MAA="
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\nMAB=\n-----END CERTIFICATE REQUEST-----\n"
    assert "base64" in refused(E_CSR_ENCODING, pem)


@pytest.mark.parametrize("data", [
    b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
    b"-----BEGIN CERTIFICATE REQUEST-----\nMAA=\n",
    b"-----BEGIN CERTIFICATE REQUEST-----MAA=\n-----END CERTIFICATE REQUEST-----\n",
    b"hello",
    b"\x00\x01",
])
def test_other_framing_errors_are_refused(data):
    refused(E_CSR_ENCODING, data)


def test_hundred_thousand_nested_sequences_are_refused_quickly():
    assert "deeper than 32" in refused(E_CSR_MALFORMED, nested(100_000), max_size=1 << 20)
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(nested(40_000)) + \
        b"-----END CERTIFICATE REQUEST-----\n"
    refused(E_CSR_MALFORMED, pem, max_size=1 << 20)


def test_length_claiming_two_to_the_32_is_refused_quickly():
    assert "4 GiB" in refused(E_CSR_MALFORMED, bytes.fromhex("30850100000000") + b"\x00" * 64)
    assert "runs past" in refused(E_CSR_MALFORMED, bytes.fromhex("3084ffffffff") + b"\x00" * 64)


def test_indefinite_length_is_refused(agent_pem):
    der = der_of(agent_pem)
    assert "indefinite" in refused(E_CSR_MALFORMED, b"\x30\x80" + der[4:] + b"\x00\x00")


def test_size_cap_is_checked_first():
    assert MAX_CSR_BYTES == 65536
    assert "limit" in refused(E_CSR_ENCODING, b"\x30" * (MAX_CSR_BYTES + 1))
    assert "limit" in refused(E_CSR_ENCODING, b"x" * 101, max_size=100)


# --- strict structure ---------------------------------------------------------------------

def test_version_other_than_zero_is_refused(rsa_key):
    assert "version" in refused(E_CSR_MALFORMED, hand_csr(rsa_key, version=b"\x01"), check=parse_csr)


def test_explicit_critical_false_in_a_requested_extension_is_refused(p256_key):
    attributes = extension_request_attribute([extension("2.5.29.19", b"\x30\x00", critical=b"\x00")])
    assert "critical FALSE" in refused(E_CSR_MALFORMED, hand_csr(p256_key, attributes=attributes))


def test_duplicate_requested_extension_is_refused(p256_key):
    san = extension("2.5.29.17", bytes.fromhex("3006820461626364"))
    attributes = extension_request_attribute([san, san])
    assert "twice" in refused(E_CSR_MALFORMED, hand_csr(p256_key, attributes=attributes))


def test_malformed_requested_san_is_refused(p256_key):
    attributes = extension_request_attribute([extension("2.5.29.17", bytes.fromhex("30038201ff"))])
    assert "IA5String" in refused(E_CSR_MALFORMED, hand_csr(p256_key, attributes=attributes))
    attributes = extension_request_attribute([extension("2.5.29.17", bytes.fromhex("3000"))])
    assert "empty" in refused(E_CSR_MALFORMED, hand_csr(p256_key, attributes=attributes))


def test_missing_attributes_field_is_refused(p256_key):
    info = request_info(spki_of(p256_key))
    without_attributes = info[:1] + bytes([info[1] - 2]) + info[2:-2]
    assert info[-2:] == b"\xa0\x00"
    der = certification_request(without_attributes, bytes.fromhex("300a06082a8648ce3d040302"),
                                p256_key.sign(without_attributes, ec.ECDSA(hashes.SHA256())))
    assert "attributes" in refused(E_CSR_MALFORMED, der)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_csrs_fail_only_with_native_error(agent_pem, data):
    der = bytearray(der_of(agent_pem))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(der) - 1))
        der[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(der)))
    try:
        verify_csr(bytes(der[:cut]))
    except NativeError as error:
        assert error.code in (E_CSR_ENCODING, E_CSR_MALFORMED, E_CSR_ALGORITHM, E_CSR_KEY, E_CSR_SIGNATURE)


def test_native_error_survives_pickling():
    error = NativeError(E_CSR_KEY, "RSA public exponent must be 65537")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, str(copy)) == (E_CSR_KEY, "RSA public exponent must be 65537")
    assert isinstance(copy, ValueError)


def test_requested_extension_count_and_repeated_extension_request_are_bounded(p256_key):
    many = [extension(f"1.2.3.{i}", b"\x05\x00") for i in range(65)]
    assert "more than 64" in refused(E_CSR_MALFORMED, hand_csr(p256_key, attributes=extension_request_attribute(many)))
    assert len(verify_csr(hand_csr(p256_key, attributes=extension_request_attribute(many[:64])))
               .requested_extensions) == 64
    one = extension_request_attribute([extension("2.5.29.19", b"\x30\x00")])
    assert "more than one extensionRequest" in refused(E_CSR_MALFORMED, hand_csr(p256_key, attributes=one + one))

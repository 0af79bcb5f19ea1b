"""The post-issuance profile check (check_issued_batch): what the native
writer built passes; pyca's twin of the same certificate passes too (an
independent encoder agreeing with the reader); each single deviation a
faulty writer or signer could produce is caught."""

from __future__ import annotations

import datetime as dt
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fastca._native.testing import E_INTERNAL, NativeError, check_issued_batch, prepare_batch

from .test_tbs import AGENTS, LEAVES, NOW, issue, make_ca, pyca_twin, spec


@pytest.fixture(scope="module", params=["sha256-ecdsa", "sha256-rsa", "sha384-ecdsa"])
def ca(request):
    return make_ca(request.param)


def _csr(ca, leaf):
    return prepare_batch(ca.profile(), [leaf])[0].csr


def _profile_serial(raw: bytes) -> int:
    return int.from_bytes(bytes([(raw[0] & 0x7F) | 0x40]) + raw[1:], "big")


@pytest.mark.parametrize("leaf_name", LEAVES)
def test_what_the_writer_built_passes(ca, leaf_name):
    leaf = spec(leaf_name, dns_names=("web.default.svc",), ip_addresses=(bytes([10, 0, 0, 7]),))
    der = issue(ca, [leaf])[0]
    assert check_issued_batch(ca.profile(), [der], [leaf], [_csr(ca, leaf)]) == [None]


@pytest.mark.parametrize("window", [(-631152001, NOW), (-62167219200, 253402300799), (NOW, 2524608000)],
                         ids=["from-1949", "years-0000-9999", "to-2050"])
def test_windows_outside_the_utctime_years_pass(ca, window):
    """The writer encodes times outside 1950..2049 as GeneralizedTime (RFC
    5280 4.1.2.5), before 1950 too; the reader takes them back (found by the
    tbs fuzz target: notBefore in 1949 was refused)."""
    leaf = spec(not_before=window[0], not_after=window[1])
    der = issue(ca, [leaf])[0]
    assert check_issued_batch(ca.profile(), [der], [leaf], [_csr(ca, leaf)]) == [None]


@pytest.mark.parametrize("leaf_name", LEAVES)
def test_pyca_twin_of_the_same_certificate_passes(ca, leaf_name):
    leaf = spec(leaf_name, dns_names=("web.default.svc",))
    is_rsa = AGENTS[leaf_name].name.startswith("rsa")
    twin = pyca_twin(ca, leaf, bytes([(leaf.serial[0] & 0x7F) | 0x40]) + leaf.serial[1:], ku_rsa=is_rsa)
    der = twin.public_bytes(serialization.Encoding.DER)
    assert check_issued_batch(ca.profile(), [der], [leaf], [_csr(ca, leaf)]) == [None]


def _pyca(ca, leaf, *, serial=None, issuer=None, sans=None, not_after=None, subject=None, extra=None,
          drop=None, san_critical=True, key=None):
    csr = x509.load_pem_x509_csr(leaf.csr)
    is_rsa = isinstance(csr.public_key(), rsa.RSAPublicKey)
    usage = dict(digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
                 data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                 encipher_only=False, decipher_only=False)
    builder = (x509.CertificateBuilder()
               .serial_number(serial if serial is not None else _profile_serial(leaf.serial))
               .issuer_name(issuer or ca.name)
               .subject_name(subject or x509.Name([]))
               .public_key(key or csr.public_key())
               .not_valid_before(dt.datetime.fromtimestamp(leaf.not_before, dt.timezone.utc))
               .not_valid_after(dt.datetime.fromtimestamp(not_after or leaf.not_after, dt.timezone.utc)))
    extensions = [
        ("ku", x509.KeyUsage(**usage), True),
        ("eku", x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        ("bc", x509.BasicConstraints(ca=False, path_length=None), True),
        ("aki", x509.AuthorityKeyIdentifier(ca.ski, None, None), False),
        ("san", x509.SubjectAlternativeName(sans or [x509.UniformResourceIdentifier(leaf.spiffe_id)]), san_critical),
    ]
    for name, extension, critical in extensions:
        if name != drop:
            builder = builder.add_extension(extension, critical=critical)
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    return builder.sign(ca.key, ca.hash).public_bytes(serialization.Encoding.DER)


DEVIATIONS = {
    "serial": dict(serial=12345),
    "issuer": dict(issuer=x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "someone else")])),
    "identity": dict(sans=[x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/admin")]),
    "extra name": dict(sans=[x509.UniformResourceIdentifier(AGENTS["ec256-0001"].spiffe_id),
                             x509.DNSName("evil.example")]),
    "window": dict(not_after=NOW + 90 * 86400),
    "subject": dict(subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")])),
    "extension outside the profile": dict(extra=x509.SubjectKeyIdentifier(b"\x01" * 20)),
    "missing AKI": dict(drop="aki"),
    "SAN not critical": dict(san_critical=False),
}


@pytest.mark.parametrize("deviation", sorted(DEVIATIONS))
def test_each_deviation_is_caught(ec_ca_only, deviation):
    ca = ec_ca_only
    leaf = spec("ec256-0001")
    assert check_issued_batch(ca.profile(), [_pyca(ca, leaf)], [leaf], [_csr(ca, leaf)]) == [None]
    bad = _pyca(ca, leaf, **DEVIATIONS[deviation])
    verdict = check_issued_batch(ca.profile(), [bad], [leaf], [_csr(ca, leaf)])[0]
    assert isinstance(verdict, NativeError) and verdict.code == E_INTERNAL, verdict


def test_another_key_than_the_csrs_is_caught(ec_ca_only):
    ca = ec_ca_only
    leaf = spec("ec256-0001")
    bad = _pyca(ca, leaf, key=ec.generate_private_key(ec.SECP256R1()).public_key())
    verdict = check_issued_batch(ca.profile(), [bad], [leaf], [_csr(ca, leaf)])[0]
    assert isinstance(verdict, NativeError) and "public key" in str(verdict)


def test_truncated_and_garbage_certificates_fail_without_crashing(ec_ca_only):
    ca = ec_ca_only
    leaf = spec("ec256-0001")
    good = issue(ca, [leaf])[0]
    csr = _csr(ca, leaf)
    for bad in (good[:-1], good[: len(good) // 2], b"", b"\x30\x00", os.urandom(300), good + b"\x00"):
        verdict = check_issued_batch(ca.profile(), [bad], [leaf], [csr])[0]
        assert isinstance(verdict, NativeError) and verdict.code == E_INTERNAL


@pytest.fixture(scope="module")
def ec_ca_only():
    return make_ca("sha256-ecdsa")

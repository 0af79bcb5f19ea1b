"""TBS and certificate assembly: every field of docs/cert-profile.md, byte-equal
to pyca's CertificateBuilder fed the same inputs, and the post-sign check."""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from fastca._native.testing import (
    E_CSR_ENCODING,
    DerWriter,
    E_CSR_SIGNATURE,
    E_IDENTITY,
    E_INTERNAL,
    E_SIGNATURE,
    IssuerProfile,
    LeafSpec,
    NativeError,
    PreparedLeaf,
    assemble_batch,
    ecdsa_raw_to_der,
    parse_csr,
    pem_encode,
    prepare_batch,
    walk_der,
)

from .factories import agent_csrs, spki_of

NOW = 1_764_000_000                      # 2025-11-24
DAY = 86_400
ALGORITHMS = {
    "sha256-ecdsa": bytes.fromhex("300a06082a8648ce3d040302"),
    "sha384-ecdsa": bytes.fromhex("300a06082a8648ce3d040303"),
    "sha256-rsa": bytes.fromhex("300d06092a864886f70d01010b0500"),
    "sha512-rsa": bytes.fromhex("300d06092a864886f70d01010d0500"),
}
KU_RSA = bytes.fromhex("030205a0")
KU_EC = bytes.fromhex("03020780")


@dataclass
class SoftwareCA:
    key: object
    name: x509.Name
    ski: bytes
    algorithm: bytes
    hash: hashes.HashAlgorithm

    def profile(self, **kwargs) -> IssuerProfile:
        return IssuerProfile(self.name.public_bytes(), self.ski, self.algorithm, spki_of(self.key), **kwargs)

    def sign(self, tbs: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(tbs, ec.ECDSA(self.hash))
        return self.key.sign(tbs, padding.PKCS1v15(), self.hash)


def make_ca(kind: str) -> SoftwareCA:
    key = {"sha256-ecdsa": lambda: ec.generate_private_key(ec.SECP256R1()),
           "sha384-ecdsa": lambda: ec.generate_private_key(ec.SECP384R1()),
           "sha256-rsa": lambda: rsa.generate_private_key(65537, 2048),
           "sha512-rsa": lambda: rsa.generate_private_key(65537, 2048)}[kind]()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"fastca test {kind}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    digest = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}[kind[:6]]
    return SoftwareCA(key, name, ski, ALGORITHMS[kind], digest)


@pytest.fixture(scope="module", params=sorted(ALGORITHMS))
def ca(request) -> SoftwareCA:
    return make_ca(request.param)


@pytest.fixture(scope="module")
def ec_ca() -> SoftwareCA:
    return make_ca("sha256-ecdsa")


AGENTS = {a.name: a for a in agent_csrs()}
LEAVES = ["rsa2048-0000", "ec256-0001", "ec384-0002"]


def spec(agent_name: str = "ec256-0000", **overrides) -> LeafSpec:
    agent = AGENTS[agent_name]
    fields = dict(csr=agent.pem, spiffe_id=agent.spiffe_id, serial=os.urandom(16),
                  not_before=NOW - 120, not_after=NOW + DAY)
    fields.update(overrides)
    return LeafSpec(**fields)


def issue(ca: SoftwareCA, specs: list[LeafSpec], **profile_options) -> list:
    profile = ca.profile(**profile_options)
    prepared = prepare_batch(profile, specs)
    assert all(isinstance(p, PreparedLeaf) for p in prepared), prepared
    tbs = [p.tbs for p in prepared]
    return assemble_batch(profile, tbs, [ca.sign(t) for t in tbs], False)


def extensions_in(tbs: bytes) -> list[tuple[str, bool | None, bytes]]:
    """(OID, critical as encoded or None, extnValue) in encoding order."""
    walked = walk_der(tbs)
    start = next(i for i, (depth, tag, _) in enumerate(walked) if depth == 1 and tag == 0xA3)
    out: list = []
    for depth, tag, content in walked[start + 2:]:
        if depth == 3:
            out.append(["", None, b""])
        elif tag == 0x06 and depth == 4:
            out[-1][0] = dotted(content)
        elif tag == 0x01 and depth == 4:
            out[-1][1] = content == b"\xff"
        elif tag == 0x04 and depth == 4:
            out[-1][2] = content
    return [tuple(e) for e in out]


def dotted(content: bytes) -> str:
    arcs, arc = [], 0
    for byte in content:
        arc = (arc << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(arc)
            arc = 0
    return ".".join(map(str, [min(arcs[0] // 40, 2), arcs[0] - 40 * min(arcs[0] // 40, 2), *arcs[1:]]))


def pyca_twin(ca: SoftwareCA, leaf: LeafSpec, serial: bytes, *, ku_rsa: bool) -> x509.Certificate:
    csr = x509.load_pem_x509_csr(leaf.csr)
    sans = [x509.UniformResourceIdentifier(leaf.spiffe_id)] + [x509.DNSName(d) for d in leaf.dns_names]
    usage = dict(digital_signature=True, content_commitment=False, key_encipherment=ku_rsa,
                 data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                 encipher_only=False, decipher_only=False)
    return (x509.CertificateBuilder()
            .serial_number(int.from_bytes(serial, "big"))
            .issuer_name(ca.name)
            .subject_name(x509.Name([]))
            .public_key(csr.public_key())
            .not_valid_before(dt.datetime.fromtimestamp(leaf.not_before, dt.timezone.utc))
            .not_valid_after(dt.datetime.fromtimestamp(leaf.not_after, dt.timezone.utc))
            .add_extension(x509.KeyUsage(**usage), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier(ca.ski, None, None), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .sign(ca.key, ca.hash))


@pytest.mark.parametrize("leaf_name", LEAVES)
def test_certificate_has_every_profile_field(ca, leaf_name):
    leaf = spec(leaf_name, dns_names=("web.default.svc",))
    der = issue(ca, [leaf])[0]
    cert = x509.load_der_x509_certificate(der)
    csr = x509.load_pem_x509_csr(leaf.csr)

    assert cert.version == x509.Version.v3
    serial_tlv = next(c for d, t, c in walk_der(cert.tbs_certificate_bytes) if d == 1 and t == 0x02)
    assert len(serial_tlv) == 16 and serial_tlv[0] & 0xC0 == 0x40
    assert serial_tlv[1:] == leaf.serial[1:] and serial_tlv[0] == (leaf.serial[0] & 0x7F) | 0x40
    assert cert.serial_number > 0
    tbs = cert.tbs_certificate_bytes
    assert tbs[:2] == b"\x30\x82" and tbs[27:27 + len(ca.algorithm)] == ca.algorithm
    assert der.endswith(ca.algorithm + bit_string(cert.signature))
    assert cert.issuer.public_bytes() == ca.name.public_bytes()
    assert cert.not_valid_before_utc == dt.datetime.fromtimestamp(NOW - 120, dt.timezone.utc)
    assert cert.not_valid_after_utc == dt.datetime.fromtimestamp(NOW + DAY, dt.timezone.utc)
    assert cert.subject == x509.Name([])
    assert cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) == \
        csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert parse_csr(leaf.csr).spki in tbs

    extensions = extensions_in(cert.tbs_certificate_bytes)
    rsa_leaf = leaf_name.startswith("rsa")
    assert extensions == [
        ("2.5.29.15", True, KU_RSA if rsa_leaf else KU_EC),
        ("2.5.29.37", None, bytes.fromhex("301406082b0601050507030106082b06010505070302")),
        ("2.5.29.19", True, b"\x30\x00"),
        ("2.5.29.35", None, b"\x30" + bytes([len(ca.ski) + 2, 0x80, len(ca.ski)]) + ca.ski),
        ("2.5.29.17", True, sans_value(leaf.spiffe_id, "web.default.svc")),
    ]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [leaf.spiffe_id]
    assert san.value.get_values_for_type(x509.DNSName) == ["web.default.svc"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

    cert.verify_directly_issued_by(self_signed(ca))
    twin = pyca_twin(ca, leaf, serial_tlv, ku_rsa=rsa_leaf)
    assert cert.tbs_certificate_bytes == twin.tbs_certificate_bytes


def bit_string(content: bytes) -> bytes:
    w = DerWriter()
    w.primitive(0x03, b"\x00" + content)
    return w.getvalue()


def sans_value(uri: str, *dns: str) -> bytes:
    w = DerWriter()
    w.begin(0x30)
    w.primitive(0x86, uri.encode())
    for name in dns:
        w.primitive(0x82, name.encode())
    w.end()
    return w.getvalue()


def self_signed(ca: SoftwareCA) -> x509.Certificate:
    now = dt.datetime.fromtimestamp(NOW, dt.timezone.utc)
    return (x509.CertificateBuilder().serial_number(1).issuer_name(ca.name).subject_name(ca.name)
            .public_key(ca.key.public_key()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca.key, ca.hash))


def test_validity_after_2049_is_generalized_time(ec_ca):
    not_after = int(dt.datetime(2050, 6, 1, 12, 0, 0, tzinfo=dt.timezone.utc).timestamp())
    leaf = spec(not_after=not_after)
    der = issue(ec_ca, [leaf])[0]
    cert = x509.load_der_x509_certificate(der)
    times = [(t, c) for d, t, c in walk_der(cert.tbs_certificate_bytes) if d == 2 and t in (0x17, 0x18)]
    assert times == [(0x17, b"251124155800Z"), (0x18, b"20500601120000Z")]
    assert cert.not_valid_after_utc.year == 2050
    twin = pyca_twin(ec_ca, leaf, cert.serial_number.to_bytes(16, "big"), ku_rsa=False)
    assert cert.tbs_certificate_bytes == twin.tbs_certificate_bytes


def test_istio_key_usage_gives_every_key_digital_signature_and_key_encipherment(ec_ca):
    der = issue(ec_ca, [spec("ec256-0000")], istio_key_usage=True)[0]
    assert extensions_in(x509.load_der_x509_certificate(der).tbs_certificate_bytes)[0] == \
        ("2.5.29.15", True, KU_RSA)


@pytest.mark.parametrize("first, fixed", [(0xFF, 0x7F), (0x00, 0x40), (0x80, 0x40), (0x3F, 0x7F)])
def test_serial_is_positive_with_a_fixed_length(ec_ca, first, fixed):
    serial = bytes([first]) + bytes(15)
    tbs = prepare_batch(ec_ca.profile(), [spec(serial=serial)])[0].tbs
    assert tbs[4:9] == bytes.fromhex("a003020102")
    assert tbs[9:27] == bytes([0x02, 0x10, fixed]) + bytes(15)


def test_csr_subject_and_requested_sans_never_reach_the_certificate(ec_ca):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://evil/x"),
                                                      x509.DNSName("evil.example")]), critical=False)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    cert = x509.load_der_x509_certificate(issue(ec_ca, [spec(csr=csr)])[0])
    assert cert.subject == x509.Name([])
    assert b"evil" not in cert.public_bytes(serialization.Encoding.DER)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_one_bad_item_fails_alone(ec_ca):
    flipped = bytearray(x509.load_pem_x509_csr(AGENTS["rsa2048-0001"].pem).public_bytes(serialization.Encoding.DER))
    flipped[-1] ^= 1
    specs = [spec("ec256-0000"), spec(csr=b"garbage"), spec("rsa2048-0000"),
             spec(csr=bytes(flipped)), spec(spiffe_id="spiffe://Bad/x"), spec("ec384-0000")]
    results = prepare_batch(ec_ca.profile(), specs)
    assert [type(r).__name__ for r in results] == \
        ["PreparedLeaf", "NativeError", "PreparedLeaf", "NativeError", "NativeError", "PreparedLeaf"]
    assert [r.code for r in results if isinstance(r, NativeError)] == [E_CSR_ENCODING, E_CSR_SIGNATURE, E_IDENTITY]
    assert results[2].csr.key_type == "rsa" and results[5].csr.curve == "secp384r1"


@pytest.mark.parametrize("overrides, code, says", [
    (dict(spiffe_id="spiffe://cluster.local/ns/a/sa/b/"), E_IDENTITY, "trailing"),
    (dict(spiffe_id="spiffe://cluster.local/ns/é"), E_IDENTITY, "non-ASCII"),
    (dict(spiffe_id="spiffe://cluster.local/ns/a\x00b"), E_IDENTITY, "NUL"),
    (dict(dns_names=("ok.example", "bad_name")), E_IDENTITY, "'_'"),
    (dict(dns_names=("*.example",)), E_IDENTITY, "wildcard"),
    (dict(dns_names=("a.example", "A.example")), E_IDENTITY, "twice"),
    (dict(dns_names=("ü.example",)), E_IDENTITY, "non-ASCII"),
    (dict(serial=b"\x01" * 15), E_INTERNAL, "16 random bytes"),
    (dict(not_after=NOW - 120), E_INTERNAL, "later than"),
    (dict(not_after=2**70), E_INTERNAL, "0000..9999"),
    (dict(not_after=253402300800), E_INTERNAL, "0000..9999"),
])
def test_invalid_specs_fail_their_item(ec_ca, overrides, code, says):
    result = prepare_batch(ec_ca.profile(), [spec(**overrides)])[0]
    assert isinstance(result, NativeError) and result.code == code and says in str(result)


def test_identity_is_validated_before_the_csr(ec_ca):
    result = prepare_batch(ec_ca.profile(), [spec(csr=b"", spiffe_id="spiffe://cluster.local/%2F")])[0]
    assert result.code == E_IDENTITY


def test_leaf_spec_types_are_checked():
    with pytest.raises(TypeError):
        LeafSpec("not bytes", "spiffe://a/b", bytes(16), 0, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        LeafSpec(b"", "spiffe://a/b", bytes(16), 0.5, 1)
    with pytest.raises(TypeError):
        LeafSpec(b"", "spiffe://a/b", bytes(16), 0, 1, [b"bytes.example"])
    with pytest.raises(TypeError):
        prepare_batch(make_ca("sha256-ecdsa").profile(), ["not a spec"])


# --- assemble_batch ------------------------------------------------------------------

def prepared_tbs(ca: SoftwareCA, count: int = 1) -> list[bytes]:
    return [p.tbs for p in prepare_batch(ca.profile(), [spec() for _ in range(count)])]


def test_wrong_signatures_fail_with_e_signature(ca):
    tbs = prepared_tbs(ca, 4)
    good = [ca.sign(t) for t in tbs]
    flipped = bytearray(good[1])
    flipped[len(flipped) // 2] ^= 0x10
    signatures = [good[0], bytes(flipped), ca.sign(tbs[0]), b""]
    results = assemble_batch(ca.profile(), tbs, signatures, False)
    assert isinstance(results[0], bytes)
    for bad in results[1:]:
        assert isinstance(bad, NativeError) and bad.code == E_SIGNATURE
        assert str(bad) == "CA signature did not verify"


def test_signature_from_another_key_fails(ec_ca):
    tbs = prepared_tbs(ec_ca)
    other = ec.generate_private_key(ec.SECP256R1()).sign(tbs[0], ec.ECDSA(hashes.SHA256()))
    assert assemble_batch(ec_ca.profile(), tbs, [other], False)[0].code == E_SIGNATURE


def test_raw_ecdsa_signatures_are_converted_and_verified(ec_ca):
    tbs = prepared_tbs(ec_ca, 3)
    raw = []
    for t in tbs:
        r, s = decode_dss_signature(ec_ca.sign(t))
        raw.append(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    raw[2] = raw[2][:-1]
    results = assemble_batch(ec_ca.profile(), tbs, raw, True)
    for der, t, r in zip(results[:2], tbs, raw):
        cert = x509.load_der_x509_certificate(der)
        assert cert.tbs_certificate_bytes == t
        assert decode_dss_signature(cert.signature) == (int.from_bytes(r[:32], "big"), int.from_bytes(r[32:], "big"))
    assert results[2].code == E_SIGNATURE


def test_raw_signatures_for_an_rsa_ca_are_refused():
    rsa_ca = make_ca("sha256-rsa")
    tbs = prepared_tbs(rsa_ca)
    assert assemble_batch(rsa_ca.profile(), tbs, [rsa_ca.sign(tbs[0])], True)[0].code == E_SIGNATURE


def test_assemble_batch_argument_errors(ec_ca):
    profile = ec_ca.profile()
    assert assemble_batch(profile, [], [], False) == []
    with pytest.raises(ValueError):
        assemble_batch(profile, [b"x"], [], False)
    with pytest.raises(TypeError):
        assemble_batch(profile, ["x"], [b"y"], False)
    assert assemble_batch(profile, [b"\x04\x00"], [b"sig"], False)[0].code == E_INTERNAL


@given(st.integers(0, 2**256 - 1), st.integers(0, 2**256 - 1))
def test_ecdsa_raw_to_der_matches_pyca(r, s):
    assert ecdsa_raw_to_der(r.to_bytes(32, "big") + s.to_bytes(32, "big")) == encode_dss_signature(r, s)


@pytest.mark.parametrize("raw", [b"", b"\x01", b"\x01" * 63])
def test_ecdsa_raw_with_unequal_halves_is_refused(raw):
    with pytest.raises(NativeError) as caught:
        ecdsa_raw_to_der(raw)
    assert caught.value.code == E_SIGNATURE


# --- profile and PEM -----------------------------------------------------------------

def test_profile_knows_its_hash(ca):
    profile = ca.profile()
    assert profile.hash_name == ca.hash.name
    assert profile.signature_algorithm == ca.algorithm


def test_profile_refuses_what_it_cannot_check(ec_ca):
    name, spki = ec_ca.name.public_bytes(), spki_of(ec_ca.key)
    with pytest.raises(ValueError):      # ECDSA with NULL parameters
        IssuerProfile(name, ec_ca.ski, bytes.fromhex("300c06082a8648ce3d0403020500"), spki)
    with pytest.raises(ValueError):      # sha1WithRSAEncryption
        IssuerProfile(name, ec_ca.ski, bytes.fromhex("300d06092a864886f70d0101050500"), spki)
    with pytest.raises(ValueError):      # RSA algorithm, EC key
        IssuerProfile(name, ec_ca.ski, ALGORITHMS["sha256-rsa"], spki)
    with pytest.raises(ValueError):
        IssuerProfile(name, ec_ca.ski, ec_ca.algorithm, spki + b"\x00")
    with pytest.raises(ValueError):
        IssuerProfile(b"\x31\x00", ec_ca.ski, ec_ca.algorithm, spki)
    with pytest.raises(ValueError):
        IssuerProfile(name, b"", ec_ca.algorithm, spki)


def test_pem_encode_matches_pyca(ec_ca):
    der = issue(ec_ca, [spec()])[0]
    pem = pem_encode(der)
    assert pem == x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
    assert all(len(line) <= 64 for line in pem.splitlines())
    assert pem.endswith("-----END CERTIFICATE-----\n")


@pytest.mark.parametrize("size", [1, 2, 3, 47, 48, 49, 96, 1000])
def test_pem_encode_lines_and_label(size):
    data = os.urandom(size)
    pem = pem_encode(data, "CERTIFICATE REQUEST")
    lines = pem.splitlines()
    assert lines[0] == "-----BEGIN CERTIFICATE REQUEST-----" and lines[-1] == "-----END CERTIFICATE REQUEST-----"
    assert all(len(line) == 64 for line in lines[1:-2]) and 0 < len(lines[-2]) <= 64
    assert base64.b64decode("".join(lines[1:-1])) == data
    assert re.fullmatch(r"[A-Za-z0-9+/=\n-]+[A-Z -]+-----\n", pem.split("\n", 1)[1])


@pytest.mark.parametrize("label", ["", "certificate", "X\n-----BEGIN", " CERT"])
def test_pem_encode_refuses_odd_labels(label):
    with pytest.raises(ValueError):
        pem_encode(b"\x30\x00", label)

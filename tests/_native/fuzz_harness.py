"""One input of each fuzz target of the native core (bench/fuzz.py runs them
under atheris; tests/_native/test_fuzz_corpus.py replays the corpus in
tests/vectors/fuzz/<target>/).

A NativeError (the native core's documented refusal) is an accepted outcome.
Any other exception, a crash, or a ``Mismatch`` (our reading of an input
differs from a reference: a re-encoding, a reference implementation of the
documented rules, or pyca/cryptography) is a finding.

    der   walk_der on arbitrary bytes; what it accepts, DerWriter re-encodes
          to the same bytes (strict DER is canonical).
    pem   the CSR PEM unwrap (load_csr_der) against a reference unwrap with
          the same rules, both ways; pem_encode against a reference encoder.
    san   validate_spiffe_id / validate_dns_name / validate_ip against
          reference implementations of the documented rules, both ways.
    csr   parse_csr and verify_csr against cryptography's CSR loader: what we
          parse, cryptography reads to the same subject, key and SANs; what we
          verify, cryptography verifies; what cryptography verifies, we do.
          Prefix 0: the rest is a CSR (PEM or DER); prefix 1/2: the rest is a
          CertificationRequestInfo, signed here with a fixed P-256/P-384 key,
          so that mutated requests still reach the verifying paths.
    tbs   prepare_batch on a LeafSpec drawn from the input (fixed valid CSRs,
          fuzzed identities, serial and validity): it succeeds exactly when
          the reference rules say so, and then the TBS, signed with
          cryptography and assembled (DER and raw ECDSA signatures), parses
          with cryptography to exactly the fields asked for, verifies with
          the CA key, and passes check_issued_batch.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import ipaddress
import re
from pathlib import Path

from asn1crypto.core import ObjectIdentifier
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fastca._native.testing import (
    E_CSR_SIGNATURE,
    DerWriter,
    IssuerProfile,
    LeafSpec,
    NativeError,
    PreparedLeaf,
    assemble_batch,
    check_issued_batch,
    load_csr_der,
    parse_csr,
    pem_encode,
    prepare_batch,
    validate_dns_name,
    validate_ip,
    validate_spiffe_id,
    verify_csr,
    walk_der,
)

__all__ = ["ONE_INPUT", "Mismatch", "Draw", "der_one_input", "pem_one_input", "san_one_input",
           "csr_one_input", "tbs_one_input"]

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
# Cryptography's own refusals, which are not ours to judge.
THEIR_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature)


class Mismatch(AssertionError):
    """Our reading of an input disagrees with the reference's."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Mismatch(what)


class Draw:
    """Structured values from fuzz bytes; past the end everything is zero."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, count: int) -> bytes:
        chunk = self.data[self.at:self.at + count]
        self.at += count
        return chunk.ljust(count, b"\0")

    def byte(self) -> int:
        return self.take(1)[0]

    def signed(self, count: int) -> int:
        return int.from_bytes(self.take(count), "big", signed=True)

    def chunk(self) -> bytes:
        """One length-prefixed (one octet) byte string."""
        return self.take(self.byte())


# --- der ------------------------------------------------------------------

def reencode(elements: list[tuple[int, int, bytes | None]]) -> bytes:
    writer = DerWriter()
    open_ = 0
    for depth, tag, content in elements:
        while open_ > depth:
            writer.end()
            open_ -= 1
        if content is None:
            writer.begin(tag)
            open_ += 1
        else:
            writer.primitive(tag, content)
    while open_:
        writer.end()
        open_ -= 1
    return writer.getvalue()


def der_one_input(data: bytes) -> None:
    try:
        elements = walk_der(data)
    except NativeError:
        return
    expect(bool(elements), "walk_der accepted input with no element")
    expect(reencode(elements) == data, "walk_der's elements do not re-encode to the input")


# --- pem ------------------------------------------------------------------

_WHITESPACE = b" \t\r\n"
_BLOCKS = ((b"-----BEGIN CERTIFICATE REQUEST-----", b"-----END CERTIFICATE REQUEST-----"),
           (b"-----BEGIN NEW CERTIFICATE REQUEST-----", b"-----END NEW CERTIFICATE REQUEST-----"))
PEM_LABELS = ("CERTIFICATE", "CERTIFICATE REQUEST", "X509 CRL", "A")


def reference_unwrap(text: bytes) -> bytes | None:
    """docs/cert-profile.md's CSR framing, written plainly: one CERTIFICATE
    REQUEST block, whitespace around it, canonical base64 (whitespace allowed,
    padding only at the end, zero unused bits), non-empty."""
    text = text.lstrip(_WHITESPACE)
    for begin, end in _BLOCKS:
        if text.startswith(begin):
            break
    else:
        return None
    body = text[len(begin):]
    if body[:1] not in (b"\n", b"\r"):
        return None
    at = body.find(end)
    if at < 0 or body[at + len(end):].strip(_WHITESPACE):
        return None
    packed = bytes(c for c in body[:at] if c not in _WHITESPACE)
    try:
        decoded = base64.b64decode(packed, validate=True)
    except binascii.Error:
        return None
    if base64.b64encode(decoded) != packed or not decoded:
        return None
    return decoded


def reference_pem(der: bytes, label: str) -> str:
    text = base64.b64encode(der).decode("ascii")
    lines = "".join(text[i:i + 64] + "\n" for i in range(0, len(text), 64))
    return f"-----BEGIN {label}-----\n{lines}-----END {label}-----\n"


def _is_der_refusal(error: NativeError) -> bool:
    """A refusal of the decoded DER (after the PEM layer let it through)."""
    return error.code == "csr.malformed" or error.message == "trailing bytes after the CSR"


def pem_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        if body:
            label = PEM_LABELS[(mode >> 1) % len(PEM_LABELS)]
            encoded = pem_encode(body, label)
            expect(encoded == reference_pem(body, label), "pem_encode differs from the reference encoder")
            if label == "CERTIFICATE REQUEST":
                expect(reference_unwrap(encoded.encode()) == body, "reference unwrap of pem_encode")
        return
    try:
        ours = load_csr_der(body)
    except NativeError as error:
        ours, refusal = None, error
    if body[:1] == b"\x30":
        expect(ours is None or ours == body, "DER passes through unchanged")
        return
    theirs = reference_unwrap(body)
    if ours is not None:
        expect(theirs == ours, "load_csr_der accepted PEM the reference unwrap reads otherwise")
        again = load_csr_der(pem_encode(ours, "CERTIFICATE REQUEST").encode())
        expect(again == ours, "pem_encode + load_csr_der is not a round trip")
    elif theirs is not None:
        expect(_is_der_refusal(refusal), f"PEM the reference unwrap accepts was refused: {refusal.message}")


# --- san ------------------------------------------------------------------

_TRUST_DOMAIN = re.compile(rb"[a-z0-9._-]{1,255}")
_PATH_SEGMENT = re.compile(rb"[A-Za-z0-9._-]+")
_DNS_LABEL = re.compile(rb"[A-Za-z0-9-]{1,63}")


def _printable(text: bytes) -> bool:
    return all(0x20 <= c < 0x7F for c in text)


def reference_spiffe_id(text: bytes) -> bool:
    if not 0 < len(text) <= 2048 or not _printable(text) or not text.startswith(b"spiffe://"):
        return False
    trust_domain, slash, path = text[9:].partition(b"/")
    if not slash or not _TRUST_DOMAIN.fullmatch(trust_domain):
        return False
    return all(_PATH_SEGMENT.fullmatch(s) and s not in (b".", b"..") for s in path.split(b"/"))


def reference_dns_name(text: bytes, allow_wildcard: bool) -> bool:
    if not 0 < len(text) <= 253 or not _printable(text):
        return False
    if allow_wildcard and text.startswith(b"*."):
        text = text[2:]
    return all(_DNS_LABEL.fullmatch(label) and label[:1] != b"-" and label[-1:] != b"-"
               for label in text.split(b"."))


def _accepts(check, *args) -> bool:
    try:
        check(*args)
    except NativeError:
        return False
    return True


def san_one_input(data: bytes) -> None:
    if not data:
        return
    kind, value = data[0] % 5, data[1:]
    if kind == 0:
        ours, theirs = _accepts(validate_spiffe_id, value), reference_spiffe_id(value)
    elif kind == 1:     # as text, the way the Authority passes it
        ours, theirs = _accepts(validate_spiffe_id, value.decode("latin-1")), reference_spiffe_id(value)
    elif kind in (2, 3):
        wildcard = kind == 3
        ours = _accepts(validate_dns_name, value.decode("latin-1"), wildcard)
        theirs = reference_dns_name(value, wildcard)
        expect(ours == _accepts(validate_dns_name, value, wildcard), "DNS name: str and bytes disagree")
    else:
        ours, theirs = _accepts(validate_ip, value), len(value) in (4, 16)
    expect(ours == theirs, f"validator kind {kind} says {ours}, the reference {theirs}")


# --- csr ------------------------------------------------------------------

@functools.cache
def fixed_keys() -> dict[int, tuple[ec.EllipticCurvePrivateKey, hashes.HashAlgorithm, str]]:
    """The keys the re-signing modes sign with: fixed, so the corpus's
    CertificationRequestInfos carry their public keys."""
    return {1: (ec.derive_private_key(0x5EED_0001, ec.SECP256R1()), hashes.SHA256(), "1.2.840.10045.4.3.2"),
            2: (ec.derive_private_key(0x5EED_0002, ec.SECP384R1()), hashes.SHA384(), "1.2.840.10045.4.3.3")}


def signed_request(info: bytes, algorithm_oid: str, signature: bytes) -> bytes:
    writer = DerWriter()
    writer.begin(0x30)
    writer.raw(info)
    writer.begin(0x30)
    writer.oid(algorithm_oid)
    writer.end()
    writer.primitive(0x03, b"\0" + signature)
    writer.end()
    return writer.getvalue()


def _name_attributes(name_der: bytes) -> list[list[tuple[bytes, int, bytes]]]:
    """Our view of a Name: per RDN, its (type OID content, value tag, value)."""
    rdns: list[list[list[tuple[int, bytes]]]] = []
    for depth, tag, content in walk_der(name_der):
        if depth == 1:
            rdns.append([])
        elif depth == 2:
            rdns[-1].append([])
        elif depth == 3:
            rdns[-1][-1].append((tag, content or b""))
    return [[(atv[0][1], atv[1][0], atv[1][1]) for atv in rdn] for rdn in rdns]


_STRING_CODECS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1", 0x1E: "utf-16-be",
                  0x1C: "utf-32-be", 0x1A: "ascii", 0x12: "ascii"}


def _dotted(content: bytes) -> str:
    return ObjectIdentifier.load(bytes([0x06, len(content)]) + content).dotted if len(content) < 0x80 else "?"


def _same_subject(ours: bytes, theirs: x509.Name) -> bool:
    if theirs.public_bytes() == ours:
        return True
    # Not byte-equal: cryptography re-encodes (sorting multi-valued RDNs); the
    # attributes must still be the same.
    mine = _name_attributes(ours)
    if len(mine) != len(theirs.rdns):
        return False
    for rdn, their_rdn in zip(mine, theirs.rdns):
        decoded = sorted((_dotted(oid), value.decode(_STRING_CODECS.get(tag, "latin-1"), "replace"))
                         for oid, tag, value in rdn)
        if decoded != sorted((a.oid.dotted_string, a.value if isinstance(a.value, str) else "")
                             for a in their_rdn):
            return False
    return True


def _their_sans(request: x509.CertificateSigningRequest) -> tuple[list, list, list, list] | None:
    try:
        names = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], [], [], []
    except THEIR_ERRORS:
        return None
    return (names.get_values_for_type(x509.UniformResourceIdentifier), names.get_values_for_type(x509.DNSName),
            [ip.packed for ip in names.get_values_for_type(x509.IPAddress)
             if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address))],
            names.get_values_for_type(x509.RFC822Name))


def check_csr(data: bytes) -> None:
    try:
        parsed = parse_csr(data)
    except NativeError:
        parsed = None
    try:
        verified, refusal = verify_csr(data), None
    except NativeError as error:
        verified, refusal = None, error
    if parsed is None:
        expect(verified is None, "verify_csr accepted what parse_csr refused")
        return
    if verified is not None:
        expect((verified.der, verified.spki, verified.uris, verified.dns_names, verified.ip_addresses)
               == (parsed.der, parsed.spki, parsed.uris, parsed.dns_names, parsed.ip_addresses),
               "verify_csr and parse_csr read the CSR differently")
    try:
        theirs = x509.load_der_x509_csr(parsed.der)
        their_key = theirs.public_key()
    except THEIR_ERRORS as error:
        # Our reader does not check the order of SET OF elements (not in
        # docs/cert-profile.md's DER rules), nor the string inside a subject
        # attribute (a UniversalString of 5 bytes, say): the subject is never
        # read, nor copied into a certificate. cryptography refuses such a
        # request whole, so it cannot be compared.
        if "InvalidSetOrdering" in str(error) or "AttributeTypeValue::value" in str(error):
            return
        expect(verified is None, "a CSR we verify, cryptography cannot load")
        return
    expect(their_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
           == parsed.spki, "the public key differs from cryptography's")
    if isinstance(their_key, rsa.RSAPublicKey):
        expect((parsed.key_type, parsed.key_bits, parsed.rsa_exponent)
               == ("rsa", their_key.key_size, their_key.public_numbers().e), "RSA key classification")
    else:
        expect((parsed.key_type, parsed.curve, parsed.key_bits)
               == ("ec", their_key.curve.name, their_key.curve.key_size), "EC key classification")
    try:
        subject = theirs.subject
    except THEIR_ERRORS:
        subject = None
    if subject is not None:
        expect(_same_subject(parsed.subject, subject), "the subject differs from cryptography's")
    sans = _their_sans(theirs)
    if sans is not None:
        expect(sans == (parsed.uris, parsed.dns_names, parsed.ip_addresses, parsed.emails),
               f"requested SANs differ: ours {parsed.uris, parsed.dns_names, parsed.ip_addresses, parsed.emails}, "
               f"cryptography's {sans}")
    try:
        their_oids = [e.oid.dotted_string for e in theirs.extensions]
    except THEIR_ERRORS:
        their_oids = None
    if their_oids is not None:
        expect(their_oids == parsed.requested_extensions, "requested extension OIDs differ")
    try:
        valid = theirs.is_signature_valid
    except THEIR_ERRORS:
        valid = False
    if verified is not None:
        expect(valid, "we verify a CSR signature cryptography rejects")
    elif refusal.code == E_CSR_SIGNATURE:
        expect(not valid, f"cryptography verifies a CSR signature we reject: {refusal.message}")


def csr_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    if mode == 0:
        check_csr(body)
        return
    key, digest, algorithm_oid = fixed_keys()[mode]
    try:
        parse_csr(signed_request(body, algorithm_oid, b"\x30\x00"))
    except NativeError:
        return
    check_csr(signed_request(body, algorithm_oid, key.sign(body, ec.ECDSA(digest))))


# --- tbs ------------------------------------------------------------------

EARLIEST = -62167219200     # 0000-01-01T00:00:00Z
LATEST = 253402300799       # 9999-12-31T23:59:59Z
NOW = 1_764_000_000
# datetime has no year 0: cryptography cannot show a time before year 1.
YEAR_ONE = -62135596800
CA_KEYS = ("p256", "rsa", "p384")


@functools.cache
def tbs_fixtures() -> tuple[list[bytes], dict]:
    csrs = [path.read_bytes() for path in sorted((VECTORS / "agent-csrs").glob("*-000[01].csr.pem"))]
    cas = {}
    for name in CA_KEYS:
        if name == "rsa":           # 1024 bits: a test CA, signing in each execution
            key = rsa.generate_private_key(65537, 1024)
            algorithm, sign = bytes.fromhex("300d06092a864886f70d01010b0500"), \
                (lambda k: lambda tbs: k.sign(tbs, padding.PKCS1v15(), hashes.SHA256()))(key)
        else:
            curve, digest, algorithm = ((ec.SECP256R1(), hashes.SHA256(), bytes.fromhex("300a06082a8648ce3d040302"))
                                        if name == "p256" else
                                        (ec.SECP384R1(), hashes.SHA384(), bytes.fromhex("300a06082a8648ce3d040303")))
            key = ec.derive_private_key(0xCA + len(name), curve)
            sign = (lambda k, d: lambda tbs: k.sign(tbs, ec.ECDSA(d)))(key, digest)
        issuer = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"fuzz {name}"),
                            x509.NameAttribute(NameOID.COMMON_NAME, "fuzz CA")]).public_bytes()
        aki = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        cas[name] = (key, sign, issuer, aki, algorithm,
                     {istio: IssuerProfile(issuer, aki, algorithm, spki, istio_key_usage=istio)
                      for istio in (False, True)})
    return csrs, cas


def _ascii(value: bytes) -> str:
    return value.decode("latin-1")


def draw_spec(draw: Draw, csrs: list[bytes]) -> tuple[LeafSpec, dict]:
    csr = csrs[draw.byte() % len(csrs)]
    serial = draw.take(16)
    if draw.byte() & 1:        # anywhere, edges of the encodable range included
        not_before, not_after = draw.signed(8), draw.signed(8)
    else:                      # around now, as issued
        not_before = NOW + draw.signed(4) * 64
        not_after = not_before + draw.signed(3) * 64
    spiffe_id = draw.chunk()
    dns = [draw.chunk() for _ in range(draw.byte() % 4)]
    ips = [draw.chunk() for _ in range(draw.byte() % 3)]
    spec = LeafSpec(csr, _ascii(spiffe_id), serial, not_before, not_after,
                    dns_names=[_ascii(d) for d in dns], ip_addresses=ips)
    valid = (reference_spiffe_id(spiffe_id) and all(reference_dns_name(d, False) for d in dns)
             and len({d.lower() for d in dns}) == len(dns)
             and all(len(ip) in (4, 16) for ip in ips) and len(set(ips)) == len(ips)
             and EARLIEST <= not_before < not_after <= LATEST)
    return spec, {"spiffe_id": spiffe_id, "dns": dns, "ips": ips, "valid": valid}


def _expected_key_usage(csr_key_type: str, istio: bool) -> x509.KeyUsage:
    encipher = csr_key_type == "rsa" or istio
    return x509.KeyUsage(True, False, encipher, False, False, False, False, False, False)


def check_certificate(certificate: bytes, leaf: PreparedLeaf, spec: LeafSpec, drawn: dict, ca: tuple,
                      istio: bool) -> None:
    key, _, issuer, aki, algorithm, _ = ca
    cert = x509.load_der_x509_certificate(certificate)
    expect(cert.tbs_certificate_bytes == leaf.tbs, "the certificate's TBS is not the prepared one")
    expect(cert.version == x509.Version.v3, "version")
    serial = bytearray(spec.serial)
    serial[0] = (serial[0] & 0x7F) | 0x40
    expect(cert.serial_number == int.from_bytes(serial, "big"), "serial")
    expect(cert.issuer.public_bytes() == issuer and cert.subject.public_bytes() == b"\x30\x00", "names")
    if spec.not_before >= YEAR_ONE:
        expect(cert.not_valid_before_utc == dt.datetime.fromtimestamp(spec.not_before, dt.timezone.utc),
               "notBefore")
        expect(cert.not_valid_after_utc == dt.datetime.fromtimestamp(spec.not_after, dt.timezone.utc),
               "notAfter")
    expect(cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) == leaf.csr.spki,
           "the certificate's key is not the CSR's")
    extensions = {e.oid: e for e in cert.extensions}
    expect(len(extensions) == 5, "five extensions")
    ku = extensions[x509.oid.ExtensionOID.KEY_USAGE]
    expect(ku.critical and ku.value == _expected_key_usage(leaf.csr.key_type, istio), "keyUsage")
    eku = extensions[x509.oid.ExtensionOID.EXTENDED_KEY_USAGE]
    expect(not eku.critical and list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH,
                                                    ExtendedKeyUsageOID.CLIENT_AUTH], "extKeyUsage")
    bc = extensions[x509.oid.ExtensionOID.BASIC_CONSTRAINTS]
    expect(bc.critical and not bc.value.ca and bc.value.path_length is None, "basicConstraints")
    ak = extensions[x509.oid.ExtensionOID.AUTHORITY_KEY_IDENTIFIER]
    expect(not ak.critical and ak.value.key_identifier == aki and ak.value.authority_cert_issuer is None,
           "authorityKeyIdentifier")
    san = extensions[x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    expect(san.critical and [n.value for n in san.value] ==
           [drawn["spiffe_id"].decode()] + [d.decode() for d in drawn["dns"]]
           + [ipaddress.ip_address(ip) for ip in drawn["ips"]], "subjectAltName")
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        public.verify(cert.signature, leaf.tbs, padding.PKCS1v15(), cert.signature_hash_algorithm)
    else:
        public.verify(cert.signature, leaf.tbs, ec.ECDSA(cert.signature_hash_algorithm))


def tbs_one_input(data: bytes) -> None:
    csrs, cas = tbs_fixtures()
    draw = Draw(data)
    choice = draw.byte()
    ca_name, istio, raw = CA_KEYS[choice % 3], bool(choice & 0x10), bool(choice & 0x20)
    ca = cas[ca_name]
    profile = ca[5][istio]
    spec, drawn = draw_spec(draw, csrs)
    [leaf] = prepare_batch(profile, [spec])
    if isinstance(leaf, NativeError):
        expect(not drawn["valid"], f"prepare_batch refused a valid spec: {leaf.message}")
        return
    expect(drawn["valid"], "prepare_batch accepted a spec the reference rules refuse")
    expect(reencode(walk_der(leaf.tbs)) == leaf.tbs, "the TBS is not strict DER that re-encodes to itself")
    signature = ca[1](leaf.tbs)
    [certificate] = assemble_batch(profile, [leaf.tbs], [signature], False)
    expect(isinstance(certificate, bytes), f"assemble_batch refused a good signature: {certificate!r}")
    if raw and ca_name != "rsa":
        r, s = decode_dss_signature(signature)
        half = (ca[0].curve.key_size + 7) // 8
        [again] = assemble_batch(profile, [leaf.tbs], [r.to_bytes(half, "big") + s.to_bytes(half, "big")], True)
        expect(again == certificate, "raw r || s assembles another certificate")
    check_certificate(certificate, leaf, spec, drawn, ca, istio)
    expect(check_issued_batch(profile, [certificate], [spec], [leaf.csr]) == [None],
           "check_issued_batch refuses the certificate")
    [forged] = assemble_batch(profile, [leaf.tbs], [signature[:-1] + bytes([signature[-1] ^ 1])], False)
    expect(isinstance(forged, NativeError) and forged.code == "signature", "a bad CA signature was assembled")


ONE_INPUT = {"der": der_one_input, "pem": pem_one_input, "san": san_one_input, "csr": csr_one_input,
             "tbs": tbs_one_input}

"""CSR factories for the native-core tests: pyca-built CSRs for ordinary
cases, hand-assembled DER (through DerWriter) for the ones pyca refuses to make."""

from __future__ import annotations


from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import NameOID

from fastca._native.testing import DerWriter
from tests.conftest import agent_csrs  # noqa: F401 - re-exported for the native tests

SPIFFE_ID = "spiffe://cluster.local/ns/default/sa/web"

OID_SHA256_RSA = "1.2.840.113549.1.1.11"
OID_SHA1_RSA = "1.2.840.113549.1.1.5"
OID_MD5_RSA = "1.2.840.113549.1.1.4"
OID_RSA_PSS = "1.2.840.113549.1.1.10"
OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
OID_ECDSA_SHA1 = "1.2.840.10045.4.1"
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"


def spki_of(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def pyca_csr(key, *, algorithm=None, uris=(SPIFFE_ID,), dns=(), extra_extensions=()) -> bytes:
    """A CSR as Istio's agent makes it (subject O="", critical URI SAN), PEM."""
    names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "")]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    for extension, critical in extra_extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, algorithm or hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def algorithm_identifier(oid: str, null_parameters: bool) -> bytes:
    w = DerWriter()
    w.begin(0x30)
    w.oid(oid)
    if null_parameters:
        w.primitive(0x05, b"")
    w.end()
    return w.getvalue()


def extension_request_attribute(extensions: list[bytes]) -> bytes:
    w = DerWriter()
    w.begin(0x30)
    w.oid(OID_EXTENSION_REQUEST)
    w.begin(0x31)
    w.begin(0x30)
    for extension in extensions:
        w.raw(extension)
    w.end()
    w.end()
    w.end()
    return w.getvalue()


def extension(oid: str, value: bytes, critical: bytes | None = None) -> bytes:
    w = DerWriter()
    w.begin(0x30)
    w.oid(oid)
    if critical is not None:
        w.primitive(0x01, critical)
    w.primitive(0x04, value)
    w.end()
    return w.getvalue()


def request_info(spki: bytes, *, attributes: bytes = b"", version: bytes = b"") -> bytes:
    w = DerWriter()
    w.begin(0x30)
    w.integer(version)
    w.raw(bytes.fromhex("300b31093007060355040a1300"))   # O="" as Go's agent writes it
    w.raw(spki)
    w.begin(0xA0)
    w.raw(attributes)
    w.end()
    w.end()
    return w.getvalue()


def certification_request(info: bytes, algorithm: bytes, signature: bytes) -> bytes:
    w = DerWriter()
    w.begin(0x30)
    w.raw(info)
    w.raw(algorithm)
    w.primitive(0x03, b"\x00" + signature)
    w.end()
    return w.getvalue()


def hand_csr(signing_key, *, spki: bytes | None = None, algorithm_oid: str | None = None,
             null_parameters: bool | None = None, hash_algorithm=None, attributes: bytes = b"",
             version: bytes = b"", rsa_padding=None) -> bytes:
    """A DER CSR whose info is signed by signing_key with whatever algorithm
    the test names, even ones pyca will not put into a CSR."""
    is_ec = isinstance(signing_key, ec.EllipticCurvePrivateKey)
    hash_algorithm = hash_algorithm or hashes.SHA256()
    if algorithm_oid is None:
        algorithm_oid = OID_ECDSA_SHA256 if is_ec else OID_SHA256_RSA
    if null_parameters is None:
        null_parameters = not is_ec
    info = request_info(spki if spki is not None else spki_of(signing_key), attributes=attributes,
                        version=version)
    if is_ec:
        signature = signing_key.sign(info, ec.ECDSA(hash_algorithm))
    else:
        signature = signing_key.sign(info, rsa_padding or padding.PKCS1v15(), hash_algorithm)
    return certification_request(info, algorithm_identifier(algorithm_oid, null_parameters), signature)

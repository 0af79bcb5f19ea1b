"""Keys and CSRs made the way Istio's agent makes them (docs/istio-contract.md),
byte layout matching Go's crypto/x509 output: the subject is one empty
``O=`` attribute as a PrintableString, the only requested extension is a
critical SAN holding one URI (the SPIFFE ID), no CN. Go signs with SHA-256
for RSA and P-256 and with SHA-384 for P-384; so do we."""

from __future__ import annotations

from typing import Literal

from cryptography import x509
from cryptography.x509.name import _ASN1Type  # pyca has no public spelling for the string type
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

__all__ = ["KeyType", "KEY_TYPES", "PrivateKey", "new_key", "agent_csr", "private_key_pem"]

KeyType = Literal["rsa-2048", "ec-p256", "ec-p384"]
KEY_TYPES: tuple[str, ...] = ("rsa-2048", "ec-p256", "ec-p384")
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_key(key_type: str = "rsa-2048") -> PrivateKey:
    """A fresh private key: Istio's default RSA-2048, or ECDSA P-256 / P-384."""
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    raise ValueError(f"unknown key type {key_type!r} (expected one of {', '.join(KEY_TYPES)})")


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def agent_csr(key: PrivateKey, spiffe_id: str) -> bytes:
    """PEM CSR for ``spiffe_id`` signed by ``key``."""
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "", _type=_ASN1Type.PrintableString)])
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(subject)
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
           .sign(key, _hash_for(key)))
    return csr.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8, unencrypted (what Envoy and ztunnel read)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())

"""Public keys as fastca compares them: SubjectPublicKeyInfo DER.

One helper gives the SPKI of a key or a certificate, and one check says a
signer's key is its signing certificate's; every place that compares keys
uses these.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fastca.errors import CANotReady

__all__ = ["spki_der", "require_key_matches"]


def spki_der(key_or_certificate: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a public key, a private key or a certificate."""
    public = key_or_certificate
    if isinstance(public, x509.Certificate):
        public = public.public_key()
    elif hasattr(public, "public_key"):
        public = public.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def require_key_matches(public_key: Any, certificate: x509.Certificate) -> bytes:
    """The certificate's SPKI, if ``public_key`` is its key. A signer whose key
    is not its certificate's would issue certificates nobody can verify: the
    CA is not ready until they match again (a token re-initialised with a new
    key, a wrong key URI)."""
    expected = spki_der(certificate)
    if spki_der(public_key) != expected:
        raise CANotReady("the signer's key does not match the signing certificate's public key "
                         f"({certificate.subject.rfc4514_string()!r})")
    return expected

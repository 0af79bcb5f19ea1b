"""Signing backends: where the CA private key lives and how it signs."""

from fastca.signing.base import Signer, signature_algorithm_for
from fastca.signing.pkcs11_uri import Pkcs11Uri

__all__ = ["Signer", "Pkcs11Uri", "signature_algorithm_for"]

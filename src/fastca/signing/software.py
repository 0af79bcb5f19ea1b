"""A signer holding its key in process memory (cryptography).

For tests, and for users who explicitly choose a software key; the embedded
default and production use the PKCS#11 backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from fastca.errors import ConfigurationError
from fastca.signing.base import SignerBase
from fastca.signing.secret_file import read_secret_file

__all__ = ["SoftwareSigner"]

_MAX_KEY_FILE_BYTES = 64 * 1024
_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384}


class SoftwareSigner(SignerBase):
    def __init__(self, private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
        if not isinstance(private_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise ConfigurationError("software signer needs an RSA or EC private key")
        super().__init__(private_key.public_key(), ecdsa_raw=False)
        digest = _HASHES[self._hash_name]()
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            scheme = ec.ECDSA(digest)
            self._sign_one = lambda data: private_key.sign(data, scheme)
        else:
            pkcs1 = padding.PKCS1v15()
            self._sign_one = lambda data: private_key.sign(data, pkcs1, digest)

    @classmethod
    def from_pem_file(cls, path: str, password: bytes | None = None) -> SoftwareSigner:
        data = read_secret_file(Path(path), "CA key file", _MAX_KEY_FILE_BYTES)
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"{path} is not a usable PEM private key") from exc
        return cls(key)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"SoftwareSigner({self._hash_name}, {type(self._public_key).__name__})"

    def sign(self, data: bytes) -> bytes:
        return self._sign_one(data)

    def sign_many(self, data: Sequence[bytes]) -> list[bytes]:
        sign_one = self._sign_one
        return [sign_one(item) for item in data]

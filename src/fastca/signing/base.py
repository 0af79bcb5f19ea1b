"""The Signer protocol every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Executor
from typing import Protocol, Sequence, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fastca.errors import ConfigurationError

__all__ = ["Signer", "SignerBase", "signature_algorithm_for"]

# DER AlgorithmIdentifiers: ECDSA has no parameters, RSA PKCS#1 v1.5 has NULL.
_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
_ECDSA_SHA384 = bytes.fromhex("300a06082a8648ce3d040303")
_RSA_SHA256 = bytes.fromhex("300d06092a864886f70d01010b0500")


def signature_algorithm_for(public_key: object) -> tuple[bytes, str]:
    """(AlgorithmIdentifier DER, hash name) a CA with this key signs with:
    SHA-256 for RSA and P-256, SHA-384 for P-384 (as istiod does)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, ec.SECP256R1):
            return _ECDSA_SHA256, "sha256"
        if isinstance(public_key.curve, ec.SECP384R1):
            return _ECDSA_SHA384, "sha384"
        raise ConfigurationError(f"CA key curve {public_key.curve.name} is not supported (P-256, P-384)")
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise ConfigurationError(f"CA RSA key of {public_key.key_size} bits is too small (>= 2048)")
        return _RSA_SHA256, "sha256"
    raise ConfigurationError(f"CA key type {type(public_key).__name__} is not supported (RSA, EC)")


@runtime_checkable
class Signer(Protocol):
    """A CA private key that signs.

    ``sign_many`` is the batch entry point the issuer uses; ``sign`` is for
    lifecycle work (self-signing a root, a CSR). Signatures are returned in
    the encoding ``ecdsa_raw`` says: raw r||s (PKCS#11 CKM_ECDSA) when True,
    otherwise exactly what goes into the certificate's BIT STRING. The issuer
    verifies every signature with ``public_key`` before a certificate leaves.
    """

    @property
    def algorithm_identifier(self) -> bytes: ...
    @property
    def hash_name(self) -> str: ...
    @property
    def public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey: ...
    @property
    def ecdsa_raw(self) -> bool: ...
    @property
    def home_executor(self) -> Executor | None: ...
    @property
    def available(self) -> bool: ...
    def sign(self, data: bytes) -> bytes: ...
    def sign_many(self, data: Sequence[bytes]) -> list[bytes]: ...
    def close(self) -> None: ...


class SignerBase(ABC):
    """What every backend derives from its CA public key, in one place."""

    def __init__(self, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, *, ecdsa_raw: bool) -> None:
        self._public_key = public_key
        self._algorithm_identifier, self._hash_name = signature_algorithm_for(public_key)
        self._ecdsa_raw = ecdsa_raw

    @property
    def algorithm_identifier(self) -> bytes:
        return self._algorithm_identifier

    @property
    def hash_name(self) -> str:
        return self._hash_name

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        return self._public_key

    @property
    def ecdsa_raw(self) -> bool:
        return self._ecdsa_raw

    @property
    def home_executor(self) -> Executor | None:
        """The thread this signer's calls run on, if it has one of its own.
        Work that signs is best run there: ``sign_many`` then needs no
        hand-off between threads. None: any thread will do."""
        return None

    @property
    def available(self) -> bool:
        """False while the signer knows it cannot sign (its HSM is gone) and
        is waiting to recover; answered without calling the key."""
        return True

    def sign(self, data: bytes) -> bytes:
        return self.sign_many([data])[0]

    @abstractmethod
    def sign_many(self, data: Sequence[bytes]) -> list[bytes]: ...

    def close(self) -> None:
        pass

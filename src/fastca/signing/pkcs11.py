"""A signer whose key lives in a PKCS#11 token (an HSM; SoftHSM2 by default).

Every PKCS#11 call goes through ``Pkcs11Context`` and so runs on the
process's single PKCS#11 thread. A batch is one hop to that thread and one
loop of C_Sign calls there. ECDSA: the host hashes and the token signs the
digest with CKM_ECDSA, returning raw r||s; RSA: CKM_SHA256_RSA_PKCS.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11_errors
from pkcs11.util.ec import encode_ec_public_key

from fastca.errors import CANotReady, ConfigurationError, SigningFailed
from fastca.signing.base import SignerBase
from fastca.signing.pkcs11_context import Pkcs11Context
from fastca.signing.pkcs11_uri import Pkcs11Uri

__all__ = ["Pkcs11Signer", "public_key_from_token"]

_RSA_MECHANISMS = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS}


def _find_one(session: Any, object_class: ObjectClass, uri: Pkcs11Uri) -> Any:
    template: dict[Attribute, Any] = {Attribute.CLASS: object_class}
    if uri.object is not None:
        template[Attribute.LABEL] = uri.object
    if uri.id is not None:
        template[Attribute.ID] = uri.id
    if len(template) == 1:
        raise ConfigurationError(f"the key URI {uri} names no object= or id=")
    found = list(session.get_objects(template))
    if not found:
        return None
    if len(found) > 1:
        raise ConfigurationError(f"more than one {object_class.name} object matches {uri}")
    return found[0]


def public_key_from_token(public_object: Any) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    key_type = public_object[Attribute.KEY_TYPE]
    if key_type == KeyType.EC:
        return serialization.load_der_public_key(encode_ec_public_key(public_object))  # type: ignore[return-value]
    if key_type == KeyType.RSA:
        modulus = int.from_bytes(public_object[Attribute.MODULUS], "big")
        exponent = int.from_bytes(public_object[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    raise ConfigurationError(f"PKCS#11 key type {key_type!r} is not supported (RSA, EC)")


class Pkcs11Signer(SignerBase):
    """Signs with the private key a PKCS#11 URI names.

    ``softhsm_conf`` points SoftHSM at its token directory (the embedded
    default keeps one in the state directory); other modules ignore it.
    """

    def __init__(self, uri: Pkcs11Uri | str, *, softhsm_conf: str | None = None,
                 module_default: str | None = None) -> None:
        self._uri = Pkcs11Uri.parse(uri) if isinstance(uri, str) else uri
        self._context = Pkcs11Context.for_this_process()
        self._private_key, public_key = self._context.run(self._open_on_thread, softhsm_conf, module_default)
        super().__init__(public_key, ecdsa_raw=isinstance(public_key, ec.EllipticCurvePublicKey))
        self._closed = False

    def _open_on_thread(self, softhsm_conf: str | None, module_default: str | None) -> tuple[Any, Any]:
        session = self._context.session(self._uri, softhsm_conf, module_default)
        private = _find_one(session, ObjectClass.PRIVATE_KEY, self._uri)
        if private is None:
            raise CANotReady(f"no private key matches {self._uri}")
        public = _find_one(session, ObjectClass.PUBLIC_KEY, self._uri)
        if public is None:
            raise CANotReady(f"no public key object accompanies {self._uri}; fastca needs it to "
                             "check every signature")
        return private, public_key_from_token(public)

    def __repr__(self) -> str:
        return f"Pkcs11Signer({self._uri})"

    @property
    def uri(self) -> Pkcs11Uri:
        return self._uri

    def sign_many(self, data: Sequence[bytes]) -> list[bytes]:
        if self._closed:
            raise CANotReady("the PKCS#11 signer is closed")
        return self._context.run(self._sign_on_thread, list(data))

    def _sign_on_thread(self, data: list[bytes]) -> list[bytes]:
        key = self._private_key
        try:
            if self._ecdsa_raw:
                hash_new = getattr(hashlib, self._hash_name)
                return [key.sign(hash_new(item).digest(), mechanism=Mechanism.ECDSA) for item in data]
            mechanism = _RSA_MECHANISMS[self._hash_name]
            return [key.sign(item, mechanism=mechanism) for item in data]
        except (p11_errors.DeviceError, p11_errors.DeviceRemoved, p11_errors.SessionClosed,
                p11_errors.SessionHandleInvalid, p11_errors.TokenNotPresent) as exc:
            raise CANotReady(f"HSM unavailable while signing: {type(exc).__name__}") from None
        except p11_errors.PKCS11Error as exc:
            raise SigningFailed(f"HSM signing failed: {type(exc).__name__}") from None

    def close(self) -> None:
        # The session stays open on purpose (see Pkcs11Context.session); the
        # key handle is dropped so this signer can no longer be used.
        self._closed = True

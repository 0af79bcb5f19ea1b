"""A signer whose key lives in a PKCS#11 token (an HSM; SoftHSM2 by default).

Every PKCS#11 call goes through ``Pkcs11Context`` and so runs on the
process's single PKCS#11 thread. A batch is one hop to that thread and one
loop of C_Sign calls there. ECDSA: the host hashes and the token signs the
digest with CKM_ECDSA, returning raw r||s; RSA: CKM_SHA256_RSA_PKCS.

That loop runs either in native code (``_pkcs11_batch``: one GIL-free loop
over the module's function list, on the handles python-pkcs11 opened) or
through python-pkcs11's ``key.sign`` per item. The native loop is the default
because it measured faster (bench/RESULTS.md, "PKCS#11 signing path").
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Executor
from typing import Any, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11_errors
from pkcs11.util.ec import encode_ec_public_key

from fastca.errors import CANotReady, ConfigurationError, SigningFailed
from fastca.signing import _pkcs11_batch
from fastca.signing.base import SignerBase
from fastca.signing.pkcs11_context import Pkcs11Context
from fastca.signing.pkcs11_uri import Pkcs11Uri

__all__ = ["NATIVE_BATCH_DEFAULT", "Pkcs11Signer", "public_key_from_token"]

_RSA_MECHANISMS = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS}

# Measured in bench/pkcs11_batch.py (bench/RESULTS.md, "PKCS#11 signing path").
NATIVE_BATCH_DEFAULT = True

# Errors that say the token, its session or its login is gone, not that this
# signature failed: the CA is unavailable until the HSM is back (retryable).
_NOT_READY_ERRORS = (p11_errors.DeviceError, p11_errors.DeviceMemory, p11_errors.DeviceRemoved,
                     p11_errors.SessionClosed, p11_errors.SessionHandleInvalid, p11_errors.TokenNotPresent,
                     p11_errors.TokenNotRecognised, p11_errors.UserNotLoggedIn)
# The same conditions as CK_RV values, for the native path.
_NOT_READY_CK_RVS = {
    0x030: "CKR_DEVICE_ERROR",
    0x031: "CKR_DEVICE_MEMORY",
    0x032: "CKR_DEVICE_REMOVED",
    0x0B0: "CKR_SESSION_CLOSED",
    0x0B3: "CKR_SESSION_HANDLE_INVALID",
    0x0E0: "CKR_TOKEN_NOT_PRESENT",
    0x0E1: "CKR_TOKEN_NOT_RECOGNIZED",
    0x101: "CKR_USER_NOT_LOGGED_IN",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
}
# Names for the other CK_RVs a signing call plausibly returns, for the logs.
_SIGNING_CK_RVS = {
    0x002: "CKR_HOST_MEMORY",
    0x005: "CKR_GENERAL_ERROR",
    0x006: "CKR_FUNCTION_FAILED",
    0x021: "CKR_DATA_LEN_RANGE",
    0x060: "CKR_KEY_HANDLE_INVALID",
    0x063: "CKR_KEY_TYPE_INCONSISTENT",
    0x068: "CKR_KEY_FUNCTION_NOT_PERMITTED",
    0x070: "CKR_MECHANISM_INVALID",
    0x082: "CKR_OBJECT_HANDLE_INVALID",
    0x090: "CKR_OPERATION_ACTIVE",
    0x150: "CKR_BUFFER_TOO_SMALL",
}


def _error_for_ck_rv(function: str, ck_rv: int) -> CANotReady | SigningFailed:
    if ck_rv in _NOT_READY_CK_RVS:
        return CANotReady(f"HSM unavailable while signing: {function} returned {_NOT_READY_CK_RVS[ck_rv]}")
    name = _SIGNING_CK_RVS.get(ck_rv, f"CK_RV 0x{ck_rv:08x}")
    return SigningFailed(f"HSM signing failed: {function} returned {name}")


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
    ``native_batch`` picks the signing loop (see the module docstring).
    """

    def __init__(self, uri: Pkcs11Uri | str, *, softhsm_conf: str | None = None,
                 module_default: str | None = None, native_batch: bool = NATIVE_BATCH_DEFAULT) -> None:
        self._uri = Pkcs11Uri.parse(uri) if isinstance(uri, str) else uri
        self._module_path = self._uri.resolved_module_path(module_default)
        self._native_batch = native_batch
        self._context = Pkcs11Context.for_this_process()
        self._private_key, self._session_handle, public_key = self._context.run(
            self._open_on_thread, softhsm_conf, module_default)
        super().__init__(public_key, ecdsa_raw=isinstance(public_key, ec.EllipticCurvePublicKey))
        if self._ecdsa_raw:
            # CKM_ECDSA signs a digest the host computes; the token returns r||s.
            self._native_mechanism, self._host_digest = int(Mechanism.ECDSA), self._hash_name
            self._signature_size = 2 * ((public_key.curve.key_size + 7) // 8)  # type: ignore[union-attr]
        else:
            self._native_mechanism, self._host_digest = int(_RSA_MECHANISMS[self._hash_name]), None
            self._signature_size = (public_key.key_size + 7) // 8
        self._closed = False

    def _open_on_thread(self, softhsm_conf: str | None, module_default: str | None) -> tuple[Any, int, Any]:
        session = self._context.session(self._uri, softhsm_conf, module_default)
        private = _find_one(session, ObjectClass.PRIVATE_KEY, self._uri)
        if private is None:
            raise CANotReady(f"no private key matches {self._uri}")
        public = _find_one(session, ObjectClass.PUBLIC_KEY, self._uri)
        if public is None:
            raise CANotReady(f"no public key object accompanies {self._uri}; fastca needs it to "
                             "check every signature")
        if self._native_batch:
            # The module is loaded now; fail here, not at the first batch, if
            # the native path cannot reach its function list.
            try:
                _pkcs11_batch.bind_module(self._module_path)
            except (_pkcs11_batch.Pkcs11ModuleNotLoaded, _pkcs11_batch.Pkcs11CallFailed) as exc:
                raise CANotReady(f"native PKCS#11 signing unavailable: {exc}") from None
        return private, session.handle, public_key_from_token(public)

    def __repr__(self) -> str:
        return f"Pkcs11Signer({self._uri})"

    @property
    def uri(self) -> Pkcs11Uri:
        return self._uri

    @property
    def home_executor(self) -> Executor:
        return self._context.executor

    def sign_many(self, data: Sequence[bytes]) -> list[bytes]:
        if self._closed:
            raise CANotReady("the PKCS#11 signer is closed")
        return self._context.run(self._sign_on_thread, list(data))

    def _sign_on_thread(self, data: list[bytes]) -> list[bytes]:
        if self._native_batch:
            return self._sign_native(data)
        return self._sign_python_pkcs11(data)

    def _sign_native(self, data: list[bytes]) -> list[bytes]:
        # Still on the PKCS#11 thread; the loop only drops the GIL, so the
        # event loop keeps running while the token signs.
        try:
            return _pkcs11_batch.sign_batch(self._module_path, self._session_handle, self._private_key.handle,
                                            self._native_mechanism, self._host_digest, data,
                                            self._signature_size)
        except _pkcs11_batch.Pkcs11CallFailed as exc:
            raise _error_for_ck_rv(exc.function, exc.ck_rv) from None
        except _pkcs11_batch.Pkcs11ModuleNotLoaded as exc:
            raise CANotReady(f"native PKCS#11 signing unavailable: {exc}") from None

    def _sign_python_pkcs11(self, data: list[bytes]) -> list[bytes]:
        key = self._private_key
        try:
            if self._ecdsa_raw:
                hash_new = getattr(hashlib, self._hash_name)
                return [key.sign(hash_new(item).digest(), mechanism=Mechanism.ECDSA) for item in data]
            mechanism = _RSA_MECHANISMS[self._hash_name]
            return [key.sign(item, mechanism=mechanism) for item in data]
        except _NOT_READY_ERRORS as exc:
            raise CANotReady(f"HSM unavailable while signing: {type(exc).__name__}") from None
        except p11_errors.PKCS11Error as exc:
            raise SigningFailed(f"HSM signing failed: {type(exc).__name__}") from None

    def close(self) -> None:
        # The session stays open on purpose (see Pkcs11Context.session); the
        # key handle is dropped so this signer can no longer be used.
        self._closed = True

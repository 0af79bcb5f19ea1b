"""A signer whose key lives in a PKCS#11 token (an HSM; SoftHSM2 by default).

Every PKCS#11 call goes through ``Pkcs11Context`` and so runs on the
process's single PKCS#11 thread. A batch is one hop to that thread and one
loop of C_Sign calls there. ECDSA: the host hashes and the token signs the
digest with CKM_ECDSA, returning raw r||s; RSA: CKM_SHA256_RSA_PKCS.

That loop runs either in native code (``_pkcs11_batch``: one GIL-free loop
over the module's function list, on the handles python-pkcs11 opened) or
through python-pkcs11's ``key.sign`` per item. The native loop is the default
because it measured faster (bench/RESULTS.md, "PKCS#11 signing path").

Faults are classified, then recovered from without a restart. A CK_RV that
says the device, the session, the login or a handle is gone makes the signer
*unavailable* (``CANotReady``: UNAVAILABLE to callers, readiness false); any
other failure of one signature is ``SigningFailed`` (INTERNAL). An
unavailable signer recovers on its own: it re-initialises the module, opens
a session, logs in, finds the key again and checks that its public key is
still the CA certificate's before it signs again. A batch that meets a
lost session is retried once on the recovered key, so it succeeds if the
HSM is back at once; otherwise attempts are spaced (``retry_interval_s``) and
each caller in between is answered at once. A PIN the token refuses is not
tried again until its file changes: a retry loop locks the PIN of a real HSM.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11_errors
from pkcs11.util.ec import encode_ec_public_key

from fastca.errors import CANotReady, ConfigurationError, SigningFailed
from fastca.keys import spki_der
from fastca.signing import _pkcs11_batch
from fastca.signing.base import SignerBase, signature_algorithm_for
from fastca.signing.pkcs11_context import Pkcs11Context, PinRefused
from fastca.signing.pkcs11_uri import Pkcs11Uri

__all__ = ["NATIVE_BATCH_DEFAULT", "Pkcs11Signer", "public_key_from_token"]

log = logging.getLogger(__name__)

_RSA_MECHANISMS = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS}

# Measured in bench/pkcs11_batch.py (bench/RESULTS.md, "PKCS#11 signing path").
NATIVE_BATCH_DEFAULT = True

# Errors that say the token, its session or its login is gone, not that this
# signature failed: the CA is unavailable until the HSM is back (retryable).
# A key handle that no longer names an object means the token's objects went
# away under us (a token directory moved, a token re-initialised): that is
# the HSM gone, not one signature failing.
_NOT_READY_ERRORS = (p11_errors.DeviceError, p11_errors.DeviceMemory, p11_errors.DeviceRemoved,
                     p11_errors.SessionClosed, p11_errors.SessionHandleInvalid, p11_errors.TokenNotPresent,
                     p11_errors.TokenNotRecognised, p11_errors.UserNotLoggedIn, p11_errors.ObjectHandleInvalid,
                     p11_errors.KeyHandleInvalid)
# The same conditions as CK_RV values, for the native path.
_NOT_READY_CK_RVS = {
    0x030: "CKR_DEVICE_ERROR",
    0x031: "CKR_DEVICE_MEMORY",
    0x032: "CKR_DEVICE_REMOVED",
    0x060: "CKR_KEY_HANDLE_INVALID",
    0x082: "CKR_OBJECT_HANDLE_INVALID",
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
    0x063: "CKR_KEY_TYPE_INCONSISTENT",
    0x068: "CKR_KEY_FUNCTION_NOT_PERMITTED",
    0x070: "CKR_MECHANISM_INVALID",
    0x090: "CKR_OPERATION_ACTIVE",
    0x150: "CKR_BUFFER_TOO_SMALL",
}
RETRY_INTERVAL_DEFAULT_S = 1.0
_CKR_CRYPTOKI_NOT_INITIALIZED = 0x190


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


def _native_parameters(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> tuple[int, str | None, int]:
    """(mechanism, digest the host computes or None, signature size) of the native loop."""
    _, hash_name = signature_algorithm_for(public_key)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        # CKM_ECDSA signs a digest the host computes; the token returns r||s.
        return int(Mechanism.ECDSA), hash_name, 2 * ((public_key.curve.key_size + 7) // 8)
    return int(_RSA_MECHANISMS[hash_name]), None, (public_key.key_size + 7) // 8


@dataclass(frozen=True)
class _OpenKey:
    """A usable key: the handles python-pkcs11 opened, in one generation of the module."""

    private: Any                 # python-pkcs11 PrivateKey
    session_handle: int
    generation: int
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class Pkcs11Signer(SignerBase):
    """Signs with the private key a PKCS#11 URI names.

    ``softhsm_conf`` points SoftHSM at its token directory (the embedded
    default keeps one in the state directory); other modules ignore it.
    ``native_batch`` picks the signing loop (see the module docstring).
    ``expected_public_key`` (the CA certificate's) is checked against the
    token's key at every opening; with ``start_unavailable`` a signer whose
    token is absent is still built, unavailable, and recovers when the token
    appears (a server starts not ready instead of not at all).
    """

    def __init__(self, uri: Pkcs11Uri | str, *, softhsm_conf: str | None = None,
                 module_default: str | None = None, native_batch: bool = NATIVE_BATCH_DEFAULT,
                 expected_public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | None = None,
                 start_unavailable: bool = False, retry_interval_s: float = RETRY_INTERVAL_DEFAULT_S,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._uri = Pkcs11Uri.parse(uri) if isinstance(uri, str) else uri
        self._module_path = self._uri.resolved_module_path(module_default)
        self._softhsm_conf, self._module_default = softhsm_conf, module_default
        self._native_batch = native_batch
        self._expected_spki = spki_der(expected_public_key) if expected_public_key is not None else None
        self._retry_interval_s, self._monotonic = retry_interval_s, monotonic
        self._context = Pkcs11Context.for_this_process()
        # Confined to the PKCS#11 thread once built:
        self._key: _OpenKey | None = None
        self._fault: str | None = None            # why there is no usable key
        self._next_attempt = 0.0
        self._pin_refused = False
        self._refused_pin_file: tuple[int, ...] | None = None   # the PIN file's state when its PIN was refused
        self.recoveries = 0
        if start_unavailable and expected_public_key is None:
            raise ValueError("start_unavailable needs expected_public_key: the key it will sign with")
        try:
            self._key = self._context.run(self._open_on_thread)
        except (CANotReady, PinRefused) as error:
            if not start_unavailable:
                raise
            self._context.run(self._note_unavailable, error)
            log.warning("PKCS#11 signer unavailable at start; it will recover when the token does: %s",
                        self._fault)
        public_key = self._key.public_key if self._key is not None else expected_public_key
        assert public_key is not None
        super().__init__(public_key, ecdsa_raw=isinstance(public_key, ec.EllipticCurvePublicKey))
        self._native_mechanism, self._host_digest, self._signature_size = _native_parameters(public_key)
        self._closed = False

    # -- opening, on the PKCS#11 thread ----------------------------------------------

    def _open_on_thread(self) -> _OpenKey:
        generation = self._context.generation(self._module_path)
        session = self._context.session(self._uri, self._softhsm_conf, self._module_default)
        private = _find_one(session, ObjectClass.PRIVATE_KEY, self._uri)
        if private is None:
            raise CANotReady(f"no private key matches {self._uri}")
        public = _find_one(session, ObjectClass.PUBLIC_KEY, self._uri)
        if public is None:
            raise CANotReady(f"no public key object accompanies {self._uri}; fastca needs it to "
                             "check every signature")
        public_key = public_key_from_token(public)
        if self._expected_spki is not None and spki_der(public_key) != self._expected_spki:
            # A token re-initialised with a new key under the same label: signing
            # with it would issue certificates no agent can verify.
            raise CANotReady(f"the key {self._uri} names on the token is not the CA certificate's key; "
                             "refusing to sign until it is")
        if self._native_batch and not self._native_reaches(session.handle, private.handle, public_key):
            self._native_batch = False
        return _OpenKey(private, session.handle, generation, public_key)

    def _native_reaches(self, session_handle: int, key_handle: int,
                        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bool:
        """Whether the native loop can sign in python-pkcs11's session. It
        asks the module for its function list itself; most modules (SoftHSM)
        hand out their one list, but p11-kit-client hands out a new,
        uninitialised instance per call, in which python-pkcs11's session
        does not exist: that signer signs through python-pkcs11."""
        try:
            _pkcs11_batch.bind_module(self._module_path)
            mechanism, digest, size = _native_parameters(public_key)
            _pkcs11_batch.sign_batch(self._module_path, session_handle, key_handle, mechanism, digest,
                                     [b"can the native loop reach this session?"], size)
        except _pkcs11_batch.Pkcs11CallFailed as exc:
            if exc.ck_rv != _CKR_CRYPTOKI_NOT_INITIALIZED:
                raise _error_for_ck_rv(exc.function, exc.ck_rv) from None
            log.info("PKCS#11 module %s gives each caller its own instance; signing through python-pkcs11",
                     self._module_path)
            return False
        except _pkcs11_batch.Pkcs11ModuleNotLoaded as exc:
            raise CANotReady(f"native PKCS#11 signing unavailable: {exc}") from None
        return True

    def _pin_file_state(self) -> tuple[int, ...] | None:
        path = self._uri.pin_file()
        if path is None:
            return None
        try:
            info = os.stat(path)
        except OSError:
            return None
        return (info.st_ino, info.st_size, info.st_mtime_ns)

    def _usable_key(self) -> _OpenKey:
        key = self._key
        if key is not None and key.generation == self._context.generation(self._module_path):
            return key
        if key is not None:
            # Another signer of this process re-initialised the module: the
            # token is back, only this signer's session went with the old one.
            return self._recover(reinitialize=False)
        if self._pin_refused and self._pin_file_state() == self._refused_pin_file:
            raise CANotReady(self._fault or "the PKCS#11 PIN was refused")
        if self._monotonic() < self._next_attempt:
            raise CANotReady(self._fault or "the PKCS#11 signer is recovering")
        return self._recover(reinitialize=True)

    def _recover(self, reinitialize: bool) -> _OpenKey:
        try:
            if reinitialize:
                self._context.reinitialize(self._module_path)
            key = self._open_on_thread()
        except (CANotReady, ConfigurationError) as error:
            # A module that cannot be found now (a network HSM's client being
            # reinstalled, say) is an HSM that is away, like a missing token.
            self._note_unavailable(error)
            raise CANotReady(self._fault or "HSM unavailable") from None
        was = self._fault
        self._key, self._fault, self._pin_refused = key, None, False
        self.recoveries += 1
        if was is not None:
            log.warning("PKCS#11 signer %s recovered (was: %s)", self._uri, was)
        return key

    def _note_unavailable(self, error: Exception) -> None:
        self._key = None
        self._next_attempt = self._monotonic() + self._retry_interval_s
        if isinstance(error, PinRefused):
            # Once per change of the PIN file, never in a loop: a real HSM
            # locks its PIN after a few wrong attempts.
            self._pin_refused, self._refused_pin_file = True, self._pin_file_state()
            self._fault = f"HSM unavailable: {error}; correct the PIN file to try again"
            log.error("PKCS#11 signer cannot log in; not trying again until the PIN file changes: %s", error)
        else:
            self._fault = str(error)

    def _lose(self, key: _OpenKey, reason: str) -> None:
        if self._key is key:
            self._key, self._fault = None, reason
            log.error("PKCS#11 signer %s unavailable: %s", self._uri, reason)

    def __repr__(self) -> str:
        return f"Pkcs11Signer({self._uri})"

    @property
    def uri(self) -> Pkcs11Uri:
        return self._uri

    @property
    def home_executor(self) -> Executor:
        return self._context.executor

    @property
    def available(self) -> bool:
        """Whether the last attempt left a usable key (no HSM call is made)."""
        return self._key is not None

    # -- signing -----------------------------------------------------------------------

    def sign_many(self, data: Sequence[bytes]) -> list[bytes]:
        if self._closed:
            raise CANotReady("the PKCS#11 signer is closed")
        return self._context.run(self._sign_on_thread, list(data))

    def _sign_on_thread(self, data: list[bytes]) -> list[bytes]:
        key = self._usable_key()
        try:
            return self._sign_with(key, data)
        except CANotReady as error:
            self._lose(key, str(error))
        # One transparent attempt for the batch in hand: a restarted network
        # HSM or a closed session is back before the caller notices.
        try:
            key = self._recover(reinitialize=True)
        except CANotReady:
            raise CANotReady(self._fault or "HSM unavailable") from None
        try:
            return self._sign_with(key, data)
        except CANotReady as error:
            self._lose(key, str(error))
            raise

    def _sign_with(self, key: _OpenKey, data: list[bytes]) -> list[bytes]:
        if self._native_batch:
            return self._sign_native(key, data)
        return self._sign_python_pkcs11(key, data)

    def _sign_native(self, key: _OpenKey, data: list[bytes]) -> list[bytes]:
        # Still on the PKCS#11 thread; the loop only drops the GIL, so the
        # event loop keeps running while the token signs.
        try:
            return _pkcs11_batch.sign_batch(self._module_path, key.session_handle, key.private.handle,
                                            self._native_mechanism, self._host_digest, data,
                                            self._signature_size)
        except _pkcs11_batch.Pkcs11CallFailed as exc:
            raise _error_for_ck_rv(exc.function, exc.ck_rv) from None
        except _pkcs11_batch.Pkcs11ModuleNotLoaded as exc:
            raise CANotReady(f"native PKCS#11 signing unavailable: {exc}") from None

    def _sign_python_pkcs11(self, key: _OpenKey, data: list[bytes]) -> list[bytes]:
        private = key.private
        try:
            if self._ecdsa_raw:
                hash_new = getattr(hashlib, self._hash_name)
                return [private.sign(hash_new(item).digest(), mechanism=Mechanism.ECDSA) for item in data]
            mechanism = _RSA_MECHANISMS[self._hash_name]
            return [private.sign(item, mechanism=mechanism) for item in data]
        except _NOT_READY_ERRORS as exc:
            raise CANotReady(f"HSM unavailable while signing: {type(exc).__name__}") from None
        except p11_errors.PKCS11Error as exc:
            raise SigningFailed(f"HSM signing failed: {type(exc).__name__}") from None

    def close(self) -> None:
        # The session stays open on purpose (see Pkcs11Context.session); the
        # key handle is dropped so this signer can no longer be used.
        self._closed = True

"""The native PKCS#11 batch signer against a real SoftHSM2 token."""

import dataclasses
import hashlib
import time

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    encode_dss_signature,
)
from pkcs11 import Attribute, Mechanism, ObjectClass

from fastca.ca import hsm
from fastca.errors import CANotReady, SigningFailed
from fastca.signing import _pkcs11_batch
from fastca.signing.pkcs11 import Pkcs11Signer, _error_for_ck_rv
from fastca.signing.pkcs11_context import Pkcs11Context

CKR_KEY_HANDLE_INVALID = 0x60
CKR_OBJECT_HANDLE_INVALID = 0x82
CKR_SESSION_HANDLE_INVALID = 0xB3
CKR_BUFFER_TOO_SMALL = 0x150

# key type -> (mechanism, host digest, signature bytes, verifying hash)
KEY_PROFILES = {
    "ec-p256": (Mechanism.ECDSA, "sha256", 64, hashes.SHA256()),
    "ec-p384": (Mechanism.ECDSA, "sha384", 96, hashes.SHA384()),
    "rsa-2048": (Mechanism.SHA256_RSA_PKCS, None, 256, hashes.SHA256()),
}
_KEYS: dict[str, tuple] = {}


def _verify(public_key, algorithm, data, signature):
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        half = len(signature) // 2
        der = encode_dss_signature(int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big"))
        public_key.verify(der, data, ec.ECDSA(algorithm))
    else:
        public_key.verify(signature, data, padding.PKCS1v15(), algorithm)


def _handles(uri, conf):
    """(session handle, private key handle), looked up with python-pkcs11 as the signer does."""
    context = Pkcs11Context.for_this_process()

    def on_thread():
        session = context.session(uri, conf)
        key = next(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: uri.object}))
        return session.handle, key.handle

    return context.run(on_thread)


def _key(softhsm_token, key_type):
    """(uri, conf, public key, session handle, key handle) of a per-module key.
    The handles are looked up again after a signer re-initialised the module
    (its sessions, and the handles opened in them, ended with it)."""
    base, conf = softhsm_token
    uri = base.with_object(f"batch-{key_type}", "private")
    generation = Pkcs11Context.for_this_process().generation(uri.module_path)
    cached = _KEYS.get(key_type)
    if cached is None:
        public = hsm.generate_key(uri, key_type, conf)
    elif cached[0] != generation:
        public = cached[3]
    else:
        return cached[1:]
    _KEYS[key_type] = (generation, uri, conf, public, *_handles(uri, conf))
    return _KEYS[key_type][1:]


def _sign_batch_on_thread(*args):
    return Pkcs11Context.for_this_process().run(_pkcs11_batch.sign_batch, *args)


@pytest.mark.parametrize("batch", [1, 16, 200])
@pytest.mark.parametrize("key_type", list(KEY_PROFILES))
def test_native_signatures_verify(softhsm_token, key_type, batch):
    uri, _, public, session_handle, key_handle = _key(softhsm_token, key_type)
    mechanism, digest, size, algorithm = KEY_PROFILES[key_type]
    data = [b"tbs %d " % i + bytes(i % 7) * i for i in range(batch)]
    signatures = _sign_batch_on_thread(uri.module_path, session_handle, key_handle, int(mechanism), digest,
                                       data, size)
    assert len(signatures) == batch
    for item, signature in zip(data, signatures):
        assert len(signature) == size
        _verify(public, algorithm, item, signature)
    with pytest.raises(InvalidSignature):
        _verify(public, algorithm, b"other bytes", signatures[0])


def test_empty_batch(softhsm_token):
    uri, _, _, session_handle, key_handle = _key(softhsm_token, "ec-p256")
    assert _sign_batch_on_thread(uri.module_path, session_handle, key_handle, int(Mechanism.ECDSA), "sha256",
                                 [], 64) == []


def test_ecdsa_signs_the_host_digest(softhsm_token):
    """With digest=None the item is the digest itself (what CKM_ECDSA signs)."""
    uri, _, public, session_handle, key_handle = _key(softhsm_token, "ec-p256")
    prehashed = hashlib.sha256(b"already hashed").digest()
    (signature,) = _sign_batch_on_thread(uri.module_path, session_handle, key_handle, int(Mechanism.ECDSA), None,
                                         [prehashed], 64)
    _verify(public, Prehashed(hashes.SHA256()), prehashed, signature)


@pytest.mark.parametrize("native_batch", [True, False])
@pytest.mark.parametrize("key_type", list(KEY_PROFILES))
def test_signer_paths_both_verify(softhsm_token, key_type, native_batch):
    uri, conf, public, _, _ = _key(softhsm_token, key_type)
    _, _, size, algorithm = KEY_PROFILES[key_type]
    signer = Pkcs11Signer(uri, softhsm_conf=conf, native_batch=native_batch)
    data = [b"certificate %d" % i for i in range(40)]
    signatures = signer.sign_many(data)
    assert [len(s) for s in signatures] == [size] * 40
    for item, signature in zip(data, signatures):
        _verify(public, algorithm, item, signature)
    assert signer.sign_many([]) == []


def test_invalid_key_handle_is_a_typed_error(softhsm_token):
    uri, _, _, session_handle, _ = _key(softhsm_token, "ec-p256")
    with pytest.raises(_pkcs11_batch.Pkcs11CallFailed) as caught:
        _sign_batch_on_thread(uri.module_path, session_handle, 0x7FFF_FFF0, int(Mechanism.ECDSA), "sha256",
                              [b"a", b"b"], 64)
    assert caught.value.function == "C_SignInit"
    assert caught.value.ck_rv in (CKR_KEY_HANDLE_INVALID, CKR_OBJECT_HANDLE_INVALID)
    assert caught.value.item_index == 0


@pytest.mark.parametrize("native_batch", [True, False])
def test_signer_with_a_destroyed_key_fails_cleanly(softhsm_token, native_batch):
    base, conf = softhsm_token
    uri = base.with_object(f"doomed-{native_batch}", "private")
    hsm.generate_key(uri, "ec-p256", conf)
    signer = Pkcs11Signer(uri, softhsm_conf=conf, native_batch=native_batch)
    assert len(signer.sign_many([b"before"])) == 1
    context = Pkcs11Context.for_this_process()

    def destroy():
        session = context.session(uri, conf)
        for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: uri.object}):
            key.destroy()

    context.run(destroy)
    # The key's handle names nothing any more: the signer re-opens the token
    # once, finds no key under the label and is unavailable, not failing.
    with pytest.raises(CANotReady, match="no private key matches"):
        signer.sign_many([b"after"])
    assert not signer.available
    # Every other key of the module still signs (through a session re-opened after that).
    other_uri, _, public, _, _ = _key(softhsm_token, "ec-p256")
    other = Pkcs11Signer(other_uri, softhsm_conf=conf, native_batch=native_batch)
    _verify(public, hashes.SHA256(), b"still works", other.sign(b"still works"))


def test_session_errors_map_to_not_ready_and_signing_errors_to_failed():
    for ck_rv, name in [(0x0B3, "CKR_SESSION_HANDLE_INVALID"), (0x030, "CKR_DEVICE_ERROR"),
                        (0x082, "CKR_OBJECT_HANDLE_INVALID"), (0x101, "CKR_USER_NOT_LOGGED_IN")]:
        error = _error_for_ck_rv("C_Sign", ck_rv)
        assert isinstance(error, CANotReady) and name in str(error)
    for ck_rv in (0x006, 0x021, 0x150):
        assert isinstance(_error_for_ck_rv("C_Sign", ck_rv), SigningFailed)


@pytest.mark.parametrize("native_batch", [True, False])
def test_a_dropped_session_is_reopened_within_the_batch(softhsm_token, native_batch):
    uri, conf, public, _, _ = _key(softhsm_token, "ec-p256")
    signer = Pkcs11Signer(uri, softhsm_conf=conf, native_batch=native_batch)
    signer.sign(b"first")
    before = signer.recoveries
    open_key = signer._key
    # As if the HSM had dropped the session: its handle names nothing now.
    if native_batch:
        signer._key = dataclasses.replace(open_key, session_handle=0x7FFF_FFF0)
    else:
        Pkcs11Context.for_this_process().run(lambda: open_key.private.session.close())
    signature = signer.sign(b"second")
    _verify(public, hashes.SHA256(), b"second", signature)
    assert signer.recoveries == before + 1
    assert signer.available


def test_buffer_too_small_fails_and_leaves_the_session_usable(softhsm_token):
    uri, _, public, session_handle, key_handle = _key(softhsm_token, "ec-p256")
    with pytest.raises(_pkcs11_batch.Pkcs11CallFailed) as caught:
        _sign_batch_on_thread(uri.module_path, session_handle, key_handle, int(Mechanism.ECDSA), "sha256",
                              [b"x", b"y"], 32)
    assert (caught.value.function, caught.value.ck_rv) == ("C_Sign", CKR_BUFFER_TOO_SMALL)
    # The abandoned operation was finished: the next C_SignInit is not CKR_OPERATION_ACTIVE.
    (signature,) = _sign_batch_on_thread(uri.module_path, session_handle, key_handle, int(Mechanism.ECDSA),
                                         "sha256", [b"z"], 64)
    _verify(public, hashes.SHA256(), b"z", signature)


def test_module_not_loaded_is_refused():
    with pytest.raises(_pkcs11_batch.Pkcs11ModuleNotLoaded, match="not loaded"):
        _pkcs11_batch.bind_module("/nonexistent/libpkcs11-module.so")
    with pytest.raises(_pkcs11_batch.Pkcs11ModuleNotLoaded):
        _pkcs11_batch.sign_batch("/nonexistent/libpkcs11-module.so", 1, 1, int(Mechanism.ECDSA), "sha256",
                                 [b"x"], 64)


def test_bad_arguments_are_rejected(softhsm_token):
    uri, _, _, session_handle, key_handle = _key(softhsm_token, "ec-p256")
    args = (uri.module_path, session_handle, key_handle, int(Mechanism.ECDSA))
    with pytest.raises(ValueError, match="digest"):
        _sign_batch_on_thread(*args, "md5", [b"x"], 64)
    with pytest.raises(TypeError, match="bytes"):
        _sign_batch_on_thread(*args, "sha256", [bytearray(b"x")], 64)
    with pytest.raises(ValueError, match="signature_size"):
        _sign_batch_on_thread(*args, "sha256", [b"x"], 0)


def test_native_loop_releases_the_gil(softhsm_token):
    """While a long batch signs on the PKCS#11 thread, this thread keeps
    running: had the loop held the GIL, this thread would stall for about the
    whole batch."""
    uri, conf, _, _, _ = _key(softhsm_token, "ec-p256")
    signer = Pkcs11Signer(uri, softhsm_conf=conf, native_batch=True)
    data = [b"item %d" % i for i in range(3000)]
    start = last = time.perf_counter()
    longest_stall = 0.0
    future = Pkcs11Context.for_this_process().submit(signer._sign_on_thread, data)
    while not future.done():
        now = time.perf_counter()
        longest_stall = max(longest_stall, now - last)
        last = now
    elapsed = time.perf_counter() - start
    assert len(future.result()) == 3000
    assert longest_stall < elapsed / 2, (longest_stall, elapsed)

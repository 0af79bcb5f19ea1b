"""The PKCS#11 backend against a real SoftHSM2 token."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, ObjectClass

from fastca.ca import hsm
from fastca.errors import CANotReady, ConfigurationError
from fastca.signing.base import Signer
from fastca.signing.pkcs11 import Pkcs11Signer
from fastca.signing.pkcs11_context import Pkcs11Context


def _verify(signer, data, signature):
    public = signer.public_key
    if isinstance(public, ec.EllipticCurvePublicKey):
        half = len(signature) // 2
        der = encode_dss_signature(int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big"))
        public.verify(der, data, ec.ECDSA(hashes.SHA384() if signer.hash_name == "sha384" else hashes.SHA256()))
    else:
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048"])
def test_generated_key_signs_and_verifies(softhsm_token, key_type):
    base, conf = softhsm_token
    uri = base.with_object(f"sign-{key_type}", "private")
    hsm.generate_key(uri, key_type, conf)
    signer = Pkcs11Signer(uri, softhsm_conf=conf)
    assert isinstance(signer, Signer)
    assert signer.ecdsa_raw == key_type.startswith("ec")
    data = [b"to be signed %d" % i for i in range(20)]
    signatures = signer.sign_many(data)
    assert len(signatures) == 20
    for item, signature in zip(data, signatures):
        _verify(signer, item, signature)
    with pytest.raises(Exception):
        _verify(signer, b"other bytes", signatures[0])


def test_home_executor_is_the_pkcs11_thread_and_signs_there_without_a_hop(softhsm_token):
    base, conf = softhsm_token
    uri = base.with_object("home-executor", "private")
    hsm.generate_key(uri, "ec-p256", conf)
    signer = Pkcs11Signer(uri, softhsm_conf=conf)
    signing_threads: list[int] = []
    original = Pkcs11Signer._sign_on_thread

    def recording(self, data):
        signing_threads.append(threading.get_ident())
        return original(self, data)

    def batch_at_home():
        # Work submitted to the home executor may sign directly: a hand-off
        # to the PKCS#11 thread from the PKCS#11 thread would deadlock.
        return threading.get_ident(), signer.sign_many([b"home %d" % i for i in range(10)])

    Pkcs11Signer._sign_on_thread = recording
    try:
        home_thread, signatures = signer.home_executor.submit(batch_at_home).result(timeout=30)
        signer.sign_many([b"from the test thread"])
    finally:
        Pkcs11Signer._sign_on_thread = original
    assert home_thread != threading.get_ident()
    assert signing_threads == [home_thread, home_thread]
    for i, signature in enumerate(signatures):
        _verify(signer, b"home %d" % i, signature)


def test_generated_key_never_leaves_the_token(softhsm_token):
    base, conf = softhsm_token
    uri = base.with_object("sensitive-check", "private")
    hsm.generate_key(uri, "ec-p256", conf)
    context = Pkcs11Context.for_this_process()

    def attributes():
        session = context.session(uri, conf)
        key = next(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: uri.object}))
        return key[Attribute.SENSITIVE], key[Attribute.EXTRACTABLE], key[Attribute.NEVER_EXTRACTABLE]

    assert context.run(attributes) == (True, False, True)


def test_missing_key_is_not_ready(softhsm_token):
    base, conf = softhsm_token
    with pytest.raises(CANotReady, match="no private key"):
        Pkcs11Signer(base.with_object("does-not-exist", "private"), softhsm_conf=conf)


def test_repr_and_errors_never_show_the_pin(softhsm_token, tmp_path):
    base, conf = softhsm_token
    pin = base.read_pin()
    uri = base.with_object("sign-ec-p256", "private")
    assert pin not in repr(Pkcs11Signer(uri, softhsm_conf=conf))
    assert pin not in str(uri)


@pytest.mark.parametrize("native_batch", [True, False])
def test_concurrent_signers_are_confined_to_one_thread(softhsm_token, native_batch):
    """Eight threads sign at once through two signers on one token. python-pkcs11
    on SoftHSM crashes when two threads sign concurrently; the context makes
    that impossible, for the native batch loop as for python-pkcs11. Every
    signature must verify."""
    base, conf = softhsm_token
    uris = [base.with_object(f"conc-{native_batch}-{i}", "private") for i in range(2)]
    for uri in uris:
        hsm.generate_key(uri, "ec-p256", conf)
    signers = [Pkcs11Signer(uri, softhsm_conf=conf, native_batch=native_batch) for uri in uris]
    seen_threads: set[int] = set()
    original = Pkcs11Signer._sign_on_thread

    def recording(self, data):
        seen_threads.add(threading.get_ident())
        return original(self, data)

    Pkcs11Signer._sign_on_thread = recording
    try:
        def work(n):
            signer = signers[n % 2]
            data = [b"thread %d item %d" % (n, i) for i in range(25)]
            out = []
            for _ in range(10):
                out.append((signer, data, signer.sign_many(data)))
            return out

        with ThreadPoolExecutor(8) as pool:
            results = [r for batch in pool.map(work, range(8)) for r in batch]
    finally:
        Pkcs11Signer._sign_on_thread = original
    count = 0
    for signer, data, signatures in results:
        for item, signature in zip(data, signatures):
            _verify(signer, item, signature)
            count += 1
    assert count == 8 * 10 * 25
    assert len(seen_threads) == 1
    assert threading.get_ident() not in seen_threads


def test_wrong_pin_is_one_clear_error_without_the_pin(tmp_path):
    """A fresh process: the wrong PIN must fail once, cleanly, and say nothing secret."""
    import subprocess
    import sys
    import textwrap

    from fastca.ca import softhsm

    conf = softhsm.write_softhsm_conf(tmp_path)
    softhsm.init_token(conf, "pin-test", "so-pin-1234", "right-pin-5678")
    (tmp_path / "badpin").write_text("wrong-pin-0000\n")
    (tmp_path / "badpin").chmod(0o600)
    script = textwrap.dedent(f"""
        from fastca.signing.pkcs11 import Pkcs11Signer
        from fastca.errors import ConfigurationError
        try:
            Pkcs11Signer("pkcs11:token=pin-test;object=k;type=private?module-path={softhsm.find_softhsm_module()}"
                         "&pin-source=file:{tmp_path / 'badpin'}", softhsm_conf="{conf}")
        except ConfigurationError as e:
            print("ERR", e)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "ERR PKCS#11 login to token 'pin-test' failed: PIN incorrect" in proc.stdout
    assert "wrong-pin-0000" not in proc.stdout + proc.stderr
    assert "right-pin-5678" not in proc.stdout + proc.stderr


def test_context_refuses_use_after_fork():
    import os

    context = Pkcs11Context.for_this_process()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the inherited context must refuse, a new one is fresh
        try:
            context.submit(lambda: None)
            os.write(write, b"used")
        except CANotReady:
            fresh = Pkcs11Context.for_this_process()
            os.write(write, b"refused" + (b"+fresh" if fresh is not context else b""))
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 64) == b"refused+fresh"


def test_unknown_module_is_a_configuration_error(softhsm_token):
    base, conf = softhsm_token
    from fastca.signing.pkcs11_uri import Pkcs11Uri

    with pytest.raises(ConfigurationError, match="does not exist"):
        Pkcs11Signer(Pkcs11Uri(token="x", object="y", module_path="/nonexistent/module.so"))

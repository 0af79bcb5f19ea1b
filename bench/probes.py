"""Raw limits measured in the same invocation as the load, so the report can
give fastca's rate as a fraction of what the parts underneath can do:

  softhsm_<key>_1proc / _nproc   C_Sign through python-pkcs11, one token, each
                                 process with its own library and session
                                 (opened after spawn); P-256 is CKM_ECDSA on a
                                 digest the host computed, RSA-2048 is
                                 CKM_SHA256_RSA_PKCS on 600 bytes
  openssl_<key>_sign / _verify   `openssl speed -mr` (the system OpenSSL), 1 core
  pyca_issue_1proc / _nproc      pyca CertificateBuilder issuance (load + verify
                                 CSR, build, sign; offline_issuance.pyca_rate)
                                 with an in-memory CA key of the CA's type
  fastca_engine_softhsm_1proc    fastca's issuer, no RPC (offline_issuance.fastca_rate)
                                 with its key in the same SoftHSM token, batches of 64

Every probe is bounded by ``seconds`` of measuring (plus setup).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.parallel import run_parallel, sleep_until

__all__ = [
    "KEY_LABELS",
    "ProbeToken",
    "fastca_engine_rate",
    "openssl_speed",
    "pyca_issue_rate",
    "softhsm_sign_rate",
]

KEY_LABELS = {"ec-p256": "p256", "rsa-2048": "rsa2048"}
_TOKEN_LABEL = "bench-probe"
_SIGN_DATA = os.urandom(600)                 # about a TBSCertificate's size
_CHECK_CLOCK_EVERY = 64                      # calls between deadline checks
_ENGINE_BATCH = 64


@dataclass(frozen=True)
class ProbeToken:
    """A SoftHSM token of the bench's own, with one key of each type."""

    conf: str
    module: str
    pin_file: str

    @classmethod
    def create(cls, directory: Path) -> ProbeToken:
        from fastca.ca import hsm, softhsm

        directory.mkdir(parents=True, exist_ok=True)
        conf = softhsm.write_softhsm_conf(directory)
        pin = softhsm.new_pin()
        softhsm.write_secret_file(directory / "pin", pin)
        softhsm.init_token(conf, _TOKEN_LABEL, softhsm.new_pin(), pin)
        token = cls(str(conf), softhsm.find_softhsm_module(), str(directory / "pin"))
        for key_type in KEY_LABELS:
            hsm.generate_key(token.uri(key_type), key_type, token.conf)
        return token

    def uri(self, key_type: str) -> Any:
        from fastca.signing.pkcs11_uri import Pkcs11Uri

        return Pkcs11Uri(token=_TOKEN_LABEL, object=KEY_LABELS[key_type], type="private", module_path=self.module,
                         pin_source=f"file:{self.pin_file}")


def _timed_loop(step: Callable[[], Any], seconds: float, start_at: float) -> float:
    """Calls per second of ``step`` over ``seconds`` from ``start_at``."""
    sleep_until(start_at)
    began = time.perf_counter()
    deadline = began + seconds
    calls = 0
    while True:
        for _ in range(_CHECK_CLOCK_EVERY):
            step()
        calls += _CHECK_CLOCK_EVERY
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - began)


def _open_session(library: Any, pin: str, attempts: int = 5) -> Any:
    """A logged-in session. SoftHSM's file store now and then fails one of
    several processes opening the same token at the same moment
    (GeneralError; see fastca.frontend.workers); the probe measures signing,
    so a failed open is simply tried again."""
    import pkcs11.exceptions

    for attempt in range(1, attempts):
        try:
            return library.get_token(token_label=_TOKEN_LABEL).open(user_pin=pin)
        except pkcs11.exceptions.GeneralError:
            time.sleep(0.1 * attempt)
    return library.get_token(token_label=_TOKEN_LABEL).open(user_pin=pin)


def _softhsm_worker(token: ProbeToken, key_type: str, seconds: float, go: Callable[[], float]) -> float:
    os.environ["SOFTHSM2_CONF"] = token.conf
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    library = pkcs11.lib(token.module)
    pin = Path(token.pin_file).read_text().strip()
    session = _open_session(library, pin)
    try:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=KEY_LABELS[key_type])
        if key_type == "ec-p256":
            digest = hashlib.sha256(_SIGN_DATA).digest()
            step: Callable[[], Any] = lambda: key.sign(digest, mechanism=Mechanism.ECDSA)
        else:
            step = lambda: key.sign(_SIGN_DATA, mechanism=Mechanism.SHA256_RSA_PKCS)
        return _timed_loop(step, seconds, go())
    finally:
        session.close()


def softhsm_sign_rate(token: ProbeToken, key_type: str, processes: int, seconds: float) -> float:
    """Total C_Sign/s of ``processes`` processes signing at once."""
    rates = run_parallel(_softhsm_worker, [(token, key_type, seconds)] * processes, timeout_s=seconds + 60)
    return sum(rates)


def openssl_speed(seconds: float) -> dict[str, float]:
    """Sign and verify rates of the system OpenSSL, one core. ``-mr`` lines:
    +F2:<n>:2048:<sign/s>:<verify/s> (RSA), +F4:<n>:256:<sign/s>:<verify/s> (ECDSA)."""
    whole = max(1, round(seconds))
    output = subprocess.run(["openssl", "speed", "-mr", "-seconds", str(whole), "ecdsap256", "rsa2048"],
                            capture_output=True, text=True, timeout=whole * 8 + 60, check=True).stdout
    return parse_openssl_speed(output)


def parse_openssl_speed(output: str) -> dict[str, float]:
    names = {("+F2", "2048"): "openssl_rsa2048", ("+F4", "256"): "openssl_p256"}
    rates = {}
    for line in output.splitlines():
        fields = line.strip().split(":")
        name = names.get((fields[0], fields[2])) if len(fields) == 5 else None
        if name is not None:
            rates[f"{name}_sign"] = float(fields[3])
            rates[f"{name}_verify"] = float(fields[4])
    return rates


def _ca_key(key_type: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    return ec.generate_private_key(ec.SECP256R1()) if key_type == "ec-p256" else rsa.generate_private_key(65537, 2048)


def _pyca_worker(key_type: str, csrs: list[bytes], seconds: float, go: Callable[[], float]) -> float:
    import datetime as dt

    from bench.offline_issuance import pyca_rate

    from fastca.ca.certificates import self_signed_root
    from fastca.signing.software import SoftwareSigner

    key = _ca_key(key_type)
    root = self_signed_root(SoftwareSigner(key), "cluster.local", now=dt.datetime.now(dt.UTC))
    return _repeat_rate(lambda: pyca_rate(key, root, csrs), len(csrs), seconds, go())


def _repeat_rate(measure: Callable[[], float], items: int, seconds: float, start_at: float) -> float:
    """Call ``measure`` (a rate over ``items`` items) until ``seconds`` have
    passed; the overall rate."""
    sleep_until(start_at)
    done_items, spent = 0, 0.0
    while spent < seconds:
        rate = measure()
        done_items += items
        spent += items / rate
    return done_items / spent


def pyca_issue_rate(key_type: str, csrs: list[bytes], processes: int, seconds: float) -> float:
    rates = run_parallel(_pyca_worker, [(key_type, csrs, seconds)] * processes, timeout_s=seconds + 120)
    return sum(rates)


def _engine_worker(token: ProbeToken, key_type: str, csrs: list[bytes], seconds: float,
                   go: Callable[[], float]) -> float:
    from bench.engine import Engine
    from bench.offline_issuance import fastca_rate
    from fastca.signing.pkcs11 import Pkcs11Signer

    engine = Engine(Pkcs11Signer(token.uri(key_type), softhsm_conf=token.conf))
    try:
        return _repeat_rate(lambda: fastca_rate(engine, csrs, _ENGINE_BATCH), len(csrs), seconds, go())
    finally:
        engine.close()
        engine.authority.close()


def fastca_engine_rate(token: ProbeToken, key_type: str, csrs: list[bytes], seconds: float) -> float:
    """fastca's issuance engine alone, one process: what the server would
    reach with no RPC, authentication or audit around it."""
    return run_parallel(_engine_worker, [(token, key_type, csrs, seconds)], timeout_s=seconds + 120)[0]

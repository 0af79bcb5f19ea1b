"""Loading the CA a state directory describes: its certificates and its signer.

Loading checks what a production CA must never get wrong: the signer's
public key is the signing certificate's, the signing certificate is a CA
and is in date, and it chains to a root in the bundle agents trust.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fastca.ca.state import CERT_CHAIN_FILE, ROOT_CERT_FILE, SIGNING_CERT_FILE
from fastca.chain.verify import ChainInvalid, verify_chain
from fastca.clock import SYSTEM_CLOCK, Clock
from fastca.config import CAConfig, SignerConfig, resolve_path
from fastca.errors import CANotReady, ConfigurationError
from fastca.keys import require_key_matches
from fastca.signing.base import Signer

__all__ = ["CAMaterial", "check_ca", "load_ca_material", "open_signer", "load_pem_certificates", "validate_material"]


def load_pem_certificates(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"{path} does not exist") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigurationError(f"{path} holds no readable PEM certificate") from None
    return certificates


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class CAMaterial:
    signing_cert: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]   # above the signing cert, below the roots
    roots: tuple[x509.Certificate, ...]

    @property
    def signing_cert_der(self) -> bytes:
        return self.signing_cert.public_bytes(serialization.Encoding.DER)

    @property
    def subject_der(self) -> bytes:
        """The signing certificate's subject exactly as encoded in it (a
        re-encoded Name could differ, and issuer must be byte-identical)."""
        return asn1_x509.Certificate.load(self.signing_cert_der)["tbs_certificate"]["subject"].dump()

    @property
    def subject_key_id(self) -> bytes:
        try:
            return self.signing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            # RFC 5280 method 1, which is what a CA without an SKI would most likely have used.
            return x509.SubjectKeyIdentifier.from_public_key(self.signing_cert.public_key()).digest

    @property
    def not_after(self) -> dt.datetime:
        return self.signing_cert.not_valid_after_utc

    @property
    def valid_from(self) -> dt.datetime:
        """From when the signing certificate and every intermediate are valid."""
        return max(c.not_valid_before_utc for c in (self.signing_cert, *self.intermediates))

    @property
    def valid_until(self) -> dt.datetime:
        """Until when they all are: no leaf may outlive it."""
        return min(c.not_valid_after_utc for c in (self.signing_cert, *self.intermediates))

    @property
    def chain_pems(self) -> list[str]:
        """Istio response middle elements: signing cert (when it is not a
        root itself) and intermediates, one PEM each."""
        middle = [] if self.signing_cert in self.roots else [self.signing_cert]
        return [_pem(c) for c in (*middle, *self.intermediates)]

    @property
    def root_bundle_pem(self) -> str:
        return "".join(_pem(c) for c in self.roots)


def validate_material(signing_cert: x509.Certificate, chain: list[x509.Certificate],
                      roots: list[x509.Certificate], now: dt.datetime) -> CAMaterial:
    """The material, if the signing certificate is an unexpired CA certificate
    with a path of signatures through ``chain`` to a root of ``roots``.

    A CA that is not valid *yet* loads (its certificates may have been made on
    a clock slightly ahead): issuance refuses until it is, with a clear
    error. The path is checked at a moment when all of it is valid."""
    if not roots:
        raise ConfigurationError("the root bundle is empty")
    try:
        constraints = signing_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigurationError("the signing certificate is not a CA certificate (BasicConstraints CA:TRUE)")
    if signing_cert.not_valid_after_utc <= now:
        raise ConfigurationError(f"the signing certificate expired at {signing_cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z")
    untrusted = [c for c in chain if c != signing_cert and c not in roots]
    candidates = [signing_cert, *untrusted]
    latest_start = max(c.not_valid_before_utc for c in candidates)
    earliest_end = min(c.not_valid_after_utc for c in candidates)
    at = min(max(now, latest_start), earliest_end - dt.timedelta(seconds=1))
    try:
        path = verify_chain(signing_cert, untrusted, roots, at=at)
    except ChainInvalid as error:
        raise ConfigurationError(f"the CA chain of {signing_cert.subject.rfc4514_string()!r} does not verify "
                                 f"to the root bundle: {error}") from None
    return CAMaterial(signing_cert, tuple(path[1:-1]), tuple(roots))


def load_ca_material(state_dir: Path, now: dt.datetime) -> CAMaterial:
    signing = load_pem_certificates(state_dir / SIGNING_CERT_FILE)
    chain_path = state_dir / CERT_CHAIN_FILE
    chain = load_pem_certificates(chain_path) if chain_path.exists() else []
    roots = load_pem_certificates(state_dir / ROOT_CERT_FILE)
    return validate_material(signing[0], chain, roots, now)


def open_signer(signer: SignerConfig, state_dir: Path, *,
                expected_public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | None = None,
                start_unavailable: bool = False) -> Signer:
    """The configured signer. ``expected_public_key`` (the CA certificate's)
    is checked by a PKCS#11 signer each time it opens the token; with
    ``start_unavailable`` an absent token gives a signer that waits for it
    (the server) instead of an error (the command line)."""
    backend = signer.backend
    if backend == "pkcs11":
        from fastca.signing.pkcs11 import Pkcs11Signer

        if not signer.key_uri:
            raise ConfigurationError("signer.key_uri is not set in fastca.toml")
        conf = resolve_path(state_dir, signer.softhsm_conf)
        return Pkcs11Signer(signer.key_uri, softhsm_conf=str(conf.resolve()) if conf else None,
                            expected_public_key=expected_public_key, start_unavailable=start_unavailable)
    if backend == "software":
        from fastca.signing.software import SoftwareSigner

        key_file = resolve_path(state_dir, signer.key_file)
        if key_file is None:
            raise ConfigurationError("signer.key_file is not set in fastca.toml")
        return SoftwareSigner.from_pem_file(str(key_file))
    raise ConfigurationError(f"unknown signer backend {backend!r} (pkcs11, software)")


def check_ca(state_dir: Path, clock: Clock = SYSTEM_CLOCK) -> None:
    """Prove that a state directory's CA loads: its material validates and
    its signer opens with the signing certificate's key (after `fastca init`)."""
    config = CAConfig.load(state_dir)
    if config.pending_csr is not None:
        raise CANotReady(f"the CA in {state_dir} waits for its certificate: sign {config.pending_csr} "
                         "upstream, then run `fastca init --install-cert`")
    material = load_ca_material(state_dir, clock.utcnow())
    signer = open_signer(config.signer, state_dir)
    try:
        require_key_matches(signer.public_key, material.signing_cert)
    finally:
        signer.close()

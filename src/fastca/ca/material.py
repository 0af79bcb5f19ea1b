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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from fastca.ca.state import CERT_CHAIN_FILE, ROOT_CERT_FILE, SIGNING_CERT_FILE
from fastca.config import CAConfig, SignerConfig, resolve_path
from fastca.errors import CANotReady, ConfigurationError
from fastca.signing.base import Signer

__all__ = ["CAMaterial", "load_ca_material", "open_signer", "load_pem_certificates", "LoadedCA", "load_ca"]


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


def _is_self_signed(certificate: x509.Certificate) -> bool:
    if certificate.issuer != certificate.subject:
        return False
    try:
        certificate.verify_directly_issued_by(certificate)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


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
    intermediates = [c for c in chain if c != signing_cert and c not in roots and not _is_self_signed(c)]
    # Walk signing cert -> intermediates -> a root: each must be signed by the next.
    current = signing_cert
    remaining = list(intermediates)
    while current not in roots:
        parent = next((c for c in roots if _issued_by(current, c)), None)
        if parent is not None:
            break
        parent = next((c for c in remaining if _issued_by(current, c)), None)
        if parent is None:
            raise ConfigurationError(f"the CA chain is broken: nothing in cert-chain or the root bundle signed "
                                     f"{current.subject.rfc4514_string()!r}")
        remaining.remove(parent)
        current = parent
    return CAMaterial(signing_cert, tuple(intermediates), tuple(roots))


def load_ca_material(state_dir: Path, now: dt.datetime) -> CAMaterial:
    signing = load_pem_certificates(state_dir / SIGNING_CERT_FILE)
    chain_path = state_dir / CERT_CHAIN_FILE
    chain = load_pem_certificates(chain_path) if chain_path.exists() else []
    roots = load_pem_certificates(state_dir / ROOT_CERT_FILE)
    return validate_material(signing[0], chain, roots, now)


def open_signer(signer: SignerConfig, state_dir: Path) -> Signer:
    backend = signer.backend
    if backend == "pkcs11":
        from fastca.signing.pkcs11 import Pkcs11Signer

        if not signer.key_uri:
            raise ConfigurationError("signer.key_uri is not set in fastca.toml")
        conf = resolve_path(state_dir, signer.softhsm_conf)
        return Pkcs11Signer(signer.key_uri, softhsm_conf=str(conf.resolve()) if conf else None)
    if backend == "software":
        from fastca.signing.software import SoftwareSigner

        key_file = resolve_path(state_dir, signer.key_file)
        if key_file is None:
            raise ConfigurationError("signer.key_file is not set in fastca.toml")
        return SoftwareSigner.from_pem_file(str(key_file))
    raise ConfigurationError(f"unknown signer backend {backend!r} (pkcs11, software)")


def _public_der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class LoadedCA:
    config: CAConfig
    material: CAMaterial
    signer: Signer

    def close(self) -> None:
        self.signer.close()


def load_ca(state_dir: Path, now: dt.datetime | None = None) -> LoadedCA:
    config = CAConfig.load(state_dir)
    if config.pending_csr is not None:
        raise CANotReady(f"the CA in {state_dir} waits for its certificate: sign {config.pending_csr} "
                         "upstream, then run `fastca init --install-cert`")
    material = load_ca_material(state_dir, now or dt.datetime.now(dt.timezone.utc))
    signer = open_signer(config.signer, state_dir)
    if _public_der(signer.public_key) != _public_der(material.signing_cert.public_key()):
        signer.close()
        raise ConfigurationError("the signer's key does not match the signing certificate's public key")
    return LoadedCA(config, material, signer)

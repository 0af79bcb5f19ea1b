"""`fastca init`: create or import a CA into a state directory.

Every path ends with the same files (see fastca.ca.state) and never
destroys an existing CA unless ``force`` is given.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fastca.ca import hsm, softhsm
from fastca.ca.certificates import ca_csr, self_signed_root
from fastca.ca.material import check_ca, load_pem_certificates, open_signer, validate_material
from fastca.ca.state import CERT_CHAIN_FILE, CONFIG_FILE, ROOT_CERT_FILE, SIGNING_CERT_FILE
from fastca.clock import SYSTEM_CLOCK, Clock
from fastca.config import CAConfig, IssuanceConfig, SignerConfig, write_lifecycle
from fastca.errors import ConfigurationError
from fastca.keys import spki_der
from fastca.signing.pkcs11_uri import Pkcs11Uri

__all__ = ["InitOptions", "init_ca", "install_cert", "install_issued_certificate", "new_software_key", "write_pem", "EMBEDDED_TOKEN_LABEL", "EMBEDDED_KEY_LABEL"]

EMBEDDED_TOKEN_LABEL = "fastca"
EMBEDDED_KEY_LABEL = "fastca-ca"
_SOFTWARE_KEY_FILE = "ca-key.pem"
_PIN_FILE = "pin"
_SO_PIN_FILE = "so-pin"
# Everything `init --force` may replace in a state directory it created.
_OWNED = (CONFIG_FILE, SIGNING_CERT_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE, _PIN_FILE, _SO_PIN_FILE,
          "softhsm2.conf", "tokens", _SOFTWARE_KEY_FILE, "ca.csr", "rotation")


@dataclass(frozen=True)
class InitOptions:
    trust_domain: str = "cluster.local"
    key_type: str = "ec-p256"
    key_uri: str | None = None               # an existing HSM's key (found or generated there)
    software_key: bool = False               # keep the key in a 0600 PEM file instead of an HSM
    import_istio_cacerts: Path | None = None
    csr_out: Path | None = None
    force: bool = False
    root_lifetime_days: int = 3650
    issuance: IssuanceConfig = IssuanceConfig()


def write_pem(path: Path, certificates: list[x509.Certificate]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    tmp.replace(path)


def _remove_owned(state_dir: Path) -> None:
    for name in _OWNED:
        target = state_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _prepare_state_dir(state_dir: Path, force: bool) -> None:
    if (state_dir / CONFIG_FILE).exists():
        if not force:
            raise ConfigurationError(f"{state_dir} already holds a CA; pass --force to replace it "
                                     "(its key and certificates will be destroyed)")
        _remove_owned(state_dir)
    elif any((state_dir / name).exists() for name in _OWNED):
        # Left by something other than a completed init (fastca cleans up its own failures).
        if not force:
            raise ConfigurationError(f"{state_dir} holds CA files but no fastca.toml; pass --force to replace them")
        _remove_owned(state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def _embedded_token(state_dir: Path) -> tuple[Pkcs11Uri, Path]:
    conf = softhsm.write_softhsm_conf(state_dir)
    user_pin, so_pin = softhsm.new_pin(), softhsm.new_pin()
    softhsm.write_secret_file(state_dir / _PIN_FILE, user_pin)
    softhsm.write_secret_file(state_dir / _SO_PIN_FILE, so_pin)
    softhsm.init_token(conf, EMBEDDED_TOKEN_LABEL, so_pin, user_pin)
    uri = Pkcs11Uri(token=EMBEDDED_TOKEN_LABEL, object=EMBEDDED_KEY_LABEL, type="private",
                    module_path=softhsm.find_softhsm_module(),
                    pin_source=f"file:{(state_dir / _PIN_FILE).resolve()}")
    return uri, conf


def _pin_into_file(uri: Pkcs11Uri, state_dir: Path) -> Pkcs11Uri:
    """A URI given with pin-value= is kept with the PIN moved into the state
    directory's 0600 ``pin`` file (pin-source=file:): the configuration file
    never holds a PIN, and every later start reads the real one."""
    if uri.pin_value is None:
        return uri
    if uri.pin_source is not None:
        raise ConfigurationError("the key URI gives both pin-value and pin-source; give one")
    pin_file = state_dir / _PIN_FILE
    softhsm.write_secret_file(pin_file, uri.pin_value)
    return dataclasses.replace(uri, pin_value=None, pin_source=f"file:{pin_file.resolve()}")


def _load_istio_cacerts(directory: Path) -> tuple[object, list[x509.Certificate], list[x509.Certificate],
                                                  list[x509.Certificate]]:
    """(key, signing cert(s), chain, roots) from an Istio `cacerts` directory
    (ca-cert.pem/ca-key.pem/cert-chain.pem/root-cert.pem, or tls.crt/tls.key/ca.crt)."""
    if (directory / "ca-key.pem").exists():
        key_file, cert_file, chain_file, root_file = "ca-key.pem", "ca-cert.pem", "cert-chain.pem", "root-cert.pem"
    elif (directory / "tls.key").exists():
        key_file, cert_file, chain_file, root_file = "tls.key", "tls.crt", "tls.crt", "ca.crt"
    else:
        raise ConfigurationError(f"{directory} holds neither ca-key.pem nor tls.key (Istio cacerts layout)")
    try:
        key = serialization.load_pem_private_key((directory / key_file).read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(f"{directory / key_file} is not an unencrypted PEM private key "
                                 "(PKCS#1, SEC1 or PKCS#8)") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ConfigurationError("only RSA and EC CA keys can be imported")
    signing = load_pem_certificates(directory / cert_file)
    chain = load_pem_certificates(directory / chain_file) if (directory / chain_file).exists() else []
    roots = load_pem_certificates(directory / root_file)
    if spki_der(key) != spki_der(signing[0]):
        raise ConfigurationError(f"{key_file} is not the key of {cert_file}")
    return key, signing, chain, roots


def init_ca(state_dir: Path, options: InitOptions, clock: Clock = SYSTEM_CLOCK) -> CAConfig:
    now = clock.utcnow()
    if options.key_type not in hsm.KEY_TYPES:
        raise ConfigurationError(f"unknown key type {options.key_type!r}; choose one of {', '.join(hsm.KEY_TYPES)}")
    imported = _load_istio_cacerts(options.import_istio_cacerts) if options.import_istio_cacerts else None
    if imported is not None:
        validate_material(imported[1][0], imported[2], imported[3], now)
    _prepare_state_dir(state_dir, options.force)
    try:
        return _create(state_dir, options, imported, clock)
    except BaseException:
        # A CA is all or nothing: what this attempt wrote goes, so that the
        # next attempt starts clean (a stray token labelled "fastca" would
        # make the embedded token ambiguous).
        _remove_owned(state_dir)
        raise


def _create(state_dir: Path, options: InitOptions, imported: tuple | None, clock: Clock) -> CAConfig:
    softhsm_conf: Path | None = None
    if options.software_key:
        signer_config = SignerConfig(backend="software", key_file=_SOFTWARE_KEY_FILE, key_type=options.key_type)
        key = imported[0] if imported else new_software_key(options.key_type)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                                serialization.NoEncryption()).decode()
        softhsm.write_secret_file(state_dir / _SOFTWARE_KEY_FILE, pem.rstrip("\n"))
    else:
        if options.key_uri:
            uri = _pin_into_file(Pkcs11Uri.parse(options.key_uri), state_dir)
        else:
            uri, softhsm_conf = _embedded_token(state_dir)
        conf_text = str(softhsm_conf.resolve()) if softhsm_conf else None
        if imported is not None:
            if hsm.key_exists(uri, conf_text):
                raise ConfigurationError(f"the token already holds a key matching {uri}; choose another object=")
            hsm.import_private_key(uri, imported[0], conf_text)
        elif not hsm.key_exists(uri, conf_text):
            hsm.generate_key(uri, options.key_type, conf_text)
        signer_config = SignerConfig(
            backend="pkcs11", key_uri=str(uri),
            softhsm_conf=softhsm_conf.name if softhsm_conf else None,
            key_type=None if imported else options.key_type)

    pending_csr: str | None = None
    if imported is not None:
        _, signing, chain, roots = imported
        write_pem(state_dir / SIGNING_CERT_FILE, signing[:1])
        write_pem(state_dir / CERT_CHAIN_FILE, chain or signing[:1])
        write_pem(state_dir / ROOT_CERT_FILE, roots)
    else:
        signer = open_signer(signer_config, state_dir)
        try:
            if options.csr_out is not None:
                request = ca_csr(signer, options.trust_domain)
                options.csr_out.write_bytes(request.public_bytes(serialization.Encoding.PEM))
                pending_csr = str(options.csr_out.resolve())
            else:
                root = self_signed_root(signer, options.trust_domain, now=clock.utcnow(),
                                        lifetime=dt.timedelta(days=options.root_lifetime_days))
                for name in (SIGNING_CERT_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE):
                    write_pem(state_dir / name, [root])
        finally:
            signer.close()
    write_lifecycle(state_dir, trust_domain=options.trust_domain, signer=signer_config,
                    issuance=options.issuance, pending_csr=pending_csr)
    if pending_csr is None:
        check_ca(state_dir, clock)  # prove the new CA loads and its key matches
    return CAConfig.load(state_dir)


def install_issued_certificate(target: Path, state_dir: Path, signer: SignerConfig, cert: Path,
                               chain: Path | None, root: Path, now: dt.datetime, *, whose: str) -> None:
    """Write an upstream CA's certificate for ``signer``'s key into
    ``target`` (the state directory, or a rotation's next CA), once it is
    proved to be a CA certificate for that key that chains to ``root``."""
    signing = load_pem_certificates(cert)
    chain_certs = load_pem_certificates(chain) if chain else signing[1:]
    roots = load_pem_certificates(root)
    validate_material(signing[0], chain_certs, roots, now)
    opened = open_signer(signer, state_dir)
    try:
        if spki_der(opened.public_key) != spki_der(signing[0]):
            raise ConfigurationError(f"{cert} is not a certificate for {whose}")
    finally:
        opened.close()
    write_pem(target / SIGNING_CERT_FILE, signing[:1])
    write_pem(target / CERT_CHAIN_FILE, [signing[0], *chain_certs])
    write_pem(target / ROOT_CERT_FILE, roots)


def install_cert(state_dir: Path, cert: Path, chain: Path | None, root: Path,
                 clock: Clock = SYSTEM_CLOCK) -> CAConfig:
    """Finish `init --csr-out`: install the certificate the upstream CA issued."""
    config = CAConfig.load(state_dir)
    install_issued_certificate(state_dir, state_dir, config.signer, cert, chain, root, clock.utcnow(),
                               whose="this CA's key")
    write_lifecycle(state_dir, pending_csr=None)
    check_ca(state_dir, clock)
    return CAConfig.load(state_dir)


def new_software_key(key_type: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    kind, size = hsm.KEY_TYPES[key_type]
    if kind.name == "EC":
        return ec.generate_private_key(ec.SECP256R1() if size == "secp256r1" else ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=size)

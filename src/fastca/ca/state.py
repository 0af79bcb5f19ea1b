"""The state directory and its readable configuration file (fastca.toml).

Layout (Istio's file names where Istio has one):
    fastca.toml        this configuration
    ca-cert.pem        the signing certificate
    cert-chain.pem     signing certificate + intermediates (no root)
    root-cert.pem      the root bundle agents trust (one or more roots)
    softhsm2.conf, tokens/, pin, so-pin   the embedded SoftHSM token (0600 PIN files)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomli_w

from fastca.errors import ConfigurationError

__all__ = ["CAConfig", "SignerConfig", "IssuanceConfig", "default_state_dir", "CONFIG_FILE"]

CONFIG_FILE = "fastca.toml"
SIGNING_CERT_FILE = "ca-cert.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
ROOT_CERT_FILE = "root-cert.pem"


def default_state_dir() -> Path:
    return Path(os.environ.get("FASTCA_STATE_DIR", ".fastca"))


@dataclass(frozen=True)
class SignerConfig:
    backend: str = "pkcs11"             # "pkcs11" | "software"
    key_uri: str | None = None          # pkcs11: RFC 7512 URI (pin-source, never pin-value, preferred)
    softhsm_conf: str | None = None     # embedded SoftHSM token's configuration, relative to the state dir
    key_file: str | None = None         # software: PEM private key, relative to the state dir
    key_type: str | None = None         # informational: what `fastca init` generated


@dataclass(frozen=True)
class IssuanceConfig:
    default_ttl_seconds: int = 86400
    max_ttl_seconds: int = 90 * 86400
    backdate_seconds: int = 120
    istio_key_usage: bool = False       # True: digitalSignature+keyEncipherment on EC leaves too, like istiod


@dataclass(frozen=True)
class CAConfig:
    trust_domain: str = "cluster.local"
    signer: SignerConfig = field(default_factory=SignerConfig)
    issuance: IssuanceConfig = field(default_factory=IssuanceConfig)
    pending_csr: str | None = None      # set between `init --csr-out` and `init --install-cert`

    @classmethod
    def load(cls, state_dir: Path) -> CAConfig:
        path = state_dir / CONFIG_FILE
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(f"no CA in {state_dir}: run `fastca init --state {state_dir}` first") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None
        try:
            return cls(
                trust_domain=data.get("trust_domain", "cluster.local"),
                signer=SignerConfig(**data.get("signer", {})),
                issuance=IssuanceConfig(**data.get("issuance", {})),
                pending_csr=data.get("pending_csr"),
            )
        except TypeError as exc:
            raise ConfigurationError(f"{path}: {exc}") from None

    def save(self, state_dir: Path) -> None:
        body = {k: v for k, v in asdict(self).items() if v is not None}
        body["signer"] = {k: v for k, v in body["signer"].items() if v is not None}
        text = ("# fastca CA configuration, written by `fastca init`. Paths are relative to this directory.\n"
                + tomli_w.dumps(body))
        tmp = state_dir / (CONFIG_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, state_dir / CONFIG_FILE)

    def path(self, state_dir: Path, name: str | None) -> Path | None:
        if name is None:
            return None
        candidate = Path(name)
        return candidate if candidate.is_absolute() else state_dir / candidate

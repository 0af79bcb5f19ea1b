"""The state directory's layout. Its configuration file is fastca.config.

Layout (Istio's file names where Istio has one):
    fastca.toml        this configuration
    ca-cert.pem        the signing certificate
    cert-chain.pem     signing certificate + intermediates (no root)
    root-cert.pem      the root bundle agents trust (one or more roots)
    softhsm2.conf, tokens/, pin, so-pin   the embedded SoftHSM token (0600 PIN files)
"""

from __future__ import annotations

import os
from pathlib import Path

from fastca.config import CONFIG_FILE

__all__ = ["default_state_dir", "CONFIG_FILE", "SIGNING_CERT_FILE", "CERT_CHAIN_FILE", "ROOT_CERT_FILE"]

SIGNING_CERT_FILE = "ca-cert.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
ROOT_CERT_FILE = "root-cert.pem"


def default_state_dir() -> Path:
    return Path(os.environ.get("FASTCA_STATE_DIR", ".fastca"))

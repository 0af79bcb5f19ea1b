"""SecretItem -> Envoy ``Secret`` messages, packed as ``Any``: the pure half
of the SDS server (no I/O, no state)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from google.protobuf import any_pb2

from fastca.agent.secrets import SecretItem

__all__ = ["SECRET_TYPE_URL", "combined_version", "new_nonce", "pack", "secret_message"]

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def secret_message(item: SecretItem) -> secret_pb2.Secret:
    """A root item becomes ``validation_context.trusted_ca``; anything else
    becomes ``tls_certificate`` (chain + key), all as inline bytes."""
    if item.is_root:
        return secret_pb2.Secret(
            name=item.name,
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(inline_bytes=item.trusted_ca)))
    return secret_pb2.Secret(
        name=item.name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=item.certificate_chain),
            private_key=base_pb2.DataSource(inline_bytes=item.private_key)))


def pack(item: SecretItem) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(secret_message(item))
    return packed


def combined_version(items: Iterable[SecretItem]) -> str:
    """One version string for a set of secrets: the item's own version when
    there is one item (what Envoy's config dump then shows), else a short
    digest of the sorted ``name=version`` pairs."""
    pairs = sorted((item.name, item.version) for item in items)
    if len(pairs) == 1:
        return pairs[0][1]
    digest = hashlib.sha256("\n".join(f"{n}\0{v}" for n, v in pairs).encode()).hexdigest()
    return digest[:16]


def new_nonce() -> str:
    return secrets.token_hex(8)

"""From a grpc.aio call to the RequestInfo authenticators read."""

from __future__ import annotations

import functools
import ipaddress
from urllib.parse import unquote

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fastca.authn.caller import RequestInfo

__all__ = ["request_info", "peer_ip"]

# Header values an agent sends are short; a huge one is an attack, not a credential.
_MAX_HEADER_BYTES = 16 * 1024


# An agent keeps its connection, so the same peer string comes back call
# after call; ipaddress parsing is slow enough to be worth remembering.
@functools.lru_cache(maxsize=8192)
def peer_ip(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """'ipv4:127.0.0.1:5000' / 'ipv6:[::1]:5000' -> address; other transports -> None."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rsplit(":", 1)[0]
    elif kind == "ipv6":
        host = unquote(rest).rsplit(":", 1)[0].strip("[]")
    else:
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def request_info(context: grpc.aio.ServicerContext) -> RequestInfo:
    metadata: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key.endswith("-bin") or key in metadata:
            continue
        text = value if isinstance(value, str) else value.decode("latin-1")
        if len(text) <= _MAX_HEADER_BYTES:
            metadata[key.lower()] = text
    peer = context.peer() or ""
    certificates: tuple[bytes, ...] = ()
    auth = context.auth_context() or {}
    pem_certs = auth.get("x509_pem_cert") or []
    if pem_certs:
        # grpcio exposes only the leaf, and only after the TLS layer verified
        # the chain (the mTLS port requires and verifies client certificates).
        leaf = x509.load_pem_x509_certificate(pem_certs[0])
        certificates = (leaf.public_bytes(serialization.Encoding.DER),)
    return RequestInfo(metadata=metadata, peer=peer, peer_ip=peer_ip(peer), peer_certificates=certificates)

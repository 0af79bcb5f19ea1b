"""From a native call to the RequestInfo authenticators read."""

from __future__ import annotations

import functools
import ipaddress

from fastca.authn.caller import RequestInfo, peer_host
from fastca.frontend._grpc import Call

__all__ = ["request_info", "peer_ip"]


# An agent keeps its connection, so the same peer string comes back call
# after call; ipaddress parsing is slow enough to be worth remembering.
@functools.lru_cache(maxsize=8192)
def peer_ip(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """'ipv4:127.0.0.1:5000' / 'ipv6:[::1]:5000' -> address; other transports -> None."""
    host = peer_host(peer)
    if not host:
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def request_info(call: Call) -> RequestInfo:
    """The call's metadata (lower-case keys, the first value of each, bounded
    by the core; ``-bin`` values as bytes), its peer, the client certificate
    the TLS layer verified on its connection, and that connection's cache."""
    connection = call.connection
    certificate = connection.peer_certificate
    return RequestInfo(metadata=call.metadata, peer=connection.peer, peer_ip=peer_ip(connection.peer),
                       peer_certificates=(certificate,) if certificate else (), connection_cache=connection.cache)

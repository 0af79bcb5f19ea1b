"""Who is calling: what authenticators produce and everything after them consumes."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Mapping, Protocol, runtime_checkable
from urllib.parse import unquote

from fastca.errors import AuthenticationFailed

__all__ = ["KubernetesInfo", "Caller", "RequestInfo", "Authenticator", "MAX_BEARER_TOKEN_BYTES", "PENDING",
           "peer_host"]

class _Pending:
    """What ``authenticate_now`` returns when only awaiting can tell."""

    def __repr__(self) -> str:
        return "PENDING"


PENDING = _Pending()

# Service-account and OIDC tokens are a few KiB; anything far larger is refused unread.
MAX_BEARER_TOKEN_BYTES = 16 * 1024


def peer_host(peer: str) -> str:
    """The address in a gRPC peer string, bare: 'ipv4:10.1.2.3:5000' ->
    '10.1.2.3', 'ipv6:[fd00::1]:5000' (brackets maybe percent-encoded) ->
    'fd00::1'; '' for other transports ('unix:...', 'local'). The audit log
    keeps the same strings."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return unquote(rest).rpartition(":")[0].strip("[]")
    return ""


@dataclass(frozen=True)
class KubernetesInfo:
    namespace: str
    service_account: str
    pod_name: str | None = None
    pod_uid: str | None = None
    cluster_id: str = ""
    node_name: str | None = None              # the pod's node, when the token says (Kubernetes 1.30+)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. ``identities`` are what istiod calls the
    caller's identities: SPIFFE IDs (or DNS names / IPs for XFCC and client
    certificates), in the order the credential gave them."""

    identities: tuple[str, ...]
    credential_type: str                      # "mtls" | "k8s-tokenreview" | "oidc" | "xfcc" | plug-in name
    kubernetes: KubernetesInfo | None = None
    # True when an authenticator that remembers verdicts (the TokenReview
    # cache) judged the credential for this very call, False when the verdict
    # came from its memory: risk policy's fresh_token asks for the former.
    judged_now: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class RequestInfo:
    """What an authenticator may look at. Built by the front end per call."""

    metadata: Mapping[str, str]               # lower-case keys, first value of each
    peer: str                                 # gRPC peer string, e.g. "ipv4:127.0.0.1:52100"
    peer_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    # DER certificates the TLS layer verified against the CA roots, leaf first;
    # empty when the peer presented none.
    peer_certificates: tuple[bytes, ...] = field(default=())
    # Per-connection memory (a dict the front end keeps for the connection):
    # what depends only on the connection, such as the client certificate's
    # verdict, is worked out once and found here by the connection's next calls.
    connection_cache: dict | None = field(default=None, compare=False)

    @property
    def bearer_token(self) -> str | None:
        value = self.metadata.get("authorization")
        if value is None:
            return None
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()

    def bounded_bearer_token(self) -> str | None:
        """The bearer token, refusing one too large to be a real token."""
        token = self.bearer_token
        if token is not None and len(token) > MAX_BEARER_TOKEN_BYTES:
            raise AuthenticationFailed("bearer token too large")
        return token

    @property
    def cluster_id(self) -> str:
        return self.metadata.get("clusterid", "")

    def __repr__(self) -> str:
        # Never print the metadata: it carries bearer tokens.
        return f"RequestInfo(peer={self.peer!r}, headers={sorted(self.metadata)}, certs={len(self.peer_certificates)})"


@runtime_checkable
class Authenticator(Protocol):
    """One way of authenticating. Returns None when the request carries no
    credential of its kind; raises fastca.errors.AuthenticationFailed (with
    an internal detail) when it carries one that does not hold.

    An authenticator may also offer ``authenticate_now(request)``, the same
    verdict without awaiting, returning PENDING when it cannot give one
    without I/O (the chain then awaits ``authenticate``)."""

    name: str

    async def authenticate(self, request: RequestInfo) -> Caller | None: ...

from __future__ import annotations

import base64
import ipaddress
import json
import time
from typing import Any

from fastca.authn.caller import RequestInfo

TRUST_DOMAIN = "cluster.local"


class FakeClock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def request(*, token: str | None = None, cluster_id: str | None = None, peer_ip: str | None = "10.1.2.3",
            certificates: tuple[bytes, ...] = (), **headers: str) -> RequestInfo:
    metadata = {k.replace("_", "-"): v for k, v in headers.items()}
    if token is not None:
        metadata["authorization"] = f"Bearer {token}"
    if cluster_id is not None:
        metadata["clusterid"] = cluster_id
    ip = ipaddress.ip_address(peer_ip) if peer_ip is not None else None
    peer = "unknown" if ip is None else (f"ipv4:{ip}:50000" if ip.version == 4 else f"ipv6:[{ip}]:50000")
    return RequestInfo(metadata=metadata, peer=peer, peer_ip=ip, peer_certificates=certificates)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_jwt(claims: dict[str, Any], header: dict[str, Any] | None = None, signature: bytes = b"sig") -> str:
    """JWT-shaped text with any header/claims and a meaningless signature:
    what the API server judges in TokenReview tests, and forged tokens in
    OIDC tests."""
    header = header if header is not None else {"alg": "RS256", "kid": "k1"}
    return ".".join([b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode()), b64url(signature)])

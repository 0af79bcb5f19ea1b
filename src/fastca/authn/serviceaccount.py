"""Kubernetes service-account names and the SPIFFE IDs Istio derives from them.

One place for the three string rules every Kubernetes-backed authenticator
and the node authorizer share, so they cannot drift apart:

- a token's username / ``sub`` is exactly ``system:serviceaccount:<ns>:<sa>``;
- the identity is ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``;
- a requested identity parses back only if it has exactly that shape.
"""

from __future__ import annotations

import re

__all__ = ["parse_service_account_spiffe_id", "parse_service_account_username", "service_account_spiffe_id"]

# Namespaces are DNS labels and service accounts DNS subdomains; the API
# server enforces that, so anything else in a token means it did not come
# from one. Checking here keeps odd text out of the identity we build.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_SPIFFE = re.compile(r"spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)")


def _valid_name(value: str) -> bool:
    return _NAME.fullmatch(value) is not None


def parse_service_account_username(username: object) -> tuple[str, str] | None:
    """``system:serviceaccount:<ns>:<sa>`` → (ns, sa); anything else → None."""
    if not isinstance(username, str):
        return None
    parts = username.split(":")
    if len(parts) != 4 or parts[0] != "system" or parts[1] != "serviceaccount":
        return None
    namespace, service_account = parts[2], parts[3]
    if not (_valid_name(namespace) and _valid_name(service_account)):
        return None
    return namespace, service_account


def service_account_spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def parse_service_account_spiffe_id(identity: str, trust_domain: str) -> tuple[str, str] | None:
    """``spiffe://<trust_domain>/ns/<ns>/sa/<sa>`` → (ns, sa); another trust
    domain or any other shape → None."""
    match = _SPIFFE.fullmatch(identity)
    if match is None or match.group(1) != trust_domain:
        return None
    namespace, service_account = match.group(2), match.group(3)
    if not (_valid_name(namespace) and _valid_name(service_account)):
        return None
    return namespace, service_account

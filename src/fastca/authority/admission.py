"""Admission, the Authority's first stage: what a caller may have certified.

It runs on the event loop, per request, before anything is batched: the
caller's identity (or, for impersonation, the node authorizer's verdict on
the identity it asks for), then policy (source network, time window, rate).
Its output is an ``IssueRequest`` (what to certify) and an
``IssuanceContext`` (who asked, for the audit record). The CSR is not looked
at here: nothing of it is parsed before the caller is admitted.

Local principals (the operator at ``fastca issue``, the server's own serving
certificate) are admitted by ``admit_local``: the identity must be in the
CA's trust domain, and only the server itself may add DNS and IP names.
"""

from __future__ import annotations

from fastca.audit.record import IssuanceContext
from fastca.authn.caller import Caller, RequestInfo
from fastca.authn.node_authorizer import IMPERSONATION_FAILURE, NodeAuthorizer
from fastca.authority.request import IssueRequest
from fastca.errors import AuthenticationFailed, InvalidRequest
from fastca.observability.logging import get_logger
from fastca.policy.request import RequestPolicy, spiffe_identity_of
from fastca.policy.risk import RiskPolicy

__all__ = ["Admission", "LocalPrincipal", "SERVER_PRINCIPAL"]


class LocalPrincipal:
    """Someone on this machine asking directly: ``credential_type`` names the
    path ("cli", "self"), ``name`` who it was (e.g. "unix:alice(uid=1000)")."""

    __slots__ = ("credential_type", "name")

    def __init__(self, credential_type: str, name: str) -> None:
        self.credential_type = credential_type
        self.name = name

    def __repr__(self) -> str:
        return f"LocalPrincipal({self.credential_type!r}, {self.name!r})"


SERVER_PRINCIPAL = LocalPrincipal("self", "fastca-server")

log = get_logger("fastca.admission")


class Admission:
    name = "admission"

    def __init__(self, *, signer: str, trust_domain: str, policy: RequestPolicy,
                 node_authorizer: NodeAuthorizer | None, risk: RiskPolicy | None = None) -> None:
        self.signer = signer
        self.trust_domain = trust_domain
        self._policy = policy
        self._node_authorizer = node_authorizer
        self._risk = risk

    async def admit(self, caller: Caller, info: RequestInfo, *, csr: bytes, ttl_seconds: int,
                    impersonate: str, request_id: str,
                    fresh_credential: bool = False) -> tuple[IssueRequest, IssuanceContext]:
        """Identity (own, or impersonated through the node authorizer), then
        policy, then risk policy. ``fresh_credential``: the caller was just
        authenticated without any cached verdict."""
        if impersonate:
            if self._node_authorizer is None:
                raise AuthenticationFailed("impersonation requested but no trusted node accounts are configured",
                                           public_message=IMPERSONATION_FAILURE)
            node = await self._node_authorizer.authorize(caller, impersonate, self.trust_domain)
        else:
            node = None
        return self._decide(caller, info, csr=csr, ttl_seconds=ttl_seconds, impersonate=impersonate,
                            request_id=request_id, fresh_credential=fresh_credential, node=node)

    def admit_now(self, caller: Caller, info: RequestInfo, *, csr: bytes, ttl_seconds: int,
                  impersonate: str, request_id: str) -> tuple[IssueRequest, IssuanceContext] | None:
        """``admit`` without awaiting, for a caller asking for its own identity;
        None for impersonation, which the node authorizer decides (await ``admit``)."""
        if impersonate:
            return None
        return self._decide(caller, info, csr=csr, ttl_seconds=ttl_seconds, impersonate="", request_id=request_id)

    def _decide(self, caller: Caller, info: RequestInfo, *, csr: bytes, ttl_seconds: int, impersonate: str,
                request_id: str, fresh_credential: bool = False,
                node: str | None = None) -> tuple[IssueRequest, IssuanceContext]:
        """``node``: the caller's node as the node authorizer found it (else
        what its credential says, if anything)."""
        identity = impersonate or spiffe_identity_of(caller, self.trust_domain)
        self._policy.check(identity, info.peer_ip)
        if node is None:
            node = caller.kubernetes.node_name if caller.kubernetes is not None else None
        ttl_cap = None
        if self._risk is not None:
            ttl_cap = self._risk.check(identity, caller, fresh_credential=fresh_credential,
                                       impersonated=bool(impersonate), node=node or "")
            if ttl_cap is not None or fresh_credential:
                log.warning("risk policy applied", identity=identity, signer=self.signer, request_id=request_id,
                            shortened_ttl_seconds=ttl_cap, token_reviewed_again=fresh_credential)
        return (IssueRequest(csr=csr, identity=identity, ttl_seconds=ttl_seconds, ttl_cap_seconds=ttl_cap,
                             strict_csr=self._policy.strict_csr and not impersonate),
                IssuanceContext(caller_identities=caller.identities, credential_type=caller.credential_type,
                                signer=self.signer, peer=info.peer, request_id=request_id,
                                impersonated=bool(impersonate), cluster_id=info.cluster_id, node=node or ""))

    def admit_local(self, principal: LocalPrincipal, *, identity: str, csr: bytes, ttl_seconds: int,
                    request_id: str, dns_names: tuple[str, ...] = (),
                    ip_addresses: tuple[bytes, ...] = ()) -> tuple[IssueRequest, IssuanceContext]:
        if not identity.startswith(f"spiffe://{self.trust_domain}/"):
            raise InvalidRequest(f"{identity!r} is not a SPIFFE ID of this CA's trust domain ({self.trust_domain})")
        if (dns_names or ip_addresses) and principal is not SERVER_PRINCIPAL:
            raise InvalidRequest("only the server's own certificate carries DNS or IP names")
        return (IssueRequest(csr=csr, identity=identity, ttl_seconds=ttl_seconds, dns_names=dns_names,
                             ip_addresses=ip_addresses),
                IssuanceContext(caller_identities=(principal.name,), credential_type=principal.credential_type,
                                signer=self.signer, peer="local", request_id=request_id))

"""OIDC / JWT verified locally against a JWKS (istiod's ``JWT_RULE``).

What is accepted is decided here, not by the token: algorithms are pinned by
configuration (so ``alg: none`` and an HMAC "signed" with the public key
never reach a verifier), the issuer is compared exactly, the key must be the
JWKS key the header's ``kid`` names, and no ``crit`` extension is understood.
A token whose signature or claims were refused is remembered briefly (by
hash) and refused again without being verified.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import Key, import_key
from joserfc.jws import JWSRegistry, extract_compact

from fastca.authn._rejections import RejectionCache, token_key
from fastca.authn.caller import Caller, KubernetesInfo, RequestInfo
from fastca.authn.config import OidcProvider
from fastca.authn.serviceaccount import (
    parse_service_account_username,
    service_account_spiffe_id,
)
from fastca.errors import AuthenticationFailed

__all__ = ["JwksSource", "OidcAuthenticator"]

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1024 * 1024


class JwksSource:
    """The provider's signing keys by ``kid``, from an HTTPS URL or a local
    file. The URL is fetched on first use, when older than ``max_age``, and
    when a token names an unknown ``kid`` — at most once per
    ``min_interval`` so unknown kids cannot make us hammer the issuer. The
    file is re-read when it changes."""

    def __init__(self, provider: OidcProvider, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.provider = provider
        self._clock = clock
        self._keys: dict[str | None, Key] = {}
        self._fetched_at: float | None = None
        self._file_state: tuple[int, int] | None = None
        self._lock = asyncio.Lock()
        self._client: httpx.AsyncClient | None = None
        self.fetches = 0

    async def get(self, kid: str | None) -> Key | None:
        if self.provider.jwks_file is not None:
            self._load_file_if_changed()
        else:
            stale = self._fetched_at is None or self._clock() - self._fetched_at >= self.provider.jwks_max_age_seconds
            if stale:
                await self._refresh(force=True)
            elif self._lookup(kid) is None:
                await self._refresh(force=False)
        return self._lookup(kid)

    def _lookup(self, kid: str | None) -> Key | None:
        if kid is None:
            # No kid: usable only when the set leaves no choice.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _refresh(self, *, force: bool) -> None:
        async with self._lock:
            now = self._clock()
            if self._fetched_at is not None:
                since = now - self._fetched_at
                if force and since < self.provider.jwks_max_age_seconds:
                    return      # another waiter refreshed while we queued
                if not force and since < self.provider.jwks_refresh_min_interval_seconds:
                    return      # unknown kids refetch at most this often
            self._fetched_at = now
            self.fetches += 1
            try:
                async with asyncio.timeout(self.provider.timeout_seconds):
                    document = await self._fetch()
            except Exception as exc:
                # Keep the keys we have: an issuer outage must not turn into
                # rejecting every token signed by a key we already know.
                log.warning("JWKS fetch from %s failed: %s", self.provider.jwks_uri, type(exc).__name__)
                return
            self._keys = _parse_jwks(document)

    async def _fetch(self) -> Any:
        if self._client is None:
            context = ssl.create_default_context(cafile=self.provider.jwks_ca_file)
            self._client = httpx.AsyncClient(verify=context, timeout=httpx.Timeout(self.provider.timeout_seconds),
                                             follow_redirects=False, trust_env=False)
        assert self.provider.jwks_uri is not None
        response = await self._client.get(self.provider.jwks_uri, headers={"Accept": "application/json"})
        response.raise_for_status()
        if len(response.content) > MAX_JWKS_BYTES:
            raise ValueError("JWKS too large")
        return response.json()

    def _load_file_if_changed(self) -> None:
        path = Path(self.provider.jwks_file or "")
        try:
            stat = os.stat(path)
        except OSError as exc:
            if self._file_state is None:
                raise AuthenticationFailed(f"JWKS file {path} unreadable: {exc.strerror}") from None
            return
        state = (stat.st_mtime_ns, stat.st_size)
        if state == self._file_state:
            return
        try:
            self._keys = _parse_jwks(json.loads(path.read_bytes()))
        except (OSError, ValueError) as exc:
            log.warning("JWKS file %s unreadable, keeping the previous keys: %s", path, exc)
        self._file_state = state
        self.fetches += 1

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _parse_jwks(document: Any) -> dict[str | None, Key]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("JWKS has no keys list")
    keys: dict[str | None, Key] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") == "oct":
            continue        # a symmetric key in a public document is no key at all
        try:
            key = import_key(entry)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            log.warning("skipping a JWKS key that does not import: %s", type(exc).__name__)
            continue
        if key.is_private:
            continue
        keys[entry.get("kid") if isinstance(entry.get("kid"), str) else None] = key
    return keys


class OidcAuthenticator:
    """A JWT from one configured issuer. ``sub`` must be
    ``system:serviceaccount:<ns>:<sa>``; the identity is
    ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``; pod facts come from the
    ``kubernetes.io`` claim projected tokens carry."""

    name = "oidc"

    def __init__(self, provider: OidcProvider, *, trust_domain: str,
                 clock: Callable[[], float] = time.time, jwks_clock: Callable[[], float] = time.monotonic,
                 rejections: RejectionCache | None = None) -> None:
        self.provider = provider
        self.trust_domain = trust_domain
        self._clock = clock
        self.jwks = JwksSource(provider, clock=jwks_clock)
        self._algorithms = list(provider.algorithms)
        self.rejections = rejections if rejections is not None else RejectionCache(10_000, 10.0, jwks_clock)
        # Unknown header names are tolerated (issuers add their own); `crit`
        # is refused outright below.
        self._registry = JWSRegistry(algorithms=self._algorithms, strict_check_header=False)

    def __repr__(self) -> str:
        return f"OidcAuthenticator(issuer={self.provider.issuer!r})"

    async def authenticate(self, request: RequestInfo) -> Caller | None:
        token = request.bounded_bearer_token()
        if token is None:
            return None
        try:
            unverified = extract_compact(token.encode("ascii"))
            header = unverified.headers()
            unverified_claims = json.loads(unverified.payload)
        except (JoseError, ValueError, UnicodeError, TypeError):
            raise AuthenticationFailed("bearer token is not a JWS compact JWT") from None
        # Tokens from another issuer are not ours to judge (TokenReview may
        # accept them); checked before the JWKS so they cost no fetch.
        if not isinstance(unverified_claims, dict) or unverified_claims.get("iss") != self.provider.issuer:
            raise AuthenticationFailed(f"token issuer is not {self.provider.issuer!r}")
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise AuthenticationFailed(f"token algorithm {alg!r} is not one of {self._algorithms}")
        if "crit" in header:
            raise AuthenticationFailed("token has critical header extensions fastca does not implement")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationFailed("token kid is not a string")

        rejection_key = token_key(f"oidc:{self.provider.issuer}", token)
        if self.rejections.rejected(rejection_key):
            raise AuthenticationFailed(f"token refused within the last {self.rejections.ttl:g} s (not verified again)")
        # An unknown kid is not remembered: the JWKS may not have been fetched yet.
        key = await self.jwks.get(kid)
        if key is None:
            shown = kid if kid is None or len(kid) <= 64 else kid[:64] + "…"
            raise AuthenticationFailed(f"token key {shown!r} is not in the issuer's JWKS")
        try:
            return self._verified(token, key)
        except AuthenticationFailed:
            self.rejections.reject(rejection_key)
            raise

    def _verified(self, token: str, key: Key) -> Caller:
        """The caller of a token checked against ``key``; AuthenticationFailed
        (a verdict on the token) otherwise."""
        try:
            verified = jwt.decode(token, key, algorithms=self._algorithms, registry=self._registry)
        except JoseError as exc:
            raise AuthenticationFailed(f"token signature does not verify: {exc.error}") from None
        except (ValueError, TypeError):
            raise AuthenticationFailed("token does not decode") from None
        claims = verified.claims
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self._clock()), leeway=self.provider.leeway_seconds,
            iss={"essential": True, "value": self.provider.issuer},
            aud={"essential": True, "values": list(self.provider.audiences)},
            exp={"essential": True}, sub={"essential": True})
        try:
            registry.validate(claims)
        except JoseError as exc:
            raise AuthenticationFailed(f"token claims rejected: {exc.error} {exc.description or ''}".strip()) from None

        parsed = parse_service_account_username(claims.get("sub"))
        if parsed is None:
            raise AuthenticationFailed("token sub is not system:serviceaccount:<namespace>:<name>")
        namespace, service_account = parsed
        pod_name, pod_uid = _pod_facts(claims.get("kubernetes.io"), namespace, service_account)
        return Caller(
            identities=(service_account_spiffe_id(self.trust_domain, namespace, service_account),),
            credential_type="oidc",
            kubernetes=KubernetesInfo(namespace=namespace, service_account=service_account, pod_name=pod_name,
                                      pod_uid=pod_uid, cluster_id=self.provider.cluster_id))

    async def aclose(self) -> None:
        await self.jwks.aclose()


def _pod_facts(claim: Any, namespace: str, service_account: str) -> tuple[str | None, str | None]:
    """Pod name and uid from a projected token's ``kubernetes.io`` claim,
    which must agree with ``sub`` where it repeats it."""
    if claim is None:
        return None, None
    if not isinstance(claim, dict):
        raise AuthenticationFailed("token kubernetes.io claim is not an object")
    if "namespace" in claim and claim["namespace"] != namespace:
        raise AuthenticationFailed("token kubernetes.io namespace disagrees with sub")
    account = claim.get("serviceaccount")
    if isinstance(account, dict) and "name" in account and account["name"] != service_account:
        raise AuthenticationFailed("token kubernetes.io service account disagrees with sub")
    pod = claim.get("pod")
    if not isinstance(pod, dict):
        return None, None
    name, uid = pod.get("name"), pod.get("uid")
    return (name if isinstance(name, str) and name else None, uid if isinstance(uid, str) and uid else None)

"""Kubernetes service-account tokens, checked by the API server (TokenReview).

istiod's KubeJWTAuthenticator, plus what it leaves out: the review's
``status.audiences`` must hold one of ours (a token the API server accepts
for other audiences is not a token for the CA). Successful reviews are kept
for a short, bounded time so a restart storm of agents does not become one
of TokenReviews; so are the API server's refusals, for less time, so a
caller retrying a bad token does not become one either. An API server that
does not answer (timeout, transport error, HTTP error, no verdict) is
``AuthenticatorUnavailable``: retried by agents, never cached.

The token is a credential: it is hashed before it is used as a key and
appears in no log, error or repr.
"""

from __future__ import annotations

import asyncio
import dataclasses
import base64
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from fastca.authn._kube import KubernetesApi
from fastca.authn._rejections import ExpiringLru, RejectionCache, token_key
from fastca.authn.caller import PENDING, Caller, KubernetesInfo, RequestInfo
from fastca.authn.config import TokenReviewCluster
from fastca.authn.serviceaccount import (
    parse_service_account_username,
    service_account_spiffe_id,
)
from fastca.errors import AuthenticationFailed, AuthenticatorUnavailable

__all__ = ["TokenReviewAuthenticator", "TokenReviewCache", "token_expiry"]

log = logging.getLogger(__name__)

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"
POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"


def token_expiry(token: str) -> float | None:
    """The ``exp`` of a JWT, read WITHOUT verifying it. Used only to never
    cache a review past the token's own expiry; None if there is none."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return None
    return float(exp)


_MEMO_KEY = "tokenreview"


class TokenReviewCache(ExpiringLru[Caller]):
    """A bounded LRU of successful reviews: key → (caller, wall-clock expiry).
    ``generation`` moves on whenever a review is taken back (``revoke``): a
    connection's memo of its last review is good only within one generation."""

    key = staticmethod(token_key)
    generation = 0

    def revoke(self, key: bytes) -> None:
        """A later review refused this token: forget that an earlier one accepted it."""
        if self._entries.pop(key, None) is not None:
            self.generation += 1

    def get(self, key: bytes) -> Caller | None:
        entry = self.entry(key)
        return entry[0] if entry is not None else None

    def live(self, expires: float) -> bool:
        return self._clock() < expires

    def put(self, key: bytes, caller: Caller, token_exp: float | None) -> None:
        expires = self._clock() + self.ttl
        if token_exp is not None:
            expires = min(expires, token_exp)
        self._store(key, caller, expires)


class TokenReviewAuthenticator:
    """Bearer token → TokenReview on the cluster the ``clusterid`` header
    names (empty: the first configured cluster; unknown: failure)."""

    name = "tokenreview"
    caches_verdicts = True      # authenticate(fresh=True) reviews the token again

    def __init__(self, clusters: Sequence[TokenReviewCluster], *, trust_domain: str, cache_size: int = 10_000,
                 cache_ttl: float = 30.0, clock: Callable[[], float] = time.time,
                 rejections: RejectionCache | None = None) -> None:
        if not clusters:
            raise ValueError("TokenReviewAuthenticator needs at least one cluster")
        self.trust_domain = trust_domain
        self._apis = {c.cluster_id: KubernetesApi(c) for c in clusters}
        self._review_slots = {c.cluster_id: asyncio.Semaphore(c.max_concurrent_reviews) for c in clusters}
        self._default = clusters[0].cluster_id
        self._clock = clock
        self.cache = TokenReviewCache(cache_size, cache_ttl, clock)
        self.rejections = rejections if rejections is not None else RejectionCache(10_000, 10.0)
        # Concurrent requests with one token share one review.
        self._inflight: dict[bytes, asyncio.Task[Caller]] = {}

    def __repr__(self) -> str:
        return f"TokenReviewAuthenticator(clusters={list(self._apis)}, {self.cache!r})"

    def authenticate_now(self, request: RequestInfo) -> Caller | object | None:
        """A cached review's verdict at once; PENDING when the API server must
        be asked. An agent sends the same token on every call of its
        connection: the connection remembers the last one it was cached
        for (until that review expires), so the next call is one comparison."""
        memo = request.connection_cache
        header = request.metadata.get("authorization")
        cluster_header = request.metadata.get("clusterid", "")
        if memo is not None and header is not None:
            known = memo.get(_MEMO_KEY)
            if known is not None and known[0] == header and known[1] == cluster_header \
                    and self.cache.live(known[3]) and known[4] == self.cache.generation:
                return known[2]
        token = request.bounded_bearer_token()
        if token is None:
            return None
        cluster_id = cluster_header or self._default
        if cluster_id not in self._apis:
            raise AuthenticationFailed(f"unknown cluster {cluster_id!r}")
        key = TokenReviewCache.key(cluster_id, token)
        entry = self.cache.entry(key)
        if entry is None:
            self._check_not_rejected(key)
            return PENDING
        if memo is not None:
            memo[_MEMO_KEY] = (header, cluster_header, entry[0], entry[1], self.cache.generation)
        return entry[0]

    async def authenticate(self, request: RequestInfo, *, fresh: bool = False) -> Caller | None:
        """``fresh``: ask the API server even if a review of this token is
        cached (the new verdict replaces the cached one)."""
        token = request.bounded_bearer_token()
        if token is None:
            return None
        cluster_id = request.cluster_id or self._default
        api = self._apis.get(cluster_id)
        if api is None:
            raise AuthenticationFailed(f"unknown cluster {cluster_id!r}")

        key = TokenReviewCache.key(cluster_id, token)
        cached = None if fresh else self.cache.get(key)
        if cached is not None:
            return cached
        self._check_not_rejected(key)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._review_and_cache(api, token, key))
            self._inflight[key] = task
            task.add_done_callback(lambda t, key=key: self._finished(key, t))
        # Shielded: one caller giving up must not cancel the review the
        # others wait for.
        return await asyncio.shield(task)

    def _finished(self, key: bytes, task: asyncio.Task[Caller]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()   # retrieved: every waiter may have gone

    def _check_not_rejected(self, key: bytes) -> None:
        if self.rejections.rejected(key):
            raise AuthenticationFailed(f"token refused by the API server within the last "
                                       f"{self.rejections.ttl:g} s (not reviewed again)")

    async def _review_and_cache(self, api: KubernetesApi, token: str, key: bytes) -> Caller:
        try:
            caller = await self._review(api, token)
        except AuthenticationFailed:
            # The API server's verdict on this token (AuthenticatorUnavailable,
            # no verdict at all, is not an AuthenticationFailed). A fresh review
            # that refuses a token the cache still accepts takes that back.
            self.rejections.reject(key)
            self.cache.revoke(key)
            raise
        self.cache.put(key, caller, token_expiry(token))
        return dataclasses.replace(caller, judged_now=True)     # the cache keeps the remembered one

    async def _review(self, api: KubernetesApi, token: str) -> Caller:
        cluster = api.cluster
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": list(cluster.audiences)}}
        try:
            # httpx's timeout bounds each phase; this bounds the whole call,
            # so a server dripping bytes cannot hold an agent's request.
            # The wait for a slot counts: an agent waits at most the timeout.
            async with asyncio.timeout(cluster.timeout_seconds), self._review_slots[cluster.cluster_id]:
                client = await api.client()
                response = await client.post(TOKENREVIEW_PATH, json=body, headers=api.headers())
        except (httpx.TimeoutException, TimeoutError):
            raise AuthenticatorUnavailable(f"TokenReview on {cluster.api_server} timed out") from None
        except (httpx.HTTPError, OSError) as exc:
            raise AuthenticatorUnavailable(
                f"TokenReview on {cluster.api_server} failed: {type(exc).__name__}") from None
        if response.status_code not in (200, 201):
            # 401/403 are fastca's own credential, 5xx the API server: no verdict on the token.
            raise AuthenticatorUnavailable(f"TokenReview on {cluster.api_server}: HTTP {response.status_code}")
        try:
            review = response.json()
        except ValueError:
            raise AuthenticatorUnavailable("TokenReview response is not JSON") from None
        return self._caller_from_review(review, cluster)

    def _caller_from_review(self, review: Any, cluster: TokenReviewCluster) -> Caller:
        """The caller the review vouches for; AuthenticationFailed (a verdict,
        remembered) when it vouches for none."""
        status = review.get("status") if isinstance(review, dict) else None
        if not isinstance(status, dict):
            raise AuthenticatorUnavailable("TokenReview response has no status")
        if status.get("authenticated") is not True:
            error = status.get("error")
            reason = f": {error[:200]}" if isinstance(error, str) and error else ""
            raise AuthenticationFailed(f"token not authenticated{reason}")
        audiences = status.get("audiences")
        if not isinstance(audiences, list) or not set(cluster.audiences) & {a for a in audiences if isinstance(a, str)}:
            raise AuthenticationFailed(f"token is not for audiences {list(cluster.audiences)}")
        user = status.get("user")
        if not isinstance(user, dict):
            raise AuthenticationFailed("TokenReview status has no user")
        groups = user.get("groups")
        if not isinstance(groups, list) or SERVICE_ACCOUNTS_GROUP not in groups:
            raise AuthenticationFailed(f"user is not in group {SERVICE_ACCOUNTS_GROUP}")
        parsed = parse_service_account_username(user.get("username"))
        if parsed is None:
            raise AuthenticationFailed("username is not system:serviceaccount:<namespace>:<name>")
        namespace, service_account = parsed
        extra = user.get("extra")
        extra = extra if isinstance(extra, dict) else {}
        return Caller(
            identities=(service_account_spiffe_id(self.trust_domain, namespace, service_account),),
            credential_type="k8s-tokenreview",
            kubernetes=KubernetesInfo(namespace=namespace, service_account=service_account,
                                      pod_name=_first(extra.get(POD_NAME_KEY)), pod_uid=_first(extra.get(POD_UID_KEY)),
                                      cluster_id=cluster.cluster_id, node_name=_first(extra.get(NODE_NAME_KEY))))

    async def aclose(self) -> None:
        for api in self._apis.values():
            await api.aclose()


def _first(value: Any) -> str | None:
    """``user.extra`` values are lists of strings; the pod facts hold one."""
    if isinstance(value, list) and value and isinstance(value[0], str) and value[0]:
        return value[0]
    return None

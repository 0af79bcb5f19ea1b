"""An HTTPS client for one Kubernetes API server, shared by the TokenReview
authenticator and the pod watch. Credentials are re-read as they rotate:
the bearer token file on every request, the CA bundle and client key pair
when their files change."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import httpx

from fastca.authn.config import TokenReviewCluster

__all__ = ["KubernetesApi"]

_WATCH_CONNECTIONS = 2


def _mtime(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


class KubernetesApi:
    def __init__(self, cluster: TokenReviewCluster, *, timeout: httpx.Timeout | float | None = None) -> None:
        self.cluster = cluster
        self.base_url = cluster.api_server
        self._timeout = timeout if timeout is not None else httpx.Timeout(cluster.timeout_seconds)
        self._client: httpx.AsyncClient | None = None
        # Room for every review allowed in flight, plus the pod watch.
        connections = cluster.max_concurrent_reviews + _WATCH_CONNECTIONS
        self._limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._files_seen: tuple[int | None, ...] | None = None

    def _files_state(self) -> tuple[int | None, ...]:
        c = self.cluster
        return (_mtime(c.ca_file), _mtime(c.client_cert_file), _mtime(c.client_key_file))

    def _ssl_context(self) -> ssl.SSLContext:
        c = self.cluster
        context = ssl.create_default_context(cafile=c.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if c.client_cert_file is not None:
            context.load_cert_chain(c.client_cert_file, c.client_key_file)
        return context

    async def client(self) -> httpx.AsyncClient:
        state = self._files_state()
        if self._client is None or state != self._files_seen:
            old, self._client = self._client, httpx.AsyncClient(
                base_url=self.base_url, verify=self._ssl_context(), timeout=self._timeout,
                limits=self._limits, follow_redirects=False, trust_env=False)
            self._files_seen = state
            if old is not None:
                await old.aclose()
        return self._client

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token_file = self.cluster.bearer_token_file
        if token_file is not None:
            token = Path(token_file).read_text().strip()
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def __repr__(self) -> str:
        return f"KubernetesApi({self.base_url!r}, cluster_id={self.cluster.cluster_id!r})"

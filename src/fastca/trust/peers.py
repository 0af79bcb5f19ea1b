"""``[trust.peers]``: other meshes' roots, fetched every
``sync_interval_seconds`` and merged into the bundle this CA hands out.

A source is a file, an HTTPS URL (httpx; its own ``ca_file``, a timeout,
the body read up to ``max_bytes`` and no further) or a remote cluster's
``istio-ca-root-cert`` ConfigMap through a kubeconfig (kubernetes-asyncio).
Each fetched bundle passes ``validate_bundle`` before it replaces the
peer's last good one; a refused bundle or a failed fetch keeps the last
good roots and is reported (a warning, ``fastca_trust_peer_ok{peer}`` 0,
``fastca_trust_peer_refusals_total{peer,reason}``). A peer whose last
success is older than ``grace_period_seconds`` leaves the bundle (a
warning, ``fastca_trust_peer_in_bundle{peer}`` 0) until it answers again;
a kept certificate that expires meanwhile leaves it at once.

Each server process syncs on its own (every worker answers requests, so
every worker needs the merged bundle; a peer sees one fetch per worker per
interval). ``on_change(peers)`` gets every peer's current roots after each
pass; the ``TrustBundle`` it feeds decides whether anything changed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from fastca.observability.logging import get_logger
from fastca.trust.bundle import BundleRefused, validate_bundle
from fastca.trust.config import PeersConfig, PeerSourceConfig

__all__ = ["PeerSync", "FetchFailed"]

log = get_logger("fastca.trust.peers")


class FetchFailed(Exception):
    """A peer's bundle could not be read (reason in the message)."""


def _resolve(base_dir: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else base_dir / path


# -- sources ------------------------------------------------------------------------------------------------------

class _FileSource:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self._path, self._max = path, max_bytes

    def _read(self) -> bytes:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise FetchFailed(f"{self._path}: {error.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FetchFailed(f"{self._path} is not a regular file")
            return handle.read(self._max + 1)

    async def fetch(self) -> bytes:
        return await asyncio.to_thread(self._read)

    async def close(self) -> None:
        pass


class _UrlSource:
    def __init__(self, url: str, ca_file: Path | None, timeout: float, max_bytes: int) -> None:
        import httpx

        self._url, self._max = url, max_bytes
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as error:
                from fastca.errors import ConfigurationError

                raise ConfigurationError(f"[trust.peers] ca_file {ca_file}: {error}") from None
        self._client = httpx.AsyncClient(verify=verify, timeout=timeout, follow_redirects=False)

    async def fetch(self) -> bytes:
        import httpx

        try:
            async with self._client.stream("GET", self._url) as response:
                if response.status_code != 200:
                    raise FetchFailed(f"HTTP {response.status_code} from {self._url}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self._max:
                        break           # enough to refuse it; the rest is never read
                return bytes(body)
        except httpx.HTTPError as error:
            raise FetchFailed(f"{self._url}: {type(error).__name__}: {error}") from None

    async def close(self) -> None:
        await self._client.aclose()


class _ConfigMapSource:
    def __init__(self, source: PeerSourceConfig, base_dir: Path) -> None:
        self._source, self._base_dir = source, base_dir
        self._api: Any = None

    async def fetch(self) -> bytes:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        from fastca.trust.kubernetes import kubeconfig_client

        source = self._source
        if self._api is None:
            assert source.kubeconfig is not None
            self._api = await kubeconfig_client(source.kubeconfig, source.context, self._base_dir,
                                                section="[trust.peers]")
        try:
            configmap = await client.CoreV1Api(self._api).read_namespaced_config_map(
                source.configmap, source.namespace, _request_timeout=source.timeout_seconds)
        except ApiException as error:
            raise FetchFailed(f"ConfigMap {source.namespace}/{source.configmap}: "
                              f"HTTP {error.status}: {error.reason}") from None
        value = (configmap.data or {}).get(source.key)
        if value is None:
            raise FetchFailed(f"ConfigMap {source.namespace}/{source.configmap} has no {source.key!r}")
        return value.encode()

    async def close(self) -> None:
        api, self._api = self._api, None
        if api is not None:
            await api.close()


def _open_source(source: PeerSourceConfig, base_dir: Path, max_bytes: int) -> Any:
    if source.file is not None:
        return _FileSource(_resolve(base_dir, source.file), max_bytes)
    if source.url is not None:
        ca_file = _resolve(base_dir, source.ca_file) if source.ca_file is not None else None
        return _UrlSource(source.url, ca_file, source.timeout_seconds, max_bytes)
    return _ConfigMapSource(source, base_dir)


# -- the sync -----------------------------------------------------------------------------------------------------

@dataclass
class _Peer:
    name: str
    config: PeerSourceConfig
    source: Any
    roots: tuple[x509.Certificate, ...] = ()      # the last good bundle ("" when none or dropped)
    last_success: float | None = None
    ok: bool = False
    dropped: bool = False


class PeerSync:
    """``sync_once`` fetches every peer at once and reports; ``run`` does
    that every ``sync_interval_seconds``. ``clock`` is unix time."""

    def __init__(self, config: PeersConfig, base_dir: Path,
                 on_change: Callable[[Mapping[str, tuple[x509.Certificate, ...]]], None] | None = None, *,
                 metrics: Any = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._on_change = on_change or (lambda _peers: None)
        self._metrics = metrics
        self._clock = clock
        self._peers = [_Peer(name, source, _open_source(source, base_dir, config.max_bytes))
                       for name, source in sorted(config.sources.items())]
        self.passes = 0

    def on_change(self, callback: Callable[[Mapping[str, tuple[x509.Certificate, ...]]], None]) -> None:
        """Who hears every peer's current roots after each pass."""
        self._on_change = callback

    def roots(self) -> dict[str, tuple[x509.Certificate, ...]]:
        return {peer.name: peer.roots for peer in self._peers if peer.roots}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync_interval_seconds)
            await self.sync_once()

    async def sync_once(self) -> None:
        await asyncio.gather(*(self._sync(peer) for peer in self._peers))
        self.passes += 1
        self._on_change(self.roots())

    async def _sync(self, peer: _Peer) -> None:
        config = self.config
        try:
            data = await asyncio.wait_for(peer.source.fetch(), timeout=peer.config.timeout_seconds)
            roots = validate_bundle(data, now=self._utcnow(), max_certificates=config.max_certificates,
                                    max_bytes=config.max_bytes)
        except BundleRefused as error:
            self._failed(peer, error.kind, f"bundle refused: {error}")
        except (FetchFailed, asyncio.TimeoutError, OSError) as error:
            self._failed(peer, "fetch", str(error) or f"no answer within {peer.config.timeout_seconds} s")
        except asyncio.CancelledError:
            raise
        except Exception as error:          # a source's unexpected failure is a failed fetch, never a crash
            self._failed(peer, "fetch", repr(error)[:300])
        else:
            changed = roots != peer.roots
            peer.roots, peer.last_success, peer.ok = roots, self._clock(), True
            if peer.dropped or changed:
                log.info("peer trust bundle accepted", peer=peer.name, source=peer.config.kind,
                         certificates=len(roots), subjects=[c.subject.rfc4514_string()[:200] for c in roots[:10]])
            peer.dropped = False
        self._expire(peer)
        self._report(peer)

    def _failed(self, peer: _Peer, reason: str, message: str) -> None:
        peer.ok = False
        log.warning("peer trust bundle not updated", peer=peer.name, source=peer.config.kind, reason=reason,
                    detail=message[:500], keeping=len(peer.roots), last_success=peer.last_success)
        if self._metrics is not None:
            self._metrics.trust_peer_refused(peer.name, reason)

    def _expire(self, peer: _Peer) -> None:
        """Out of the bundle: a peer silent for longer than the grace period,
        and any kept root that has expired since it was fetched."""
        if not peer.roots:
            return
        now = self._clock()
        if not peer.ok and peer.last_success is not None and now - peer.last_success > self.config.grace_period_seconds:
            log.warning("peer trust bundle dropped: no good bundle within the grace period", peer=peer.name,
                        grace_period_seconds=self.config.grace_period_seconds,
                        seconds_since_success=round(now - peer.last_success, 1))
            peer.roots, peer.dropped = (), True
            return
        utcnow = self._utcnow()
        alive = tuple(c for c in peer.roots if c.not_valid_after_utc > utcnow)
        if alive != peer.roots:
            log.warning("expired peer roots left the bundle", peer=peer.name, expired=len(peer.roots) - len(alive))
            peer.roots = alive

    def _report(self, peer: _Peer) -> None:
        if self._metrics is not None:
            self._metrics.trust_peer(peer.name, ok=peer.ok, in_bundle=bool(peer.roots),
                                     certificates=len(peer.roots), last_success=peer.last_success)

    def _utcnow(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    async def close(self) -> None:
        for peer in self._peers:
            try:
                await peer.source.close()
            except Exception as error:
                log.warning("closing a peer source failed", peer=peer.name, reason=repr(error)[:300])

"""The ConfigMap ``istio-ca-root-cert`` in every namespace, as istiod's
namespace controller keeps it: created where it is missing, put back when it
is edited or deleted, rewritten when the bundle changes, written into each
new namespace. Facts kept from istiod: data key ``root-cert.pem``, label
``istio.io/config: "true"``, the Kubernetes system namespaces skipped
(``skip_namespaces``), a namespace that is terminating left alone.

Driven by two watches (Namespaces; ConfigMaps of that name in all
namespaces, by field selector), each opened at the resourceVersion of a full
list, reopened where it stopped when the server ends it, and replaced by a
new list when it fails (410 Gone and the rest). The full list also runs every
``resync_seconds`` and when the bundle changes, as a safety net for a missed
event. Work goes through a queue of namespace names (so a burst of events is
one write per namespace), and each write reads the ConfigMap first and
replaces it with the resourceVersion it read (a 409 reads again).

Every write first asks ``may_write()`` (the Lease fence): a process that is
not sure it holds the Lease writes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.watch import Watch

from fastca.observability.logging import get_logger
from fastca.trust.config import CONFIGMAP_KEY, KubernetesTrustConfig

__all__ = ["TrustBundlePublisher", "CONFIGMAP_LABELS"]

log = get_logger("fastca.trust.publisher")

CONFIGMAP_LABELS = {"istio.io/config": "true"}
_LIST_PAGE = 500
_MAX_BACKOFF_S = 30.0
_CONFLICT_RETRIES = 3


class _NotLeader(Exception):
    pass


class TrustBundlePublisher:
    def __init__(self, core: client.CoreV1Api, config: KubernetesTrustConfig, bundle_pem: str, *,
                 may_write: Callable[[], bool] = lambda: True) -> None:
        self._core = core
        self._config = config
        self._bundle = bundle_pem
        self._may_write = may_write
        self._skipped = frozenset(config.skip_namespaces)
        self._namespaces: dict[str, bool] = {}        # name -> active (not terminating)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._attempts: dict[str, int] = {}
        self._resync = asyncio.Event()
        self.writes = 0
        self.resyncs = 0

    # -- what is wanted ------------------------------------------------------------

    @property
    def bundle_pem(self) -> str:
        return self._bundle

    def set_bundle(self, bundle_pem: str) -> None:
        """A new bundle (root rotation, a peer's roots): every namespace is
        looked at again."""
        if bundle_pem != self._bundle:
            self._bundle = bundle_pem
            self._resync.set()

    def _wanted(self, namespace: str) -> bool:
        return namespace not in self._skipped and self._namespaces.get(namespace, False)

    def _correct(self, configmap: client.V1ConfigMap | None) -> bool:
        if configmap is None:
            return False
        labels = configmap.metadata.labels or {}
        return ((configmap.data or {}) == {CONFIGMAP_KEY: self._bundle} and not configmap.binary_data
                and all(labels.get(k) == v for k, v in CONFIGMAP_LABELS.items()))

    def _enqueue(self, namespace: str) -> None:
        if namespace not in self._queued:
            self._queued.add(namespace)
            self._queue.put_nowait(namespace)

    # -- the loop ------------------------------------------------------------------

    async def run(self) -> None:
        """List, repair, watch; list again every ``resync_seconds``, when the
        bundle changes or when a watch fails. Runs until cancelled."""
        worker = asyncio.create_task(self._work(), name="trust-publisher-worker")
        failures = 0
        try:
            while True:
                self._resync.clear()
                try:
                    namespaces_rv, configmaps_rv = await self._list_and_repair()
                except (ApiException, OSError, asyncio.TimeoutError, ValueError) as error:
                    failures += 1
                    delay = min(_MAX_BACKOFF_S, self._config.retry_period_seconds * 2 ** (failures - 1))
                    log.warning("listing namespaces and trust bundles failed", reason=_reason(error),
                                retry_in_seconds=delay)
                    await asyncio.sleep(delay)
                    continue
                except Exception as error:      # aiohttp.ClientError and kin
                    failures += 1
                    log.warning("listing namespaces and trust bundles failed", reason=_reason(error))
                    await asyncio.sleep(min(_MAX_BACKOFF_S, self._config.retry_period_seconds * failures))
                    continue
                failures = 0
                waits = [asyncio.create_task(self._watch_namespaces(namespaces_rv)),
                         asyncio.create_task(self._watch_configmaps(configmaps_rv)),
                         asyncio.create_task(asyncio.sleep(self._config.resync_seconds)),
                         asyncio.create_task(self._resync.wait())]
                try:
                    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in waits:
                        task.cancel()
                    await asyncio.gather(*waits, return_exceptions=True)
                for task in done:
                    if task in waits[:2] and not task.cancelled() and task.exception() is not None:
                        log.info("watch ended; listing again", reason=_reason(task.exception()))
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    async def _list_and_repair(self) -> tuple[str | None, str | None]:
        timeout = self._config.request_timeout_seconds
        namespaces, namespaces_rv = await self._list_all(self._core.list_namespace, _request_timeout=timeout)
        configmaps, configmaps_rv = await self._list_all(
            self._core.list_config_map_for_all_namespaces,
            field_selector=f"metadata.name={self._config.configmap_name}", _request_timeout=timeout)
        self._namespaces = {ns.metadata.name: _active(ns) for ns in namespaces}
        published = {cm.metadata.namespace: cm for cm in configmaps}
        drifted = [name for name in self._namespaces
                   if self._wanted(name) and not self._correct(published.get(name))]
        for name in drifted:
            self._enqueue(name)
        self.resyncs += 1
        log.info("trust bundle resync", namespaces=len(self._namespaces), published=len(published),
                 to_repair=len(drifted))
        return namespaces_rv, configmaps_rv

    @staticmethod
    async def _list_all(list_fn: Callable[..., Any], **kwargs: Any) -> tuple[list[Any], str | None]:
        items: list[Any] = []
        token: str | None = None
        while True:
            page = await list_fn(limit=_LIST_PAGE, _continue=token, **kwargs) if token else \
                await list_fn(limit=_LIST_PAGE, **kwargs)
            items.extend(page.items or [])
            token = page.metadata._continue if page.metadata is not None else None
            if not token:
                return items, page.metadata.resource_version if page.metadata is not None else None

    async def _watch(self, list_fn: Callable[..., Any], resource_version: str | None,
                     on_event: Callable[[str, Any], None], **kwargs: Any) -> None:
        """Events from ``resource_version`` on, reopened where the server
        ended the stream; an error (410 Gone included) ends the watch."""
        config = self._config
        while True:
            watch = Watch()
            async with watch:
                async for event in watch.stream(list_fn, resource_version=resource_version,
                                                timeout_seconds=config.watch_timeout_seconds,
                                                allow_watch_bookmarks=True,
                                                _request_timeout=config.watch_timeout_seconds
                                                + config.request_timeout_seconds, **kwargs):
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        on_event(event["type"], event["object"])
            resource_version = watch.resource_version or resource_version

    async def _watch_namespaces(self, resource_version: str | None) -> None:
        await self._watch(self._core.list_namespace, resource_version, self._namespace_event)

    async def _watch_configmaps(self, resource_version: str | None) -> None:
        await self._watch(self._core.list_config_map_for_all_namespaces, resource_version, self._configmap_event,
                          field_selector=f"metadata.name={self._config.configmap_name}")

    def _namespace_event(self, kind: str, namespace: client.V1Namespace) -> None:
        name = namespace.metadata.name
        if kind == "DELETED":
            self._namespaces.pop(name, None)
            return
        was = self._namespaces.get(name)
        self._namespaces[name] = _active(namespace)
        if self._wanted(name) and was is not True:
            self._enqueue(name)

    def _configmap_event(self, kind: str, configmap: client.V1ConfigMap) -> None:
        name = configmap.metadata.namespace
        if not self._wanted(name):
            return
        if kind == "DELETED" or not self._correct(configmap):
            self._enqueue(name)

    # -- writing -------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            name = await self._queue.get()
            self._queued.discard(name)
            if not self._wanted(name):
                self._attempts.pop(name, None)
                continue
            try:
                await self._reconcile(name)
            except _NotLeader:
                # Not sure of the Lease any more: nothing is written; the
                # elector either renews (and the next resync catches up) or
                # cancels this publisher.
                asyncio.get_running_loop().call_later(self._config.retry_period_seconds, self._enqueue, name)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as error:
                attempts = self._attempts[name] = self._attempts.get(name, 0) + 1
                delay = min(_MAX_BACKOFF_S, 0.1 * 2 ** attempts)
                log.warning("publishing the trust bundle failed", namespace=name, reason=_reason(error),
                            attempt=attempts, retry_in_seconds=delay)
                asyncio.get_running_loop().call_later(delay, self._enqueue, name)
            else:
                self._attempts.pop(name, None)

    async def _reconcile(self, namespace: str) -> None:
        core, config = self._core, self._config
        timeout = config.request_timeout_seconds
        for _ in range(_CONFLICT_RETRIES):
            try:
                current = await core.read_namespaced_config_map(config.configmap_name, namespace,
                                                                 _request_timeout=timeout)
            except ApiException as error:
                if error.status != 404:
                    raise
                current = None
            if self._correct(current):
                return
            if not self._may_write():
                raise _NotLeader()
            bundle = self._bundle
            try:
                if current is None:
                    body = client.V1ConfigMap(
                        api_version="v1", kind="ConfigMap",
                        metadata=client.V1ObjectMeta(name=config.configmap_name, namespace=namespace,
                                                     labels=dict(CONFIGMAP_LABELS)),
                        data={CONFIGMAP_KEY: bundle})
                    await core.create_namespaced_config_map(namespace, body, _request_timeout=timeout)
                    action = "created"
                else:
                    current.data = {CONFIGMAP_KEY: bundle}
                    current.binary_data = None
                    current.metadata.labels = {**(current.metadata.labels or {}), **CONFIGMAP_LABELS}
                    await core.replace_namespaced_config_map(config.configmap_name, namespace, current,
                                                             _request_timeout=timeout)
                    action = "updated"
            except ApiException as error:
                if error.status == 409:         # created or changed since it was read: read again
                    continue
                if error.status == 404 and not self._wanted(namespace):
                    return                      # the namespace went away meanwhile
                raise
            self.writes += 1
            log.info("trust bundle published", namespace=namespace, configmap=config.configmap_name,
                     action=action)
            return
        raise RuntimeError(f"{namespace}/{config.configmap_name} kept changing under the writer")


def _active(namespace: client.V1Namespace) -> bool:
    status = namespace.status
    return not (status is not None and status.phase == "Terminating")


def _reason(error: BaseException | None) -> str:
    if isinstance(error, ApiException):
        text = f"HTTP {error.status}: {error.reason}"
    else:
        text = repr(error)
    return text if len(text) <= 300 else text[:300] + "…"       # never a whole response body

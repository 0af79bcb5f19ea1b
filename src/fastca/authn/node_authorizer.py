"""Impersonation: a trusted node agent (ztunnel) asking for a certificate on
behalf of a workload on its own node (istiod's ClusterNodeAuthorizer).

The rules, all of which must hold: the caller is a Kubernetes service
account listed as a trusted node account and its token names its pod (name
and uid); that pod exists, has that uid and runs that service account; the
requested identity is ``spiffe://<td>/ns/<ns>/sa/<sa>``; and some pod with
that namespace and service account runs on the caller pod's node.

Pod facts come from a ``PodSource``: the API server (list + watch) in
Kubernetes, a file elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

from fastca.authn._kube import KubernetesApi
from fastca.authn.caller import Caller
from fastca.authn.config import TokenReviewCluster
from fastca.authn.serviceaccount import parse_service_account_spiffe_id
from fastca.errors import AuthenticationFailed, CANotReady, ConfigurationError

__all__ = [
    "IMPERSONATION_FAILURE",
    "KubernetesPodSource",
    "NodeAuthorizer",
    "NotOnNode",
    "Pod",
    "PodSource",
    "StaticPodSource",
]

log = logging.getLogger(__name__)

IMPERSONATION_FAILURE = "request impersonation authentication failure"


class NotOnNode(AuthenticationFailed):
    """The one refusal that says something about the caller rather than its
    credential: a trusted node agent asked for an identity that has no pod on
    its node. The issuance monitor scores it (node_impersonation)."""

    public_message = IMPERSONATION_FAILURE

    def __init__(self, detail: str, *, caller: str, requested: str, node: str) -> None:
        super().__init__(f"impersonation denied: {detail}")
        self.caller = caller
        self.requested = requested
        self.node = node


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    uid: str
    service_account: str
    node_name: str


@runtime_checkable
class PodSource(Protocol):
    async def get_pod(self, namespace: str, name: str) -> Pod | None: ...

    async def pods_on_node(self, node: str) -> list[Pod]: ...


class _PodIndex:
    """Pods by (namespace, name) and by node."""

    def __init__(self, pods: Iterable[Pod] = ()) -> None:
        self.by_name: dict[tuple[str, str], Pod] = {}
        self.by_node: dict[str, dict[tuple[str, str], Pod]] = {}
        for pod in pods:
            self.put(pod)

    def put(self, pod: Pod) -> None:
        key = (pod.namespace, pod.name)
        self.remove(key)
        self.by_name[key] = pod
        self.by_node.setdefault(pod.node_name, {})[key] = pod

    def remove(self, key: tuple[str, str]) -> None:
        old = self.by_name.pop(key, None)
        if old is not None:
            on_node = self.by_node.get(old.node_name)
            if on_node is not None:
                on_node.pop(key, None)
                if not on_node:
                    del self.by_node[old.node_name]

    def on_node(self, node: str) -> list[Pod]:
        return list(self.by_node.get(node, {}).values()) if node else []


# ---------------------------------------------------------------- static file

def _pods_from_document(document: Any) -> list[Pod]:
    entries = document.get("pods") if isinstance(document, dict) else document
    if not isinstance(entries, list):
        raise ValueError("expected a list of pods (or a `pods` list)")
    pods = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"pod {index} is not a table")
        try:
            values = {f: entry[f] for f in ("namespace", "name", "uid", "service_account", "node_name")}
        except KeyError as exc:
            raise ValueError(f"pod {index} lacks {exc.args[0]}") from None
        if not all(isinstance(v, str) and v for v in values.values()):
            raise ValueError(f"pod {index}: every field must be a non-empty string")
        pods.append(Pod(**values))
    return pods


class StaticPodSource:
    """Pods listed in a JSON or TOML file (``.toml`` suffix), for meshes
    outside Kubernetes. The file is re-read when it changes; a broken
    rewrite keeps the last good list."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._state: tuple[int, int] | None = None
        self._index = _PodIndex()
        try:
            self._reload()
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"pod file {self.path}: {exc}") from None

    def _reload(self) -> None:
        stat = os.stat(self.path)
        state = (stat.st_mtime_ns, stat.st_size)
        if state == self._state:
            return
        raw = self.path.read_bytes()
        document = tomllib.loads(raw.decode()) if self.path.suffix == ".toml" else json.loads(raw)
        self._index = _PodIndex(_pods_from_document(document))
        self._state = state

    def _current(self) -> _PodIndex:
        try:
            self._reload()
        except (OSError, ValueError) as exc:
            log.warning("pod file %s unreadable, keeping the previous pods: %s", self.path, exc)
        return self._index

    async def get_pod(self, namespace: str, name: str) -> Pod | None:
        return self._current().by_name.get((namespace, name))

    async def pods_on_node(self, node: str) -> list[Pod]:
        return self._current().on_node(node)


# ---------------------------------------------------------------- Kubernetes

class _WatchExpired(Exception):
    """The resource version is too old (410 Gone): list again."""


def _pod_from_object(obj: Any) -> Pod | None:
    if not isinstance(obj, dict):
        return None
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        return None
    namespace, name = meta.get("namespace"), meta.get("name")
    if not isinstance(namespace, str) or not isinstance(name, str):
        return None
    def text(value: Any) -> str:
        return value if isinstance(value, str) else ""
    return Pod(namespace=namespace, name=name, uid=text(meta.get("uid")),
               service_account=text(spec.get("serviceAccountName")), node_name=text(spec.get("nodeName")))


class KubernetesPodSource:
    """All pods of a cluster, listed then watched through the API server, in
    memory. Reconnects with capped exponential backoff; lists again when the
    watch's resource version expires. Until the first list completes, lookups
    wait up to ``sync_timeout`` seconds, then raise CANotReady (retried by
    agents) rather than deny."""

    def __init__(self, cluster: TokenReviewCluster, *, page_size: int = 500, watch_timeout_seconds: int = 300,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, sync_timeout: float = 10.0) -> None:
        self.cluster = cluster
        # A watch is a long read: the server ends it after
        # watch_timeout_seconds; the client allows a margin beyond that.
        self._api = KubernetesApi(cluster, timeout=httpx.Timeout(cluster.timeout_seconds,
                                                                 read=watch_timeout_seconds + 30))
        self.page_size = page_size
        self.watch_timeout_seconds = watch_timeout_seconds
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.sync_timeout = sync_timeout
        self._index = _PodIndex()
        self._resource_version: str | None = None
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.lists = 0
        self.watches = 0

    def __repr__(self) -> str:
        return f"KubernetesPodSource({self.cluster.api_server!r}, pods={len(self._index.by_name)})"

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="fastca-pod-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self._api.aclose()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _ready_index(self) -> _PodIndex:
        if not self._synced.is_set() and not await self.wait_synced(self.sync_timeout):
            raise CANotReady("pod index not synced with the API server yet")
        return self._index

    async def get_pod(self, namespace: str, name: str) -> Pod | None:
        return (await self._ready_index()).by_name.get((namespace, name))

    async def pods_on_node(self, node: str) -> list[Pod]:
        return (await self._ready_index()).on_node(node)

    async def _run(self) -> None:
        backoff = self.backoff_initial
        while True:
            started = time.monotonic()
            try:
                if self._resource_version is None:
                    await self._list()
                events = await self._watch()
                # A watch the server ends on schedule is renewed at once; one
                # that ends straight away without news is backed off.
                if events or time.monotonic() - started > 1.0:
                    backoff = self.backoff_initial
                    continue
                delay = backoff
            except _WatchExpired:
                self._resource_version = None
                if time.monotonic() - started > 1.0:
                    continue
                delay = backoff     # expired straight after a list: the server is confused
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pod watch on %s failed (%s); retrying in %.1fs", self.cluster.api_server,
                            type(exc).__name__, backoff)
                delay = backoff
            await asyncio.sleep(delay * (0.9 + 0.2 * random.random()))
            backoff = min(backoff * 2, self.backoff_max)

    async def _list(self) -> None:
        client = await self._api.client()
        pods: list[Pod] = []
        continue_token: str | None = None
        while True:
            params = {"limit": str(self.page_size)}
            if continue_token:
                params["continue"] = continue_token
            response = await client.get("/api/v1/pods", params=params, headers=self._api.headers())
            response.raise_for_status()
            body = response.json()
            for item in body.get("items") or []:
                pod = _pod_from_object(item)
                if pod is not None:
                    pods.append(pod)
            meta = body.get("metadata") or {}
            continue_token = meta.get("continue")
            if not continue_token:
                self._resource_version = str(meta.get("resourceVersion") or "")
                break
        self._index = _PodIndex(pods)
        self.lists += 1
        self._synced.set()

    async def _watch(self) -> int:
        client = await self._api.client()
        params = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": str(self.watch_timeout_seconds),
                  "resourceVersion": self._resource_version or ""}
        events = 0
        self.watches += 1
        async with client.stream("GET", "/api/v1/pods", params=params, headers=self._api.headers()) as response:
            if response.status_code == 410:
                raise _WatchExpired()
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                self._apply(event)
                events += 1
        return events

    def _apply(self, event: Any) -> None:
        kind, obj = event.get("type"), event.get("object")
        if kind == "ERROR":
            if isinstance(obj, dict) and obj.get("code") == 410:
                raise _WatchExpired()
            raise RuntimeError(f"watch error event: {obj.get('reason') if isinstance(obj, dict) else obj!r}")
        version = ((obj or {}).get("metadata") or {}).get("resourceVersion") if isinstance(obj, dict) else None
        if kind in ("ADDED", "MODIFIED"):
            pod = _pod_from_object(obj)
            if pod is not None:
                self._index.put(pod)
        elif kind == "DELETED":
            pod = _pod_from_object(obj)
            if pod is not None:
                self._index.remove((pod.namespace, pod.name))
        if isinstance(version, str) and version:
            self._resource_version = version


# ---------------------------------------------------------------- the authorizer

def _denied(detail: str) -> AuthenticationFailed:
    return AuthenticationFailed(f"impersonation denied: {detail}", public_message=IMPERSONATION_FAILURE)


class NodeAuthorizer:
    def __init__(self, trusted_node_accounts: Iterable[str], pod_source: PodSource, *,
                 trust_domain: str | None = None) -> None:
        accounts = set()
        for account in trusted_node_accounts:
            namespace, _, service_account = account.partition("/")
            if not namespace or not service_account:
                raise ConfigurationError(f"trusted node account {account!r} is not ns/sa")
            accounts.add((namespace, service_account))
        self.trusted_node_accounts = frozenset(accounts)
        self.pod_source = pod_source
        self.trust_domain = trust_domain

    def __repr__(self) -> str:
        return f"NodeAuthorizer(trusted={sorted('/'.join(a) for a in self.trusted_node_accounts)})"

    async def start(self) -> None:
        start = getattr(self.pod_source, "start", None)
        if start is not None:
            await start()

    async def stop(self) -> None:
        stop = getattr(self.pod_source, "stop", None)
        if stop is not None:
            await stop()

    async def authorize(self, caller: Caller, requested_identity: str, trust_domain: str | None = None) -> str:
        """The caller pod's node if ``caller`` may obtain a certificate for
        ``requested_identity``; raise AuthenticationFailed (public message
        "request impersonation authentication failure") otherwise."""
        trust_domain = trust_domain if trust_domain is not None else self.trust_domain
        if trust_domain is None:
            raise ValueError("NodeAuthorizer.authorize needs a trust domain")
        k8s = caller.kubernetes
        if not self.trusted_node_accounts:
            raise _denied("no trusted node accounts configured")
        if k8s is None:
            raise _denied(f"{caller.credential_type} caller carries no Kubernetes identity")
        if (k8s.namespace, k8s.service_account) not in self.trusted_node_accounts:
            raise _denied(f"{k8s.namespace}/{k8s.service_account} is not a trusted node account")
        if not k8s.pod_name or not k8s.pod_uid:
            raise _denied("caller token names no pod (name and uid)")
        requested = parse_service_account_spiffe_id(requested_identity, trust_domain)
        if requested is None:
            raise _denied(f"requested identity is not spiffe://{trust_domain}/ns/<ns>/sa/<sa>")

        pod = await self.pod_source.get_pod(k8s.namespace, k8s.pod_name)
        if pod is None:
            raise _denied(f"caller pod {k8s.namespace}/{k8s.pod_name} not found")
        if pod.uid != k8s.pod_uid:
            raise _denied(f"caller pod {k8s.namespace}/{k8s.pod_name} has another uid")
        if pod.service_account != k8s.service_account:
            raise _denied(f"caller pod {k8s.namespace}/{k8s.pod_name} runs another service account")
        if not pod.node_name:
            raise _denied(f"caller pod {k8s.namespace}/{k8s.pod_name} is on no node")
        namespace, service_account = requested
        for candidate in await self.pod_source.pods_on_node(pod.node_name):
            if candidate.namespace == namespace and candidate.service_account == service_account:
                return pod.node_name
        raise NotOnNode(f"no pod of {namespace}/{service_account} on node {pod.node_name}",
                        caller=caller.identities[0] if caller.identities else "", requested=requested_identity,
                        node=pod.node_name)

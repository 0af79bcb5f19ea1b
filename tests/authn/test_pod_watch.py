"""KubernetesPodSource against a fake API server over HTTPS that serves a
paginated pod list and a watch stream of ADDED/MODIFIED/DELETED events."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from fastca.authn.caller import Caller, KubernetesInfo
from fastca.authn.config import AuthnConfig, TokenReviewCluster, build_node_authorizer
from fastca.authn.node_authorizer import KubernetesPodSource, NodeAuthorizer, Pod
from fastca.errors import AuthenticationFailed, CANotReady
from tests.authn._https import FakeHttpsServer, Request, Response

API_TOKEN = "pod-reader-credential"


def pod_object(namespace: str, name: str, uid: str, account: str, node: str, rv: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": namespace, "name": name, "uid": uid, "resourceVersion": str(rv)},
            "spec": {"serviceAccountName": account, "nodeName": node, "containers": [{"name": "c"}]},
            "status": {"phase": "Running"}}


class FakePodApi:
    def __init__(self) -> None:
        self.rv = 100
        self.pods = {("istio-system", "ztunnel-abc"): pod_object("istio-system", "ztunnel-abc", "z1", "ztunnel", "n1", 90),
                     ("default", "sleep-1"): pod_object("default", "sleep-1", "s1", "sleep", "n1", 91),
                     ("default", "httpbin-1"): pod_object("default", "httpbin-1", "h1", "httpbin", "n2", 92)}
        self.events: queue.Queue[Any] = queue.Queue()
        self.list_failures = 0
        self.closed = threading.Event()
        self.watch_versions: list[str] = []

    # ---- what the test does to the cluster
    def change(self, kind: str, namespace: str, name: str, uid: str, account: str, node: str) -> None:
        self.rv += 1
        obj = pod_object(namespace, name, uid, account, node, self.rv)
        if kind == "DELETED":
            self.pods.pop((namespace, name), None)
        else:
            self.pods[(namespace, name)] = obj
        self.events.put({"type": kind, "object": obj})

    def end_stream(self) -> None:
        self.events.put(None)

    def expire(self) -> None:
        self.events.put({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                     "message": "too old resource version", "reason": "Expired",
                                                     "code": 410}})

    # ---- the API server
    def _stream(self) -> Iterator[bytes]:
        while not self.closed.is_set():
            try:
                event = self.events.get(timeout=0.05)
            except queue.Empty:
                continue
            if event is None:
                return
            yield json.dumps(event).encode()

    def __call__(self, req: Request) -> Response:
        if req.headers.get("authorization") != f"Bearer {API_TOKEN}":
            return Response(401, {"kind": "Status", "code": 401})
        url = urlsplit(req.path)
        if url.path != "/api/v1/pods":
            return Response(404, {"kind": "Status", "code": 404})
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if query.get("watch") == "true":
            self.watch_versions.append(query.get("resourceVersion", ""))
            return Response(200, lines=self._stream())
        if self.list_failures > 0:
            self.list_failures -= 1
            return Response(500, {"kind": "Status", "code": 500})
        items = sorted(self.pods.values(), key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"]))
        limit, start = int(query.get("limit", "500")), int(query.get("continue", "0") or 0)
        page = items[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        return Response(200, {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": page})


@pytest.fixture
def api(tmp_path: Path):
    fake = FakePodApi()
    (tmp_path / "token").write_text(API_TOKEN)
    with FakeHttpsServer(tmp_path, fake) as server:
        server.fake = fake
        server.cluster = TokenReviewCluster(api_server=server.url, ca_file=str(server.ca_file),
                                            token_file=str(tmp_path / "token"))
        try:
            yield server
        finally:
            fake.closed.set()


async def eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except AssertionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


ZTUNNEL = Caller(identities=("spiffe://cluster.local/ns/istio-system/sa/ztunnel",), credential_type="k8s-tokenreview",
                 kubernetes=KubernetesInfo("istio-system", "ztunnel", "ztunnel-abc", "z1"))


def test_list_then_watch_keeps_the_index_current(api):
    fake = api.fake

    async def go():
        source = KubernetesPodSource(api.cluster, page_size=2, backoff_initial=0.05)
        authorizer = NodeAuthorizer({"istio-system/ztunnel"}, source, trust_domain="cluster.local")
        await authorizer.start()
        try:
            assert await source.wait_synced(5)
            assert len(api.requests_to("/api/v1/pods?limit=")) == 2          # two pages
            assert await source.get_pod("default", "sleep-1") == Pod("default", "sleep-1", "s1", "sleep", "n1")
            assert {p.name for p in await source.pods_on_node("n1")} == {"ztunnel-abc", "sleep-1"}
            await authorizer.authorize(ZTUNNEL, "spiffe://cluster.local/ns/default/sa/sleep")
            with pytest.raises(AuthenticationFailed):
                await authorizer.authorize(ZTUNNEL, "spiffe://cluster.local/ns/default/sa/httpbin")

            fake.change("ADDED", "default", "reviews-1", "r1", "reviews", "n1")
            fake.change("MODIFIED", "default", "httpbin-1", "h1", "httpbin", "n1")     # rescheduled to n1
            fake.change("DELETED", "default", "sleep-1", "s1", "sleep", "n1")

            async def applied():
                return {p.name for p in await source.pods_on_node("n1")} == {"ztunnel-abc", "reviews-1", "httpbin-1"}
            await eventually(applied)
            assert await source.get_pod("default", "sleep-1") is None
            assert await source.pods_on_node("n2") == []
            await authorizer.authorize(ZTUNNEL, "spiffe://cluster.local/ns/default/sa/httpbin")
            with pytest.raises(AuthenticationFailed):
                await authorizer.authorize(ZTUNNEL, "spiffe://cluster.local/ns/default/sa/sleep")

            # The server ends the watch: the source reconnects from the last version it saw.
            fake.end_stream()
            fake.change("ADDED", "default", "late-1", "l1", "late", "n2")

            async def reconnected():
                return await source.get_pod("default", "late-1") is not None
            await eventually(reconnected)
            assert fake.watch_versions[:2] == ["100", "103"]
            assert source.lists == 1

            # The version expires (410 Gone): list again, then watch from the new version.
            fake.expire()
            fake.change("ADDED", "default", "after-gone-1", "g1", "gone", "n2")   # seen through the relist

            async def relisted():
                return (source.lists == 2 and await source.get_pod("default", "after-gone-1") is not None
                        and fake.watch_versions[-1] == str(fake.rv))
            await eventually(relisted)
        finally:
            await authorizer.stop()
        return source

    source = asyncio.run(go())
    assert source._task is None


def test_list_failures_are_retried_with_backoff(api):
    api.fake.list_failures = 3

    async def go():
        source = KubernetesPodSource(api.cluster, backoff_initial=0.02, backoff_max=0.1)
        await source.start()
        try:
            assert await source.wait_synced(5)
            return await source.get_pod("istio-system", "ztunnel-abc")
        finally:
            await source.stop()

    assert asyncio.run(go()) == Pod("istio-system", "ztunnel-abc", "z1", "ztunnel", "n1")
    assert len(api.requests_to("/api/v1/pods?limit=")) == 4


def test_lookups_before_the_first_sync_are_unavailable_not_denied(api):
    api.fake.list_failures = 10**6

    async def go():
        source = KubernetesPodSource(api.cluster, backoff_initial=0.02, sync_timeout=0.2)
        authorizer = NodeAuthorizer({"istio-system/ztunnel"}, source, trust_domain="cluster.local")
        await authorizer.start()
        try:
            with pytest.raises(CANotReady):
                await authorizer.authorize(ZTUNNEL, "spiffe://cluster.local/ns/default/sa/sleep")
        finally:
            await authorizer.stop()

    asyncio.run(go())


def test_built_from_config_uses_the_named_cluster(api):
    config = AuthnConfig.model_validate({
        "tokenreview": [{"cluster_id": "other", "api_server": "https://127.0.0.1:1"},
                        api.cluster.model_dump() | {"cluster_id": "main"}],
        "node_authorizer": {"trusted_node_accounts": ["istio-system/ztunnel"], "pod_source": "kubernetes",
                            "kubernetes_cluster": "main"}})
    authorizer = build_node_authorizer(config, trust_domain="cluster.local")

    async def go():
        await authorizer.start()
        try:
            await authorizer.authorize(ZTUNNEL, "spiffe://cluster.local/ns/default/sa/sleep")
        finally:
            await authorizer.stop()

    asyncio.run(go())

"""The trust-bundle publisher against the stand-in API server, through
kubernetes-asyncio and a kubeconfig exactly as against a cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fastca.config import CAConfig
from fastca.errors import ConfigurationError
from fastca.frontend.workers import _worker_config
from fastca.trust.config import CONFIGMAP_KEY, CONFIGMAP_NAME, KubernetesTrustConfig
from fastca.trust.kubernetes import KubernetesTrustPublisher
from tests.authn._pki import make_root
from tests.trust._apiserver import KubeStandIn

LEASE_NS = "istio-system"
LEASE = "fastca-trust-publisher"
FAST = {"lease_duration_seconds": 3, "renew_deadline_seconds": 2.0, "retry_period_seconds": 1.0,
        "resync_seconds": 120.0, "request_timeout_seconds": 5.0}


@pytest.fixture
def cluster(tmp_path: Path):
    with KubeStandIn(tmp_path) as server:
        for name in ("default", "app", LEASE_NS, "kube-system", "kube-public", "kube-node-lease"):
            server.create_namespace(name)
        yield server


def _bundle(label: str) -> str:
    return make_root(label).pem.decode()


def _config(cluster: KubeStandIn, tmp_path: Path, who: str, **extra) -> KubernetesTrustConfig:
    kubeconfig = cluster.write_kubeconfig(tmp_path / f"kubeconfig-{who}", who=who)
    return KubernetesTrustConfig(enabled=True, kubeconfig=str(kubeconfig), identity=who, **{**FAST, **extra})


async def _until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _published(cluster: KubeStandIn, namespace: str, bundle: str) -> bool:
    cm = cluster.configmap(namespace, CONFIGMAP_NAME)
    return cm is not None and cm.get("data") == {CONFIGMAP_KEY: bundle}


def _holder(cluster: KubeStandIn) -> str | None:
    lease = cluster.lease(LEASE_NS, LEASE)
    return lease["spec"].get("holderIdentity") if lease else None


def test_the_bundle_is_published_kept_and_updated_in_every_namespace(cluster: KubeStandIn, tmp_path: Path):
    bundle = _bundle("root one")
    served = ["default", "app", LEASE_NS]

    async def scenario() -> None:
        publisher = KubernetesTrustPublisher(_config(cluster, tmp_path, "solo"), bundle, base_dir=tmp_path)
        await publisher.start()
        try:
            await _until(lambda: all(_published(cluster, ns, bundle) for ns in served), what="first publication")
            assert _holder(cluster) == "solo"
            cm = cluster.configmap("app", CONFIGMAP_NAME)
            assert cm["metadata"]["labels"] == {"istio.io/config": "true"}      # as istiod labels it
            for skipped in ("kube-system", "kube-public", "kube-node-lease"):
                assert cluster.configmap(skipped, CONFIGMAP_NAME) is None

            cluster.create_namespace("new-team")                               # a new namespace gets one
            await _until(lambda: _published(cluster, "new-team", bundle), what="new namespace")

            cluster.edit_configmap("app", CONFIGMAP_NAME, {CONFIGMAP_KEY: "tampered"}, labels={})
            await _until(lambda: _published(cluster, "app", bundle), what="edited ConfigMap repaired")
            assert cluster.configmap("app", CONFIGMAP_NAME)["metadata"]["labels"]["istio.io/config"] == "true"

            cluster.edit_configmap("default", CONFIGMAP_NAME, {CONFIGMAP_KEY: bundle, "extra": "x"})
            await _until(lambda: _published(cluster, "default", bundle), what="extra key removed")

            cluster.delete_configmap("default", CONFIGMAP_NAME)
            await _until(lambda: _published(cluster, "default", bundle), what="deleted ConfigMap recreated")

            # All of that came from the watches: one list at the start, no resync since.
            assert publisher.publisher is not None and publisher.publisher.resyncs == 1

            cluster.delete_namespace("new-team")                               # terminating: left alone
            await asyncio.sleep(0.5)
            assert cluster.configmap("new-team", CONFIGMAP_NAME) is None

            rotated = bundle + _bundle("root two")
            publisher.set_bundle(rotated)
            await _until(lambda: all(_published(cluster, ns, rotated) for ns in served), what="bundle update")
        finally:
            await publisher.stop()
        lease = cluster.lease(LEASE_NS, LEASE)
        assert lease["spec"]["holderIdentity"] == ""                           # released on stop

    asyncio.run(scenario())


def test_a_watch_that_falls_behind_compaction_lists_again(cluster: KubeStandIn, tmp_path: Path):
    bundle = _bundle("root")

    async def scenario() -> None:
        config = _config(cluster, tmp_path, "solo", watch_timeout_seconds=1)
        publisher = KubernetesTrustPublisher(config, bundle, base_dir=tmp_path)
        await publisher.start()
        try:
            await _until(lambda: _published(cluster, "app", bundle), what="first publication")
            cluster.compact()          # the watches' next reopen (within 1 s) is 410 Gone
            await _until(lambda: publisher.publisher.resyncs >= 2, what="a new list after 410")
            cluster.delete_configmap("app", CONFIGMAP_NAME)
            await _until(lambda: _published(cluster, "app", bundle), what="repair after relist")
        finally:
            await publisher.stop()

    asyncio.run(scenario())


def test_one_leader_writes_and_a_conflict_on_the_lease_is_survived(cluster: KubeStandIn, tmp_path: Path):
    bundle = _bundle("root")

    async def scenario() -> None:
        a = KubernetesTrustPublisher(_config(cluster, tmp_path, "a"), bundle, base_dir=tmp_path)
        b = KubernetesTrustPublisher(_config(cluster, tmp_path, "b"), bundle, base_dir=tmp_path)
        await a.start()
        await _until(lambda: _published(cluster, "app", bundle) and a.leading, what="a leads")
        await b.start()
        try:
            # Someone else writes the Lease between the leader's read and its
            # replace: that replace carries a stale resourceVersion and gets
            # 409; the leader reads again and renews at its next try, within
            # its renew deadline. Twice, a few renewals apart.
            for _ in range(2):
                cluster.interleave_lease_writes = 1
                await _until(lambda: cluster.interleave_lease_writes == 0, what="the interleaved write")
                await asyncio.sleep(2.5)
            assert cluster.conflicts["leases"] >= 2
            assert a.elector.conflicts >= 2
            assert _holder(cluster) == "a" and a.leading and not b.leading
            assert a.elector.terms == 1                    # never lost it
            cluster.delete_configmap("app", CONFIGMAP_NAME)
            await _until(lambda: _published(cluster, "app", bundle), what="repair by the leader")
            assert cluster.writes("configmaps", who="b") == []
            assert cluster.writes("configmaps", who="a")

            await a.stop()                                 # graceful: released, b takes it at its next try
            took = await _until(lambda: _holder(cluster) == "b" and b.leading, timeout=5, what="b leads")
            assert took < FAST["lease_duration_seconds"]
            cluster.delete_configmap("default", CONFIGMAP_NAME)
            await _until(lambda: _published(cluster, "default", bundle), what="repair by the new leader")
            assert cluster.writes("configmaps", who="b")
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_an_api_server_that_does_not_answer_is_retried(tmp_path: Path):
    """No server at the address: the elector keeps trying, nothing raises."""
    async def scenario() -> None:
        with KubeStandIn(tmp_path) as server:
            kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        config = KubernetesTrustConfig(enabled=True, kubeconfig=str(kubeconfig), identity="x",
                                       **{**FAST, "request_timeout_seconds": 1.0})
        publisher = KubernetesTrustPublisher(config, _bundle("root"), base_dir=tmp_path)
        await publisher.start()
        await asyncio.sleep(2.5)
        assert not publisher.leading and publisher._task is not None and not publisher._task.done()
        await publisher.stop()

    asyncio.run(scenario())


def test_configuration():
    with pytest.raises(ValueError, match="greater than renew_deadline"):
        KubernetesTrustConfig(lease_duration_seconds=5, renew_deadline_seconds=5)
    with pytest.raises(ValueError, match="1.2 x retry_period"):
        KubernetesTrustConfig(renew_deadline_seconds=2, retry_period_seconds=2)
    assert KubernetesTrustConfig().lease_namespace == "istio-system"
    assert "_" in KubernetesTrustConfig().holder_identity()
    config = CAConfig.from_mapping({"trust": {"kubernetes": {"enabled": True, "identity": "r1"}}})
    assert config.trust.kubernetes.identity == "r1"
    # Only worker 0 of a replica contends for the Lease.
    assert _worker_config(config, 0).trust.kubernetes.enabled
    assert not _worker_config(config, 1).trust.kubernetes.enabled


def test_a_missing_kubeconfig_is_a_configuration_error(tmp_path: Path):
    config = KubernetesTrustConfig(enabled=True, kubeconfig="nowhere.yaml")
    publisher = KubernetesTrustPublisher(config, "x", base_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="kubeconfig"):
        asyncio.run(publisher.start())

"""Acceptance: two real `fastca serve` replicas of one CA contend for the
trust-bundle Lease on the stand-in API server. One publishes; killed with
SIGKILL, the other takes the Lease within its lease duration (plus a retry
period) and repairs a ConfigMap deleted meanwhile."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fastca.trust.config import CONFIGMAP_KEY, CONFIGMAP_NAME
from tests.frontend.conftest import init_state, start_server, write_config
from tests.trust._apiserver import KubeStandIn

LEASE_NS = "istio-system"
LEASE = "fastca-trust-publisher"
LEASE_DURATION = 4
RETRY = 1.0


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.slow
def test_the_survivor_takes_the_lease_and_repairs(tmp_path: Path):
    with KubeStandIn(tmp_path) as cluster:
        for name in ("default", "app", LEASE_NS, "kube-system"):
            cluster.create_namespace(name)
        state = init_state(tmp_path / "state")
        bundle = (state / "root-cert.pem").read_text()
        write_config(state, {"trust": {"kubernetes": {
            "enabled": True, "lease_duration_seconds": LEASE_DURATION, "renew_deadline_seconds": 3.0,
            "retry_period_seconds": RETRY}}})

        def published(namespace: str) -> bool:
            cm = cluster.configmap(namespace, CONFIGMAP_NAME)
            return cm is not None and cm.get("data") == {CONFIGMAP_KEY: bundle}

        def holder() -> str | None:
            lease = cluster.lease(LEASE_NS, LEASE)
            return lease["spec"].get("holderIdentity") if lease else None

        def replica(who: str):
            kubeconfig = cluster.write_kubeconfig(tmp_path / f"kubeconfig-{who}", who=who)
            return start_server(state, env={"FASTCA_TRUST__KUBERNETES__KUBECONFIG": str(kubeconfig),
                                            "FASTCA_TRUST__KUBERNETES__IDENTITY": who})

        a = replica("replica-a")
        b = None
        try:
            _until(lambda: holder() == "replica-a" and all(published(ns) for ns in ("default", "app", LEASE_NS)),
                   20, "replica-a publishing")
            assert cluster.configmap("kube-system", CONFIGMAP_NAME) is None
            b = replica("replica-b")
            time.sleep(3 * RETRY)                       # b has tried, and been refused, a few times
            assert holder() == "replica-a"
            cluster.delete_configmap("app", CONFIGMAP_NAME)
            _until(lambda: published("app"), 10, "the leader's repair")
            assert cluster.writes("configmaps", who="replica-b") == []
            assert cluster.writes("leases", who="replica-b") == []

            a.stop(signal.SIGKILL)                      # no release: the Lease has to expire
            killed = time.monotonic()
            cluster.delete_configmap("default", CONFIGMAP_NAME)
            took = _until(lambda: holder() == "replica-b", LEASE_DURATION + 10, "replica-b taking the Lease")
            _until(lambda: published("default"), 10, "replica-b's repair")
            repaired = time.monotonic() - killed
            print(f"lease taken {took:.2f}s after SIGKILL, ConfigMap repaired after {repaired:.2f}s")
            # Within the lease duration plus a retry period, and a little
            # for the request itself on a loaded machine.
            assert took <= LEASE_DURATION + RETRY + 1.0, took
            assert cluster.writes("configmaps", who="replica-b")
            assert any(e.get("event") == "leading" for e in b.log_events())
        finally:
            a.stop(signal.SIGKILL)
            if b is not None:
                assert b.stop() == 0                    # a graceful stop releases the Lease
        assert holder() == ""

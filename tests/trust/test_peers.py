"""[trust.peers]: each kind of source, the last good bundle kept through a
refusal or an outage, the grace period, and the report (metrics, logs)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from fastca.config import CAConfig
from fastca.observability.metrics import Metrics
from fastca.trust.bundle import TrustBundle
from fastca.trust.config import CONFIGMAP_KEY, CONFIGMAP_NAME, PeersConfig
from fastca.trust.peers import PeerSync
from tests.authn._https import FakeHttpsServer, Request, Response
from tests.trust._apiserver import KubeStandIn
from tests.trust._roots import certificate, pem


class _Clock:
    def __init__(self) -> None:
        import time

        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def _metric(metrics: Metrics, series: str) -> float | None:
    for line in metrics.render().decode().splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def _sync(config: dict, tmp: Path, clock=None) -> tuple[PeerSync, TrustBundle, Metrics]:
    metrics = Metrics()
    bundle = TrustBundle([certificate("own")])
    sync = PeerSync(PeersConfig.model_validate(config), tmp, bundle.set_peers, metrics=metrics,
                    **({"clock": clock} if clock else {}))
    return sync, bundle, metrics


def test_a_file_peer_last_good_kept_through_refusals_then_dropped_after_grace(tmp_path: Path):
    clock = _Clock()
    peer_file = tmp_path / "west.pem"
    good = certificate("west")
    peer_file.write_bytes(pem(good))
    sync, bundle, metrics = _sync({"grace_period_seconds": 100, "max_bytes": 4096,
                                   "sources": {"west": {"file": "west.pem"}}}, tmp_path, clock)

    async def scenario() -> None:
        await sync.sync_once()
        assert bundle.certificates[1:] == (good,)
        assert _metric(metrics, 'fastca_trust_peer_ok{peer="west"}') == 1
        assert _metric(metrics, 'fastca_trust_peer_last_success_timestamp_seconds{peer="west"}') == clock.t
        for bad, reason in [(b"garbage", "empty"), (pem(certificate("leaf", ca=False)), "not_ca"),
                            (pem(*(certificate(f"r{i}") for i in range(12))), "too_large")]:
            peer_file.write_bytes(bad)
            clock.t += 10
            await sync.sync_once()
            assert bundle.certificates[1:] == (good,)          # the last good one is kept
            assert _metric(metrics, 'fastca_trust_peer_ok{peer="west"}') == 0
            assert _metric(metrics, f'fastca_trust_peer_refusals_total{{peer="west",reason="{reason}"}}') == 1
        peer_file.unlink()                                      # unreachable
        clock.t += 60
        await sync.sync_once()
        assert bundle.certificates[1:] == (good,)
        assert _metric(metrics, 'fastca_trust_peer_refusals_total{peer="west",reason="fetch"}') == 1
        clock.t += 20                                           # 110 s since the last success
        await sync.sync_once()
        assert len(bundle.certificates) == 1                    # dropped: only the own root
        assert _metric(metrics, 'fastca_trust_peer_in_bundle{peer="west"}') == 0
        newer = certificate("west-2")
        peer_file.write_bytes(pem(newer))                       # back: in again at once
        await sync.sync_once()
        assert bundle.certificates[1:] == (newer,)
        assert _metric(metrics, 'fastca_trust_peer_in_bundle{peer="west"}') == 1
        await sync.close()

    asyncio.run(scenario())


def test_a_fifo_is_not_read(tmp_path: Path):
    import os

    os.mkfifo(tmp_path / "fifo.pem")
    sync, bundle, metrics = _sync({"sources": {"p": {"file": str(tmp_path / "fifo.pem")}}}, tmp_path)
    asyncio.run(sync.sync_once())
    assert len(bundle.certificates) == 1
    assert _metric(metrics, 'fastca_trust_peer_refusals_total{peer="p",reason="fetch"}') == 1


def test_an_https_peer_is_read_up_to_the_bound_and_verified(tmp_path: Path):
    body = {"data": pem(certificate("east"))}

    def handle(request: Request) -> Response:
        return Response(body=body["data"]) if request.path == "/roots.pem" else Response(status=404, body=b"")

    with FakeHttpsServer(tmp_path, handle) as server:
        config = {"max_bytes": 2048, "sources": {
            "east": {"url": f"{server.url}/roots.pem", "ca_file": str(server.ca_file), "timeout_seconds": 5},
            "missing": {"url": f"{server.url}/nothing", "ca_file": str(server.ca_file)},
            "untrusted": {"url": f"{server.url}/roots.pem"}}}         # the system's CAs: not this server's
        sync, bundle, metrics = _sync(config, tmp_path)

        async def scenario() -> None:
            await sync.sync_once()
            assert [c.subject.rfc4514_string() for c in bundle.certificates[1:]] == ["O=east"]
            assert _metric(metrics, 'fastca_trust_peer_ok{peer="missing"}') == 0
            assert _metric(metrics, 'fastca_trust_peer_ok{peer="untrusted"}') == 0
            body["data"] = b"x" * 1_000_000                              # oversized: refused, not read whole
            await sync.sync_once()
            assert _metric(metrics, 'fastca_trust_peer_refusals_total{peer="east",reason="too_large"}') == 1
            assert [c.subject.rfc4514_string() for c in bundle.certificates[1:]] == ["O=east"]
            await sync.close()

        asyncio.run(scenario())


def test_a_remote_clusters_configmap_through_a_kubeconfig(tmp_path: Path):
    with KubeStandIn(tmp_path) as cluster:
        kubeconfig = cluster.write_kubeconfig(tmp_path / "south.kubeconfig")
        sync, bundle, metrics = _sync({"sources": {"south": {"kubeconfig": str(kubeconfig)}}}, tmp_path)
        south = certificate("south")

        async def scenario() -> None:
            await sync.sync_once()                                     # no ConfigMap yet
            assert _metric(metrics, 'fastca_trust_peer_ok{peer="south"}') == 0
            cluster.create_namespace("istio-system")
            cluster.put_configmap("istio-system", CONFIGMAP_NAME, {CONFIGMAP_KEY: pem(south).decode()})
            await sync.sync_once()
            assert bundle.certificates[1:] == (south,)
            await sync.close()

        asyncio.run(scenario())


def test_configuration():
    peers = CAConfig.from_mapping({"trust": {"peers": {"sources": {"a": {"file": "a.pem"}}}}}, source="t").trust.peers
    assert (peers.sync_interval_seconds, peers.grace_period_seconds, peers.max_certificates, peers.max_bytes) == \
        (60, 86400, 100, 1024 * 1024)
    assert peers.sources["a"].kind == "file"
    for bad in [{"a": {}}, {"a": {"file": "x", "url": "https://x"}}, {"a": {"url": "http://plain"}},
                {"a": {"file": "x", "ca_file": "c"}}, {"bad name!": {"file": "x"}}]:
        with pytest.raises(ValidationError):
            PeersConfig.model_validate({"sources": bad})

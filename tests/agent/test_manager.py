"""The CA-backed secret manager: single flight, rotation observed through
subscribe against a real CA, CA outages, expiry, root changes, discarded
responses, the output directory (docs/reliability.md, cases 29–32)."""

from __future__ import annotations

import asyncio
import stat
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fastca.agent.caclient import CAClient, validate_response
from fastca.agent.files import FileCertificates
from fastca.agent.manager import SecretManager
from fastca.agent.secrets import ROOT_CERT, WORKLOAD_CERT, SecretUnavailable
from tests.agent.conftest import WORKLOAD_ID, LocalCA, make_authority, run, wait_until
from tests.frontend.conftest import service_account_token


def _client(ca, **kwargs) -> CAClient:
    return CAClient(ca.address, root_pem=ca.root_pem, token_file=ca.token_file, cluster_id="Kubernetes", **kwargs)


def _leaf(item) -> x509.Certificate:
    return x509.load_pem_x509_certificates(item.certificate_chain)[0]


def _key_matches(item) -> bool:
    key = serialization.load_pem_private_key(item.private_key, None)
    return key.public_key() == _leaf(item).public_key()


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict]] = []

    def __call__(self, kind: str, name: str, **details) -> None:
        self.items.append((kind, name, details))

    def count(self, kind: str) -> int:
        return sum(1 for k, _, _ in self.items if k == kind)

    def details(self, kind: str) -> list[dict]:
        return [d for k, _, d in self.items if k == kind]


# -- single flight ----------------------------------------------------------------------------------------------
def test_fifty_concurrent_gets_make_one_csr_real_ca(shared_ca):
    async def main():
        before = shared_ca.metric("citadel_server_csr_count")
        client = _client(shared_ca)
        manager = SecretManager(client, spiffe_id=WORKLOAD_ID, key_type="ec-p256", ttl_seconds=3600)
        try:
            items = await asyncio.gather(*(manager.get(WORKLOAD_CERT if i % 5 else ROOT_CERT) for i in range(50)))
        finally:
            await manager.stop()
            await client.close()
        assert manager.csr_count == 1
        assert shared_ca.metric("citadel_server_csr_count") - before == 1
        workloads = {i.version for i in items if i.name == WORKLOAD_CERT}
        roots = {i.trusted_ca for i in items if i.name == ROOT_CERT}
        assert len(workloads) == 1 and roots == {shared_ca.root_pem}
        item = next(i for i in items if i.name == WORKLOAD_CERT)
        assert _key_matches(item) and item.version == format(_leaf(item).serial_number, "x")
        assert item.private_key.startswith(b"-----BEGIN PRIVATE KEY-----")

    run(main())


def test_single_flight_local_and_cached_afterwards():
    async def main():
        ca = LocalCA(delay=0.2)
        manager = SecretManager(ca, spiffe_id=WORKLOAD_ID, key_type="ec-p256", ttl_seconds=3600)
        items = await asyncio.gather(*(manager.get(WORKLOAD_CERT) for _ in range(50)))
        assert ca.calls == 1 and ca.ttls == [3600]
        assert len({i.version for i in items}) == 1
        assert (await manager.get(WORKLOAD_CERT)) is items[0]        # cached: no new CSR
        assert ca.calls == 1
        await manager.stop()

    run(main())


def test_rootca_first_fetches_default():
    async def main():
        ca = LocalCA()
        ca.intermediate = make_authority("intermediate", ca.root)
        manager = SecretManager(ca, spiffe_id=WORKLOAD_ID, key_type="ec-p256")
        root = await manager.get(ROOT_CERT)
        assert root.is_root and root.trusted_ca == ca.root.pem.encode()
        assert ca.calls == 1
        workload = await manager.get(WORKLOAD_CERT)
        assert ca.calls == 1
        # chain = leaf + intermediate, root bundle kept apart
        assert x509.load_pem_x509_certificates(workload.certificate_chain)[1] == ca.intermediate.cert
        assert ca.root.pem.encode() not in workload.certificate_chain
        await manager.stop()

    run(main())


def test_unknown_resource():
    async def main():
        manager = SecretManager(LocalCA(), spiffe_id=WORKLOAD_ID)
        with pytest.raises(SecretUnavailable, match="unknown"):
            await manager.get("kubernetes://some-secret")
        with pytest.raises(ValueError):
            SecretManager(LocalCA(), spiffe_id=WORKLOAD_ID, key_type="dsa")

    run(main())


# -- rotation against a real CA ------------------------------------------------------------------------------------
def test_rotation_with_short_ttl_real_ca(shared_ca, tmp_path):
    async def main():
        client = _client(shared_ca)
        out = tmp_path / "out"
        manager = SecretManager(client, spiffe_id=WORKLOAD_ID, key_type="ec-p256", ttl_seconds=3, output_dir=out)
        heard: list[str] = []
        manager.subscribe(heard.append)
        await manager.start()
        try:
            first = await manager.get(WORKLOAD_CERT)
            await manager.get(ROOT_CERT)
            await wait_until(lambda: heard.count(WORKLOAD_CERT) >= 2, 15)
            assert ROOT_CERT not in heard                              # the root did not change
            latest = await manager.get(WORKLOAD_CERT)
            await manager.stop()
            current = await manager.get(WORKLOAD_CERT)                 # no task may write after this
        finally:
            await manager.stop()
            await client.close()
        assert latest.version != first.version and latest.private_key != first.private_key
        assert _key_matches(latest)
        assert manager.csr_count >= 3
        assert _leaf(latest).not_valid_after_utc.timestamp() > time.time() - 5
        on_disk = FileCertificates(out / "cert-chain.pem", out / "key.pem").read("default")
        assert (on_disk.certificate_chain, on_disk.private_key) == (current.certificate_chain, current.private_key)
        assert (out / "root-cert.pem").read_bytes() == shared_ca.root_pem

    run(main())


def test_ca_down_at_rotation_keeps_serving_then_recovers(own_ca):
    async def main():
        events = Events()
        client = _client(own_ca, max_attempts=2, initial_backoff=0.05)
        # renewal due at ~5 s, expiry at 20 s: room to observe the outage while the pair is still valid
        manager = SecretManager(client, spiffe_id=WORKLOAD_ID, key_type="ec-p256", ttl_seconds=20,
                                rotation_ratio=0.75, backoff_initial=0.2, backoff_max=0.5, on_event=events)
        heard: list[str] = []
        manager.subscribe(heard.append)
        await manager.start()
        try:
            first = await manager.get(WORKLOAD_CERT)
            assert manager.next_refresh is not None
            await asyncio.to_thread(own_ca.stop)
            await wait_until(lambda: manager.rotation_failures >= 3, 12)
            assert time.time() < manager.not_after                     # still valid, so still served
            assert await manager.get(WORKLOAD_CERT) == first
            assert heard == []
            assert all(d["failures"] >= 1 and d["retry_in"] <= 0.5 for d in events.details("rotation_failed"))
            assert {d["code"] for d in events.details("fetch_failed")} == {"UNAVAILABLE"}
            # The token is re-read on every try: without it the restarted CA refuses ...
            token = own_ca.token_file.read_text()
            own_ca.token_file.unlink()
            await asyncio.to_thread(own_ca.start)
            await wait_until(lambda: "UNAUTHENTICATED" in {d["code"] for d in events.details("fetch_failed")}, 10)
            assert heard == []
            # ... and with it back, the next try succeeds.
            own_ca.token_file.write_text(token)
            await wait_until(lambda: heard == [WORKLOAD_CERT], 10)
            second = await manager.get(WORKLOAD_CERT)
            assert second.version != first.version and _key_matches(second)
            assert manager.rotation_failures == 0
        finally:
            await manager.stop()
            await client.close()

    run(main(), timeout=90)


# -- expiry --------------------------------------------------------------------------------------------------------
def test_expired_cache_with_ca_down_is_unavailable():
    now = [time.time()]

    async def main():
        ca = LocalCA()
        events = Events()
        manager = SecretManager(ca, spiffe_id=WORKLOAD_ID, key_type="ec-p256", ttl_seconds=100,
                                clock=lambda: now[0], on_event=events)
        first = await manager.get(WORKLOAD_CERT)
        ca.fail = grpc.StatusCode.UNAVAILABLE
        now[0] += 70                                   # past refresh_at, not expired: renewal fails, cached served
        assert await manager.get(WORKLOAD_CERT) == first
        assert ca.calls == 2
        now[0] += 40                                   # expired
        with pytest.raises(SecretUnavailable, match="expired"):
            await manager.get(WORKLOAD_CERT)
        assert ca.calls == 3
        assert events.count("fetch_failed") == 2
        # the root bundle itself is still served from the cache
        assert (await manager.get(ROOT_CERT)).trusted_ca == ca.root.pem.encode()
        ca.fail, ca.leaf_ttl = None, 1000                # the CA is back (clock still past the old expiry)
        second = await manager.get(WORKLOAD_CERT)
        assert second.version != first.version and ca.calls == 4
        await manager.stop()

    run(main())


def test_expired_cache_is_renewed_at_once_by_the_rotation_task():
    async def main():
        ca = LocalCA()
        manager = SecretManager(ca, spiffe_id=WORKLOAD_ID, key_type="ec-p256", ttl_seconds=1,
                                rotation_ratio=0.0, jitter=0.0)    # renew only at expiry
        heard: list[str] = []
        manager.subscribe(heard.append)
        await manager.get(WORKLOAD_CERT)
        await manager.start()
        try:
            await wait_until(lambda: len(heard) >= 1, 5)
            assert ca.calls >= 2
        finally:
            await manager.stop()

    run(main())


# -- root change, discarded responses, release --------------------------------------------------------------------
def test_root_change_notifies_rootca():
    async def main():
        ca = LocalCA()
        manager = SecretManager(ca, spiffe_id=WORKLOAD_ID, key_type="ec-p256", ttl_seconds=2)
        heard: list[str] = []
        manager.subscribe(heard.append)
        await manager.start()
        try:
            await manager.get(WORKLOAD_CERT)
            old_root = await manager.get(ROOT_CERT)
            await wait_until(lambda: heard.count(WORKLOAD_CERT) >= 1, 10)
            assert ROOT_CERT not in heard                              # same root: only default
            new_root = make_authority("root-2")
            ca.root = new_root
            await wait_until(lambda: ROOT_CERT in heard, 10)
            rootca = await manager.get(ROOT_CERT)
            assert rootca.trusted_ca == new_root.pem.encode() and rootca.version != old_root.version
            assert heard.index(ROOT_CERT) > heard.index(WORKLOAD_CERT)
            workload = await manager.get(WORKLOAD_CERT)
            validate_response([workload.certificate_chain.decode(), rootca.trusted_ca.decode()],
                              serialization.load_pem_private_key(workload.private_key, None), WORKLOAD_ID)
        finally:
            await manager.stop()

    run(main())


@pytest.mark.parametrize("tamper", [
    lambda chain: chain[:1],
    lambda chain: [LocalCA(identity="spiffe://cluster.local/ns/other/sa/x").root.pem] + chain[1:],
    lambda chain: [chain[0], make_authority("root-1").pem],
], ids=["one-element", "not-a-leaf-for-our-key", "chain-not-to-root"])
def test_invalid_first_response_is_discarded(tmp_path, tamper):
    async def main():
        events = Events()
        ca = LocalCA(tamper=tamper)
        manager = SecretManager(ca, spiffe_id=WORKLOAD_ID, key_type="ec-p256", output_dir=tmp_path / "out",
                                on_event=events)
        with pytest.raises(SecretUnavailable, match="discarded"):
            await manager.get(WORKLOAD_CERT)
        with pytest.raises(SecretUnavailable):
            await manager.get(ROOT_CERT)
        assert events.count("response_invalid") == 2 and events.count("issued") == 0
        assert not (tmp_path / "out").exists()
        assert manager.not_after is None

    run(main())


def test_wrong_identity_at_rotation_is_discarded_and_cached_pair_kept(tmp_path):
    async def main():
        events = Events()
        ca = LocalCA()
        out = tmp_path / "out"
        manager = SecretManager(ca, spiffe_id=WORKLOAD_ID, key_type="ec-p256", ttl_seconds=10, output_dir=out,
                                rotation_ratio=0.9, backoff_initial=0.1, backoff_max=0.2, on_event=events)
        heard: list[str] = []
        manager.subscribe(heard.append)
        first = await manager.get(WORKLOAD_CERT)
        written = (out / "cert-chain.pem").read_bytes()
        ca.identity = "spiffe://cluster.local/ns/payments/sa/someone-else"
        await manager.start()
        try:
            await wait_until(lambda: events.count("rotation_failed") >= 2, 10)   # counted after each discard
            assert heard == []
            assert await manager.get(WORKLOAD_CERT) == first
            assert (out / "cert-chain.pem").read_bytes() == written
            assert manager.rotation_failures >= 2
        finally:
            await manager.stop()

    run(main())


def test_release_stops_rotation():
    async def main():
        ca = LocalCA()
        manager = SecretManager(ca, spiffe_id=WORKLOAD_ID, key_type="ec-p256", ttl_seconds=1)
        await manager.start()
        try:
            await manager.get(WORKLOAD_CERT)
            manager.release(WORKLOAD_CERT)
            await asyncio.sleep(1.5)                   # past refresh and expiry: nobody wants it
            assert ca.calls == 1
            await manager.get(ROOT_CERT)               # wanted again (ROOTCA keeps the response fresh)
            await wait_until(lambda: ca.calls >= 2, 5)
        finally:
            await manager.stop()

    run(main())


# -- output directory and file resources --------------------------------------------------------------------------
def test_output_directory_follows_every_new_certificate(tmp_path):
    async def main():
        ca = LocalCA()
        out = tmp_path / "out"
        manager = SecretManager(ca, spiffe_id=WORKLOAD_ID, key_type="rsa-2048", ttl_seconds=1, output_dir=out)
        heard: list[str] = []
        manager.subscribe(heard.append)
        await manager.start()
        try:
            first = await manager.get(WORKLOAD_CERT)
            on_disk = FileCertificates(out / "cert-chain.pem", out / "key.pem").read("default")
            assert (on_disk.certificate_chain, on_disk.private_key) == (first.certificate_chain, first.private_key)
            assert (out / "root-cert.pem").read_bytes() == ca.root.pem.encode()
            assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
            await wait_until(lambda: heard, 5)
            latest = await manager.get(WORKLOAD_CERT)
            on_disk = FileCertificates(out / "cert-chain.pem", out / "key.pem").read("default")
            assert on_disk.private_key == latest.private_key != first.private_key
        finally:
            await manager.stop()

    run(main())


def test_file_resources_through_the_manager(tmp_path):
    from tests.agent.test_files import make_pair

    first, second = make_pair(), make_pair()
    (tmp_path / "c.pem").write_bytes(first[0])
    (tmp_path / "k.pem").write_bytes(first[1])
    name = f"file-cert:{tmp_path / 'c.pem'}~{tmp_path / 'k.pem'}"

    async def main():
        ca = LocalCA()
        manager = SecretManager(ca, spiffe_id=WORKLOAD_ID, file_poll_interval=0.05)
        heard: list[str] = []
        manager.subscribe(heard.append)
        try:
            assert (await manager.get(name)).private_key == first[1]
            (tmp_path / "c.pem").write_bytes(second[0])
            (tmp_path / "k.pem").write_bytes(second[1])
            await wait_until(lambda: heard == [name], 5)
            assert (await manager.get(name)).private_key == second[1]
            assert ca.calls == 0
        finally:
            await manager.stop()

    run(main())


def test_token_identity_follows_the_token(shared_ca, tmp_path):
    """The token names the identity; a token for another account gets a
    certificate the manager refuses (the SPIFFE ID is not the expected one)."""
    token = tmp_path / "token"
    token.write_text(service_account_token("payments", "not-api", "p"))

    async def main():
        client = CAClient(shared_ca.address, root_pem=shared_ca.root_pem, token_file=token, cluster_id="Kubernetes")
        events = Events()
        manager = SecretManager(client, spiffe_id=WORKLOAD_ID, key_type="ec-p256", on_event=events)
        try:
            with pytest.raises(SecretUnavailable, match="URI SAN"):
                await manager.get(WORKLOAD_CERT)
            token.write_text(service_account_token("payments", "api", "p"))
            item = await manager.get(WORKLOAD_CERT)
            assert _key_matches(item)
        finally:
            await manager.stop()
            await client.close()
        assert events.count("response_invalid") == 1

    run(main())


# -- the root bundle between renewals -----------------------------------------------------------------------------
class _PollingCA(LocalCA):
    """A LocalCA that also answers ``trust_bundle`` (fastca's TrustBundleService)."""

    def __init__(self) -> None:
        super().__init__()
        self.bundle: str | None = None
        self.bundle_fail: grpc.StatusCode | None = None
        self.polls = 0

    async def trust_bundle(self) -> str:
        from fastca.agent.caclient import CARequestFailed

        self.polls += 1
        if self.bundle_fail is not None:
            raise CARequestFailed(f"GetTrustBundle failed: {self.bundle_fail.name}", code=self.bundle_fail,
                                  attempts=1)
        return self.bundle if self.bundle is not None else self.root.pem


def test_a_changed_bundle_is_polled_checked_and_pushed():
    async def main():
        ca = _PollingCA()
        events = Events()
        manager = SecretManager(ca, spiffe_id=WORKLOAD_ID, key_type="ec-p256", ttl_seconds=3600, on_event=events,
                                root_poll_interval=0.05)
        pushed: list[str] = []
        manager.subscribe(pushed.append)
        await manager.start()
        try:
            first = await manager.get(ROOT_CERT)
            assert first.trusted_ca == ca.root.pem.encode()
            peer = make_authority("peer-root")
            ca.bundle = ca.root.pem + peer.pem                  # a peer's root added
            await wait_until(lambda: ROOT_CERT in pushed, 5)
            now = await manager.get(ROOT_CERT)
            assert now.trusted_ca == (ca.root.pem + peer.pem).encode() and now.version != first.version
            assert events.count("root_updated") == 1 and ca.calls == 1       # no new certificate for it
            ca.bundle = peer.pem                                # would strand the leaf: discarded
            await wait_until(lambda: events.count("root_poll_failed") >= 1, 5)
            assert (await manager.get(ROOT_CERT)).trusted_ca == now.trusted_ca
            ca.bundle_fail = grpc.StatusCode.UNIMPLEMENTED      # istiod: asked no more
            await wait_until(lambda: events.count("root_poll_unsupported") == 1, 5)
            polls = ca.polls
            await asyncio.sleep(0.3)
            assert ca.polls == polls
        finally:
            await manager.stop()

    run(main())


def test_no_poll_while_rootca_is_not_wanted():
    async def main():
        ca = _PollingCA()
        manager = SecretManager(ca, spiffe_id=WORKLOAD_ID, key_type="ec-p256", ttl_seconds=3600,
                                root_poll_interval=0.05)
        await manager.start()
        try:
            await manager.get(WORKLOAD_CERT)
            await asyncio.sleep(0.3)
            assert ca.polls == 0
        finally:
            await manager.stop()

    run(main())

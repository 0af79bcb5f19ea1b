"""Acceptance (issue 14, rotation): a real `fastca serve`, two real `fastca
agent`s (two workloads) and an SDS client on each, subscribed to `default`
and `ROOTCA`, through a whole rotation of a self-signed root run with the
real `fastca ca rotate` commands against the running server:

    start      ROOTCA grows to old + new; certificates still from the old key
    activate   each workload's certificate is re-issued under the new key
    (retire_at passes) ROOTCA shrinks to the new root; no restart anywhere
    finish     the state directory's own CA is the new one; nothing changes for agents

At every step the two workloads' current certificates complete a mutual TLS
handshake (Python's ssl, each trusting its own ROOTCA), including the step
where one holds a certificate of the old key and the other of the new."""

from __future__ import annotations

import json
import queue
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from tests.agent.sds_client import SotwStream
from tests.agent.test_agent_e2e import AgentProcess
from tests.conftest import run_fastca
from tests.frontend.conftest import (apiserver, init_state, service_account_token,  # noqa: F401
                                     start_server, tokenreview_config, write_config)
from tests.trust.test_replicas import _until

TTL = 16            # workload certificates: renewed about every 8 s
MAX_TTL = 61        # the CA's max TTL (the serving certificate's, the shortest it may have): retire_at - activate_at
WATCH = 0.5         # server.ca_watch_seconds
POLL = 0.5          # the agents' GetTrustBundle poll


class Workload:
    """One agent and the SDS view its Envoy would have."""

    def __init__(self, tmp: Path, server, state: Path, namespace: str, account: str) -> None:
        self.dir = tmp / account
        self.dir.mkdir()
        token = self.dir / "token"
        token.write_text(service_account_token(namespace, account, f"{account}-1"))
        self.agent = AgentProcess(self.dir, "--ca-addr", server.address, "--ca-root", str(state / "root-cert.pem"),
                                  "--trust-domain", "cluster.local", "--namespace", namespace,
                                  "--service-account", account, "--token-file", str(token), "--ttl", f"{TTL}s",
                                  "--key-type", "ec-p256", env={"FASTCA_AGENT_ROOT_POLL_SECONDS": str(POLL)})
        self.stream = SotwStream(str(self.agent.socket), ["default", "ROOTCA"])
        self.secrets: dict = {}
        self.pushes = 0
        self.refresh(wait=20)

    def refresh(self, wait: float = 0.0) -> None:
        """Take every push the agent sent (waiting up to ``wait`` for the first)."""
        deadline = time.monotonic() + wait
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                received = self.stream.receive(timeout=remaining if remaining else 0.01)
            except queue.Empty:
                if "default" in self.secrets and "ROOTCA" in self.secrets:
                    return
                if time.monotonic() >= deadline:
                    raise AssertionError(f"no SDS push from {self.dir.name}")
                continue
            self.stream.ack(received)
            self.secrets.update(received.secrets)
            self.pushes += 1

    @property
    def chain_pem(self) -> bytes:
        return self.secrets["default"].tls_certificate.certificate_chain.inline_bytes

    @property
    def key_pem(self) -> bytes:
        return self.secrets["default"].tls_certificate.private_key.inline_bytes

    @property
    def roots_pem(self) -> bytes:
        return self.secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes

    @property
    def roots(self) -> set[str]:
        self.refresh()
        return {c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(self.roots_pem)}

    @property
    def issuer(self) -> str:
        self.refresh()
        return x509.load_pem_x509_certificates(self.chain_pem)[0].issuer.rfc4514_string()

    def context(self, side: int) -> ssl.SSLContext:
        context = ssl.SSLContext(side)
        files = self.dir / f"tls-{time.monotonic_ns()}.pem"
        files.write_bytes(self.key_pem + b"\n" + self.chain_pem)
        context.load_cert_chain(str(files))
        files.unlink()
        context.load_verify_locations(cadata=self.roots_pem.decode())
        context.verify_mode = ssl.CERT_REQUIRED
        if side == ssl.PROTOCOL_TLS_CLIENT:
            context.check_hostname = False      # SPIFFE leaves carry URI SANs only
        return context

    def stop(self) -> None:
        self.stream.close()
        self.agent.stop()


def handshake(server: Workload, client: Workload) -> tuple[str, str]:
    """Mutual TLS between the two workloads' current certificates; returns
    the identity each side saw in the other's certificate."""
    server.refresh()
    client.refresh()
    server_context, client_context = server.context(ssl.PROTOCOL_TLS_SERVER), client.context(ssl.PROTOCOL_TLS_CLIENT)
    left, right = socket.socketpair()
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_context.wrap_socket(left, server_side=True) as tls:
                seen["client"] = tls.getpeercert()
                tls.sendall(b"ok")
        except Exception as error:         # reported by the assertion below
            seen["server_error"] = error

    thread = threading.Thread(target=serve)
    thread.start()
    with client_context.wrap_socket(right) as tls:
        seen["server"] = tls.getpeercert()
        assert tls.recv(2) == b"ok"
    thread.join(10)
    assert "server_error" not in seen, seen.get("server_error")

    def uri(peer) -> str:
        return next(value for kind, value in peer["subjectAltName"] if kind == "URI")

    return uri(seen["server"]), uri(seen["client"])


def _phase(state: Path) -> str:
    return json.loads(run_fastca("ca", "status", "--state", str(state), "--json").stdout)["phase"]


def _metric_phase(port: int) -> str:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    on = [line for line in body.splitlines() if line.startswith("fastca_ca_rotation_phase{")
          and 'signer="default"' in line and line.endswith(" 1.0")]
    assert len(on) == 1, on
    return on[0].split('phase="')[1].split('"')[0]


@pytest.mark.slow
def test_a_self_signed_root_rotates_without_downtime(tmp_path: Path, apiserver):  # noqa: F811
    state = init_state(tmp_path / "state")
    write_config(state, {"authn": {"tokenreview": [tokenreview_config(apiserver, tmp_path / "api-token")]},
                         "issuance": {"default_ttl_seconds": TTL, "max_ttl_seconds": MAX_TTL},
                         "server": {"ca_watch_seconds": WATCH, "serving_cert_ttl_seconds": MAX_TTL}})
    server = start_server(state)
    metrics = server.ports["metrics"]
    pid = server.process.pid
    old_root = x509.load_pem_x509_certificate((state / "root-cert.pem").read_bytes()).subject.rfc4514_string()
    shop = web = None
    try:
        shop = Workload(tmp_path, server, state, "shop", "cart")
        web = Workload(tmp_path, server, state, "web", "front")
        assert shop.roots == web.roots == {old_root}
        assert handshake(shop, web) == ("spiffe://cluster.local/ns/shop/sa/cart",
                                        "spiffe://cluster.local/ns/web/sa/front")
        assert _phase(state) == "steady" and _metric_phase(metrics) == "steady"

        # start: the new root goes out to every agent; the old key still signs.
        run_fastca("ca", "rotate", "start", "--state", str(state), "--activate-after", "1h")
        new_root = x509.load_pem_x509_certificate(
            (state / "rotation" / "root-cert.pem").read_bytes()).subject.rfc4514_string()
        assert new_root != old_root
        took = _until(lambda: shop.roots == web.roots == {old_root, new_root}, 20, "ROOTCA with both roots")
        print(f"the new root reached both agents' ROOTCA {took:.1f}s after `rotate start`")
        assert _phase(state) == "distributing" and _metric_phase(metrics) == "distributing"
        assert shop.issuer == web.issuer == old_root
        handshake(shop, web)
        handshake(web, shop)

        # activate: certificates are re-issued under the new key at the next renewal.
        run_fastca("ca", "rotate", "activate", "--state", str(state))
        _until(lambda: _metric_phase(metrics) == "signing-with-new-key", 10, "the server signing with the new key")
        _until(lambda: shop.issuer == new_root or web.issuer == new_root, TTL + 10, "a certificate of the new key")
        if {shop.issuer, web.issuer} == {old_root, new_root}:
            handshake(shop, web)            # one old, one new: each trusts both roots
            handshake(web, shop)
        _until(lambda: shop.issuer == web.issuer == new_root, TTL + 10, "both workloads under the new key")
        assert shop.roots == web.roots == {old_root, new_root}
        handshake(shop, web)
        assert _phase(state) == "signing-with-new-key"

        # retire_at (activation + max TTL + margin): ROOTCA shrinks to the new root alone.
        _until(lambda: shop.roots == web.roots == {new_root}, MAX_TTL + 2 * WATCH + 10 + 20,
               "ROOTCA with the new root only")
        assert _phase(state) == "old-root-retired" and _metric_phase(metrics) == "old-root-retired"
        assert shop.issuer == web.issuer == new_root
        handshake(shop, web)
        handshake(web, shop)

        # finish: the state directory's CA is the new one; agents see no change.
        pushes = shop.pushes
        run_fastca("ca", "rotate", "finish", "--state", str(state))
        assert _phase(state) == "steady"
        assert x509.load_pem_x509_certificate((state / "root-cert.pem").read_bytes()).subject.rfc4514_string() \
            == new_root
        _until(lambda: _metric_phase(metrics) == "steady", 10, "the server steady again")
        time.sleep(2 * POLL + WATCH)
        assert shop.roots == {new_root}
        handshake(shop, web)
        # Only renewals were pushed meanwhile (each carries the same single root).
        assert shop.pushes - pushes <= 2
        assert server.process.pid == pid and server.process.poll() is None
        events = [e for e in server.log_events() if e.get("event") == "CA rotation phase"]
        assert [e["phase"] for e in events] == ["steady", "distributing", "signing-with-new-key",
                                                 "old-root-retired", "steady"]
        assert any(e.get("event") == "serving certificate re-issued under the new key" for e in server.log_events())
    finally:
        for workload in (shop, web):
            if workload is not None:
                workload.stop()
        assert server.stop() == 0

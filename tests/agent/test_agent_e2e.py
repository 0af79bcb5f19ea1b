"""The whole stack as it runs beside Envoy: a real `fastca serve` (SoftHSM,
TLS, TokenReview), a real `fastca agent` process, and an SDS client speaking
as Envoy does over the agent's Unix socket (issue #5 acceptance)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests._tools import tool
from tests.agent.conftest import WORKLOAD_ID, make_real_ca
from tests.agent.sds_client import DeltaStream, SotwStream


class AgentProcess:
    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.socket = tmp / "uds" / "socket"
        self.log_file = tmp / f"agent-{time.monotonic_ns()}.log"
        full_env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
        full_env.update({"FASTCA_AGENT_HEALTH_CHECK_INTERVAL_SECONDS": "0.5"})
        full_env.update(env or {})
        with self.log_file.open("wb") as sink:
            self.process = subprocess.Popen([sys.executable, "-m", "fastca", "agent", "--socket", str(self.socket),
                                             "--metrics", "127.0.0.1:0", *args],
                                            stdout=sink, stderr=subprocess.STDOUT, env=full_env)
        self.metrics_port = self._wait_for("agent serving SDS")["metrics_port"]

    def events(self) -> list[dict]:
        out = []
        for line in self.log_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def _wait_for(self, event: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for item in self.events():
                if item.get("event") == event:
                    return item
            if self.process.poll() is not None:
                raise AssertionError(f"fastca agent exited {self.process.returncode}:\n{self.log_file.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} from the agent:\n{self.log_file.read_text()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def metric(self, series: str) -> float:
        for line in self.metrics().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{series} not exported")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def _agent_for(ca, tmp: Path, *extra: str, env: dict[str, str] | None = None) -> AgentProcess:
    return AgentProcess(tmp, "--ca-addr", ca.address, "--ca-root", str(ca.state / "root-cert.pem"),
                        "--trust-domain", "cluster.local", "--namespace", "payments", "--service-account", "api",
                        "--token-file", str(ca.token_file), *extra, env=env)


def _pair(secret) -> tuple[x509.Certificate, bytes, object]:
    chain = secret.tls_certificate.certificate_chain.inline_bytes
    key = serialization.load_pem_private_key(secret.tls_certificate.private_key.inline_bytes, None)
    return x509.load_pem_x509_certificates(chain)[0], chain, key


def _public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _verify(tmp: Path, root: bytes, chain: bytes) -> None:
    (tmp / "root.pem").write_bytes(root)
    (tmp / "chain.pem").write_bytes(chain)
    proc = subprocess.run([tool("openssl"), "verify", "-CAfile", str(tmp / "root.pem"), str(tmp / "chain.pem")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def ca(tmp_path, apiserver):
    real = make_real_ca(tmp_path / "ca", apiserver)
    real.start()
    yield real
    real.stop()


def test_envoy_gets_matching_key_and_chain_then_rotations(ca, tmp_path):
    agent = _agent_for(ca, tmp_path, "--ttl", "4s", "--key-type", "ec-p256")
    try:
        default = SotwStream(str(agent.socket), ["default"])
        rootca = SotwStream(str(agent.socket), ["ROOTCA"])
        first = default.receive()
        root = rootca.receive()
        assert root.secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes == ca.root_pem
        leaf, chain, key = _pair(first.secrets["default"])
        assert _public(leaf.public_key()) == _public(key.public_key())
        assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier) == [WORKLOAD_ID]
        _verify(tmp_path, ca.root_pem, chain)
        default.ack(first)
        rootca.ack(root)

        # Rotation at ~half of 4 s: pushed on the same stream without asking, each with a new key.
        seen_keys = {_public(key.public_key())}
        versions = [first.version]
        current = first
        for _ in range(2):
            current = default.receive(timeout=15)
            leaf, chain, key = _pair(current.secrets["default"])
            assert _public(leaf.public_key()) == _public(key.public_key())
            _verify(tmp_path, ca.root_pem, chain)
            seen_keys.add(_public(key.public_key()))
            versions.append(current.version)
            default.ack(current)
        assert len(seen_keys) == 3 and len(set(versions)) == 3

        # A NACK does not make the agent resend the same thing in a loop.
        current = default.receive(timeout=15)
        default.nack(current)
        assert default.nothing_within(0.5)
        deadline = time.monotonic() + 10                    # the health loop mirrors the count every 0.5 s
        while "fastca_agent_sds_nacks_total 1.0" not in agent.metrics():
            assert time.monotonic() < deadline, "the NACK was not counted"
            time.sleep(0.1)
        next_push = default.receive(timeout=15)            # the next real rotation still arrives
        assert next_push.version != current.version

        text = agent.metrics()
        assert agent.metric('istio_agent_num_outgoing_requests{request_type="csr"}') >= 4
        assert 'istio_agent_cert_expiry_seconds{resource_name="default"}' in text
        default.close()
        rootca.close()
    finally:
        assert agent.stop() == 0


def test_delta_sends_only_changes_and_removals(ca, tmp_path):
    agent = _agent_for(ca, tmp_path, "--ttl", "6s", "--key-type", "ec-p256")
    try:
        stream = DeltaStream(str(agent.socket))
        stream.send(subscribe=["default", "ROOTCA"])
        got: dict[str, object] = {}
        while set(got) != {"default", "ROOTCA"}:
            received = stream.receive()
            got.update(received.secrets)
            stream.send(nonce=received.nonce)
        # A rotation changes only `default`: the root is not resent.
        rotated = stream.receive(timeout=20)
        assert set(rotated.secrets) == {"default"} and rotated.removed == []
        stream.send(nonce=rotated.nonce)
        stream.send(unsubscribe=["ROOTCA"])
        removal = stream.receive()
        while "ROOTCA" not in removal.removed:      # a rotation may land first
            assert set(removal.secrets) <= {"default"}
            removal = stream.receive()
        assert "ROOTCA" not in removal.secrets
        stream.close()
    finally:
        assert agent.stop() == 0


def test_ca_outage_during_rotation(ca, tmp_path):
    # 12 s certificates: rotation is due after ~6 s, expiry leaves ~6 s of margin
    # for a slow machine between "rotation failed" and the checks below.
    agent = _agent_for(ca, tmp_path, "--ttl", "12s", "--key-type", "ec-p256",
                       env={"FASTCA_AGENT_BACKOFF_MAX_SECONDS": "1"})
    try:
        stream = SotwStream(str(agent.socket), ["default"])
        first = stream.receive()
        stream.ack(first)
        ca.stop()
        # Past the rotation point the CA is down: failures are counted and logged…
        deadline = time.monotonic() + 20
        while agent.metric('istio_agent_num_failed_outgoing_requests{request_type="csr"}') < 1:
            assert time.monotonic() < deadline, "failures were not counted"
            time.sleep(0.2)
        assert any(e.get("event") == "rotation failed" for e in agent.events())
        # …and the agent keeps serving the pair it has, to old and new streams alike.
        again = SotwStream(str(agent.socket), ["default"])
        cached = again.receive(timeout=5)
        assert cached.version == first.version
        again.close()
        ca.start()
        rotated = stream.receive(timeout=30)
        assert rotated.version != first.version
        stream.close()
    finally:
        assert agent.stop() == 0


def test_certificate_health_alert(ca, tmp_path):
    """A certificate inside the alert window is flagged by metric and log."""
    agent = _agent_for(ca, tmp_path, "--ttl", "600", env={"FASTCA_AGENT_EXPIRY_ALERT_SECONDS": "3600"})
    try:
        SotwStream(str(agent.socket), ["default"]).receive()
        deadline = time.monotonic() + 10
        while 'fastca_agent_cert_healthy{resource_name="default"} 0.0' not in agent.metrics():
            assert time.monotonic() < deadline, agent.metrics()
            time.sleep(0.2)
        assert any(e.get("event") == "certificate health alert" for e in agent.events())
    finally:
        assert agent.stop() == 0


def test_file_mounted_mode(ca, tmp_path):
    """Kubernetes-style mounted directory: a `..data` symlink swap is picked
    up and pushed; a half-written pair (new chain, old key) is not."""
    from tests.conftest import run_fastca

    def materials(name: str) -> Path:
        directory = tmp_path / "mount" / name
        directory.mkdir(parents=True)
        from cryptography.hazmat.primitives.asymmetric import ec

        from fastca.agent.csr import agent_csr, private_key_pem

        key = ec.generate_private_key(ec.SECP256R1())
        (tmp_path / f"{name}.csr").write_bytes(agent_csr(key, WORKLOAD_ID))
        chain = run_fastca("issue", "--state", str(ca.state), "--csr", str(tmp_path / f"{name}.csr"),
                           "--identity", WORKLOAD_ID, "--json",
                           env={"SOFTHSM2_CONF": str(ca.state / "softhsm2.conf")}).stdout
        elements = json.loads(chain)["cert_chain"]
        (directory / "cert-chain.pem").write_text("".join(elements[:-1]))
        (directory / "key.pem").write_bytes(private_key_pem(key))
        (directory / "root-cert.pem").write_text(elements[-1])
        return directory

    mount = tmp_path / "mount"
    first = materials("..2026_11_25_a")
    (mount / "..data").symlink_to(first.name)
    for name in ("cert-chain.pem", "key.pem", "root-cert.pem"):
        (mount / name).symlink_to(f"..data/{name}")
    agent = AgentProcess(tmp_path, "--mounted-dir", str(mount))
    try:
        stream = SotwStream(str(agent.socket), ["default"])
        initial = stream.receive()
        stream.ack(initial)
        second = materials("..2026_11_25_b")
        (mount / "..data_tmp").symlink_to(second.name)
        os.replace(mount / "..data_tmp", mount / "..data")          # the atomic swap kubelet does
        swapped = stream.receive(timeout=10)
        leaf, _, key = _pair(swapped.secrets["default"])
        assert swapped.version != initial.version and _public(leaf.public_key()) == _public(key.public_key())
        stream.ack(swapped)
        # Half-written: a new chain lands before its key. Nothing mismatched is pushed.
        third = materials("..2026_11_25_c")
        shutil.copy(third / "cert-chain.pem", second / "cert-chain.pem")
        assert stream.nothing_within(2.0)
        shutil.copy(third / "key.pem", second / "key.pem")
        completed = stream.receive(timeout=10)
        leaf, _, key = _pair(completed.secrets["default"])
        assert _public(leaf.public_key()) == _public(key.public_key())
        stream.close()
    finally:
        assert agent.stop() == 0


def _ip_sans(leaf: x509.Certificate) -> list[str]:
    return [str(ip) for ip in leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)]


def test_agent_dialling_the_listen_ip_address_gets_certificates(ca, tmp_path):
    """The serving certificate carries the IP the server listens on, so an
    agent given --ca-addr 127.0.0.1:PORT verifies it as it would a name."""
    served = x509.load_der_x509_certificate(_served_certificate(ca.port, ca.root_pem, "127.0.0.1"))
    assert _ip_sans(served) == ["127.0.0.1"]
    agent = AgentProcess(tmp_path, "--ca-addr", f"127.0.0.1:{ca.port}", "--ca-root", str(ca.state / "root-cert.pem"),
                         "--trust-domain", "cluster.local", "--namespace", "payments", "--service-account", "api",
                         "--token-file", str(ca.token_file))
    try:
        leaf, chain, _ = _pair(SotwStream(str(agent.socket), ["default"]).receive().secrets["default"])
        _verify(tmp_path, ca.root_pem, chain)
    finally:
        agent.stop()


def _served_certificate(port: int, root: bytes, server_name: str) -> bytes:
    import socket
    import ssl

    context = ssl.create_default_context(cadata=root.decode())
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            return tls.getpeercert(binary_form=True)


def test_ca_server_name_overrides_the_name_checked(tmp_path, apiserver):
    """A server on a wildcard address whose certificate names only
    ca.mesh.internal: reached at 127.0.0.1 with --ca-server-name (flag, then
    FASTCA_AGENT_CA_SERVER_NAME), refused without."""
    from tests.agent.conftest import free_port, make_real_ca
    from tests.frontend.conftest import start_server, write_config

    real = make_real_ca(tmp_path / "ca", apiserver)
    write_config(real.state, {"server": {"serving_dns_names": ["ca.mesh.internal"]}})
    port = free_port()
    server = start_server(real.state, "--listen", f"0.0.0.0:{port}")
    try:
        served = x509.load_der_x509_certificate(_served_certificate(port, real.root_pem, "ca.mesh.internal"))
        sans = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["ca.mesh.internal"] and _ip_sans(served) == []
        base = ("--ca-addr", f"127.0.0.1:{port}", "--ca-root", str(real.state / "root-cert.pem"),
                "--trust-domain", "cluster.local", "--namespace", "payments", "--service-account", "api",
                "--token-file", str(real.token_file))
        for extra, env in ((("--ca-server-name", "ca.mesh.internal"), None),
                           ((), {"FASTCA_AGENT_CA_SERVER_NAME": "ca.mesh.internal"})):
            (tmp_path / f"agent-{len(extra)}").mkdir()
            agent = AgentProcess(tmp_path / f"agent-{len(extra)}", *base, *extra, env=env)
            try:
                _, chain, _ = _pair(SotwStream(str(agent.socket), ["default"]).receive().secrets["default"])
                _verify(tmp_path, real.root_pem, chain)
            finally:
                agent.stop()
        (tmp_path / "agent-none").mkdir()
        refused = AgentProcess(tmp_path / "agent-none", *base)
        try:
            stream = SotwStream(str(refused.socket), ["default"])
            failure = refused._wait_for("fetch failed", timeout=60)
            assert "hostname" in failure["error"].lower() or "verify" in failure["error"].lower(), failure
            assert stream.nothing_within(0.2)
        finally:
            refused.stop()
    finally:
        server.stop()


def test_a_fifo_file_root_does_not_stop_default_and_is_unhealthy(ca, tmp_path):
    """Issue 13: a FIFO given as a `file-root:` path (with a writer that never
    closes, so a plain read of it would block forever) is refused at once;
    `default` keeps being served over SDS, and the metrics say the FIFO's
    resource is unhealthy while `default` is healthy."""
    fifo = tmp_path / "roots.fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    name = f"file-root:{fifo}"
    agent = _agent_for(ca, tmp_path, "--key-type", "ec-p256")
    streams = []
    try:
        stuck = SotwStream(str(agent.socket), [name])
        streams.append(stuck)
        deadline = time.monotonic() + 20                    # the agent has the FIFO's request first
        while not any(e.get("event") == "sds request" and e.get("resources") == [name] for e in agent.events()):
            assert time.monotonic() < deadline, agent.log_file.read_text()
            time.sleep(0.05)
        default = SotwStream(str(agent.socket), ["default"])
        streams.append(default)
        leaf, _, key = _pair(default.receive(timeout=20).secrets["default"])
        assert _public(leaf.public_key()) == _public(key.public_key())
        assert any(e.get("event") == "sds secret unavailable" and e.get("resource") == name
                   and "is a FIFO, not a regular file" in str(e.get("reason")) for e in agent.events())
        assert stuck.nothing_within(0.2)                    # nothing is sent for what cannot be read
        fifo_health = f'fastca_agent_cert_healthy{{resource_name="{name}"}}'
        deadline = time.monotonic() + 10                    # the health check runs every 0.5 s
        while fifo_health not in agent.metrics():
            assert time.monotonic() < deadline, agent.metrics()
            time.sleep(0.1)
        assert agent.metric(fifo_health) == 0.0
        assert agent.metric('fastca_agent_cert_healthy{resource_name="default"}') == 1.0
    finally:
        for stream in streams:
            stream.close()
        os.close(writer)                                    # would unblock a loop stuck reading it
        assert agent.stop() == 0

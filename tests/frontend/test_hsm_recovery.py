"""The server survives its HSM going away, without a restart (issue 13,
reliability cases 18-24): a real `fastca serve` under a steady load while
its SoftHSM token directory is moved away and back, while its token is
re-initialised with another key, while a `p11-kit server` exporting the
token (a network HSM) is killed and restarted, and with the token absent at
start. Faults a real token never produces (other CK_RVs, a corrupted
signature, a C_Sign that takes seconds, a refused PIN counted at C_Login)
come from a small PKCS#11 module that wraps SoftHSM
(tests/signing/pkcs11_fault_shim.c).

Each time: callers get UNAVAILABLE (never INTERNAL, never a certificate the
CA certificate's key did not sign), health says NOT_SERVING and
fastca_signer_ready 0; when the HSM is back, SERVING and certificates again
from the same worker process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import tomli_w
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import agent_csrs
from tests.frontend.conftest import (
    ServerProcess,
    init_state,
    start_server,
    service_account_token,
    tokenreview_config,
    write_config,
)
from fastca.proto import istio_ca_pb2, istio_ca_pb2_grpc

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
SHIM_SOURCE = Path(__file__).resolve().parents[1] / "signing" / "pkcs11_fault_shim.c"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


# -- the server and what it says ------------------------------------------------------

_started: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test():
    yield
    while _started:
        process = _started.pop()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _start(state: Path, *, env: dict[str, str] | None = None, until: str = "serving") -> ServerProcess:
    """`fastca serve` (one worker) until it logs ``until``; killed after the test whatever happens."""
    server = start_server(state, env=env, until=until)
    _started.append(server.process)
    return server


def _event(server: ServerProcess, name: str) -> dict | None:
    return next((e for e in server.log_events() if e.get("event") == name), None)


def _worker_pid(server: ServerProcess) -> int:
    """With one worker, `fastca serve` is the worker (no supervisor to restart it)."""
    return server.process.pid


def _assert_same_worker(server: ServerProcess, pid: int) -> None:
    assert server.process.poll() is None and server.process.pid == pid
    assert sum(1 for e in server.log_events() if e.get("event") == "serving") == 1


def _wait(predicate: Callable[[], bool], timeout: float, message: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message())
        time.sleep(0.05)


def _health(server: ServerProcess) -> int:
    with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(server.root_pem)) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _metric(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf'^{re.escape(name)} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _signer_ready(server: ServerProcess) -> float:
    return _metric(server, 'fastca_signer_ready{signer="default"}')


def _ca_key(state: Path) -> ec.EllipticCurvePublicKey:
    return x509.load_pem_x509_certificate((state / "ca-cert.pem").read_bytes()).public_key()


def _signed_by(leaf_pem: str, key: ec.EllipticCurvePublicKey) -> bool:
    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    try:
        key.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    except InvalidSignature:
        return False
    return True


class Load:
    """Agents renewing steadily (two threads, 200 identities), each outcome
    kept as (time, code, detail). Every certificate returned is checked
    against the CA certificate's key."""

    def __init__(self, server: ServerProcess, *, threads: int = 2, timeout: float = 5.0) -> None:
        self._server, self._timeout = server, timeout
        self._ca_key = _ca_key(server.state)
        self._csrs = [c.pem.decode() for c in agent_csrs()[:8]]
        self.outcomes: list[tuple[float, str, str]] = []
        self.foreign: list[str] = []          # certificates not signed by the CA's key
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, n: int) -> None:
        credentials = grpc.ssl_channel_credentials(self._server.root_pem)
        with grpc.secure_channel(self._server.address, credentials) as channel:
            stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(channel)
            i = 0
            while not self._stop.is_set():
                metadata = struct_pb2.Struct()
                metadata.update({"CertSigner": ""})
                request = istio_ca_pb2.IstioCertificateRequest(csr=self._csrs[i % len(self._csrs)],
                                                               validity_duration=3600, metadata=metadata)
                token = service_account_token("load", f"sa-{n}-{i % 100}")
                headers = [("clusterid", "Kubernetes"), ("authorization", f"Bearer {token}")]
                try:
                    response = stub.CreateCertificate(request, metadata=headers, timeout=self._timeout)
                except grpc.RpcError as error:
                    self.outcomes.append((time.monotonic(), error.code().name, error.details() or ""))
                else:
                    if not _signed_by(response.cert_chain[0], self._ca_key):
                        self.foreign.append(response.cert_chain[0])
                    self.outcomes.append((time.monotonic(), "OK", ""))
                i += 1
                time.sleep(0.01)

    def count(self, code: str, since: float = 0.0) -> int:
        return sum(1 for at, c, _ in list(self.outcomes) if c == code and at >= since)

    def codes(self) -> set[str]:
        return {c for _, c, _ in list(self.outcomes)}


def _hsm_gone_then_back(server: ServerProcess, load: Load, take_away: Callable[[], None],
                        bring_back: Callable[[], None], while_away: Callable[[], bool] = lambda: True) -> None:
    """The acceptance sequence: issuing; HSM away → UNAVAILABLE, NOT_SERVING,
    ready 0 (and ``while_away`` true); HSM back → SERVING, ready 1, issuing again."""
    _wait(lambda: load.count("OK") >= 10, 30, lambda: f"no issuance: {load.codes()}")
    assert _health(server) == SERVING and _signer_ready(server) == 1
    away = time.monotonic()
    take_away()
    _wait(lambda: load.count("UNAVAILABLE", since=away) >= 3, 30, lambda: f"no UNAVAILABLE: {load.outcomes[-5:]}")
    _wait(lambda: _health(server) == NOT_SERVING, 15, lambda: "health still SERVING")
    assert _signer_ready(server) == 0
    refused = [d for at, c, d in load.outcomes if at >= away and c == "UNAVAILABLE"]
    assert set(refused) == {"CA is not ready"}, set(refused)      # the internal cause stays in the log
    _wait(while_away, 30, lambda: f"not as expected while away:\n{server.log_file.read_text()[-3000:]}")
    back = time.monotonic()
    bring_back()
    _wait(lambda: _health(server) == SERVING, 30, lambda: f"not SERVING again:\n{server.log_file.read_text()[-3000:]}")
    assert _signer_ready(server) == 1
    _wait(lambda: load.count("OK", since=back) >= 10, 30, lambda: f"no issuance after: {load.outcomes[-5:]}")


@pytest.fixture
def state(tmp_path, apiserver) -> Path:
    state = init_state(tmp_path / "state")
    write_config(state, {"authn": {"tokenreview": [tokenreview_config(apiserver, tmp_path / "api-token")]}})
    return state


def _set_module(state: Path, module_path: str) -> None:
    import tomllib

    path = state / "fastca.toml"
    body = tomllib.loads(path.read_text())
    body["signer"]["key_uri"] = body["signer"]["key_uri"].replace(f"module-path={SOFTHSM}", f"module-path={module_path}")
    path.write_text(tomli_w.dumps(body))


def _finish(server: ServerProcess, load: Load, pid: int) -> None:
    assert "INTERNAL" not in load.codes(), [o for o in load.outcomes if o[1] == "INTERNAL"][:3]
    assert not load.foreign
    _assert_same_worker(server, pid)
    assert server.stop() == 0


# -- SoftHSM directly ---------------------------------------------------------------------


def test_token_directory_moved_away_and_restored(state):
    server = _start(state)
    pid = _worker_pid(server)
    tokens, away = state / "tokens", state / "tokens.away"
    with Load(server) as load:
        _hsm_gone_then_back(server, load, lambda: tokens.rename(away), lambda: away.rename(tokens))
    _finish(server, load, pid)
    assert _event(server, "health probe failed") is not None


def _softhsm(state: Path, *args: str) -> None:
    env = {**os.environ, "SOFTHSM2_CONF": str(state / "softhsm2.conf")}
    subprocess.run(["softhsm2-util", *args], check=True, capture_output=True, env=env)


def test_token_reinitialised_with_another_key_is_refused_until_the_key_matches(state):
    server = _start(state)
    pid = _worker_pid(server)
    tokens, original = state / "tokens", state / "tokens.original"

    def rekey() -> None:
        # The same label, PIN and key label; a different key pair.
        tokens.rename(original)
        tokens.mkdir()
        pin = (state / "pin").read_text().strip()
        _softhsm(state, "--init-token", "--free", "--label", "fastca", "--so-pin", "0000" + pin[:4], "--pin", pin)
        uri = f"pkcs11:token=fastca;object=fastca-ca;type=private?module-path={SOFTHSM}&pin-source=file:{state / 'pin'}"
        subprocess.run([sys.executable, "-c", "import sys; from fastca.ca import hsm; from fastca.signing.pkcs11_uri "
                        "import Pkcs11Uri; hsm.generate_key(Pkcs11Uri.parse(sys.argv[1]), 'ec-p256', sys.argv[2])",
                        uri, str(state / "softhsm2.conf")], check=True, capture_output=True)

    def restore() -> None:
        shutil.rmtree(tokens)
        original.rename(tokens)

    def refusing_the_other_key() -> bool:
        return any("not the CA certificate's key" in str(e.get("reason", "")) for e in server.log_events()
                   if e.get("event") == "request refused")

    with Load(server) as load:
        _hsm_gone_then_back(server, load, rekey, restore, while_away=refusing_the_other_key)
        assert _health(server) == SERVING
    _finish(server, load, pid)


def test_token_absent_at_start_then_appearing(state):
    tokens, away = state / "tokens", state / "tokens.away"
    tokens.rename(away)
    server = _start(state, until="waiting for the signers' HSM before opening the ports")
    assert _signer_ready(server) == 0
    time.sleep(2.5)                       # still waiting, and the supervisor did not give up on it
    assert server.process.poll() is None and _event(server, "serving") is None
    away.rename(tokens)
    _wait(lambda: _event(server, "serving") is not None, 30, lambda: server.log_file.read_text()[-3000:])
    server.ports = _event(server, "serving")["ports"]
    assert _health(server) == SERVING and _signer_ready(server) == 1
    with Load(server) as load:
        _wait(lambda: load.count("OK") >= 5, 30, lambda: f"no issuance: {load.outcomes[-5:]}")
    assert server.stop() == 0


def test_a_stop_signal_while_waiting_for_the_hsm_ends_the_server(state):
    (state / "tokens").rename(state / "tokens.away")
    server = _start(state, until="waiting for the signers' HSM before opening the ports")
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=30)
    assert time.monotonic() - started < 20


# -- a network HSM: p11-kit server ---------------------------------------------------------


class P11KitServer:
    """`p11-kit server` exporting the state's SoftHSM token on a Unix socket,
    in its own process group (it forks a p11-kit-remote per connection)."""

    def __init__(self, state: Path) -> None:
        self.socket = state / "p11-kit.sock"
        self._state = state
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        env = {**os.environ, "SOFTHSM2_CONF": str(self._state / "softhsm2.conf")}
        self.process = subprocess.Popen(
            ["p11-kit", "server", "-f", "-n", str(self.socket), "--provider", SOFTHSM, "pkcs11:token=fastca"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _wait(self.socket.exists, 10, lambda: "p11-kit server did not create its socket")

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)     # the server and every p11-kit-remote it forked
        self.process.wait(timeout=10)


def test_network_hsm_killed_and_restarted(state):
    hsm = P11KitServer(state)
    hsm.start()
    _set_module(state, P11KIT_CLIENT)
    try:
        server = _start(state, env={"P11_KIT_SERVER_ADDRESS": f"unix:path={hsm.socket}"})
        pid = _worker_pid(server)
        with Load(server) as load:
            _hsm_gone_then_back(server, load, hsm.kill, hsm.start)
        _finish(server, load, pid)
    finally:
        if hsm.process is not None and hsm.process.poll() is None:
            hsm.kill()


# -- faults only a wrapped module produces ---------------------------------------------------


@pytest.fixture(scope="module")
def fault_shim(tmp_path_factory) -> Path:
    library = tmp_path_factory.mktemp("shim") / "libfastca-fault-shim.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-I/usr/include/p11-kit-1",
                    "-o", str(library), str(SHIM_SOURCE), "-ldl"], check=True)
    return library


class Shim:
    def __init__(self, state: Path) -> None:
        self.control, self.log = state / "shim-control", state / "shim-log"
        self._seq = 0
        self.set()

    def set(self, fail: int = 0, ck_rv: int = 0, delay_ms: int = 0, corrupt: bool = False) -> None:
        self._seq += 1
        staged = self.control.with_suffix(".new")
        staged.write_text(f"{self._seq} {fail} {ck_rv:#x} {delay_ms} {int(corrupt)}\n")
        staged.rename(self.control)

    def calls(self, what: str) -> list[str]:
        if not self.log.exists():
            return []
        return [line.split()[1] for line in self.log.read_text().splitlines() if line.split()[0] == what]

    @property
    def env(self) -> dict[str, str]:
        return {"FASTCA_SHIM_CONTROL": str(self.control), "FASTCA_SHIM_LOG": str(self.log)}


@pytest.fixture
def shimmed(state, fault_shim) -> tuple[Path, Shim]:
    _set_module(state, str(fault_shim))
    return state, Shim(state)


@pytest.mark.parametrize("ck_rv", [0x30, 0x32, 0xB3, 0xE0, 0x101],
                         ids=["DEVICE_ERROR", "DEVICE_REMOVED", "SESSION_HANDLE_INVALID", "TOKEN_NOT_PRESENT",
                              "USER_NOT_LOGGED_IN"])
def test_device_and_session_errors_make_the_signer_unavailable_then_it_recovers(shimmed, ck_rv):
    state, shim = shimmed
    server = _start(state, env=shim.env)
    pid = _worker_pid(server)
    initialised = len(shim.calls("initialize"))
    with Load(server) as load:
        # Enough failures that the one transparent retry fails too: callers see it.
        _hsm_gone_then_back(server, load, lambda: shim.set(fail=400, ck_rv=ck_rv), lambda: shim.set())
    _finish(server, load, pid)
    # Recovered by re-initialising the module and logging in again, not by a restart.
    assert len(shim.calls("initialize")) > initialised
    assert set(shim.calls("login")) == {"0x0"}


def test_a_single_lost_session_is_reopened_before_the_caller_notices(shimmed):
    state, shim = shimmed
    server = _start(state, env=shim.env)
    pid = _worker_pid(server)
    with Load(server) as load:
        _wait(lambda: load.count("OK") >= 10, 30, lambda: f"no issuance: {load.codes()}")
        shim.set(fail=1, ck_rv=0xB3)
        time.sleep(2)
    _finish(server, load, pid)
    assert load.codes() == {"OK"}
    assert "recovered" in server.log_file.read_text()


def test_a_signature_that_fails_is_internal_and_the_signer_stays_ready(shimmed):
    state, shim = shimmed
    server = _start(state, env=shim.env)
    pid = _worker_pid(server)
    token = service_account_token("one", "caller")
    csr = agent_csrs()[0].pem.decode()
    with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(server.root_pem)) as channel:
        stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(channel)
        request = istio_ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=3600)
        headers = [("clusterid", "Kubernetes"), ("authorization", f"Bearer {token}")]

        def call() -> str:
            try:
                stub.CreateCertificate(request, metadata=headers, timeout=10)
            except grpc.RpcError as error:
                return f"{error.code().name}: {error.details()}"
            return "OK"

        assert call() == "OK"
        shim.set(fail=1, ck_rv=0x06)                     # CKR_FUNCTION_FAILED, once
        outcomes = [call() for _ in range(3)]
        assert outcomes[0] == "INTERNAL: failed to sign the certificate" and outcomes[1:] == ["OK", "OK"]
        assert _health(server) == SERVING
        # A token that returns signatures that do not verify: nothing leaves.
        shim.set(corrupt=True)
        assert call() == "INTERNAL: failed to sign the certificate"
        shim.set()
        assert call() == "OK"
    _assert_same_worker(server, pid)
    assert server.stop() == 0


def test_a_refused_pin_is_tried_once_until_the_pin_file_changes(shimmed):
    state, shim = shimmed
    pin_file = state / "pin"
    right = pin_file.read_text()
    pin_file.write_text("".join("0" if ch != "0" else "1" for ch in right.strip()) + "\n")
    server = _start(state, env=shim.env, until="waiting for the signers' HSM before opening the ports")
    time.sleep(4)                                        # four probe rounds, at least
    assert shim.calls("login") == ["0xa0"]               # CKR_PIN_INCORRECT, once
    assert server.process.poll() is None and _signer_ready(server) == 0
    pin_file.write_text(right)
    _wait(lambda: _event(server, "serving") is not None, 30, lambda: server.log_file.read_text()[-3000:])
    assert shim.calls("login") == ["0xa0", "0x0"]
    assert right.strip() not in server.log_file.read_text()
    assert server.stop() == 0


def _threads_and_fds(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def test_a_c_sign_slowed_to_seconds(shimmed):
    """Deadlines are honoured (each caller hears back at its deadline, not
    when the token answers), the queue stays bounded (RESOURCE_EXHAUSTED past
    server.queue_limit) and the worker's threads and descriptors stay flat."""
    state, shim = shimmed
    write_config(state, {"server": {"queue_limit": 16, "batch_max": 8}})
    server = _start(state, env=shim.env)
    pid = _worker_pid(server)
    with Load(server) as load:
        _wait(lambda: load.count("OK") >= 10, 30, lambda: f"no issuance: {load.codes()}")
    before = _threads_and_fds(pid)
    shim.set(delay_ms=3000)
    results: list[tuple[str, float]] = []
    lock = threading.Lock()
    csr = agent_csrs()[0].pem.decode()

    def caller(n: int) -> None:
        token = service_account_token("slow", f"sa-{n}")
        with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(server.root_pem)) as channel:
            stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(channel)
            started = time.monotonic()
            try:
                stub.CreateCertificate(istio_ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=3600),
                                       metadata=[("authorization", f"Bearer {token}")], timeout=1.0)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            with lock:
                results.append((code, time.monotonic() - started))

    depths: list[float] = []
    sampling = threading.Event()

    def sample_queue_depth() -> None:
        while not sampling.is_set():
            depths.append(_metric(server, "fastca_queue_depth"))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample_queue_depth)
    sampler.start()
    for _round in range(3):
        callers = [threading.Thread(target=caller, args=(n,)) for n in range(60)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join(timeout=30)
    sampling.set()
    sampler.join()
    codes = {code for code, _ in results}
    assert codes <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "OK"}, codes
    assert "RESOURCE_EXHAUSTED" in codes and "DEADLINE_EXCEEDED" in codes
    assert max(elapsed for _, elapsed in results) < 2.5          # nobody waited for the token's 3 s
    assert 0 < max(depths) <= 16, depths
    shim.set()
    with Load(server) as load:
        _wait(lambda: load.count("OK") >= 10, 30, lambda: f"no issuance after: {load.codes()}")
    time.sleep(1)
    threads, fds = _threads_and_fds(pid)
    assert threads <= before[0] + 2 and fds <= before[1] + 8, (before, (threads, fds))
    _assert_same_worker(server, pid)
    assert server.stop() == 0

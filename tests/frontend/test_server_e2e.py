"""A real `fastca serve` (SoftHSM key, TLS on loopback) driven the way Istio
agents drive istiod's CA. docs/istio-contract.md and §7; docs/reliability.md, cases 1–7, 12–13."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastca.audit.sqlite_log import AuditReader
from fastca.ca.softhsm import find_softhsm_module
from tests.conftest import agent_csrs, run_fastca
from tests.frontend.agent_client import AgentClient
from tests._tools import tool
from tests.frontend.conftest import (NODE, TRUST_DOMAIN, init_state, service_account_token, start_server,
                                     tokenreview_config, write_config)

WORKLOAD_TOKEN = service_account_token("payments", "api", "api-7d9")
ZTUNNEL_TOKEN = service_account_token("istio-system", "ztunnel", "ztunnel-abc")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, apiserver):
    """Server A: TLS, TokenReview, XFCC from loopback (trusted here on purpose),
    impersonation for ztunnel, a second named signer, policies, an mTLS port."""
    base = tmp_path_factory.mktemp("mesh")
    state = init_state(base / "state")
    # The second signer's key lives in the same HSM token, under its own label.
    other_key = (f"pkcs11:token=fastca;object=other-ca;type=private?module-path={find_softhsm_module()}"
                 f"&pin-source=file:{state / 'pin'}")
    other = base / "other-ca"
    run_fastca("init", "--state", str(other), "--key-type", "rsa-2048", "--key-uri", other_key,
               env={"SOFTHSM2_CONF": str(state / "softhsm2.conf")})
    pods = base / "pods.json"
    pods.write_text(json.dumps({"pods": [
        {"namespace": "istio-system", "name": "ztunnel-abc", "uid": "uid-ztunnel-abc", "service_account": "ztunnel",
         "node_name": NODE},
        {"namespace": "shop", "name": "cart-1", "uid": "uid-cart-1", "service_account": "cart", "node_name": NODE},
        {"namespace": "shop", "name": "billing-1", "uid": "uid-billing-1", "service_account": "billing",
         "node_name": "node-b"},
    ]}))
    now = dt.datetime.now(dt.timezone.utc)
    closed_start = (now + dt.timedelta(hours=2)).strftime("%H:%M")
    closed_end = (now + dt.timedelta(hours=3)).strftime("%H:%M")
    write_config(state, {
        "authn": {
            "tokenreview": [tokenreview_config(apiserver, base / "apiserver-token")],
            "xfcc": {"trusted_cidrs": ["127.0.0.1/32"]},
            "node_authorizer": {"trusted_node_accounts": ["istio-system/ztunnel"], "pod_source": "static",
                                "static_file": str(pods)},
        },
        "signers": {"other": {"state_dir": str(other)}},
        "policy": {
            "rate_limit": {"per_identity_per_second": 0.001, "burst": 5},
            "time_windows": [{"identities": ["spiffe://cluster.local/ns/nightly/*"], "start": closed_start,
                              "end": closed_end}],
            "source_networks": [{"identities": ["spiffe://cluster.local/ns/restricted/*"], "cidrs": ["10.0.0.0/8"]}],
        },
    })
    server = start_server(state, "--mtls-listen", "127.0.0.1:0")
    RETURNED_SERIALS.clear()
    yield server
    assert server.stop() == 0
    # Every certificate any test in this module received has its audit record,
    # and there is no record of anything else (failures leave none).
    reader = AuditReader(state / "audit.db")
    try:
        audited = {r.serial for r in reader.list(limit=100_000) if r.credential_type != "self"}
    finally:
        reader.close()
    assert audited == set(RETURNED_SERIALS)


_accounts = itertools.count()
_FRESH = object()
RETURNED_SERIALS: list[str] = []


class RecordingClient(AgentClient):
    """Remembers the serial of every certificate the server returned."""

    def create_certificate(self, *args, **kwargs):
        chain = super().create_certificate(*args, **kwargs)
        RETURNED_SERIALS.append(f"{x509.load_pem_x509_certificate(chain[0].encode()).serial_number:x}")
        return chain


def client(server, token: str | None | object = _FRESH, **kwargs) -> AgentClient:
    """A client whose default identity is new on every call, so the
    per-identity rate limit only bites the test that is about it."""
    if token is _FRESH:
        token = service_account_token("payments", f"worker-{next(_accounts)}")
    return RecordingClient(server.address, server.root_pem, token=token, **kwargs)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def _leaf(chain: list[str]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain[0].encode())


def _uris(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)


def _openssl_verify(tmp_path: Path, root: bytes, chain: list[str]) -> None:
    (tmp_path / "root.pem").write_bytes(root)
    (tmp_path / "leaf.pem").write_text(chain[0])
    (tmp_path / "mid.pem").write_text("".join(chain[1:-1]) or chain[-1])
    proc = subprocess.run([tool("openssl"), "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                           str(tmp_path / "mid.pem"), str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", ["rsa2048", "ec256", "ec384"])
def test_agent_gets_a_chain_it_accepts(mesh, kind, tmp_path):
    csr = agent_csrs(kind)[0]
    chain = client(mesh, token=WORKLOAD_TOKEN).create_certificate(csr.pem, ttl=3600)
    assert len(chain) >= 2
    assert all(element.endswith("\n") for element in chain)
    assert chain[-1] == mesh.root_pem.decode()                # root bundle last
    leaf = _leaf(chain)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False   # leaf first
    _openssl_verify(tmp_path, mesh.root_pem, chain)
    # The authenticated identity, not the one the CSR asked for.
    assert _uris(leaf) == ["spiffe://cluster.local/ns/payments/sa/api"]
    assert csr.spiffe_id != "spiffe://cluster.local/ns/payments/sa/api"
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(seconds=3600 + 120)


def test_ttl_rules(mesh):
    pem = agent_csrs("ec256")[1].pem
    for ttl in (0, -1):
        leaf = _leaf(client(mesh, token=service_account_token("ttl", "default")).create_certificate(pem, ttl=ttl))
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=24, minutes=2)
    for ttl in (90 * 86400 + 1, 2**63 - 1):
        code, details = _code(lambda: client(mesh, token=service_account_token("ttl", "big")).create_certificate(
            pem, ttl=ttl))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max allowed TTL" in details


def test_no_credentials_is_unauthenticated(mesh):
    code, details = _code(lambda: client(mesh, token=None).create_certificate(agent_csrs()[0].pem))
    assert code == grpc.StatusCode.UNAUTHENTICATED and details == "request authenticate failure"


def test_rejected_token_is_unauthenticated(mesh):
    code, _ = _code(lambda: client(mesh, token="not-a-service-account-token").create_certificate(agent_csrs()[0].pem))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_unauthenticated_garbage_csr_is_not_parsed(mesh):
    """docs/reliability.md, case 1: without credentials the answer is UNAUTHENTICATED even for a CSR that is garbage."""
    code, _ = _code(lambda: client(mesh, token=None).create_certificate("garbage"))
    assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("csr", ["", "garbage", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"])
def test_bad_csr_is_invalid_argument(mesh, csr):
    code, details = _code(lambda: client(mesh).create_certificate(csr))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details


def test_flipped_signature_bit_is_invalid_argument(mesh):
    csr = x509.load_pem_x509_csr(agent_csrs("rsa2048")[2].pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x10
    pem = "-----BEGIN CERTIFICATE REQUEST-----\n" + __import__("base64").encodebytes(bytes(der)).decode() + \
        "-----END CERTIFICATE REQUEST-----\n"
    code, details = _code(lambda: client(mesh).create_certificate(pem))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "signature" in details


def test_cert_signer_selects_a_named_signer(mesh):
    pem = agent_csrs("ec256")[2].pem
    other_root = (mesh.state.parent / "other-ca" / "root-cert.pem").read_text()
    chain = client(mesh, token=service_account_token("signers", "a")).create_certificate(pem, cert_signer="other")
    assert chain[-1] == other_root and chain[-1] != mesh.root_pem.decode()
    code, details = _code(lambda: client(mesh).create_certificate(pem, cert_signer="nope"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "CertSigner" in details


def test_impersonation_by_trusted_node_agent(mesh):
    pem = agent_csrs("ec256")[3].pem
    ztunnel = client(mesh, token=ZTUNNEL_TOKEN)
    chain = ztunnel.create_certificate(pem, impersonate="spiffe://cluster.local/ns/shop/sa/cart")
    assert _uris(_leaf(chain)) == ["spiffe://cluster.local/ns/shop/sa/cart"]
    # billing runs on another node: denied.
    code, details = _code(lambda: ztunnel.create_certificate(pem, impersonate="spiffe://cluster.local/ns/shop/sa/billing"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and details == "request impersonation authentication failure"
    # A workload is not a trusted node account: denied.
    code, _ = _code(lambda: client(mesh).create_certificate(pem, impersonate="spiffe://cluster.local/ns/shop/sa/cart"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # ztunnel whose pod UID does not match the pod list: denied.
    wrong_uid = client(mesh, token=service_account_token("istio-system", "ztunnel", "ztunnel-zzz"))
    code, _ = _code(lambda: wrong_uid.create_certificate(pem, impersonate="spiffe://cluster.local/ns/shop/sa/cart"))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_xfcc_from_a_trusted_proxy(mesh):
    xfcc = ('By=spiffe://cluster.local/ns/istio-system/sa/gateway;Hash=abc;'
            'URI=spiffe://cluster.local/ns/edge/sa/proxy-client')
    chain = client(mesh, token=None, extra_headers=(("x-forwarded-client-cert", xfcc),)).create_certificate(
        agent_csrs("ec256")[0].pem)
    assert _uris(_leaf(chain)) == ["spiffe://cluster.local/ns/edge/sa/proxy-client"]


def _client_identity_pair(state: Path, tmp_path: Path, identity: str, hsm_conf: Path,
                          mesh_audit: bool = True) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    (tmp_path / "vm.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    chain = run_fastca("issue", "--state", str(state), "--csr", str(tmp_path / "vm.csr"), "--identity", identity,
                       env={"SOFTHSM2_CONF": str(hsm_conf)}).stdout
    if mesh_audit:   # `fastca issue` records what it prints in its CA's audit log
        RETURNED_SERIALS.append(f"{x509.load_pem_x509_certificate(chain.encode()).serial_number:x}")
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, chain.encode()


def test_mtls_client_certificate_on_the_mtls_port(mesh, tmp_path):
    hsm_conf = mesh.state / "softhsm2.conf"
    key_pem, chain_pem = _client_identity_pair(mesh.state, tmp_path, "spiffe://cluster.local/ns/vm/sa/legacy",
                                               hsm_conf)
    mtls = RecordingClient(f"localhost:{mesh.ports['mtls']}", mesh.root_pem, token=None, client_key_pem=key_pem,
                       client_cert_pem=chain_pem)
    chain = mtls.create_certificate(agent_csrs("rsa2048")[3].pem)
    assert _uris(_leaf(chain)) == ["spiffe://cluster.local/ns/vm/sa/legacy"]
    # A client certificate from another CA never completes the handshake.
    other_key, other_chain = _client_identity_pair(mesh.state.parent / "other-ca", tmp_path,
                                                   "spiffe://cluster.local/ns/vm/sa/legacy", hsm_conf,
                                                   mesh_audit=False)
    stranger = AgentClient(f"localhost:{mesh.ports['mtls']}", mesh.root_pem, token=None, client_key_pem=other_key,
                           client_cert_pem=other_chain)
    code, _ = _code(lambda: stranger.create_certificate(agent_csrs("rsa2048")[3].pem, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE
    # No client certificate at all on the mTLS port: refused too.
    bare = AgentClient(f"localhost:{mesh.ports['mtls']}", mesh.root_pem, token=WORKLOAD_TOKEN)
    code, _ = _code(lambda: bare.create_certificate(agent_csrs("rsa2048")[3].pem, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_token_or_neither_on_the_main_port(mesh, tmp_path):
    """istiod's 15012: a client certificate is asked for and verified if
    offered, so a VM agent (PROV_CERT) and a sidecar (token) share the port;
    with neither the call is UNAUTHENTICATED, and a certificate from another
    root fails the handshake."""
    hsm_conf = mesh.state / "softhsm2.conf"
    key_pem, chain_pem = _client_identity_pair(mesh.state, tmp_path, "spiffe://cluster.local/ns/vm/sa/on-main",
                                               hsm_conf)
    vm = RecordingClient(mesh.address, mesh.root_pem, token=None, client_key_pem=key_pem, client_cert_pem=chain_pem)
    for csr in agent_csrs("rsa2048")[:2]:        # the connection's verdict is reused for its next calls
        assert _uris(_leaf(vm.create_certificate(csr.pem))) == ["spiffe://cluster.local/ns/vm/sa/on-main"]
    sidecar = RecordingClient(mesh.address, mesh.root_pem, token=WORKLOAD_TOKEN)
    assert _uris(_leaf(sidecar.create_certificate(agent_csrs("ec256")[0].pem))) == [
        "spiffe://cluster.local/ns/payments/sa/api"]
    neither = AgentClient(mesh.address, mesh.root_pem, token=None)
    code, details = _code(lambda: neither.create_certificate(agent_csrs()[0].pem))
    assert code == grpc.StatusCode.UNAUTHENTICATED and details == "request authenticate failure"
    other_key, other_chain = _client_identity_pair(mesh.state.parent / "other-ca", tmp_path,
                                                   "spiffe://cluster.local/ns/vm/sa/on-main", hsm_conf,
                                                   mesh_audit=False)
    stranger = AgentClient(mesh.address, mesh.root_pem, token=WORKLOAD_TOKEN, client_key_pem=other_key,
                           client_cert_pem=other_chain)
    code, _ = _code(lambda: stranger.create_certificate(agent_csrs()[0].pem, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE          # the handshake failed: no call was made


def test_policies(mesh):
    pem = agent_csrs("ec256")[0].pem
    limited = client(mesh, token=service_account_token("busy", "bee"))
    for _ in range(5):
        limited.create_certificate(pem)
    code, _ = _code(lambda: limited.create_certificate(pem))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, details = _code(lambda: client(mesh, token=service_account_token("nightly", "job")).create_certificate(pem))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "window" in details
    code, details = _code(lambda: client(mesh, token=service_account_token("restricted", "db")).create_certificate(pem))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "network" in details


def test_metadata_must_be_strings(mesh):
    nested = struct_pb2.Struct()
    nested.update({"CertSigner": {"deep": {"deeper": ["x"]}}})
    code, details = _code(lambda: client(mesh).create_certificate(agent_csrs()[0].pem, metadata=nested))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "must be a string" in details


def test_message_over_the_receive_limit_is_refused(mesh):
    code, _ = _code(lambda: client(mesh).create_certificate("A" * (300 * 1024)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_and_reflection(mesh):
    credentials = grpc.ssl_channel_credentials(mesh.root_pem)
    with grpc.secure_channel(mesh.address, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "istio.v1.auth.IstioCertificateService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "istio.v1.auth.IstioCertificateService" in names and "grpc.health.v1.Health" in names


def test_health_watch_and_reflection_describe_the_services(mesh):
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    credentials = grpc.ssl_channel_credentials(mesh.root_pem)
    with grpc.secure_channel(mesh.address, credentials) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING      # the current status, at once
        watch.cancel()
        unknown = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        unknown.cancel()
        code, _ = _code(lambda: health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="nope"), timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="istio.v1.auth.IstioCertificateService"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Symbol")]), timeout=10))
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in responses[0].file_descriptor_response.file_descriptor_proto]
    assert files[0].package == "istio.v1.auth" and files[0].service[0].method[0].name == "CreateCertificate"
    assert "google/protobuf/struct.proto" in {f.name for f in files}     # with what it imports
    assert responses[1].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_serving_certificate_names_and_chain(mesh):
    import socket
    import ssl

    context = ssl.create_default_context(cadata=mesh.root_pem.decode())
    context.set_alpn_protocols(["h2"])
    for name in ("localhost", "istiod.istio-system.svc"):
        with socket.create_connection(("127.0.0.1", mesh.ports["grpc"]), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.selected_alpn_protocol() == "h2"
                assert tls.version() in ("TLSv1.2", "TLSv1.3")


def _scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=10) as response:
        return response.read().decode()


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in metrics")


def test_metrics_move(mesh):
    before = _scrape(mesh)
    client(mesh, token=service_account_token("metrics", "a")).create_certificate(agent_csrs()[0].pem)
    _code(lambda: client(mesh, token=None).create_certificate(agent_csrs()[0].pem))
    _code(lambda: client(mesh, token=service_account_token("metrics", "b")).create_certificate("garbage"))
    after = _scrape(mesh)
    assert _value(after, "citadel_server_csr_count") == _value(before, "citadel_server_csr_count") + 3
    assert _value(after, "citadel_server_success_cert_issuance_count") == \
        _value(before, "citadel_server_success_cert_issuance_count") + 1
    assert _value(after, "citadel_server_authentication_failure_count") >= \
        _value(before, "citadel_server_authentication_failure_count") + 1
    assert _value(after, 'citadel_server_csr_sign_err_count{error="CSR_ERROR"}') >= 1
    assert "citadel_server_root_cert_expiry_timestamp" in after
    handled = [line for line in after.splitlines() if line.startswith("grpc_server_handled_total{")
               and 'grpc_code="OK"' in line and 'grpc_method="CreateCertificate"' in line
               and 'grpc_service="istio.v1.auth.IstioCertificateService"' in line]
    assert handled and float(handled[0].split()[-1]) >= 1
    assert "fastca_issuance_seconds_bucket" in after
    assert "_total" not in "".join(line for line in after.splitlines() if line.startswith("citadel_"))
    assert WORKLOAD_TOKEN not in after


def test_logs_are_json_with_request_ids_and_no_tokens(mesh):
    client(mesh, token=service_account_token("logs", "a")).create_certificate(agent_csrs()[0].pem)
    events = mesh.log_events()
    issued = [e for e in events if e.get("event") == "certificate issued"]
    assert issued and all(e.get("request_id") for e in issued)
    text = mesh.log_file.read_text()
    assert WORKLOAD_TOKEN not in text and ZTUNNEL_TOKEN not in text
    assert "BEGIN CERTIFICATE REQUEST" not in text


def test_audit_has_every_issued_certificate_and_no_failure(mesh):
    chain = client(mesh, token=service_account_token("audit", "one")).create_certificate(agent_csrs()[0].pem)
    serial = f"{_leaf(chain).serial_number:x}"
    _code(lambda: client(mesh, token=service_account_token("audit", "two")).create_certificate("garbage"))
    shown = json.loads(run_fastca("audit", "show", serial, "--state", str(mesh.state), "--json").stdout)
    assert shown["identity"] == "spiffe://cluster.local/ns/audit/sa/one"
    assert shown["credential_type"] == "k8s-tokenreview"
    listed = json.loads(run_fastca("audit", "list", "--state", str(mesh.state), "--limit", "1000", "--json").stdout)
    identities = {r["identity"] for r in listed}
    assert "spiffe://cluster.local/ns/audit/sa/two" not in identities
    assert "spiffe://cluster.local/ns/restricted/sa/db" not in identities


def test_agent_keepalive_pings_are_accepted(mesh):
    """Agents ping every 30 s during a call; grpcio's defaults would answer
    frequent pings with GOAWAY too_many_pings (the channel drops to IDLE).
    Here the client pings every second for four seconds: the connection stays up."""
    import time

    states: list[grpc.ChannelConnectivity] = []
    options = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    channel = grpc.secure_channel(mesh.address, grpc.ssl_channel_credentials(mesh.root_pem), options=options)
    try:
        channel.subscribe(states.append, try_to_connect=True)
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        time.sleep(4)
        assert grpc.ChannelConnectivity.READY in states
        assert states[states.index(grpc.ChannelConnectivity.READY):] == [grpc.ChannelConnectivity.READY]
    finally:
        channel.close()


def _bulk(mesh, token: str, elements: list) -> list:
    from fastca.proto import bulk_pb2, bulk_pb2_grpc, istio_ca_pb2

    requests = []
    for csr, impersonate in elements:
        metadata = struct_pb2.Struct()
        metadata.update({"CertSigner": ""} | ({"ImpersonatedIdentity": impersonate} if impersonate else {}))
        requests.append(istio_ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=3600, metadata=metadata))
    with grpc.secure_channel(mesh.address, grpc.ssl_channel_credentials(mesh.root_pem)) as channel:
        response = bulk_pb2_grpc.BulkCertificateServiceStub(channel).CreateCertificates(
            bulk_pb2.BulkCertificateRequest(requests=requests),
            metadata=[("authorization", f"Bearer {token}"), ("clusterid", "Kubernetes")], timeout=60)
    for result in response.results:
        if result.code == 0:
            RETURNED_SERIALS.append(f"{_leaf(list(result.cert_chain)).serial_number:x}")
    return list(response.results)


def test_bulk_rpc_authorises_and_limits_each_element(mesh):
    pems = [c.pem.decode() for c in agent_csrs()]
    # A node agent renewing its workloads: each element is authorised on its own.
    mixed = _bulk(mesh, ZTUNNEL_TOKEN, [(pems[0], "spiffe://cluster.local/ns/shop/sa/cart"),
                                        (pems[1], "spiffe://cluster.local/ns/shop/sa/billing")])
    assert mixed[0].code == 0 and _uris(_leaf(list(mixed[0].cert_chain))) == ["spiffe://cluster.local/ns/shop/sa/cart"]
    assert mixed[1].code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    # The per-identity rate limit (burst 5 here) applies per element, in order.
    limited = _bulk(mesh, service_account_token("bulk", "limited"), [(pems[i], None) for i in range(7)])
    assert [r.code for r in limited] == [0] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]] * 2


def test_bulk_rpc_refuses_unauthenticated_and_oversized_calls(mesh):
    with pytest.raises(grpc.RpcError) as caught:
        _bulk(mesh, "not-a-token", [(agent_csrs()[0].pem.decode(), None)])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        _bulk(mesh, service_account_token("bulk", "big"), [("x", None)] * 1001)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

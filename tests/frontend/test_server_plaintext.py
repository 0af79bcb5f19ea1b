"""Server B: the :15010-style plaintext listener, strict CSR mode, XFCC from
an untrusted peer, a plug-in authenticator loaded by entry point in the
real server process, and configuration from FASTCA_* environment variables."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import agent_csrs
from tests.frontend.agent_client import AgentClient
from tests.frontend.conftest import init_state, service_account_token, start_server, tokenreview_config, write_config

API_KEY = "k3y-for-the-billing-batch-job"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _register_apikey_plugin(directory: Path) -> Path:
    """Entry-point metadata for the example plug-in, on a path the server
    process gets through PYTHONPATH (as an installed package would)."""
    dist = directory / "fastca_example_plugins-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fastca-example-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fastca.authenticators]\napikey = tests.authn.apikey_plugin:factory\n")
    return directory


@pytest.fixture(scope="module")
def plain(tmp_path_factory, apiserver):
    base = tmp_path_factory.mktemp("plain")
    state = init_state(base / "state")
    plugins = _register_apikey_plugin(base / "site")
    write_config(state, {
        "authn": {
            "tokenreview": [tokenreview_config(apiserver, base / "apiserver-token")],
            # Only a proxy network is trusted: XFCC from loopback must not count.
            "xfcc": {"trusted_cidrs": ["10.0.0.0/8"]},
            "plugins": [{"name": "apikey", "options": {"keys": {
                hashlib.sha256(API_KEY.encode()).hexdigest(): "spiffe://cluster.local/ns/billing/sa/batch"}}}],
        },
        # The bulk test issues 40 for one identity in one call: above the default burst (20).
        "policy": {"strict_csr": True, "rate_limit": {"per_identity_per_second": 1, "burst": 50}},
    })
    env = {"PYTHONPATH": os.pathsep.join([str(plugins), str(REPO_ROOT)]),
           "FASTCA_ISSUANCE__MAX_TTL_SECONDS": "7200", "FASTCA_ISSUANCE__DEFAULT_TTL_SECONDS": "3600"}
    server = start_server(state, "--plaintext", env=env)
    yield server
    assert server.stop() == 0


class _ShortLived(AgentClient):
    """This server's maximum TTL is 2 h (from the environment)."""

    def create_certificate(self, csr_pem, *, ttl: int = 3600, **kwargs):
        return super().create_certificate(csr_pem, ttl=ttl, **kwargs)


def _client(server, token=None, **kwargs) -> AgentClient:
    return _ShortLived(f"127.0.0.1:{server.ports['grpc']}", None, token=token, **kwargs)


def _csr_for(identity: str | None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if identity:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_plaintext_and_strict_csr(plain):
    token = service_account_token("shop", "cart")
    chain = _client(plain, token).create_certificate(_csr_for("spiffe://cluster.local/ns/shop/sa/cart"))
    assert len(chain) == 2
    with pytest.raises(grpc.RpcError) as caught:
        _client(plain, token).create_certificate(_csr_for("spiffe://cluster.local/ns/shop/sa/admin"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "strict CSR" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        _client(plain, token).create_certificate(agent_csrs("ec256")[0].pem)   # asks for ns0/sa0
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_xfcc_from_an_untrusted_peer_is_unauthenticated(plain):
    xfcc = "By=spiffe://cluster.local/ns/istio-system/sa/gw;URI=spiffe://cluster.local/ns/edge/sa/client"
    with pytest.raises(grpc.RpcError) as caught:
        _client(plain, extra_headers=(("x-forwarded-client-cert", xfcc),)).create_certificate(
            _csr_for("spiffe://cluster.local/ns/edge/sa/client"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_api_key_plugin_in_the_real_server(plain):
    chain = _client(plain, extra_headers=(("x-api-key", API_KEY),)).create_certificate(
        _csr_for("spiffe://cluster.local/ns/billing/sa/batch"))
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/billing/sa/batch"]
    with pytest.raises(grpc.RpcError) as caught:
        _client(plain, extra_headers=(("x-api-key", "wrong"),)).create_certificate(_csr_for(None))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_environment_overrides_the_file(plain):
    """FASTCA_ISSUANCE__MAX_TTL_SECONDS=7200 beats the file's 90 days."""
    token = service_account_token("env", "check")
    csr = _csr_for("spiffe://cluster.local/ns/env/sa/check")
    _client(plain, token).create_certificate(csr, ttl=7200)
    with pytest.raises(grpc.RpcError) as caught:
        _client(plain, token).create_certificate(csr, ttl=7201)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "7200" in caught.value.details()


def test_bulk_rpc_issues_many_with_per_element_status(plain):
    from google.protobuf import struct_pb2

    from fastca.proto import bulk_pb2, bulk_pb2_grpc, istio_ca_pb2

    identity = "spiffe://cluster.local/ns/bulk/sa/renewer"
    metadata = struct_pb2.Struct()
    metadata.update({"CertSigner": ""})
    requests = [istio_ca_pb2.IstioCertificateRequest(csr=_csr_for(identity).decode(), validity_duration=3600,
                                                     metadata=metadata) for _ in range(40)]
    requests.append(istio_ca_pb2.IstioCertificateRequest(csr="garbage", validity_duration=3600, metadata=metadata))
    with grpc.insecure_channel(f"127.0.0.1:{plain.ports['grpc']}") as channel:
        response = bulk_pb2_grpc.BulkCertificateServiceStub(channel).CreateCertificates(
            bulk_pb2.BulkCertificateRequest(requests=requests),
            metadata=[("authorization", f"Bearer {service_account_token('bulk', 'renewer')}")], timeout=60)
    results = list(response.results)
    assert [r.code for r in results[:40]] == [0] * 40
    assert results[40].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and results[40].message
    leaves = [x509.load_pem_x509_certificate(r.cert_chain[0].encode()) for r in results[:40]]
    assert len({leaf.serial_number for leaf in leaves}) == 40
    for leaf, request in zip(leaves, requests):
        csr = x509.load_pem_x509_csr(request.csr.encode())
        assert leaf.public_key() == csr.public_key()

"""The agent's CA client against a real `fastca serve` over TLS (TokenReview
authentication), an in-process recording server for the exact wire shape and
retry rule, and the response checks (docs/istio-contract.md, docs/reliability.md, cases 30–31)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from cryptography import x509

from fastca.agent.caclient import CAClient, CARequestFailed, InvalidCAResponse, validate_response
from fastca.agent.csr import agent_csr, new_key, private_key_pem
from fastca.proto import istio_ca_pb2, istio_ca_pb2_grpc
from tests.agent.conftest import (WORKLOAD_ID, LocalCA, make_authority, make_real_ca, run)
from tests.frontend.conftest import service_account_token


def _client(ca, **kwargs) -> CAClient:
    kwargs.setdefault("token_file", ca.token_file)
    return CAClient(ca.address, root_pem=ca.root_pem, cluster_id="Kubernetes", **kwargs)


def _uris(pem: str) -> list[str]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)


# -- against a real fastca ---------------------------------------------------------------------------------------
def test_happy_path_over_tls(shared_ca):
    async def main():
        key = new_key("ec-p256")
        async with _client(shared_ca) as client:
            chain = await client.sign(agent_csr(key, WORKLOAD_ID), 3600)
        leaf, root = validate_response(chain, key, WORKLOAD_ID)
        assert len(chain) == 2 and root == shared_ca.root_pem.decode()
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert 3600 <= lifetime.total_seconds() <= 3600 + 121     # TTL honoured (+ the CA's backdating)

    run(main())


def test_token_is_reread_on_every_call(shared_ca, tmp_path):
    token = tmp_path / "token"
    token.write_text(service_account_token("team-a", "svc-a", "pod-a"))

    async def main():
        key = new_key("ec-p256")
        # The CA takes the identity from the token, not from the CSR.
        csr = agent_csr(key, "spiffe://cluster.local/ns/whatever/sa/x")
        async with _client(shared_ca, token_file=token) as client:
            first = await client.sign(csr, 3600)
            token.write_text(service_account_token("team-b", "svc-b", "pod-b") + "\n")
            second = await client.sign(csr, 3600)
        assert _uris(first[0]) == ["spiffe://cluster.local/ns/team-a/sa/svc-a"]
        assert _uris(second[0]) == ["spiffe://cluster.local/ns/team-b/sa/svc-b"]

    run(main())


def test_missing_token_is_unauthenticated_and_not_retried(shared_ca, tmp_path):
    async def main():
        before = shared_ca.metric("citadel_server_authentication_failure_count")
        events = []
        async with _client(shared_ca, token_file=tmp_path / "absent",
                           on_event=lambda kind, name, **d: events.append((kind, d))) as client:
            started = time.monotonic()
            with pytest.raises(CARequestFailed) as failure:
                await client.sign(agent_csr(new_key("ec-p256"), WORKLOAD_ID), 3600)
            elapsed = time.monotonic() - started
        assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert failure.value.attempts == 1
        assert [kind for kind, _ in events] == ["ca_call"]
        assert elapsed < 2.0
        assert shared_ca.metric("citadel_server_authentication_failure_count") - before == 1

    run(main())


def test_invalid_argument_is_not_retried(shared_ca):
    async def main():
        before = shared_ca.metric("citadel_server_csr_count")
        async with _client(shared_ca) as client:
            with pytest.raises(CARequestFailed) as failure:
                await client.sign(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                                  3600)
        assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.value.attempts == 1
        assert shared_ca.metric("citadel_server_csr_count") - before == 1

    run(main())


def test_retries_unavailable_until_the_ca_comes_up(tmp_path, apiserver):
    ca = make_real_ca(tmp_path, apiserver)      # initialised, not started: nothing listens on its port
    events = []
    started: list[asyncio.Task] = []

    def on_event(kind, name, **details):
        events.append((kind, details))
        if kind == "ca_retry" and not started:
            started.append(asyncio.get_running_loop().create_task(asyncio.to_thread(ca.start)))

    async def main():
        key = new_key("ec-p256")
        client = CAClient(ca.address, root_pem=ca.root_pem, token_file=ca.token_file, cluster_id="Kubernetes",
                          initial_backoff=0.5, max_attempts=6, on_event=on_event)
        try:
            chain = await client.sign(agent_csr(key, WORKLOAD_ID), 3600)
        finally:
            await client.close()
            if started:
                await started[0]
        validate_response(chain, key, WORKLOAD_ID)
        codes = [d["code"] for kind, d in events if kind == "ca_call"]
        assert codes[0] == "UNAVAILABLE" and codes[-1] == "OK"
        assert set(codes[:-1]) == {"UNAVAILABLE"}

    try:
        run(main())
    finally:
        ca.stop()


def test_client_certificate_files_are_reread(shared_ca, tmp_path):
    """A VM presents a client certificate (mTLS port, no token); replacing
    the files changes the identity on the next call."""
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    token = tmp_path / "token"

    async def identity_pair(ns: str) -> None:
        token.write_text(service_account_token(ns, "vm", "vm-1"))
        key = new_key("ec-p256")
        async with _client(shared_ca, token_file=token) as bootstrap:
            chain = await bootstrap.sign(agent_csr(key, WORKLOAD_ID), 3600)
        cert_file.write_text("".join(chain[:-1]))
        key_file.write_bytes(private_key_pem(key))

    async def main():
        await identity_pair("vm-one")
        mtls = CAClient(f"localhost:{shared_ca.server.ports['mtls']}", root_pem=shared_ca.root_pem,
                        token_file=None, cluster_id="Kubernetes", client_cert=(cert_file, key_file), timeout=10)
        try:
            csr = agent_csr(new_key("ec-p256"), WORKLOAD_ID)
            assert _uris((await mtls.sign(csr, 3600))[0]) == ["spiffe://cluster.local/ns/vm-one/sa/vm"]
            await identity_pair("vm-two")
            assert _uris((await mtls.sign(csr, 3600))[0]) == ["spiffe://cluster.local/ns/vm-two/sa/vm"]
        finally:
            await mtls.close()

    run(main())


# -- the exact request, and the retry rule, against a recording server ---------------------------------------------
class Recorder(istio_ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self) -> None:
        self.ca = LocalCA()
        self.failures: list[grpc.StatusCode] = []
        self.calls: list[tuple[istio_ca_pb2.IstioCertificateRequest, dict[str, str]]] = []

    async def CreateCertificate(self, request, context):
        self.calls.append((request, dict(context.invocation_metadata())))
        if self.failures:
            await context.abort(self.failures.pop(0), "injected")
        return istio_ca_pb2.IstioCertificateResponse(cert_chain=await self.ca.sign(request.csr, 60))


async def _recording_server() -> tuple[grpc.aio.Server, Recorder, str]:
    server = grpc.aio.server()
    recorder = Recorder()
    istio_ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, recorder, f"127.0.0.1:{port}"


def test_request_shape(tmp_path):
    token = tmp_path / "token"
    token.write_text("jwt-1\n")

    async def main():
        server, recorder, address = await _recording_server()
        client = CAClient(address, root_pem=None, token_file=token, cluster_id="cluster-7", cert_signer="",
                          extra_headers={"X-Tenant": "blue"})
        try:
            csr = agent_csr(new_key("ec-p256"), WORKLOAD_ID)
            await client.sign(csr, 7200)
            token.unlink()
            await client.sign(csr, 60, impersonate="spiffe://cluster.local/ns/shop/sa/cart")
        finally:
            await client.close()
            await server.stop(None)
        (first, h1), (second, h2) = recorder.calls
        assert first.csr == csr.decode() and first.validity_duration == 7200
        assert dict(first.metadata) == {"CertSigner": ""}
        assert h1["authorization"] == "Bearer jwt-1" and h1["clusterid"] == "cluster-7" and h1["x-tenant"] == "blue"
        assert "authorization" not in h2 and h2["clusterid"] == "cluster-7"
        assert dict(second.metadata) == {"CertSigner": "",
                                         "ImpersonatedIdentity": "spiffe://cluster.local/ns/shop/sa/cart"}
        assert second.validity_duration == 60

    run(main())


def test_port_15010_means_plaintext():
    assert CAClient("istiod.istio-system.svc:15010", root_pem=b"unused").plaintext
    assert CAClient("istiod.istio-system.svc:15012", root_pem=None).plaintext
    assert not CAClient("istiod.istio-system.svc:15012", root_pem=b"root").plaintext


RETRYABLE = [grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE]
NOT_RETRIED = [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNKNOWN]


@pytest.mark.parametrize("code", RETRYABLE, ids=lambda c: c.name)
def test_retryable_codes(code):
    async def main():
        server, recorder, address = await _recording_server()
        client = CAClient(address, initial_backoff=0.01)
        try:
            key = new_key("ec-p256")
            recorder.failures = [code] * 4          # the fifth call succeeds
            chain = await client.sign(agent_csr(key, WORKLOAD_ID), 60)
            validate_response(chain, key, WORKLOAD_ID)
            assert len(recorder.calls) == 5
            recorder.failures = [code] * 5          # five failures: given up after five calls
            with pytest.raises(CARequestFailed) as failure:
                await client.sign(agent_csr(key, WORKLOAD_ID), 60)
            assert failure.value.code == code and failure.value.attempts == 5
            assert len(recorder.calls) == 10
        finally:
            await client.close()
            await server.stop(None)

    run(main())


@pytest.mark.parametrize("code", NOT_RETRIED, ids=lambda c: c.name)
def test_codes_never_retried(code):
    async def main():
        server, recorder, address = await _recording_server()
        client = CAClient(address, initial_backoff=0.01)
        try:
            recorder.failures = [code]
            with pytest.raises(CARequestFailed) as failure:
                await client.sign(agent_csr(new_key("ec-p256"), WORKLOAD_ID), 60)
            assert failure.value.code == code and failure.value.attempts == 1
            assert len(recorder.calls) == 1
        finally:
            await client.close()
            await server.stop(None)

    run(main())


def test_backoff_is_exponential_from_the_initial_delay():
    async def main():
        server, recorder, address = await _recording_server()
        delays = []
        client = CAClient(address, initial_backoff=0.02,
                          on_event=lambda kind, name, **d: delays.append(d["delay"]) if kind == "ca_retry" else None)
        try:
            recorder.failures = [grpc.StatusCode.UNAVAILABLE] * 5
            with pytest.raises(CARequestFailed):
                await client.sign(agent_csr(new_key("ec-p256"), WORKLOAD_ID), 60)
        finally:
            await client.close()
            await server.stop(None)
        assert len(delays) == 4
        for n, delay in enumerate(delays):
            assert 0.02 * 2 ** n * 0.9 <= delay <= 0.02 * 2 ** n * 1.1

    run(main())


# -- response checks ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_response(shared_ca):
    async def main():
        key = new_key("ec-p256")
        async with _client(shared_ca) as client:
            return key, await client.sign(agent_csr(key, WORKLOAD_ID), 3600)

    return run(main())


def test_real_response_validates(real_response):
    key, chain = real_response
    leaf, root = validate_response(chain, key, WORKLOAD_ID)
    assert root == chain[-1]
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()


def _other_root_pem() -> str:
    return make_authority("cluster.local").pem


@pytest.mark.parametrize("tamper,message", [
    (lambda chain, key: (chain[:1], key), "at least 2"),
    (lambda chain, key: ([chain[0], ""], key), "newline"),
    (lambda chain, key: ([chain[0].rstrip("\n"), chain[1]], key), "newline"),
    (lambda chain, key: (chain, new_key("ec-p256")), "public key"),
    (lambda chain, key: ([chain[0], _other_root_pem()], key), "does not verify"),
    (lambda chain, key: ([chain[0], chain[0], chain[1]], key), "did not issue"),
    (lambda chain, key: ([chain[0], chain[1] + chain[1], chain[1]], key), "exactly one"),
    (lambda chain, key: (["-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n", chain[1]], key),
     "not PEM"),
    (lambda chain, key: ([chain[0], "garbage\n"], key), "not PEM"),
], ids=["one-element", "empty-root", "no-newline", "other-key", "other-root", "leaf-as-middle", "two-in-middle",
        "bogus-der", "bogus-root"])
def test_bad_responses_rejected(real_response, tamper, message):
    key, chain = real_response
    bad_chain, local_key = tamper(list(chain), key)
    with pytest.raises(InvalidCAResponse, match=message):
        validate_response(bad_chain, local_key, WORKLOAD_ID)


def test_wrong_spiffe_id_rejected(real_response):
    key, chain = real_response
    with pytest.raises(InvalidCAResponse, match="URI SAN"):
        validate_response(chain, key, "spiffe://cluster.local/ns/payments/sa/other")


def test_expired_leaf_rejected(real_response):
    key, chain = real_response
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    with pytest.raises(InvalidCAResponse, match="not valid now"):
        validate_response(chain, key, WORKLOAD_ID, now=leaf.not_valid_after_utc.timestamp() + 1)


def test_intermediate_and_multi_root_bundle():
    async def main():
        ca = LocalCA()
        ca.intermediate = make_authority("intermediate", ca.root)
        key = new_key("rsa-2048")
        chain = await ca.sign(agent_csr(key, WORKLOAD_ID), 600)
        chain[-1] = _other_root_pem() + chain[-1]                 # two roots; ours second
        _leaf, root = validate_response(chain, key, WORKLOAD_ID)
        assert root.count("BEGIN CERTIFICATE") == 2
        # the intermediate missing: the leaf does not chain to the bundle
        with pytest.raises(InvalidCAResponse):
            validate_response([chain[0], chain[-1]], key, WORKLOAD_ID)
        # a non-CA certificate in the middle is refused even if names line up
        with pytest.raises(InvalidCAResponse):
            validate_response([chain[0], chain[0], chain[-1]], key, WORKLOAD_ID)

    run(main())


def test_leaf_signed_by_someone_else_with_the_roots_name():
    async def main():
        ca = LocalCA()
        impostor = LocalCA(root=make_authority("root-1"))           # same subject, another key
        key = new_key("ec-p256")
        chain = await impostor.sign(agent_csr(key, WORKLOAD_ID), 600)
        with pytest.raises(InvalidCAResponse, match="does not verify"):
            validate_response([chain[0], ca.root.pem], key, WORKLOAD_ID)

    run(main())

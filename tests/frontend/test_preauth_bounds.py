"""Work before authentication is bounded (issue 13), through a real `fastca
serve` and a stand-in Kubernetes API server that counts its TokenReviews:
refused tokens are remembered briefly, calls awaiting a review are capped
per peer address, bulk calls are capped and every element spends the
identity's rate (on by default), and request metadata is bounded and never
echoed. docs/reliability.md, cases 1 and 5."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from google.protobuf import struct_pb2

from fastca.proto import bulk_pb2, bulk_pb2_grpc, istio_ca_pb2, istio_ca_pb2_grpc
from tests.authn._https import FakeHttpsServer, Request, Response
from tests.conftest import agent_csrs
from tests.frontend.conftest import (_token_review, init_state, service_account_token, start_server,
                                     tokenreview_config, write_config)

REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
PENDING_CAP = 8
REVIEW_DELAY_S = 0.5


class CountingApiServer:
    """The e2e tests' TokenReview judge, slowed down (so calls pile up
    awaiting it) and counting the reviews of each token. Tokens starting
    "down." get HTTP 503: the API server gave no verdict."""

    def __init__(self) -> None:
        self.reviews: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        if not request.path.startswith(REVIEW_PATH):
            return Response(404, {"kind": "Status", "code": 404})
        token = request.json()["spec"]["token"]
        with self.lock:
            self.reviews[token] = self.reviews.get(token, 0) + 1
        time.sleep(REVIEW_DELAY_S)
        if token.startswith("down."):
            return Response(503, {"kind": "Status", "code": 503})
        return _token_review(request)

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(n for token, n in self.reviews.items() if token.startswith(prefix))


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    base = tmp_path_factory.mktemp("bounded")
    judge = CountingApiServer()
    with FakeHttpsServer(base, judge) as api:
        state = init_state(base / "state")
        # Defaults everywhere (rate limit, bulk cap, metadata bounds, the
        # rejection memory) except a smaller pending cap, to see it bite.
        write_config(state, {"authn": {"tokenreview": [tokenreview_config(api, base / "apiserver-token")],
                                       "max_pending_per_peer": PENDING_CAP}})
        server = start_server(state)
        server.judge = judge
        channel = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(server.root_pem))
        server.stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(channel)
        server.bulk = bulk_pb2_grpc.BulkCertificateServiceStub(channel)
        try:
            yield server
        finally:
            channel.close()
            assert server.stop() == 0


def _request(csr: bytes | str | None = None, metadata: struct_pb2.Struct | None = None):
    csr = csr if csr is not None else agent_csrs()[0].pem
    return istio_ca_pb2.IstioCertificateRequest(csr=csr.decode() if isinstance(csr, bytes) else csr,
                                                validity_duration=3600, metadata=metadata)


def _headers(token: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}"), ("clusterid", "Kubernetes"), *extra]


def _burst(server, tokens: list[str]) -> list[tuple[grpc.StatusCode, str]]:
    """Every call sent at once on one channel (one peer address)."""
    futures = [server.stub.CreateCertificate.future(_request(), metadata=_headers(t), timeout=30) for t in tokens]
    outcomes = []
    for future in futures:
        error = future.exception()
        outcomes.append((grpc.StatusCode.OK, "") if error is None else (error.code(), error.details()))
    return outcomes


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_200_distinct_bogus_tokens_cost_a_bounded_number_of_token_reviews(bounded):
    outcomes = _burst(bounded, [f"bogus.distinct.{i}" for i in range(200)])
    codes = {code for code, _ in outcomes}
    assert codes <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    reviews = bounded.judge.count("bogus.distinct.")
    # At most PENDING_CAP reviews at a time from this address; the burst is
    # over well within two review times.
    assert 1 <= reviews <= 2 * PENDING_CAP, reviews
    overloaded = [details for code, details in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(overloaded) >= 200 - 2 * PENDING_CAP
    assert f"awaiting authentication (at most {PENDING_CAP} at once)" in overloaded[0]
    assert "max_pending_per_peer" in overloaded[0]


def test_200_calls_with_one_bogus_token_cost_exactly_one_token_review(bounded):
    token = "bogus.same.token.x"
    burst = _burst(bounded, [token] * 100)           # concurrent: they share the review in flight
    assert {code for code, _ in burst} <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    started = time.monotonic()
    for _ in range(100):                              # after it: refused from memory, at once
        code, _ = _code(lambda: bounded.stub.CreateCertificate(_request(), metadata=_headers(token), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - started < 100 * REVIEW_DELAY_S / 4
    assert bounded.judge.count(token) == 1
    assert token not in bounded.log_file.read_text()


def test_an_api_server_without_a_verdict_is_unavailable_and_asked_again(bounded):
    token = "down.for.maintenance"
    for _ in range(2):
        code, details = _code(lambda: bounded.stub.CreateCertificate(_request(), metadata=_headers(token),
                                                                      timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE and "retry" in details
    assert bounded.judge.count(token) == 2                # not remembered as a rejection


def test_bulk_calls_are_capped_and_each_element_spends_the_default_rate(bounded):
    token = service_account_token("bulk", "renewer")
    pem = agent_csrs()[0].pem.decode()
    code, details = _code(lambda: bounded.bulk.CreateCertificates(
        bulk_pb2.BulkCertificateRequest(requests=[_request(pem)] * 101), metadata=_headers(token), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 100" in details
    response = bounded.bulk.CreateCertificates(bulk_pb2.BulkCertificateRequest(requests=[_request(pem)] * 25),
                                               metadata=_headers(token), timeout=60)
    # The default rate: a burst of 20 per identity, then one a second.
    assert [r.code for r in response.results] == [0] * 20 + [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]] * 5
    assert "rate limit" in response.results[-1].message
    # A single call for that identity draws on the same bucket.
    code, details = _code(lambda: bounded.stub.CreateCertificate(_request(pem), metadata=_headers(token),
                                                                  timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in details


def test_a_long_header_name_is_invalid_argument_and_never_echoed(bounded):
    token = service_account_token("meta", "key")
    name = "x-" + "k" * 998
    code, details = _code(lambda: bounded.stub.CreateCertificate(
        _request(), metadata=_headers(token, (name, "v")), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "keys up to 256 bytes" in details
    assert "k" * 64 not in details and "k" * 64 not in bounded.log_file.read_text()


@pytest.mark.parametrize("size", [9 * 1024, 12 * 1024])
def test_a_header_value_above_8_kib_is_invalid_argument(bounded, size):
    token = service_account_token("meta", f"value{size}")
    code, details = _code(lambda: bounded.stub.CreateCertificate(
        _request(), metadata=_headers(token, ("x-note", "v" * size)), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "values up to 8192" in details


def test_headers_above_the_list_bound_get_a_status_that_says_so(bounded):
    token = service_account_token("meta", "list")
    extra = [(f"x-note-{i}", "v" * 6000) for i in range(4)]       # each fine, 24 KB in all
    code, details = _code(lambda: bounded.stub.CreateCertificate(_request(), metadata=_headers(token, *extra),
                                                                  timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "16384 bytes in all" in details


def test_a_huge_request_metadata_key_is_invalid_argument_and_never_echoed(bounded):
    token = service_account_token("meta", "struct")
    metadata = struct_pb2.Struct()
    metadata.update({"K" * 200_000: "v"})
    code, details = _code(lambda: bounded.stub.CreateCertificate(_request(metadata=metadata),
                                                                  metadata=_headers(token), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "of 200000 bytes" in details and "longer than the 256 bytes" in details
    assert "K" * 32 not in details
    text = bounded.log_file.read_text()
    assert "K" * 32 not in text and max(len(line) for line in text.splitlines()) < 4096

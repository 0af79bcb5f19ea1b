"""Kubernetes TokenReview against a real HTTPS server speaking the
authentication.k8s.io/v1 API (docs/reliability.md, case 1, 3)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from fastca.authn.config import TokenReviewCluster
from fastca.authn._rejections import RejectionCache
from fastca.authn.caller import PENDING
from fastca.authn.chain import AuthenticatorChain
from fastca.authn.k8s_tokenreview import TokenReviewAuthenticator, token_expiry
from fastca.errors import AuthenticationFailed, AuthenticatorUnavailable, grpc_status_of
from tests.authn._https import FakeHttpsServer, Request, Response
from tests.authn._pki import make_leaf, make_root
from tests.authn._support import TRUST_DOMAIN, FakeClock, request, unsigned_jwt

REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
API_TOKEN = "api-server-credential-of-fastca"


class FakeKubeApi:
    """Judges tokens as the API server would: a known token is valid for its
    audiences; status.audiences is the intersection with spec.audiences."""

    def __init__(self, api_token: str = API_TOKEN) -> None:
        self.api_token = api_token
        self.tokens: dict[str, dict[str, Any]] = {}
        self.status_code = 201
        self.delay = 0.0

    def service_account(self, token: str, namespace: str = "default", account: str = "sleep", *,
                        audiences: tuple[str, ...] = ("istio-ca",), pod: tuple[str, str] | None = ("sleep-1", "uid-1"),
                        groups: list[str] | None = None, username: str | None = None,
                        node: str | None = None) -> None:
        extra = {}
        if pod is not None:
            extra = {"authentication.kubernetes.io/pod-name": [pod[0]],
                     "authentication.kubernetes.io/pod-uid": [pod[1]]}
        if node is not None:                    # Kubernetes 1.30+ also names the pod's node
            extra["authentication.kubernetes.io/node-name"] = [node]
        self.tokens[token] = {
            "audiences": list(audiences),
            "user": {"username": username or f"system:serviceaccount:{namespace}:{account}", "uid": "sa-uid",
                     "groups": groups if groups is not None else
                     ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                     "extra": extra}}

    def __call__(self, req: Request) -> Response:
        if req.path != REVIEW_PATH or req.method != "POST":
            return Response(404, {"kind": "Status", "code": 404})
        if req.headers.get("authorization") != f"Bearer {self.api_token}":
            return Response(401, {"kind": "Status", "code": 401})
        review = req.json()
        assert review["apiVersion"] == "authentication.k8s.io/v1" and review["kind"] == "TokenReview"
        spec = review["spec"]
        known = self.tokens.get(spec["token"])
        if "raw_status" in (known or {}):
            status = known["raw_status"]
        elif known is None:
            status = {"authenticated": False, "error": "invalid bearer token"}
        else:
            audiences = [a for a in spec.get("audiences", []) if a in known["audiences"]]
            if not audiences:
                status = {"authenticated": False, "error": "token audiences are invalid for the target audiences"}
            else:
                status = {"authenticated": True, "user": known["user"], "audiences": audiences}
        return Response(self.status_code, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                           "metadata": {"creationTimestamp": None}, "spec": spec, "status": status},
                        delay=self.delay)


@pytest.fixture
def api(tmp_path: Path):
    fake = FakeKubeApi()
    with FakeHttpsServer(tmp_path, fake) as server:
        server.fake = fake
        yield server


def cluster(server: FakeHttpsServer, tmp_path: Path, **overrides: Any) -> TokenReviewCluster:
    token_file = tmp_path / "api-token"
    if not token_file.exists():
        token_file.write_text(API_TOKEN + "\n")
    fields = dict(cluster_id="", api_server=server.url, ca_file=str(server.ca_file), token_file=str(token_file))
    fields.update(overrides)
    return TokenReviewCluster(**fields)


def sa_token(name: str = "t", exp: float | None = None) -> str:
    claims: dict[str, Any] = {"iss": "https://kubernetes.default.svc", "sub": f"system:serviceaccount:default:{name}",
                              "aud": ["istio-ca"]}
    if exp is not None:
        claims["exp"] = exp
    return unsigned_jwt(claims)


def run(coro_fn):
    return asyncio.run(coro_fn())


def test_valid_service_account_token(api, tmp_path):
    token = sa_token()
    api.fake.service_account(token, "default", "sleep", pod=("sleep-7f69474bf9-6pmf5", "bca5b2e9"), node="node-7")

    async def go():
        auth = TokenReviewAuthenticator([cluster(api, tmp_path, cluster_id="Kubernetes")], trust_domain=TRUST_DOMAIN)
        try:
            return await auth.authenticate(request(token=token, cluster_id="Kubernetes"))
        finally:
            await auth.aclose()

    caller = run(go)
    assert caller.identities == ("spiffe://cluster.local/ns/default/sa/sleep",)
    assert caller.credential_type == "k8s-tokenreview"
    k8s = caller.kubernetes
    assert (k8s.namespace, k8s.service_account, k8s.pod_name, k8s.pod_uid, k8s.cluster_id, k8s.node_name) == (
        "default", "sleep", "sleep-7f69474bf9-6pmf5", "bca5b2e9", "Kubernetes", "node-7")
    [sent] = api.requests_to(REVIEW_PATH)
    assert sent.json()["spec"] == {"token": token, "audiences": ["istio-ca"]}
    assert sent.headers["content-type"].startswith("application/json")


def test_no_token_is_not_this_authenticators_business(api, tmp_path):
    async def go():
        auth = TokenReviewAuthenticator([cluster(api, tmp_path)], trust_domain=TRUST_DOMAIN)
        try:
            return (await auth.authenticate(request()),
                    await auth.authenticate(request(authorization="Basic dXNlcjpwdw==")))
        finally:
            await auth.aclose()

    assert run(go) == (None, None)
    assert api.requests == []


def test_cache_spares_the_api_server_and_expires(api, tmp_path):
    clock = FakeClock()
    first, second = sa_token("a"), sa_token("b")
    api.fake.service_account(first, account="a")
    api.fake.service_account(second, account="b")

    async def go():
        auth = TokenReviewAuthenticator([cluster(api, tmp_path)], trust_domain=TRUST_DOMAIN, cache_ttl=30, clock=clock)
        try:
            one = await auth.authenticate(request(token=first))
            assert len(api.requests) == 1
            again = await auth.authenticate(request(token=first))         # within TTL: no request
            assert again == one and len(api.requests) == 1
            await auth.authenticate(request(token=second))                # another token: a request
            assert len(api.requests) == 2
            clock.advance(31)                                             # TTL over: asked again
            await auth.authenticate(request(token=first))
            assert len(api.requests) == 3
        finally:
            await auth.aclose()

    run(go)


def test_a_fresh_review_bypasses_the_cache_and_says_so(api, tmp_path):
    """Risk policy's fresh_token: ``fresh=True`` asks the API server even with
    a cached verdict; a verdict made for the call is ``judged_now``, one from
    the cache is not; a token revoked since it was cached fails the fresh
    review, through the chain too."""
    token = sa_token("risky")
    api.fake.service_account(token, account="risky")

    async def go():
        auth = TokenReviewAuthenticator([cluster(api, tmp_path)], trust_domain=TRUST_DOMAIN, cache_ttl=30)
        chain = AuthenticatorChain([auth])
        try:
            reviewed = await auth.authenticate(request(token=token))
            assert reviewed.judged_now and len(api.requests) == 1
            cached = await auth.authenticate(request(token=token))
            assert not cached.judged_now and len(api.requests) == 1
            assert not chain.authenticate_now(request(token=token)).judged_now
            fresh = await chain.authenticate(request(token=token), fresh=True)
            assert fresh.judged_now and fresh.identities == reviewed.identities and len(api.requests) == 2
            del api.fake.tokens[token]                      # revoked: the cache still says yes...
            assert chain.authenticate_now(request(token=token)).identities == reviewed.identities
            memo: dict = {}
            remembering = dataclasses.replace(request(token=token), connection_cache=memo)
            assert chain.authenticate_now(remembering) is not None and memo
            with pytest.raises(AuthenticationFailed):       # ...a fresh review does not
                await chain.authenticate(request(token=token), fresh=True)
            assert len(api.requests) == 3
            # ...and takes the cached acceptance back, on the connection that remembered it too.
            for again in (request(token=token), remembering):
                with pytest.raises(AuthenticationFailed):
                    chain.authenticate_now(again)
            assert len(api.requests) == 3
        finally:
            await auth.aclose()

    run(go)


def test_cache_never_outlives_the_token(api, tmp_path):
    clock = FakeClock()
    token = sa_token("short", exp=clock.now + 5)
    api.fake.service_account(token, account="short")
    assert token_expiry(token) == clock.now + 5

    async def go():
        auth = TokenReviewAuthenticator([cluster(api, tmp_path)], trust_domain=TRUST_DOMAIN, cache_ttl=30, clock=clock)
        try:
            await auth.authenticate(request(token=token))
            clock.advance(3)
            await auth.authenticate(request(token=token))
            assert len(api.requests) == 1
            clock.advance(3)                     # past exp, within the TTL: not served from cache
            api.fake.tokens.pop(token)           # ...and the API server now refuses it
            with pytest.raises(AuthenticationFailed):
                await auth.authenticate(request(token=token))
            assert len(api.requests) == 2
        finally:
            await auth.aclose()

    run(go)


def test_rejections_are_not_accepted_from_cache_and_cache_is_bounded(api, tmp_path):
    clock = FakeClock()
    tokens = [sa_token(f"w{i}") for i in range(4)]
    for i, token in enumerate(tokens):
        api.fake.service_account(token, account=f"w{i}")

    async def go():
        auth = TokenReviewAuthenticator([cluster(api, tmp_path)], trust_domain=TRUST_DOMAIN, cache_size=2, clock=clock,
                                        rejections=RejectionCache(0, 10.0))     # only the positive cache here
        try:
            for _ in range(2):
                with pytest.raises(AuthenticationFailed):
                    await auth.authenticate(request(token="not-a-known-token"))
            assert len(api.requests) == 2 and len(auth.cache) == 0
            for token in tokens:
                await auth.authenticate(request(token=token))
            assert len(auth.cache) == 2
            await auth.authenticate(request(token=tokens[0]))    # evicted (least recently used)
            assert len(api.requests) == 2 + 4 + 1
            await auth.authenticate(request(token=tokens[3]))    # still cached
            assert len(api.requests) == 7
        finally:
            await auth.aclose()

    run(go)


def test_concurrent_requests_with_one_token_share_one_review(api, tmp_path):
    token = sa_token("burst")
    api.fake.service_account(token, account="burst")
    api.fake.delay = 0.2

    async def go():
        auth = TokenReviewAuthenticator([cluster(api, tmp_path)], trust_domain=TRUST_DOMAIN)
        try:
            return await asyncio.gather(*(auth.authenticate(request(token=token)) for _ in range(8)))
        finally:
            await auth.aclose()

    callers = run(go)
    assert len({c.identities for c in callers}) == 1
    assert len(api.requests) == 1


def test_a_burst_of_new_tokens_is_reviewed_a_bounded_number_at_a_time(tmp_path):
    """Hundreds of agents arriving at once (a restart, a scale-up), each with
    its own token: every one is reviewed, never more than
    ``max_concurrent_reviews`` at a time, and several at a time."""
    fake = FakeKubeApi()
    tokens = [sa_token(f"agent-{i}") for i in range(200)]
    for i, token in enumerate(tokens):
        fake.service_account(token, account=f"agent-{i}")
    lock = threading.Lock()
    in_flight = [0, 0]               # now, most seen

    def slow(req: Request) -> Response:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            time.sleep(0.01)
            return fake(req)
        finally:
            with lock:
                in_flight[0] -= 1

    with FakeHttpsServer(tmp_path, slow) as server:
        async def go():
            auth = TokenReviewAuthenticator([cluster(server, tmp_path, max_concurrent_reviews=6)],
                                            trust_domain=TRUST_DOMAIN)
            try:
                return await asyncio.gather(*(auth.authenticate(request(token=t)) for t in tokens))
            finally:
                await auth.aclose()

        callers = run(go)
    assert [c.identities[0].rsplit("/", 1)[1] for c in callers] == [f"agent-{i}" for i in range(200)]
    assert len(server.requests_to(REVIEW_PATH)) == 200
    assert 1 < in_flight[1] <= 6


@pytest.mark.parametrize("case", ["status_audiences_missing", "status_audiences_other", "not_for_our_audience",
                                  "expired", "not_in_serviceaccounts_group", "username_3_parts",
                                  "username_5_parts", "username_not_serviceaccount", "empty_namespace",
                                  "authenticated_string"])
def test_reviews_that_must_not_authenticate(api, tmp_path, case):
    token = sa_token(case)
    user = {"username": "system:serviceaccount:default:sleep", "groups": ["system:serviceaccounts"]}
    if case == "status_audiences_missing":       # an API server that ignored spec.audiences
        api.fake.tokens[token] = {"raw_status": {"authenticated": True, "user": user}}
    elif case == "status_audiences_other":
        api.fake.tokens[token] = {"raw_status": {"authenticated": True, "user": user, "audiences": ["kubernetes"]}}
    elif case == "not_for_our_audience":         # the token's aud is another service's
        api.fake.service_account(token, audiences=("https://kubernetes.default.svc",))
    elif case == "expired":
        api.fake.tokens[token] = {"raw_status": {"authenticated": False, "error": "token has expired"}}
    elif case == "not_in_serviceaccounts_group":
        api.fake.service_account(token, groups=["system:authenticated"])
    elif case == "username_3_parts":
        api.fake.service_account(token, username="system:serviceaccount:default", groups=["system:serviceaccounts"])
    elif case == "username_5_parts":
        api.fake.service_account(token, username="system:serviceaccount:default:sleep:x")
    elif case == "username_not_serviceaccount":
        api.fake.service_account(token, username="system:node:node-1:x")
    elif case == "empty_namespace":
        api.fake.service_account(token, username="system:serviceaccount::sleep")
    elif case == "authenticated_string":
        api.fake.tokens[token] = {"raw_status": {"authenticated": "true", "user": user, "audiences": ["istio-ca"]}}

    async def go():
        auth = TokenReviewAuthenticator([cluster(api, tmp_path)], trust_domain=TRUST_DOMAIN)
        try:
            with pytest.raises(AuthenticationFailed) as info:
                await auth.authenticate(request(token=token))
            return info.value
        finally:
            await auth.aclose()

    error = run(go)
    assert error.public_message == "request authenticate failure"
    assert token not in str(error)


@pytest.mark.parametrize("fault", ["http_500", "timeout", "not_json", "refused", "wrong_server_ca", "api_401"])
def test_api_server_faults_are_unavailable_not_exceptions_and_not_remembered(api, tmp_path, fault, caplog):
    token = sa_token("fault")
    api.fake.service_account(token)
    overrides: dict[str, Any] = {}
    if fault == "http_500":
        api.fake.status_code = 500
    elif fault == "timeout":
        api.fake.delay = 2.0
        overrides["timeout_seconds"] = 0.3
    elif fault == "not_json":
        api.handler = lambda req: Response(201, b"<html>proxy error</html>")
    elif fault == "refused":
        overrides["api_server"] = "https://127.0.0.1:1"
    elif fault == "wrong_server_ca":
        other = tmp_path / "other-ca.pem"
        other.write_bytes(make_root("someone else").pem)
        overrides["ca_file"] = str(other)
    elif fault == "api_401":
        (tmp_path / "api-token").write_text("stale-credential")

    async def go():
        auth = TokenReviewAuthenticator([cluster(api, tmp_path, **overrides)], trust_domain=TRUST_DOMAIN)
        try:
            started = time.monotonic()
            with pytest.raises(AuthenticatorUnavailable) as info:
                await auth.authenticate(request(token=token))
            elapsed = time.monotonic() - started
            # No verdict was had: the next call asks again (retryable), nothing is remembered.
            assert len(auth.rejections) == 0
            assert auth.authenticate_now(request(token=token)) is PENDING
            return info.value, elapsed, repr(auth)
        finally:
            await auth.aclose()

    with caplog.at_level(logging.DEBUG):
        error, elapsed, text = run(go)
    assert elapsed < 1.5
    assert grpc_status_of(error) == "UNAVAILABLE"
    assert token not in str(error) and token not in caplog.text and token not in text


def test_a_refused_token_is_reviewed_once_then_refused_from_memory_until_ttl(api, tmp_path, caplog):
    """200 calls with the same bogus token: one TokenReview. The memory is
    keyed by a hash (the token is not in it) and lasts the configured TTL."""
    clock = FakeClock()
    bogus = sa_token("forged")

    async def go():
        rejections = RejectionCache(100, 10.0, clock)
        auth = TokenReviewAuthenticator([cluster(api, tmp_path)], trust_domain=TRUST_DOMAIN, rejections=rejections)
        try:
            # Concurrent ones share the review; later ones are refused at once.
            first = await asyncio.gather(*(auth.authenticate(request(token=bogus)) for _ in range(100)),
                                         return_exceptions=True)
            assert all(isinstance(e, AuthenticationFailed) for e in first)
            for _ in range(100):
                with pytest.raises(AuthenticationFailed) as info:
                    auth.authenticate_now(request(token=bogus))      # no I/O at all
            assert "refused by the API server within the last 10 s" in str(info.value)
            assert len(api.requests_to(REVIEW_PATH)) == 1
            assert bogus.encode() not in repr(rejections._entries).encode()
            clock.advance(10.5)
            assert auth.authenticate_now(request(token=bogus)) is PENDING
            with pytest.raises(AuthenticationFailed):
                await auth.authenticate(request(token=bogus))
            assert len(api.requests_to(REVIEW_PATH)) == 2
        finally:
            await auth.aclose()

    with caplog.at_level(logging.DEBUG):
        run(go)
    assert bogus not in caplog.text


def test_rejection_memory_is_bounded_and_per_cluster(api, tmp_path):
    clock = FakeClock()

    async def go():
        rejections = RejectionCache(3, 10.0, clock)
        auth = TokenReviewAuthenticator([cluster(api, tmp_path), cluster(api, tmp_path, cluster_id="other")],
                                        trust_domain=TRUST_DOMAIN, rejections=rejections)
        try:
            for i in range(5):
                with pytest.raises(AuthenticationFailed):
                    await auth.authenticate(request(token=f"bogus-{i}"))
            assert len(rejections) == 3                        # LRU: the oldest two are gone
            with pytest.raises(AuthenticationFailed):
                await auth.authenticate(request(token="bogus-0"))
            assert len(api.requests_to(REVIEW_PATH)) == 6
            with pytest.raises(AuthenticationFailed):
                await auth.authenticate(request(token="bogus-4"))      # still remembered
            assert len(api.requests_to(REVIEW_PATH)) == 6
            # A refusal by one cluster says nothing of another's.
            with pytest.raises(AuthenticationFailed):
                await auth.authenticate(request(token="bogus-4", cluster_id="other"))
            assert len(api.requests_to(REVIEW_PATH)) == 7
        finally:
            await auth.aclose()

    run(go)


def test_token_file_is_reread_on_every_call(api, tmp_path):
    first, second = sa_token("one"), sa_token("two")
    api.fake.service_account(first, account="one")
    api.fake.service_account(second, account="two")

    async def go():
        auth = TokenReviewAuthenticator([cluster(api, tmp_path)], trust_domain=TRUST_DOMAIN)
        try:
            await auth.authenticate(request(token=first))
            api.fake.api_token = "rotated-credential"
            (tmp_path / "api-token").write_text("rotated-credential")
            caller = await auth.authenticate(request(token=second))
        finally:
            await auth.aclose()
        return caller

    assert run(go).identities == ("spiffe://cluster.local/ns/default/sa/two",)
    assert [r.headers["authorization"] for r in api.requests] == [f"Bearer {API_TOKEN}", "Bearer rotated-credential"]


def test_clusterid_selects_the_api_server(tmp_path):
    token = sa_token("multi")
    east_fake, west_fake = FakeKubeApi(), FakeKubeApi()
    east_fake.service_account(token, "east-ns", "app")
    west_fake.service_account(token, "west-ns", "app")
    (tmp_path / "east").mkdir()
    (tmp_path / "west").mkdir()
    with FakeHttpsServer(tmp_path / "east", east_fake) as east, FakeHttpsServer(tmp_path / "west", west_fake) as west:
        async def go():
            auth = TokenReviewAuthenticator([cluster(east, tmp_path, cluster_id="east"),
                                             cluster(west, tmp_path, cluster_id="west")], trust_domain=TRUST_DOMAIN)
            try:
                by_default = await auth.authenticate(request(token=token))
                by_name = await auth.authenticate(request(token=token, cluster_id="west"))
                with pytest.raises(AuthenticationFailed, match="unknown cluster"):
                    await auth.authenticate(request(token=token, cluster_id="north"))
                return by_default, by_name
            finally:
                await auth.aclose()

        by_default, by_name = run(go)
    assert by_default.identities == ("spiffe://cluster.local/ns/east-ns/sa/app",)
    assert by_name.identities == ("spiffe://cluster.local/ns/west-ns/sa/app",)
    assert by_name.kubernetes.cluster_id == "west"
    assert len(east.requests) == 1 and len(west.requests) == 1


def test_client_certificate_credentials(tmp_path):
    client_ca = make_root("api client CA")
    leaf, key = make_leaf(client_ca, None)
    (tmp_path / "client.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "client.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    token = sa_token("mtls")
    fake = FakeKubeApi()
    fake.service_account(token)
    fake.api_token = None  # a client certificate, no bearer credential
    fake_handler = fake.__call__

    def handler(req: Request) -> Response:
        assert "authorization" not in req.headers
        req.headers["authorization"] = "Bearer None"
        return fake_handler(req)

    with FakeHttpsServer(tmp_path, handler, client_ca=client_ca.pem) as server:
        async def go():
            auth = TokenReviewAuthenticator([TokenReviewCluster(
                api_server=server.url, ca_file=str(server.ca_file), client_cert_file=str(tmp_path / "client.pem"),
                client_key_file=str(tmp_path / "client.key"))], trust_domain=TRUST_DOMAIN)
            try:
                return await auth.authenticate(request(token=token))
            finally:
                await auth.aclose()

        assert run(go).identities == ("spiffe://cluster.local/ns/default/sa/sleep",)
        assert len(server.requests) == 1

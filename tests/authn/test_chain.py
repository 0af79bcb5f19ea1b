"""istiod's authenticator order and what the chain does with failures
(docs/reliability.md, case 1)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from fastca.authn.caller import Caller, RequestInfo
from fastca.authn.chain import AuthenticatorChain
from fastca.authn.config import AuthnConfig, build_authenticators
from fastca.errors import AuthenticationFailed
from tests.authn._https import FakeHttpsServer
from tests.authn._pki import make_root
from tests.authn._support import TRUST_DOMAIN, request
from tests.authn.test_oidc import ISSUER, FakeIssuer, signed
from tests.authn.test_tokenreview import API_TOKEN, FakeKubeApi, sa_token

ALICE = Caller(identities=("spiffe://cluster.local/ns/a/sa/alice",), credential_type="fixed")


class Fixed:
    """Test doubles for outcomes real authenticators produce elsewhere in
    this suite; the "raises" one injects a bug no real one has."""

    def __init__(self, name: str, outcome) -> None:
        self.name, self.outcome, self.calls = name, outcome, 0

    async def authenticate(self, request: RequestInfo):
        self.calls += 1
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def run_chain(*authenticators, req=None):
    return asyncio.run(AuthenticatorChain(authenticators).authenticate(req or request()))


def test_first_caller_wins_and_later_ones_are_not_asked():
    none, fails, wins, never = (Fixed("none", None), Fixed("fails", AuthenticationFailed("bad")),
                                Fixed("wins", ALICE), Fixed("never", ALICE))
    assert run_chain(none, fails, wins, never) is ALICE
    assert (none.calls, fails.calls, wins.calls, never.calls) == (1, 1, 1, 0)


def test_nobody_authenticates_joins_the_reasons_behind_istios_public_message():
    with pytest.raises(AuthenticationFailed) as info:
        run_chain(Fixed("none", None), Fixed("a", AuthenticationFailed("reason one")),
                  Fixed("b", AuthenticationFailed("reason two")))
    assert str(info.value) == "a: reason one; b: reason two"
    assert info.value.public_message == "request authenticate failure"


def test_an_unexpected_exception_is_that_authenticators_failure(caplog):
    buggy = Fixed("buggy", RuntimeError("secret-looking text"))
    with caplog.at_level(logging.ERROR):
        assert run_chain(buggy, Fixed("wins", ALICE)) is ALICE
    assert "buggy" in caplog.text
    with pytest.raises(AuthenticationFailed) as info:
        run_chain(buggy)
    assert str(info.value) == "buggy: unexpected RuntimeError"


def test_a_caller_without_identities_does_not_count():
    empty = Caller(identities=(), credential_type="odd")
    with pytest.raises(AuthenticationFailed, match="no identities"):
        run_chain(Fixed("empty", empty))


def test_cancellation_is_not_swallowed():
    with pytest.raises(asyncio.CancelledError):
        run_chain(Fixed("cancelled", asyncio.CancelledError()), Fixed("wins", ALICE))


@pytest.fixture
def servers(tmp_path: Path):
    kube, oidc = FakeKubeApi(), FakeIssuer()
    (tmp_path / "kube").mkdir()
    (tmp_path / "oidc").mkdir()
    (tmp_path / "api-token").write_text(API_TOKEN)
    with FakeHttpsServer(tmp_path / "kube", kube) as kube_server, FakeHttpsServer(tmp_path / "oidc", oidc) as oidc_server:
        config = AuthnConfig.model_validate({
            "tokenreview": [{"api_server": kube_server.url, "ca_file": str(kube_server.ca_file),
                             "token_file": "api-token"}],
            "oidc": [{"issuer": ISSUER, "jwks_uri": f"{oidc_server.url}/jwks", "jwks_ca_file": str(oidc_server.ca_file)}],
            "xfcc": {"trusted_cidrs": ["10.0.0.0/8"]},
        })
        yield config, kube, kube_server, oidc_server, tmp_path


def build(config: AuthnConfig, base_dir: Path) -> AuthenticatorChain:
    return build_authenticators(config, trust_domain=TRUST_DOMAIN, roots=[make_root().certificate], base_dir=base_dir)


def test_no_credentials_anywhere_is_unauthenticated_and_asks_no_server(servers):
    config, _, kube_server, oidc_server, base = servers
    chain = build(config, base)
    assert chain.names == ("mtls", "oidc", "tokenreview", "xfcc")

    async def go():
        try:
            with pytest.raises(AuthenticationFailed) as info:
                await chain.authenticate(request(peer_ip="10.1.1.1", clusterid="Kubernetes"))
            return info.value
        finally:
            await chain.aclose()

    error = asyncio.run(go())
    assert str(error) == "no credentials"
    assert error.public_message == "request authenticate failure"
    assert kube_server.requests == [] and oidc_server.requests == []


def test_each_credential_finds_its_authenticator_in_one_chain(servers):
    config, kube, kube_server, oidc_server, base = servers
    k8s_token = sa_token("kube")
    kube.service_account(k8s_token, "team", "kube")
    chain = build(config, base)

    async def go():
        try:
            by_oidc = await chain.authenticate(request(token=signed()))
            # A cluster token is not the OIDC issuer's: OIDC declines, TokenReview accepts.
            by_review = await chain.authenticate(request(token=k8s_token))
            by_xfcc = await chain.authenticate(request(peer_ip="10.9.9.9",
                                                       x_forwarded_client_cert="URI=spiffe://cluster.local/ns/vm/sa/x"))
            with pytest.raises(AuthenticationFailed) as info:
                await chain.authenticate(request(token="garbage", x_forwarded_client_cert="URI=x", peer_ip="8.8.8.8"))
            return by_oidc, by_review, by_xfcc, info.value
        finally:
            await chain.aclose()

    by_oidc, by_review, by_xfcc, failure = asyncio.run(go())
    assert (by_oidc.credential_type, by_review.credential_type, by_xfcc.credential_type) == (
        "oidc", "k8s-tokenreview", "xfcc")
    assert by_review.identities == ("spiffe://cluster.local/ns/team/sa/kube",)
    reasons = str(failure)
    assert reasons.startswith("oidc: ") and "; tokenreview: " in reasons and "; xfcc: " in reasons
    assert "garbage" not in reasons
    assert json.loads(kube_server.requests[-1].body)["spec"]["token"] == "garbage"


class Slow:
    """An authenticator that must wait (as a TokenReview not cached does) until released."""

    name = "slow"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def authenticate(self, request: RequestInfo):
        self.started += 1
        await self.release.wait()
        raise AuthenticationFailed("not this one")


def test_calls_pending_authentication_are_capped_per_peer_before_any_network_work():
    from fastca.errors import Overloaded, grpc_status_of

    async def go():
        slow = Slow()
        chain = AuthenticatorChain([slow], max_pending_per_peer=3)
        first = [asyncio.ensure_future(chain.authenticate(request(token="t", peer_ip="10.0.0.1"))) for _ in range(3)]
        await asyncio.sleep(0)
        assert chain.pending("10.0.0.1") == 3
        with pytest.raises(Overloaded) as info:
            await chain.authenticate(request(token="t", peer_ip="10.0.0.1"))
        # Another address is not held back by this one.
        other = asyncio.ensure_future(chain.authenticate(request(token="t", peer_ip="10.0.0.2")))
        await asyncio.sleep(0)
        assert slow.started == 4
        slow.release.set()
        outcomes = await asyncio.gather(*first, other, return_exceptions=True)
        assert all(isinstance(o, AuthenticationFailed) for o in outcomes)
        assert chain.pending("10.0.0.1") == 0 and chain._pending == {}
        # Slots come back: the peer may try again.
        with pytest.raises(AuthenticationFailed):
            await chain.authenticate(request(token="t", peer_ip="10.0.0.1"))
        return info.value

    error = asyncio.run(go())
    assert grpc_status_of(error) == "RESOURCE_EXHAUSTED"
    assert "at most 3 at once" in error.public_message and "max_pending_per_peer" in error.public_message


def test_calls_judged_at_once_take_no_pending_place():
    class Now:
        name = "now"

        def authenticate_now(self, request):
            return ALICE

    async def go():
        chain = AuthenticatorChain([Now()], max_pending_per_peer=1)
        return [await chain.authenticate(request(token="t")) for _ in range(5)]

    assert asyncio.run(go()) == [ALICE] * 5


def test_an_unanswered_check_makes_the_verdict_unavailable_unless_another_accepts():
    from fastca.errors import AuthenticatorUnavailable, grpc_status_of

    down = Fixed("tokenreview", AuthenticatorUnavailable("TokenReview timed out"))
    with pytest.raises(AuthenticatorUnavailable) as info:
        run_chain(Fixed("oidc", AuthenticationFailed("issuer differs")), down)
    assert grpc_status_of(info.value) == "UNAVAILABLE"
    assert "TokenReview timed out" in str(info.value) and "issuer differs" in str(info.value)
    assert run_chain(down, Fixed("wins", ALICE)) is ALICE

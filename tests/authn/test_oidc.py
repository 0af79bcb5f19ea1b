"""OIDC JWTs verified against a JWKS served over real HTTPS (docs/reliability.md, case 4)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fastca.authn.config import OidcProvider
from fastca.authn.oidc import OidcAuthenticator
from fastca.errors import AuthenticationFailed
from tests.authn._https import FakeHttpsServer, Request, Response
from tests.authn._support import TRUST_DOMAIN, FakeClock, b64url, request

ISSUER = "https://issuer.example.com/clusters/one"
RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "use": "sig"})
EC = ECKey.generate_key("P-256", parameters={"kid": "ec-1", "use": "sig"})
ROGUE = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})


def public_jwks(*keys: Any) -> dict[str, Any]:
    return {"keys": [k.as_dict(private=False) for k in keys]}


class FakeIssuer:
    def __init__(self) -> None:
        self.jwks = public_jwks(RSA, EC)
        self.status = 200

    def __call__(self, req: Request) -> Response:
        if req.path != "/jwks":
            return Response(404, {})
        return Response(self.status, self.jwks)


@pytest.fixture
def issuer(tmp_path: Path):
    fake = FakeIssuer()
    with FakeHttpsServer(tmp_path, fake) as server:
        server.fake = fake
        yield server


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": ["istio-ca"], "sub": "system:serviceaccount:default:sleep", "iat": now,
            "nbf": now, "exp": now + 600,
            "kubernetes.io": {"namespace": "default", "pod": {"name": "sleep-7f69474bf9-6pmf5", "uid": "bca5b2e9"},
                              "serviceaccount": {"name": "sleep", "uid": "sa-uid"}}}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(key: Any = RSA, alg: str = "RS256", header: dict[str, Any] | None = None, **claim_overrides: Any) -> str:
    head = {"alg": alg, "kid": key.kid}
    head.update(header or {})
    return jwt.encode(head, claims(**claim_overrides), key, algorithms=[alg])


def provider(issuer: FakeHttpsServer, **overrides: Any) -> OidcProvider:
    fields: dict[str, Any] = dict(issuer=ISSUER, jwks_uri=f"{issuer.url}/jwks", jwks_ca_file=str(issuer.ca_file))
    fields.update(overrides)
    return OidcProvider(**fields)


def check(auth: OidcAuthenticator, *tokens: str) -> list[Any]:
    """Authenticate each token in one event loop: the Caller or the AuthenticationFailed."""
    async def go():
        out = []
        try:
            for token in tokens:
                try:
                    out.append(await auth.authenticate(request(token=token)))
                except AuthenticationFailed as exc:
                    out.append(exc)
        finally:
            await auth.aclose()
        return out
    return asyncio.run(go())


@pytest.mark.parametrize("key,alg", [(RSA, "RS256"), (EC, "ES256")])
def test_valid_projected_token(issuer, key, alg):
    [caller] = check(OidcAuthenticator(provider(issuer), trust_domain=TRUST_DOMAIN), signed(key, alg))
    assert caller.identities == ("spiffe://cluster.local/ns/default/sa/sleep",)
    assert caller.credential_type == "oidc"
    k8s = caller.kubernetes
    assert (k8s.namespace, k8s.service_account, k8s.pod_name, k8s.pod_uid) == (
        "default", "sleep", "sleep-7f69474bf9-6pmf5", "bca5b2e9")


def test_no_token_is_none(issuer):
    assert asyncio.run(OidcAuthenticator(provider(issuer), trust_domain=TRUST_DOMAIN).authenticate(request())) is None
    assert issuer.requests == []


def _alg_none() -> str:
    return ".".join([b64url(json.dumps({"alg": "none", "kid": "rsa-1"}).encode()),
                     b64url(json.dumps(claims()).encode()), ""])


def _hs256_with_public_key() -> str:
    # The classic confusion: HMAC keyed with the PEM text of the public key,
    # which a verifier that lets the token choose the algorithm would accept.
    secret = RSA.as_pem(private=False)
    signing_input = ".".join([b64url(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode()),
                              b64url(json.dumps(claims()).encode())])
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(mac)


def _unknown_crit() -> str:
    # Signed correctly by the right key; joserfc itself refuses to produce
    # such a header, so the signature is made by hand.
    signing_input = ".".join([b64url(json.dumps({"alg": "RS256", "kid": "rsa-1", "crit": ["x-fastca-test"],
                                                 "x-fastca-test": True}).encode()),
                              b64url(json.dumps(claims()).encode())])
    signature = RSA.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(signature)


def _tampered() -> str:
    head, _, sig = signed().split(".")
    forged = b64url(json.dumps(claims(sub="system:serviceaccount:istio-system:istiod")).encode())
    return ".".join([head, forged, sig])


# case -> (token maker, what the refusal must be about)
FORGERIES = {
    "alg_none": (_alg_none, "algorithm 'none'"),
    "hs256_with_public_key": (_hs256_with_public_key, "algorithm 'HS256'"),
    "unknown_crit": (_unknown_crit, "critical"),
    "issuer_prefix": (lambda: signed(iss="https://issuer.example.com/clusters/on"), "issuer"),
    "issuer_suffix": (lambda: signed(iss=ISSUER + "e"), "issuer"),
    "issuer_trailing_slash": (lambda: signed(iss=ISSUER + "/"), "issuer"),
    "kid_unknown": (lambda: signed(header={"kid": "rsa-2"}), "'rsa-2' is not in the issuer's JWKS"),
    "no_kid_several_keys": (lambda: jwt.encode({"alg": "RS256"}, claims(), RSA, algorithms=["RS256"]), "JWKS"),
    "signed_by_another_key_same_kid": (lambda: signed(ROGUE), "signature"),
    "tampered_payload": (_tampered, "signature"),
    "expired": (lambda: signed(exp=int(time.time()) - 60), "expired"),
    "no_exp": (lambda: signed(exp=None), "'exp'"),
    "not_yet_valid": (lambda: signed(nbf=int(time.time()) + 600), "not yet valid"),
    "wrong_aud": (lambda: signed(aud=["https://kubernetes.default.svc"]), "'aud'"),
    "no_aud": (lambda: signed(aud=None), "'aud'"),
    "sub_not_serviceaccount": (lambda: signed(sub="alice"), "sub"),
    "sub_five_parts": (lambda: signed(sub="system:serviceaccount:default:sleep:x"), "sub"),
    "claim_namespace_disagrees": (lambda: signed(**{"kubernetes.io": {"namespace": "istio-system"}}), "disagrees"),
    "alg_not_pinned": (lambda: signed(alg="PS256"), "algorithm 'PS256'"),
    "not_a_jwt": (lambda: "definitely-not-a-jwt", "not a JWS"),
}


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_tokens_that_must_not_authenticate(issuer, case):
    make, reason = FORGERIES[case]
    [outcome] = check(OidcAuthenticator(provider(issuer), trust_domain=TRUST_DOMAIN), make())
    assert isinstance(outcome, AuthenticationFailed), outcome
    assert reason in str(outcome)
    assert outcome.public_message == "request authenticate failure"


def test_alg_pinning_is_what_refuses_an_otherwise_valid_signature(issuer):
    token = signed(EC, "ES256")
    [refused] = check(OidcAuthenticator(provider(issuer, algorithms=["RS256"]), trust_domain=TRUST_DOMAIN), token)
    assert isinstance(refused, AuthenticationFailed) and "algorithm" in str(refused)
    with pytest.raises(ValueError):
        OidcProvider(issuer=ISSUER, jwks_file="x", algorithms=["HS256"])
    with pytest.raises(ValueError):
        OidcProvider(issuer=ISSUER, jwks_file="x", algorithms=["none"])


def test_leeway_is_configurable(issuer):
    token = signed(exp=int(time.time()) - 5)
    accepted, = check(OidcAuthenticator(provider(issuer, leeway_seconds=30), trust_domain=TRUST_DOMAIN), token)
    refused, = check(OidcAuthenticator(provider(issuer, leeway_seconds=0), trust_domain=TRUST_DOMAIN), token)
    assert accepted.identities and isinstance(refused, AuthenticationFailed)


def test_unknown_kid_refetches_at_most_once_per_interval_and_picks_up_rotation(issuer):
    clock = FakeClock(0.0)
    new_key = RSAKey.generate_key(2048, parameters={"kid": "rsa-2"})
    auth = OidcAuthenticator(provider(issuer, jwks_refresh_min_interval_seconds=30), trust_domain=TRUST_DOMAIN,
                             jwks_clock=clock)

    async def go():
        try:
            await auth.authenticate(request(token=signed()))
            assert len(issuer.requests) == 1
            with pytest.raises(AuthenticationFailed):  # the keys were just fetched: no refetch yet
                await auth.authenticate(request(token=signed(new_key)))
            assert len(issuer.requests) == 1
            clock.advance(31)
            for _ in range(3):                         # unknown kid: one refetch, then rate-limited
                with pytest.raises(AuthenticationFailed, match="not in the issuer's JWKS"):
                    await auth.authenticate(request(token=signed(new_key)))
            assert len(issuer.requests) == 2
            issuer.fake.jwks = public_jwks(RSA, EC, new_key)   # the issuer rotates
            with pytest.raises(AuthenticationFailed):          # still within the interval
                await auth.authenticate(request(token=signed(new_key)))
            assert len(issuer.requests) == 2
            clock.advance(31)
            caller = await auth.authenticate(request(token=signed(new_key)))
            assert len(issuer.requests) == 3
            await auth.authenticate(request(token=signed()))      # known kid: no fetch
            assert len(issuer.requests) == 3
            return caller
        finally:
            await auth.aclose()

    assert asyncio.run(go()).identities == ("spiffe://cluster.local/ns/default/sa/sleep",)


def test_tokens_of_another_issuer_cost_no_jwks_fetch(issuer):
    [outcome] = check(OidcAuthenticator(provider(issuer), trust_domain=TRUST_DOMAIN),
                      signed(iss="https://kubernetes.default.svc.cluster.local"))
    assert isinstance(outcome, AuthenticationFailed)
    assert issuer.requests == []


def test_issuer_outage_is_a_failure_and_known_keys_survive_it(issuer):
    clock = FakeClock(0.0)
    auth = OidcAuthenticator(provider(issuer, jwks_max_age_seconds=60), trust_domain=TRUST_DOMAIN, jwks_clock=clock)

    async def go():
        try:
            await auth.authenticate(request(token=signed()))
            issuer.fake.status = 500
            clock.advance(61)                            # stale: refetch fails, the old keys stay
            still = await auth.authenticate(request(token=signed()))
            assert len(issuer.requests) == 2
            return still
        finally:
            await auth.aclose()

    assert asyncio.run(go()).identities
    issuer.fake.status = 503
    [first_use] = check(OidcAuthenticator(provider(issuer), trust_domain=TRUST_DOMAIN), signed())
    assert isinstance(first_use, AuthenticationFailed)


def test_jwks_from_a_local_file_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(public_jwks(RSA)))
    auth = OidcAuthenticator(OidcProvider(issuer=ISSUER, jwks_file=str(path)), trust_domain=TRUST_DOMAIN)

    async def go():
        try:
            assert (await auth.authenticate(request(token=signed()))).identities
            with pytest.raises(AuthenticationFailed):
                await auth.authenticate(request(token=signed(EC, "ES256")))
            path.write_text(json.dumps(public_jwks(RSA, EC)) + "\n")
            return await auth.authenticate(request(token=signed(EC, "ES256")))
        finally:
            await auth.aclose()

    assert asyncio.run(go()).identities == ("spiffe://cluster.local/ns/default/sa/sleep",)


def test_a_symmetric_key_in_the_jwks_is_ignored(tmp_path):
    # An "oct" key published in a JWKS is a secret anyone can read.
    path = tmp_path / "jwks.json"
    secret = b"s" * 32
    path.write_text(json.dumps({"keys": [{"kty": "oct", "kid": "hmac", "k": b64url(secret)}]}))
    signing_input = ".".join([b64url(json.dumps({"alg": "HS256", "kid": "hmac"}).encode()),
                              b64url(json.dumps(claims()).encode())])
    token = signing_input + "." + b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())
    [outcome] = check(OidcAuthenticator(OidcProvider(issuer=ISSUER, jwks_file=str(path)),
                                        trust_domain=TRUST_DOMAIN), token)
    assert isinstance(outcome, AuthenticationFailed)


VECTOR = Path(__file__).parent.parent / "vectors" / "istio" / "agent" / "testjwt"


def test_istio_agent_fixture_token_shape(tmp_path):
    """The projected token from Istio's agent tests: its claims, re-signed
    by a key we hold (the original signer's is not ours), authenticate with
    the pod facts; the original, signed by a key not in our JWKS, does not."""
    original = VECTOR.read_text().strip()
    payload = json.loads(base64.urlsafe_b64decode(original.split(".")[1] + "=="))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(public_jwks(RSA)))
    provider = OidcProvider(issuer=payload["iss"], jwks_file=str(jwks), audiences=payload["aud"])
    auth = OidcAuthenticator(provider, trust_domain=TRUST_DOMAIN, clock=lambda: payload["iat"] + 60)
    resigned = jwt.encode({"alg": "RS256", "kid": RSA.kid}, payload, RSA, algorithms=["RS256"])
    caller, refused = check(auth, resigned, original)
    assert caller.identities == ("spiffe://cluster.local/ns/default/sa/sleep",)
    assert (caller.kubernetes.pod_name, caller.kubernetes.pod_uid) == (
        "sleep-7f69474bf9-6pmf5", "bca5b2e9-f7f2-11e8-8286-42010a800003")
    assert isinstance(refused, AuthenticationFailed)


def test_a_refused_token_is_verified_once_then_refused_from_memory(issuer, monkeypatch):
    """A bad signature or an expired token is a verdict: the same token again
    within the TTL is refused without verifying it; a good token is not
    affected, and the memory holds a hash, not the token."""
    from fastca.authn._rejections import RejectionCache

    clock = FakeClock()
    rejections = RejectionCache(100, 10.0, clock)
    auth = OidcAuthenticator(provider(issuer), trust_domain=TRUST_DOMAIN, rejections=rejections)
    forged = jwt.encode({"alg": "RS256", "kid": "rsa-1"}, claims(), ROGUE, algorithms=["RS256"])
    expired = signed(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200, nbf=int(time.time()) - 7200)
    verifications = []
    original = OidcAuthenticator._verified
    monkeypatch.setattr(OidcAuthenticator, "_verified",
                        lambda self, token, key: verifications.append(1) or original(self, token, key))
    results = check(auth, *([forged] * 50 + [expired] * 50 + [signed()]))
    assert all(isinstance(r, AuthenticationFailed) for r in results[:100])
    assert "within the last 10 s" in str(results[99])
    assert results[100].identities == ("spiffe://cluster.local/ns/default/sa/sleep",)
    assert len(verifications) == 3                      # forged once, expired once, the good one
    assert len(rejections) == 2
    assert forged.encode() not in repr(rejections._entries).encode()
    clock.advance(11)
    auth = OidcAuthenticator(provider(issuer), trust_domain=TRUST_DOMAIN, rejections=rejections)
    check(auth, forged)
    assert len(verifications) == 4                      # past the TTL: verified again


def test_an_unknown_kid_is_not_remembered(issuer):
    from fastca.authn._rejections import RejectionCache

    rejections = RejectionCache(100, 10.0)
    auth = OidcAuthenticator(provider(issuer), trust_domain=TRUST_DOMAIN, rejections=rejections)
    stranger = RSAKey.generate_key(2048, parameters={"kid": "not-yet-published"})
    result, = check(auth, signed(key=stranger))
    assert isinstance(result, AuthenticationFailed) and len(rejections) == 0

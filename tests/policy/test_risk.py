"""Risk policy: what a signer does with a high-risk identity, judged on the
real issuance monitor's scores and, for the TTL cap, through a real
Authority (native core, software signer, SQLite audit log)."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fastca.audit.sqlite_log import SqliteAuditLog
from fastca.authn.caller import Caller, RequestInfo
from fastca.authority import Admission, Authority
from fastca.ca.certificates import self_signed_root
from fastca.ca.material import validate_material
from fastca.clock import ManualClock
from fastca.config import IssuanceConfig, PolicyConfig
from fastca.errors import FreshCredentialRequired, PolicyDenied, grpc_status_of
from fastca.monitoring import IssuanceMonitor, MonitoringConfig, Observation
from fastca.monitoring.config import RiskPolicyConfig
from fastca.policy.request import RequestPolicy
from fastca.policy.risk import RiskPolicy
from fastca.signing.software import SoftwareSigner
from tests.conftest import agent_csrs

RISKY = "spiffe://cluster.local/ns/shop/sa/risky"
CALM = "spiffe://cluster.local/ns/shop/sa/calm"
ZTUNNEL = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
T0 = dt.datetime.now(dt.timezone.utc).timestamp()


def reviewed(identity: str, *, now: bool = False, credential: str = "k8s-tokenreview") -> Caller:
    return Caller((identity,), credential, judged_now=now)


def scored(clock: ManualClock) -> IssuanceMonitor:
    """A monitor with no learning period in which CALM and RISKY are new
    (new_identity, 5 each), RISKY reused CALM's key (key_reuse, 40: 45 in
    all) and ZTUNNEL was refused an off-node identity (node_impersonation, 50)."""
    monitor = IssuanceMonitor(MonitoringConfig(enabled=True, learning_seconds=0), clock=clock)
    rng = random.Random(1)
    key = rng.randbytes(32)
    for serial, identity in enumerate((CALM, RISKY)):
        monitor.observe_issued(Observation(at=T0, identity=identity, caller=identity, impersonated=False, node="",
                                           peer_ip="10.0.0.1", spki_sha256=key, csr_sha256=rng.randbytes(32),
                                           ttl_seconds=3600, serial=f"{serial:x}"))
    monitor.observe_refused(T0, ZTUNNEL, "spiffe://cluster.local/ns/x/sa/y", "10.0.0.9", "node_impersonation")
    return monitor


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


def test_below_the_threshold_nothing_happens(clock):
    policy = RiskPolicy(scored(clock), threshold=50, actions=["refuse"], shortened_ttl_seconds=600)
    assert policy.check(RISKY, reviewed(RISKY), fresh_credential=False) is None       # 45 < 50
    assert policy.check(CALM, reviewed(CALM), fresh_credential=False) is None


def test_refuse_is_permission_denied_with_a_message_a_person_can_act_on(clock):
    policy = RiskPolicy(scored(clock), threshold=25, actions=["refuse", "shorten_ttl"], shortened_ttl_seconds=600)
    with pytest.raises(PolicyDenied) as refused:
        policy.check(RISKY, reviewed(RISKY, now=True), fresh_credential=True)
    assert grpc_status_of(refused.value) == "PERMISSION_DENIED"
    public = refused.value.public_message
    assert "risk score 45" in public and "threshold 25" in public and "fastca risk" in public and "decays" in public
    assert RISKY not in public          # the client knows who it is; the message names the reason, not the subject


def test_fresh_token_asks_for_a_review_only_of_a_remembered_verdict(clock):
    policy = RiskPolicy(scored(clock), threshold=25, actions=["fresh_token"], shortened_ttl_seconds=600)
    with pytest.raises(FreshCredentialRequired):
        policy.check(RISKY, reviewed(RISKY), fresh_credential=False)
    # Reviewed for this call, or re-authenticated without the cache: go on (no TTL cap asked for).
    assert policy.check(RISKY, reviewed(RISKY, now=True), fresh_credential=False) is None
    assert policy.check(RISKY, reviewed(RISKY), fresh_credential=True) is None
    # A client certificate is judged on its connection, not from a cache of reviews.
    assert policy.check(RISKY, reviewed(RISKY, credential="mtls"), fresh_credential=False) is None


def test_shorten_ttl_caps_and_the_score_decays_back(clock):
    policy = RiskPolicy(scored(clock), threshold=25, actions=["fresh_token", "shorten_ttl"], shortened_ttl_seconds=600)
    assert policy.check(RISKY, reviewed(RISKY, now=True), fresh_credential=False) == 600
    clock.advance(3600)                  # one half-life: 45 -> 22.5
    assert policy.check(RISKY, reviewed(RISKY), fresh_credential=False) is None


def test_a_node_agent_is_judged_by_its_own_score_too(clock):
    """ZTUNNEL's refusal scored it 50: whatever it asks for, on behalf of a
    calm workload, gets the action; the workload asking itself does not."""
    policy = RiskPolicy(scored(clock), threshold=25, actions=["shorten_ttl"], shortened_ttl_seconds=600)
    assert policy.check(CALM, reviewed(ZTUNNEL), fresh_credential=False, impersonated=True) == 600
    assert policy.check(CALM, reviewed(CALM), fresh_credential=False) is None


def test_the_policy_configuration(clock):
    assert RiskPolicyConfig(actions=["shorten_ttl", "refuse", "shorten_ttl"]).actions == ["shorten_ttl", "refuse"]
    with pytest.raises(ValueError, match="actions"):
        RiskPolicyConfig(actions=[])
    with pytest.raises(ValueError):
        RiskPolicyConfig(actions=["quarantine"])
    with pytest.raises(ValueError, match="enabled = true"):
        MonitoringConfig(policy={"default": {"actions": ["refuse"]}})
    with pytest.raises(ValueError, match="could never act"):
        MonitoringConfig(enabled=True, policy={"default": {"actions": ["refuse"], "threshold": 500}})
    config = MonitoringConfig(enabled=True, alert_threshold=40,
                              policy={"default": {"actions": ["refuse"]}, "other": {"actions": ["refuse"],
                                                                                    "threshold": 70}})
    assert (config.threshold_for("default"), config.threshold_for("other"), config.threshold_for("none")) == \
        (40, 70, None)


def test_a_shortened_ttl_through_the_authority(clock, tmp_path):
    """Admission hands the cap to the validity stage: the certificate lives
    at most shortened_ttl_seconds (plus the backdate), whatever was asked."""
    signer = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))
    now = dt.datetime.fromtimestamp(clock.now() - 3600, dt.timezone.utc)     # valid at the test's clock
    root = self_signed_root(signer, "cluster.local", now=now)
    material = validate_material(root, [], [root], now)
    risk = RiskPolicy(scored(clock), threshold=25, actions=["shorten_ttl"], shortened_ttl_seconds=600)
    admission = Admission(signer="default", trust_domain="cluster.local", policy=RequestPolicy(PolicyConfig()),
                          node_authorizer=None, risk=risk)
    audit = SqliteAuditLog(tmp_path / "audit.db")
    authority = Authority("default", material, signer, issuance=IssuanceConfig(), admission=admission, audit=audit,
                          clock=clock)
    info = RequestInfo(metadata={}, peer="ipv4:127.0.0.1:1", peer_ip=None)
    csr = agent_csrs("ec256")[0].pem

    async def issue(identity: str):
        return await authority.issue(reviewed(identity), info, csr=csr, ttl_seconds=86_400, impersonate="",
                                     request_id="r")

    try:
        shortened = asyncio.run(issue(RISKY))
        full = asyncio.run(issue(CALM))
    finally:
        authority.close()
        audit.close()
    assert (shortened.not_after - shortened.not_before).total_seconds() == 600 + IssuanceConfig().backdate_seconds
    assert (full.not_after - full.not_before).total_seconds() == 86_400 + IssuanceConfig().backdate_seconds

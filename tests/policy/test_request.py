import datetime as dt
import ipaddress

import pytest

from fastca.authn.caller import Caller
from fastca.clock import ManualClock
from fastca.config import PolicyConfig
from fastca.errors import AuthenticationFailed, Overloaded, PolicyDenied
from fastca.policy.request import RequestPolicy, spiffe_identity_of

ID = "spiffe://cluster.local/ns/shop/sa/cart"
LOOPBACK = ipaddress.ip_address("127.0.0.1")


def test_identity_is_the_one_spiffe_id_of_the_trust_domain():
    assert spiffe_identity_of(Caller((ID, "cart.shop.svc"), "mtls"), "cluster.local") == ID
    for identities in ((), ("cart.shop.svc",), ("spiffe://other.domain/ns/a/sa/b",), (ID, ID + "2")):
        with pytest.raises(AuthenticationFailed):
            spiffe_identity_of(Caller(identities, "xfcc"), "cluster.local")


def test_rate_limit_is_per_identity_and_refills():
    clock = ManualClock(100.0)
    policy = RequestPolicy(PolicyConfig.model_validate({"rate_limit": {"per_identity_per_second": 2, "burst": 3}}),
                           clock=clock)
    for _ in range(3):
        policy.check(ID, LOOPBACK)
    with pytest.raises(Overloaded):
        policy.check(ID, LOOPBACK)
    policy.check(ID + "x", LOOPBACK)          # another identity has its own bucket
    clock.advance(0.5)                         # one token back
    policy.check(ID, LOOPBACK)
    with pytest.raises(Overloaded):
        policy.check(ID, LOOPBACK)


def test_rate_limit_memory_is_bounded():
    policy = RequestPolicy(PolicyConfig.model_validate(
        {"rate_limit": {"per_identity_per_second": 1, "burst": 1, "max_tracked_identities": 10}}))
    for i in range(1000):
        policy.check(f"spiffe://cluster.local/ns/n/sa/s{i}", LOOPBACK)
    assert len(policy._buckets._buckets) == 10


@pytest.mark.parametrize("hour,allowed", [(1, False), (9, True), (16, True), (17, False), (23, False)])
def test_time_window(hour, allowed):
    moment = dt.datetime(2026, 11, 25, hour, 30, tzinfo=dt.timezone.utc).timestamp()
    policy = RequestPolicy(PolicyConfig.model_validate(
        {"time_windows": [{"identities": ["spiffe://cluster.local/ns/shop/*"], "start": "09:00", "end": "17:00"}]}),
        clock=ManualClock(moment))
    if allowed:
        policy.check(ID, LOOPBACK)
    else:
        with pytest.raises(PolicyDenied, match="window"):
            policy.check(ID, LOOPBACK)
    policy.check("spiffe://cluster.local/ns/other/sa/x", LOOPBACK)     # not covered by the rule


def test_time_window_across_midnight():
    late = dt.datetime(2026, 11, 25, 23, 30, tzinfo=dt.timezone.utc).timestamp()
    noon = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc).timestamp()
    config = PolicyConfig.model_validate({"time_windows": [{"identities": ["*"], "start": "22:00", "end": "02:00"}]})
    RequestPolicy(config, clock=ManualClock(late)).check(ID, LOOPBACK)
    with pytest.raises(PolicyDenied):
        RequestPolicy(config, clock=ManualClock(noon)).check(ID, LOOPBACK)


def test_source_network():
    policy = RequestPolicy(PolicyConfig.model_validate(
        {"source_networks": [{"identities": ["spiffe://cluster.local/ns/shop/*"], "cidrs": ["10.0.0.0/8", "::1/128"]}]}))
    policy.check(ID, ipaddress.ip_address("10.2.3.4"))
    policy.check(ID, ipaddress.ip_address("::1"))
    for peer in (LOOPBACK, None):
        with pytest.raises(PolicyDenied) as denied:
            policy.check(ID, peer)
        assert "source network" in denied.value.public_message


def test_bad_policy_configuration_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        PolicyConfig.model_validate({"time_windows": [{"identities": ["*"], "start": "25:00", "end": "02:00"}]})
    with pytest.raises(ValidationError):
        PolicyConfig.model_validate({"source_networks": [{"identities": ["*"], "cidrs": ["10.0.0.0/33"]}]})


def test_default_rate_is_one_per_second_with_a_burst_of_twenty_and_zero_turns_it_off():
    """On unless configured off: a stolen token mints 20 certificates, then
    one a second; an Istio agent renewing twice a day never notices."""
    clock = ManualClock(100.0)
    policy = RequestPolicy(PolicyConfig(), clock=clock)
    for _ in range(20):
        policy.check(ID, LOOPBACK)
    with pytest.raises(Overloaded) as info:
        policy.check(ID, LOOPBACK)
    assert "rate limit" in info.value.public_message
    clock.advance(1.0)
    policy.check(ID, LOOPBACK)
    with pytest.raises(Overloaded):
        policy.check(ID, LOOPBACK)
    unlimited = RequestPolicy(PolicyConfig.model_validate({"rate_limit": {"per_identity_per_second": 0}}),
                              clock=clock)
    for _ in range(1000):
        unlimited.check(ID, LOOPBACK)

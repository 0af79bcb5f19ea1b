"""The live trust bundle: validation of a peer's PEM, and the merge."""

from __future__ import annotations

import datetime as dt

import pytest

from fastca.trust.bundle import BundleRefused, TrustBundle, validate_bundle
from tests.trust._roots import certificate, pem

NOW = dt.datetime.now(dt.UTC)


def _refused(data: bytes, **limits) -> BundleRefused:
    with pytest.raises(BundleRefused) as raised:
        validate_bundle(data, now=NOW, **limits)
    return raised.value


def test_ca_certificates_in_date_are_accepted_in_order():
    a, b = certificate("a"), certificate("b")
    assert validate_bundle(b"# a comment\n" + pem(a, b), now=NOW) == (a, b)


@pytest.mark.parametrize("data, kind", [
    (b"", "empty"),
    (b"not pem at all", "empty"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n", "malformed"),                          # never ends
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "malformed"),  # not DER
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "malformed"),
])
def test_malformed_bundles_are_refused(data, kind):
    assert _refused(data).kind == kind


def test_a_private_key_beside_certificates_is_refused():
    data = pem(certificate("a")) + b"-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"
    error = _refused(data)
    assert error.kind == "malformed" and "EC PRIVATE KEY" in str(error)


def test_leaves_and_expired_certificates_are_refused():
    assert _refused(pem(certificate("a"), certificate("leaf", ca=False))).kind == "not_ca"
    error = _refused(pem(certificate("a"), certificate("old", expired=True)))
    assert error.kind == "expired" and "old" in str(error)


def test_size_bounds():
    three = pem(certificate("a"), certificate("b"), certificate("c"))
    assert _refused(three, max_certificates=2).kind == "too_large"
    assert _refused(three, max_bytes=len(three) - 1).kind == "too_large"
    assert len(validate_bundle(three, now=NOW, max_certificates=3, max_bytes=len(three))) == 3


def test_merge_is_deduplicated_ordered_and_versioned():
    own, west, east = certificate("own"), certificate("west"), certificate("east")
    bundle = TrustBundle([own])
    seen: list[str] = []
    bundle.subscribe(seen.append)
    first = bundle.version
    assert bundle.pem == pem(own).decode()
    # Peers by name, own roots first, a root the two share only once.
    assert bundle.set_peers({"west": [west, own], "east": [east]}) is True
    assert bundle.certificates == (own, east, west)
    assert bundle.version != first and seen == [bundle.pem]
    # The same content in another order of peers: no change, no notification.
    assert bundle.set_peers({"east": [east], "west": [west]}) is False
    assert len(seen) == 1
    assert bundle.set_peers({}) is True
    assert bundle.version == first and bundle.pem == pem(own).decode()


def test_a_failing_subscriber_does_not_stop_the_others():
    bundle = TrustBundle([certificate("own")])
    got: list[str] = []
    bundle.subscribe(lambda _pem: 1 / 0)
    bundle.subscribe(got.append)
    bundle.set_peers({"p": [certificate("p")]})
    assert got == [bundle.pem]

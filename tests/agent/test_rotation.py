"""Renewal time and retry backoff (docs/reliability.md, cases 29–30)."""

from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastca.agent.rotation import Backoff, delay_until, refresh_at


@settings(max_examples=300, deadline=None)
@given(received=st.floats(0, 4e9), lifetime=st.floats(1, 1e8), ratio=st.floats(-0.5, 1.5),
       jitter=st.floats(0, 0.6), seed=st.integers(0, 2**32))
def test_refresh_at_is_inside_the_clamped_window(received, lifetime, ratio, jitter, seed):
    not_after = received + lifetime
    rng = random.Random(seed)
    low = min(1.0, max(0.0, ratio - jitter))
    high = min(1.0, max(0.0, ratio + jitter))
    for _ in range(20):
        at = refresh_at(received, not_after, ratio, jitter, rng)
        used = (not_after - at) / lifetime            # the effective ratio
        assert low - 1e-5 <= used <= high + 1e-5
        assert received - 1e-3 <= at <= not_after + 1e-3


def test_ten_thousand_samples_within_bounds_and_centred():
    rng = random.Random(7)
    received, not_after = 1_000_000.0, 1_000_000.0 + 86400
    ratios = [(not_after - refresh_at(received, not_after, 0.5, 0.01, rng)) / 86400 for _ in range(10_000)]
    assert min(ratios) >= 0.49 and max(ratios) <= 0.51
    assert abs(statistics.fmean(ratios) - 0.5) < 0.001
    # uniform, not a constant: both halves of the window are used
    assert sum(r < 0.5 for r in ratios) > 4000 and sum(r > 0.5 for r in ratios) > 4000


def test_clamping_at_the_edges():
    rng = random.Random(1)
    # ratio 1 ± 0.2: never beyond "renew at once" (= received)
    samples = [refresh_at(100.0, 200.0, 1.0, 0.2, rng) for _ in range(2000)]
    assert min(samples) == pytest.approx(100.0) and all(s >= 100.0 for s in samples)
    # ratio 0 ± 0.2: never after not_after
    samples = [refresh_at(100.0, 200.0, 0.0, 0.2, rng) for _ in range(2000)]
    assert max(samples) == pytest.approx(200.0) and all(s <= 200.0 for s in samples)
    assert refresh_at(100.0, 200.0, 0.5, 0.0) == 150.0


def test_uses_received_not_not_before():
    # A certificate backdated by the CA: only `received` matters.
    assert refresh_at(received=1000.0, not_after=1100.0, ratio=0.5, jitter=0.0) == 1050.0


def test_expired_certificate_is_due_at_once():
    now = 5000.0
    at = refresh_at(received=1000.0, not_after=2000.0, ratio=0.5, jitter=0.01, rng=random.Random(3))
    assert delay_until(at, now) == 0.0
    # received after it expired (a cached file from long ago): due at not_after, i.e. now
    assert refresh_at(received=3000.0, not_after=2000.0) == 2000.0
    assert delay_until(refresh_at(3000.0, 2000.0), 3000.0) == 0.0


def test_backoff_grows_and_is_capped():
    backoff = Backoff(initial=1.0, maximum=60.0, factor=2.0, jitter=0.0)
    assert [backoff.next() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.failures == 8
    backoff.reset()
    assert backoff.next() == 1.0


def test_backoff_jitter_bounds_and_cap():
    backoff = Backoff(initial=0.5, maximum=3.0, jitter=0.2, rng=random.Random(11))
    values = [backoff.next() for _ in range(200)]
    assert 0.4 <= values[0] <= 0.6
    assert 0.8 <= values[1] <= 1.2
    assert all(v <= 3.0 for v in values)
    assert len(set(values[10:])) > 1          # jitter still spreads capped values
    assert min(values[10:]) >= 3.0 * 0.8


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"initial": 2, "maximum": 1}, {"factor": 0.5},
                                    {"jitter": 1.0}])
def test_backoff_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)

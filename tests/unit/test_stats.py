"""Confidence intervals: Wilson against known values, the bootstrap against the normal theory it approximates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mnemo.evaluation.stats import (
    MIN_BOOTSTRAP_UNITS,
    bootstrap_mean_interval,
    bootstrap_ratio_interval,
    wilson_interval,
)


@pytest.mark.parametrize(
    "k,n,lo,hi",
    [  # Wilson score intervals at z = 1.96 (Newcombe 1998; Brown, Cai & DasGupta 2001)
        (0, 100, 0.0, 0.0370),
        (97, 100, 0.9155, 0.9897),
        (50, 100, 0.4038, 0.5962),
        (100, 100, 0.9630, 1.0),
        (81, 263, 0.2553, 0.3662),
        (1, 10, 0.0179, 0.4042),
    ],
)
def test_wilson_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=6e-4)


def test_wilson_properties():
    for n in (1, 7, 30, 100, 1000):
        for k in range(0, n + 1, max(1, n // 9)):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            # symmetric: k right is n - k wrong
            lo2, hi2 = wilson_interval(n - k, n)
            assert (lo, hi) == pytest.approx((1 - hi2, 1 - lo2), abs=1e-12)
    # more trials, narrower; a wider z, wider
    assert np.diff(wilson_interval(50, 100)) > np.diff(wilson_interval(500, 1000))
    assert np.diff(wilson_interval(50, 100, z=2.58)) > np.diff(wilson_interval(50, 100))
    assert wilson_interval(0, 100)[0] == 0.0 and wilson_interval(100, 100)[1] == 1.0


@pytest.mark.parametrize("k,n,match", [(0, 0, "trials"), (3, -1, "trials"), (5, 4, "successes"), (-1, 4, "successes")])
def test_wilson_rejects(k, n, match):
    with pytest.raises(ValueError, match=match):
        wilson_interval(k, n)


def test_bootstrap_matches_normal_theory():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    lo, hi = bootstrap_mean_interval(x, n_boot=2000, seed=0)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)  # ~0.196
    assert lo < x.mean() < hi
    assert lo == pytest.approx(x.mean() - half, abs=0.03) and hi == pytest.approx(x.mean() + half, abs=0.03)
    # a lower level is narrower, inside
    lo90, hi90 = bootstrap_mean_interval(x, n_boot=2000, seed=0, level=0.9)
    assert lo < lo90 < hi90 < hi


def test_bootstrap_deterministic_and_edge_cases():
    x = np.random.default_rng(2).random(57)
    assert bootstrap_mean_interval(x, seed=3) == bootstrap_mean_interval(list(x), seed=3)
    assert bootstrap_mean_interval(x, seed=3) != bootstrap_mean_interval(x, seed=4)
    assert bootstrap_mean_interval([2.5] * 10) == (2.5, 2.5)
    assert all(math.isnan(b) for b in bootstrap_mean_interval([1.0]))  # one value: no interval (was (1, 1))
    # blocks of resamples (a long input) give the same interval as one block would
    big = np.random.default_rng(5).random(50_000)
    lo, hi = bootstrap_mean_interval(big, n_boot=200)
    assert lo < big.mean() < hi and hi - lo < 0.01
    # 0/1 values: close to Wilson away from the edges
    hits = np.array([1.0] * 70 + [0.0] * 30)
    assert bootstrap_mean_interval(hits, n_boot=4000) == pytest.approx(wilson_interval(70, 100), abs=0.02)


@pytest.mark.parametrize(
    "values,kw,match",
    [
        ([], {}, "no values"),
        ([1.0, float("nan")], {}, "NaN"),
        ([1.0], {"n_boot": 0}, "n_boot"),
        ([1.0], {"level": 1.0}, "level"),
    ],
)
def test_bootstrap_rejects(values, kw, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_mean_interval(values, **kw)


def test_bootstrap_ratio_of_equal_units_is_the_mean_bootstrap():
    # Units of one token each: the ratio of sums is the mean, resampled with the same draws.
    x = np.random.default_rng(3).normal(1.0, 1.0, size=80)
    assert bootstrap_ratio_interval(x, np.ones_like(x), seed=7) == pytest.approx(
        bootstrap_mean_interval(x, seed=7), abs=1e-12
    )
    # Units of 10 tokens each, summed: the same interval (the ratio does not see the scale).
    assert bootstrap_ratio_interval(10 * x, np.full_like(x, 10), seed=7) == pytest.approx(
        bootstrap_mean_interval(x, seed=7), abs=1e-12
    )


def test_bootstrap_ratio_weights_units_by_size_and_drops_empty_ones():
    # One long unit (loss 1/token over 1000 tokens) and many short ones (loss 3 over 1 token):
    # the pooled ratio is near 1, and every resample ratio lies within [1, 3].
    num = np.array([1000.0] + [3.0] * 20 + [0.0])
    den = np.array([1000.0] + [1.0] * 20 + [0.0])  # the last unit has no token in the bucket
    lo, hi = bootstrap_ratio_interval(num, den, n_boot=500)
    ratio = num.sum() / den.sum()
    assert 1.0 <= lo <= ratio <= hi <= 3.0
    assert bootstrap_ratio_interval(num, den, n_boot=500) == (lo, hi)  # deterministic for a seed
    # paired differences of two losses over the same units: a constant shift is exact
    assert bootstrap_ratio_interval(num - (num - 0.5 * den), den) == pytest.approx((0.5, 0.5), abs=1e-12)


def test_bootstrap_ratio_of_one_unit_is_no_interval():
    """One document was a zero-width "95 % CI" ([4.023, 4.023] for a bucket only one document reaches; a paired
    difference of one document had lo == hi == diff, which reads as "excludes 0"): now NaN bounds."""
    assert MIN_BOOTSTRAP_UNITS == 2
    for num, den in (([30.0], [10.0]), ([30.0, 5.0], [10.0, 0.0])):  # one unit, or one left with tokens
        lo, hi = bootstrap_ratio_interval(num, den)
        assert math.isnan(lo) and math.isnan(hi)
    lo, hi = bootstrap_ratio_interval([30.0, 10.0], [10.0, 10.0])  # two units: an interval
    assert 1.0 <= lo < hi <= 3.0


@pytest.mark.parametrize(
    "num,den,kw,match",
    [
        ([1.0], [1.0, 2.0], {}, "numerators"),
        ([1.0], [0.0], {}, "nonzero"),
        ([float("inf")], [1.0], {}, "NaN"),
        ([1.0], [1.0], {"n_boot": 0}, "n_boot"),
        ([1.0], [1.0], {"level": 0.0}, "level"),
    ],
)
def test_bootstrap_ratio_rejects(num, den, kw, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ratio_interval(num, den, **kw)

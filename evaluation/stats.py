"""Confidence intervals for evaluation scores: accuracies (Wilson) and means (percentile bootstrap).

An accuracy of k right out of n trials is reported with its Wilson score
interval, which stays inside [0, 1] and is not degenerate at 0 or n right
(the normal approximation gives [0, 0] for 0/100; Wilson gives [0, 0.037]).
A mean of per-sample values that are not 0/1 (answer loss, fraction of answer
tokens right) gets a percentile bootstrap interval; with fewer than
MIN_BOOTSTRAP_UNITS units it gets none (NaN bounds): every resample of one
unit is that unit, a zero-width "interval" that would read as certainty
(a difference of one document "excluding 0").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# The fewest units (documents, samples) a bootstrap interval is given for; below it the bounds are NaN.
MIN_BOOTSTRAP_UNITS = 2

NO_INTERVAL = (float("nan"), float("nan"))


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """(lo, hi) of the Wilson score interval for ``successes`` out of ``trials``; z = 1.96 is 95 %.

    Raises ValueError for trials < 1 or successes outside [0, trials].
    """
    if trials < 1:
        raise ValueError(f"wilson_interval: trials must be >= 1, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: successes must be in [0, trials={trials}], got {successes}")
    n, p, z2 = float(trials), successes / trials, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At 0 or n successes the bound is exactly 0 or 1 (center - half cancels to rounding error).
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == trials else min(1.0, center + half)
    return lo, hi


def bootstrap_mean_interval(
    values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """(lo, hi) percentile bootstrap interval of the mean of ``values``: deterministic for a seed.

    ``n_boot`` resamples with replacement, each as large as ``values``; the
    bounds are the (1 - level) / 2 and (1 + level) / 2 quantiles of their means;
    (nan, nan) for fewer than MIN_BOOTSTRAP_UNITS values (no interval).
    Raises ValueError for no values, a non-finite value, n_boot < 1 or level outside (0, 1).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap_mean_interval: no values")
    if not np.isfinite(x).all():
        raise ValueError("bootstrap_mean_interval: the values hold NaN or infinity")
    if n_boot < 1:
        raise ValueError(f"bootstrap_mean_interval: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_mean_interval: level must be in (0, 1), got {level}")
    if x.size < MIN_BOOTSTRAP_UNITS:
        return NO_INTERVAL
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    rows = max(1, 4_000_000 // x.size)  # resamples per block: at most ~32 MB of indices at once
    for b in range(0, n_boot, rows):
        idx = rng.integers(0, x.size, size=(min(rows, n_boot - b), x.size))  # [rows, n]
        means[b : b + idx.shape[0]] = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ratio_interval(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """(lo, hi) percentile bootstrap interval of sum(numerators) / sum(denominators), resampling the pairs.

    For a mean over units of unequal size (loss summed per document over its
    tokens / the document's token count): whole units are resampled, so the
    interval reflects the variation between documents, not between tokens.
    A paired difference of two such means over the same units is the ratio
    of the numerator differences. Units with a zero denominator are dropped;
    fewer than MIN_BOOTSTRAP_UNITS units left gives (nan, nan) (no interval).
    Raises ValueError for mismatched lengths, no unit left, a non-finite
    value, n_boot < 1 or level outside (0, 1).
    """
    num = np.asarray(numerators, dtype=np.float64).reshape(-1)
    den = np.asarray(denominators, dtype=np.float64).reshape(-1)
    if num.shape != den.shape:
        raise ValueError(f"bootstrap_ratio_interval: {num.size} numerators but {den.size} denominators")
    if not (np.isfinite(num).all() and np.isfinite(den).all()):
        raise ValueError("bootstrap_ratio_interval: the values hold NaN or infinity")
    keep = den != 0
    num, den = num[keep], den[keep]
    if num.size == 0:
        raise ValueError("bootstrap_ratio_interval: no unit with a nonzero denominator")
    if n_boot < 1:
        raise ValueError(f"bootstrap_ratio_interval: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ratio_interval: level must be in (0, 1), got {level}")
    if num.size < MIN_BOOTSTRAP_UNITS:
        return NO_INTERVAL
    rng = np.random.default_rng(seed)
    ratios = np.empty(n_boot)
    rows = max(1, 4_000_000 // num.size)  # resamples per block, as bootstrap_mean_interval
    for b in range(0, n_boot, rows):
        idx = rng.integers(0, num.size, size=(min(rows, n_boot - b), num.size))  # [rows, n]
        ratios[b : b + idx.shape[0]] = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)

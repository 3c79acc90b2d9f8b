"""The held-out split: a fixed hash of the sample index.

Training streams skip held-out documents and evaluation reads only them. The
choice depends on nothing but the index and the fraction, so it is the same
for every seed, world size and resume.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def heldout_mask(num_samples: int, val_fraction: float) -> np.ndarray:
    """Boolean [num_samples]: True where sample i is held out for evaluation.

    At least one document is held out when val_fraction > 0 and the dataset
    has more than one document, so evaluation always has something to read.
    """
    if val_fraction <= 0 or num_samples == 0:
        return np.zeros(num_samples, dtype=bool)
    with np.errstate(over="ignore"):
        h = _splitmix64(np.arange(num_samples, dtype=np.uint64))
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    mask = u < val_fraction
    if not mask.any() and num_samples > 1:
        mask[int(np.argmin(u))] = True
    return mask

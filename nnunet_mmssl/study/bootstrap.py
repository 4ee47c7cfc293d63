"""Paired bootstrap interval of a mean difference (Efron & Tibshirani 1993, percentile interval)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_resamples: int = 10000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Mean of ``a - b`` over pairs with a percentile bootstrap interval (pairs resampled with replacement).

    Pairs where either value is not finite (e.g. HD95 of an empty prediction) are left out and counted.

    Args:
        a: values of the first method, one per pair (e.g. per (seed, test case)).
        b: the second method's values for the same pairs, in the same order.
        n_resamples: bootstrap resamples.
        confidence: interval coverage, e.g. 0.95.
        seed: the resampling RNG's seed (fixed: the same input gives the same interval).

    Returns:
        ``{"mean_difference", "low", "high", "n_pairs", "n_dropped", "confidence", "n_resamples", "seed"}``; the
        numbers are None when no pair is left.

    Raises:
        ValueError: ``a`` and ``b`` differ in length, or ``confidence`` is not in (0, 1).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired bootstrap needs two 1-d sequences of equal length, got shapes {a.shape} and "
                         f"{b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    result = {"mean_difference": None, "low": None, "high": None, "n_pairs": int(d.size),
              "n_dropped": int((~keep).sum()), "confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    if d.size == 0:
        return result
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    result.update(mean_difference=float(d.mean()), low=float(low), high=float(high))
    return result

"""Bootstrap intervals of a mean paired difference (percentile intervals, Efron & Tibshirani 1993): pairs resampled
as independent (:func:`paired_bootstrap`), or the rows and columns of a crossed design resampled
(:func:`crossed_bootstrap`, what the study reports)."""

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
    # each pair its own row of a one-column design: resampling rows is resampling pairs
    result = crossed_bootstrap(a, b, range(a.size), [0] * a.size, n_resamples, confidence, seed)
    return {key: result[key] for key in ("mean_difference", "low", "high", "n_pairs", "n_dropped", "confidence",
                                         "n_resamples", "seed")}


def crossed_bootstrap(a: Sequence[float], b: Sequence[float], rows: Sequence, cols: Sequence,
                      n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``a - b`` with a percentile interval that resamples rows and columns of a crossed design.

    A study's pairs are (seed, test case) cells: every seed is scored on the same test cases, so the pairs of one case
    share that case's difficulty and the pairs of one seed share that seed's training. Resampling the pairs as if
    independent ignores both and gives too narrow an interval. Here the seeds (``rows``) and the cases (``cols``) are
    resampled independently with replacement and the resampled mean is taken over the cells they pick, with
    multiplicity (Owen 2007, "the pigeonhole bootstrap"). With one seed this is the case bootstrap.

    Cells where either value is not finite are left out (counted in ``n_dropped``); a resample that picks no finite
    cell is discarded (counted in ``n_empty_resamples``). A (row, col) given twice is an error.

    Returns:
        :func:`paired_bootstrap`'s fields plus ``n_rows``, ``n_cols``, ``n_empty_resamples`` and
        ``resampled = "rows and columns"``.

    Raises:
        ValueError: the sequences differ in length, a cell repeats, or ``confidence`` is not in (0, 1).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or not a.shape == b.shape == (len(rows),) == (len(cols),):
        raise ValueError(f"crossed bootstrap needs a, b, rows and cols of one length, got {a.shape}, {b.shape}, "
                         f"{len(rows)} and {len(cols)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    cells = list(zip(rows, cols))
    if len(set(cells)) != len(cells):
        repeated = next(c for c in cells if cells.count(c) > 1)
        raise ValueError(f"crossed bootstrap: cell (row, col) = {repeated} is given more than once")
    keep = np.isfinite(a) & np.isfinite(b)
    kept_rows = [r for r, k in zip(rows, keep) if k]
    kept_cols = [c for c, k in zip(cols, keep) if k]
    row_ids = {r: k for k, r in enumerate(dict.fromkeys(kept_rows))}
    col_ids = {c: k for k, c in enumerate(dict.fromkeys(kept_cols))}
    result = {"mean_difference": None, "low": None, "high": None, "n_pairs": int(keep.sum()),
              "n_dropped": int((~keep).sum()), "n_rows": len(row_ids), "n_cols": len(col_ids),
              "n_empty_resamples": 0, "resampled": "rows and columns", "confidence": confidence,
              "n_resamples": n_resamples, "seed": seed}
    if not keep.any():
        return result
    d = np.full((len(row_ids), len(col_ids)), np.nan)
    for r, c, value in zip(kept_rows, kept_cols, a[keep] - b[keep]):
        d[row_ids[r], col_ids[c]] = value
    finite = np.isfinite(d)
    values = np.where(finite, d, 0.0)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_resamples, 1000):  # chunks bound the (resamples, rows, cols) array
        n = min(1000, n_resamples - start)
        ri = rng.integers(0, d.shape[0], size=(n, d.shape[0]))[:, :, None]
        ci = rng.integers(0, d.shape[1], size=(n, d.shape[1]))[:, None, :]
        total, count = values[ri, ci].sum(axis=(1, 2)), finite[ri, ci].sum(axis=(1, 2))
        means.append(total[count > 0] / count[count > 0])
    means = np.concatenate(means)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    result.update(mean_difference=float(d[finite].mean()), low=float(low), high=float(high),
                  n_empty_resamples=int(n_resamples - means.size))
    return result

"""Per-voxel uncertainty of a prediction and the ranking of cases for annotation (pure numpy).

All maps are in nats (natural logarithm); ``0 · log 0 = 0``. Shapes: ``C`` classes (softmax) or ``R`` regions
(sigmoid, nnU-Net's region-based training), ``K`` heads, ``*S`` the spatial shape (2D or 3D, any size).

* :func:`softmax_entropy`: ``H(p) = -Σ_c p_c log p_c`` of a class distribution; in ``[0, log C]``.
* :func:`mean_binary_entropy`: for independent sigmoid outputs (regions such as BraTS WT/TC/ET), the mean over
  regions of the binary entropy ``h(p_r) = -p_r log p_r - (1 - p_r) log(1 - p_r)``; in ``[0, log 2]``.
* :func:`head_disagreement`: the disagreement of the heads of a multi-head network, the mean over heads of the
  Kullback–Leibler divergence of each head's distribution from the heads' mean distribution (the generalised
  Jensen–Shannon divergence, i.e. the mutual information between the head index and the predicted class).
* :func:`ranking_score`, :func:`rank_cases`: one number per case, and the order in which to annotate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.special import entr


def _check_probabilities(probabilities: np.ndarray, name: str = "probabilities") -> np.ndarray:
    array = np.asarray(probabilities)
    if array.ndim < 2:
        raise ValueError(f"{name} must have shape (channels, *spatial), got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contain non-finite values (NaN or inf); check the input images.")
    return array


def softmax_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of a per-voxel class distribution.

    ``H(p)(x) = -Σ_c p_c(x) log p_c(x)`` with ``0 · log 0 = 0``.

    Args:
        probabilities: (C, *S) softmax probabilities (summing to 1 over axis 0).

    Returns:
        (*S) entropy in nats, in ``[0, log C]``; float32 (float64 for float64 input).

    Raises:
        ValueError: if the array has fewer than 2 dimensions or contains NaN/inf.
    """
    p = _check_probabilities(probabilities)
    return entr(np.clip(p, 0, 1)).sum(axis=0)


def mean_binary_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Mean binary entropy over independent sigmoid outputs (nnU-Net's regions).

    ``H(x) = (1/R) Σ_r h(p_r(x))``, ``h(q) = -q log q - (1 - q) log(1 - q)``. A region model has no single class
    distribution per voxel, so this is the uncertainty we report for it (said so in the output README).

    Args:
        probabilities: (R, *S) sigmoid probabilities, one channel per region.

    Returns:
        (*S) mean binary entropy in nats, in ``[0, log 2]``.

    Raises:
        ValueError: if the array has fewer than 2 dimensions or contains NaN/inf.
    """
    p = np.clip(_check_probabilities(probabilities), 0, 1)
    return (entr(p) + entr(1 - p)).mean(axis=0)


def predictive_entropy(probabilities: np.ndarray, sigmoid: bool = False) -> np.ndarray:
    """:func:`softmax_entropy` (``sigmoid=False``) or :func:`mean_binary_entropy` (``sigmoid=True``).

    Args:
        probabilities: (C, *S) softmax or (R, *S) sigmoid probabilities.
        sigmoid: whether the channels are independent sigmoid outputs (region-based model).

    Returns:
        (*S) entropy in nats.
    """
    return mean_binary_entropy(probabilities) if sigmoid else softmax_entropy(probabilities)


def max_entropy(num_channels: int, sigmoid: bool = False) -> float:
    """Upper bound of :func:`predictive_entropy`: ``log C`` (softmax) or ``log 2`` (sigmoid)."""
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}.")
    return math.log(2) if sigmoid else math.log(num_channels)


def head_disagreement(head_probabilities: np.ndarray | Sequence[np.ndarray], sigmoid: bool = False) -> np.ndarray:
    """Disagreement of the heads of a multi-head network: mean KL divergence of each head from the heads' mean.

    Softmax heads, with ``p̄ = (1/K) Σ_k p_k``::

        D(x) = (1/K) Σ_k KL(p_k(x) ‖ p̄(x)) = H(p̄(x)) - (1/K) Σ_k H(p_k(x))

    (the generalised Jensen–Shannon divergence of the heads = the mutual information between the head index and
    the class), in ``[0, min(log K, log C)]``; 0 exactly when all heads predict the same distribution. Sigmoid
    (region) heads: the same quantity for each region's Bernoulli distribution, averaged over regions, in
    ``[0, min(log K, log 2)]``. Computed through the entropy form and clipped at 0 against rounding.

    Args:
        head_probabilities: (K, C, *S) array or a sequence of K (C, *S) arrays, each head's probabilities.
        sigmoid: whether the channels are independent sigmoid outputs (region-based model).

    Returns:
        (*S) disagreement in nats.

    Raises:
        ValueError: fewer than 2 heads, heads of different shapes, or non-finite values.
    """
    heads = [_check_probabilities(h, "head probabilities") for h in head_probabilities]
    if len(heads) < 2:
        raise ValueError(f"head_disagreement needs at least 2 heads, got {len(heads)}.")
    if any(h.shape != heads[0].shape for h in heads):
        raise ValueError(f"all heads must have the same shape, got {[h.shape for h in heads]}.")
    mean = sum(h.astype(np.float64) for h in heads) / len(heads)
    entropy_of_mean = predictive_entropy(mean, sigmoid)
    mean_entropy = sum(predictive_entropy(h.astype(np.float64), sigmoid) for h in heads) / len(heads)
    return np.maximum(entropy_of_mean - mean_entropy, 0.0).astype(heads[0].dtype)


def uncertain_region(entropy: np.ndarray, foreground: np.ndarray, spacing: Sequence[float] | None = None,
                     margin_mm: float = 3.0, entropy_threshold: float | None = None) -> np.ndarray:
    """Voxels over which a case's uncertainty is scored: predicted foreground ∪ a margin ∪ very uncertain voxels.

    ``ROI = {x : dist_mm(x, foreground) <= margin_mm} ∪ {x : entropy(x) >= entropy_threshold}``. The margin holds
    the boundary, where a segmentation's errors are; the threshold adds places where the model nearly predicted
    foreground but did not (a missed lesion has uncertain voxels and no foreground).

    Args:
        entropy: (*S) uncertainty map.
        foreground: (*S) boolean predicted foreground (any label > 0, or any region).
        spacing: voxel size per axis of ``*S`` in mm (default 1 for every axis).
        margin_mm: distance from the foreground within which voxels belong to the ROI (0: the foreground only).
        entropy_threshold: voxels at or above it belong to the ROI (None: none added).

    Returns:
        (*S) boolean ROI.
    """
    entropy = np.asarray(entropy)
    foreground = np.asarray(foreground, dtype=bool)
    if entropy.shape != foreground.shape:
        raise ValueError(f"entropy {entropy.shape} and foreground {foreground.shape} must have the same shape.")
    if margin_mm < 0:
        raise ValueError(f"margin_mm must be >= 0, got {margin_mm}.")
    spacing = [1.0] * entropy.ndim if spacing is None else [float(s) for s in spacing]
    if len(spacing) != entropy.ndim:
        raise ValueError(f"spacing {spacing} must have one value per axis of shape {entropy.shape}.")
    if not foreground.any():
        roi = np.zeros_like(foreground)
    elif margin_mm == 0 or foreground.all():
        roi = foreground.copy()
    else:
        roi = distance_transform_edt(~foreground, sampling=spacing) <= margin_mm
    if entropy_threshold is not None:
        roi |= entropy >= entropy_threshold
    return roi


def ranking_score(entropy: np.ndarray, foreground: np.ndarray, spacing: Sequence[float] | None = None,
                  margin_mm: float = 3.0, entropy_threshold: float | None = None,
                  disagreement: np.ndarray | None = None) -> dict:
    """Summary numbers of one case; ``score`` orders cases for annotation (higher = annotate sooner).

    ``score`` = mean entropy over :func:`uncertain_region` (predicted foreground ∪ ``margin_mm`` ∪ voxels with
    entropy >= ``entropy_threshold``), or the whole-image mean when that region is empty (the model is confident
    everywhere and predicts nothing). The whole-image mean is reported too but is not the score: it is dominated by
    the amount of confidently predicted background, i.e. by the field of view.

    Args:
        entropy: (*S) entropy map.
        foreground: (*S) boolean predicted foreground.
        spacing: voxel size per axis in mm.
        margin_mm: see :func:`uncertain_region`.
        entropy_threshold: see :func:`uncertain_region`.
        disagreement: optional (*S) head-disagreement map, summarised over the same region.

    Returns:
        Dict with ``score``, ``roi_mean_entropy`` (NaN for an empty region), ``image_mean_entropy``,
        ``roi_voxels``, ``foreground_voxels`` and, with ``disagreement``, ``roi_mean_disagreement``,
        ``image_mean_disagreement`` and ``disagreement_score`` (the same rule as ``score``, on the disagreement).
    """
    entropy = np.asarray(entropy, dtype=np.float64)
    roi = uncertain_region(entropy, foreground, spacing, margin_mm, entropy_threshold)
    roi_voxels = int(roi.sum())
    result = {
        "roi_mean_entropy": float(entropy[roi].mean()) if roi_voxels else float("nan"),
        "image_mean_entropy": float(entropy.mean()),
        "roi_voxels": roi_voxels,
        "foreground_voxels": int(np.count_nonzero(foreground)),
    }
    result["score"] = result["roi_mean_entropy"] if roi_voxels else result["image_mean_entropy"]
    if disagreement is not None:
        disagreement = np.asarray(disagreement, dtype=np.float64)
        if disagreement.shape != entropy.shape:
            raise ValueError(f"disagreement {disagreement.shape} and entropy {entropy.shape} differ in shape.")
        result["roi_mean_disagreement"] = float(disagreement[roi].mean()) if roi_voxels else float("nan")
        result["image_mean_disagreement"] = float(disagreement.mean())
        result["disagreement_score"] = (result["roi_mean_disagreement"] if roi_voxels
                                        else result["image_mean_disagreement"])
    return result


def rank_cases(scores: Mapping[str, Mapping[str, float]], key: str = "score") -> list[tuple[int, str]]:
    """Order cases for annotation: highest ``key`` first; ties by case name; NaN last.

    Args:
        scores: case id -> summary dict (e.g. from :func:`ranking_score`).
        key: the entry to rank by.

    Returns:
        ``[(rank, case_id), ...]`` with ranks 1..n.

    Raises:
        KeyError: naming the missing key and the available ones.
    """
    def sort_key(case: str):
        if key not in scores[case]:
            raise KeyError(f"case {case!r} has no {key!r}; available: {sorted(scores[case])}")
        value = float(scores[case][key])
        return (math.isnan(value), -value if not math.isnan(value) else 0.0, case)

    return [(rank, case) for rank, case in enumerate(sorted(scores, key=sort_key), start=1)]

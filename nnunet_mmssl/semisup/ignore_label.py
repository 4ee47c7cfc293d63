"""The arithmetic of ignore-masked pseudo-labels, shared by ``nnUNetv2_mmssl_selftrain``
(:mod:`nnunet_mmssl.semisup.selftrain`) and the study's self-training arm (:mod:`nnunet_mmssl.study.selftrain_arm`):
nnU-Net's ignore label of a ``dataset.json`` and the voxels that carry it (normalised entropy above a threshold)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["DEFAULT_THRESHOLD", "ignore_label_value", "mask_uncertain", "normalised_entropy", "with_ignore_label"]

#: default normalised-entropy threshold above which a pseudo-label voxel carries the ignore label. Measured on the
#: phantom (8 unlabelled cases, a 2d nnUNetTrainer teacher of 3 x 25 iterations, pseudo-label Dice 0.90): it is the
#: knee of the error rate of the voxels a threshold adds to the ignored ones -- 25-27 % of them are wrong in the bands
#: (0.5, 0.7] and (0.7, 0.9], 12 % in (0.3, 0.5], 7 % in (0.1, 0.3]. At 0.5, 262 voxels (0.12 %) are ignored, 29 %
#: of them wrong, removing 76 of the 145 wrong voxels (52 %); 0.03 % of the kept voxels are wrong.
DEFAULT_THRESHOLD = 0.5


def normalised_entropy(entropy: np.ndarray, num_outputs: int, sigmoid: bool) -> np.ndarray:
    """Entropy divided by its maximum: ``H / log C`` (softmax, ``C`` classes) or ``H / log 2`` (regions: the mean
    binary entropy of :func:`~nnunet_mmssl.semisup.uncertainty.mean_binary_entropy`), in [0, 1].

    Args:
        entropy: (*S) entropy in nats (:func:`~nnunet_mmssl.semisup.uncertainty.predictive_entropy`).
        num_outputs: the network's output channels (classes, or regions).
        sigmoid: region (sigmoid) model.
    """
    from nnunet_mmssl.semisup.uncertainty import max_entropy

    return np.asarray(entropy, dtype=np.float32) / np.float32(max_entropy(num_outputs, sigmoid))


def ignore_label_value(labels: Mapping[str, int | Sequence[int]]) -> int:
    """nnU-Net's ignore label for ``labels`` (``dataset.json``): the existing ``ignore`` entry, else the highest
    integer label (regions: the highest integer in any region) + 1 -- nnU-Net requires it to be the highest label."""
    if "ignore" in labels:
        return int(labels["ignore"])
    values = [int(v) for key, value in labels.items()
              for v in (value if isinstance(value, (list, tuple)) else [value])]
    return max(values) + 1


def with_ignore_label(labels: Mapping[str, int | Sequence[int]]) -> dict:
    """A copy of ``labels`` with ``"ignore": ignore_label_value(labels)`` (the input is not modified)."""
    out = copy.deepcopy(dict(labels))
    out["ignore"] = ignore_label_value(labels)
    return out


def mask_uncertain(segmentation: np.ndarray, entropy_normalised: np.ndarray, threshold: float,
                   ignore_label: int) -> np.ndarray:
    """The pseudo-label with every voxel whose normalised entropy is above ``threshold`` set to ``ignore_label``.

    Args:
        segmentation: (*S) integer label map (nnU-Net's export).
        entropy_normalised: (*S) normalised entropy (:func:`normalised_entropy`).
        threshold: in [0, 1]; voxels with ``entropy_normalised > threshold`` are ignored (1: none).
        ignore_label: the value written there.

    Returns:
        (*S) label map, dtype uint8 (uint16 if ``ignore_label`` > 255).
    """
    if segmentation.shape != entropy_normalised.shape:
        raise ValueError(f"label map {segmentation.shape} and entropy map {entropy_normalised.shape} differ in shape")
    dtype = np.uint8 if ignore_label <= 255 else np.uint16
    out = segmentation.astype(dtype, copy=True)
    out[entropy_normalised > threshold] = ignore_label
    return out

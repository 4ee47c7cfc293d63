"""Consistency losses between the predictions of several heads on unlabelled data.

``cross_modal_consistency_loss`` is eq. (4) of Chung et al. 2025 (MemCif): the squared difference between the
probability maps of the two modality branches on unlabelled images, with gradient to both branches. Two reductions:

* ``"printed"`` -- eq. (4) as printed, ``L = (1/M) sum_j ||p1_j - p2_j||^2``: the squared norm runs over all pixels
  and classes of sample j, averaged over the M samples. A per-sample sum grows with the patch, so it is taken in a
  patch-size-independent form: ``reference_voxels * mean_{samples, voxels} sum_{classes} (p1 - p2)^2``, which equals
  the printed sum on a sample of ``reference_voxels`` voxels (the paper's 240 x 240 slices: 57,600) and keeps the
  paper's weight 0.01 meaningful for any patch, 2D or 3D.
* ``"mean"`` -- ``mean((p1 - p2)^2)`` over samples, classes and voxels (SSL4MIS's softmax MSE). For C classes it is
  ``printed / (C * reference_voxels)``: 4-5 orders of magnitude weaker at the same weight.
"""

import torch
from torch import nn

from nnunet_mmssl.losses.precision import float32_region

#: voxels of one sample of the MemCif paper (240 x 240 BraTS slices), the reference of the ``"printed"`` reduction
PAPER_SAMPLE_VOXELS = 240 * 240
REDUCTIONS = ("printed", "mean")


@float32_region
def probabilities(logits: torch.Tensor, use_sigmoid: bool = False) -> torch.Tensor:
    """Softmax over the channel axis (or sigmoid for nnU-Net's region-based training). Shape (B, C, *S) kept."""
    return torch.sigmoid(logits) if use_sigmoid else torch.softmax(logits, dim=1)


@float32_region
def cross_modal_consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor,
                                 use_sigmoid: bool = False, reduction: str = "mean",
                                 reference_voxels: int = PAPER_SAMPLE_VOXELS) -> torch.Tensor:
    """Squared difference of the two heads' probability maps, reduced as eq. (4) prints it or as a mean.

    Gradient flows into both inputs (neither side is detached), as in eq. (4)-(5) of the paper.

    Args:
        logits_a: (B, C, *S) raw logits of head a on unlabelled data (2D or 3D).
        logits_b: (B, C, *S) raw logits of head b.
        use_sigmoid: use per-channel sigmoid instead of softmax (region-based training).
        reduction: ``"mean"`` = ``mean((p_a - p_b)^2)`` over batch, classes and space; ``"printed"`` =
            ``reference_voxels * mean_{B, S} sum_C (p_a - p_b)^2`` (the paper's per-sample squared norm on a sample of
            ``reference_voxels`` voxels, averaged over samples).
        reference_voxels: voxels per sample of the ``"printed"`` reduction (default 240 x 240).

    Returns:
        A scalar tensor (float32).
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"cross_modal_consistency_loss needs equal shapes, got {tuple(logits_a.shape)} and "
                         f"{tuple(logits_b.shape)}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown consistency reduction {reduction!r}; use one of {REDUCTIONS}.")
    p_a = probabilities(logits_a.float(), use_sigmoid)
    p_b = probabilities(logits_b.float(), use_sigmoid)
    squared = (p_a - p_b) ** 2
    if reduction == "mean":
        return torch.mean(squared)
    if reference_voxels <= 0:
        raise ValueError(f"reference_voxels must be > 0, got {reference_voxels}.")
    return squared.sum(dim=1).mean() * float(reference_voxels)


@float32_region
def pairwise_consistency_loss(logits: list[torch.Tensor], use_sigmoid: bool = False, reduction: str = "mean",
                              reference_voxels: int = PAPER_SAMPLE_VOXELS) -> torch.Tensor:
    """Mean of :func:`cross_modal_consistency_loss` over all pairs of heads (the two-head case is eq. (4))."""
    if len(logits) < 2:
        raise ValueError(f"consistency needs at least two heads, got {len(logits)}.")
    pairs = [(i, j) for i in range(len(logits)) for j in range(i + 1, len(logits))]
    return sum(cross_modal_consistency_loss(logits[i], logits[j], use_sigmoid, reduction, reference_voxels)
               for i, j in pairs) / len(pairs)


class CrossModalConsistencyLoss(nn.Module):
    """Module wrapper of :func:`pairwise_consistency_loss`."""

    def __init__(self, use_sigmoid: bool = False, reduction: str = "mean",
                 reference_voxels: int = PAPER_SAMPLE_VOXELS):
        super().__init__()
        self.use_sigmoid = use_sigmoid
        self.reduction = reduction
        self.reference_voxels = reference_voxels

    def forward(self, logits: list[torch.Tensor]) -> torch.Tensor:
        return pairwise_consistency_loss(logits, self.use_sigmoid, self.reduction, self.reference_voxels)

"""Consistency losses between the predictions of several heads on unlabelled data.

``cross_modal_consistency_loss`` is eq. (4) of Chung et al. 2025 (MemCif): the mean squared difference between the
probability maps of the two modality branches on unlabelled images, with gradient to both branches.
"""

import torch
from torch import nn


def probabilities(logits: torch.Tensor, use_sigmoid: bool = False) -> torch.Tensor:
    """Softmax over the channel axis (or sigmoid for nnU-Net's region-based training). Shape (B, C, *S) kept."""
    return torch.sigmoid(logits) if use_sigmoid else torch.softmax(logits, dim=1)


def cross_modal_consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor,
                                 use_sigmoid: bool = False) -> torch.Tensor:
    """``mean((p_a - p_b)^2)`` over batch, classes and space, with ``p = softmax(logits)``.

    Gradient flows into both inputs (neither side is detached), as in eq. (4)-(5) of the paper.

    Args:
        logits_a: (B, C, *S) raw logits of head a on unlabelled data.
        logits_b: (B, C, *S) raw logits of head b.
        use_sigmoid: use per-channel sigmoid instead of softmax (region-based training).

    Returns:
        A scalar tensor (float32).
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"cross_modal_consistency_loss needs equal shapes, got {tuple(logits_a.shape)} and "
                         f"{tuple(logits_b.shape)}.")
    p_a = probabilities(logits_a.float(), use_sigmoid)
    p_b = probabilities(logits_b.float(), use_sigmoid)
    return torch.mean((p_a - p_b) ** 2)


def pairwise_consistency_loss(logits: list[torch.Tensor], use_sigmoid: bool = False) -> torch.Tensor:
    """Mean of :func:`cross_modal_consistency_loss` over all pairs of heads (the two-head case is eq. (4))."""
    if len(logits) < 2:
        raise ValueError(f"consistency needs at least two heads, got {len(logits)}.")
    pairs = [(i, j) for i in range(len(logits)) for j in range(i + 1, len(logits))]
    return sum(cross_modal_consistency_loss(logits[i], logits[j], use_sigmoid) for i, j in pairs) / len(pairs)


class CrossModalConsistencyLoss(nn.Module):
    """Module wrapper of :func:`pairwise_consistency_loss`."""

    def __init__(self, use_sigmoid: bool = False):
        super().__init__()
        self.use_sigmoid = use_sigmoid

    def forward(self, logits: list[torch.Tensor]) -> torch.Tensor:
        return pairwise_consistency_loss(logits, self.use_sigmoid)

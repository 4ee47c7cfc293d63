"""Contrastive mutual learning between two modality branches (Meng et al. 2025, eqs. 5-6).

D. Meng, S. Li, H. Wu, G. Wang, X. Yan, "Semi-Supervised Multi-Modal Medical Image Segmentation for Complex
Situations", MICCAI 2025, Sec. 2.2 (after Zhang et al., "Multi-modal contrastive mutual learning and pseudo-label
re-learning for semi-supervised medical image segmentation", MedIA 2023). On unlabelled data each branch's prediction
is the pseudo-label of the other, ``pl^a = f(x^a)``, ``pl^b = g(x^b)`` (eq. 5), and

    L_unsup = ||f(x^a) - sg(pl^b)||^2 + ||g(x^b) - sg(pl^a)||^2                                     (eq. 6)

where ``sg`` is stop-gradient ("gradient back-propagation is not performed between pl^a and f(x^a), nor between
pl^b and g(x^b)"). Predictions are probabilities (softmax over classes; sigmoid for nnU-Net's region-based training).
The total loss is ``L_sup + alpha * L_unsup`` with ``alpha = 1.0`` in the paper; the trainer applies alpha.

Reduction: each squared norm is taken as the *mean* over batch, classes and voxels (as ``torch.nn.MSELoss``), and the
two terms are *summed*. A sum over classes and voxels instead would only rescale the loss by ``C * N``, i.e. change the
meaning of alpha with the patch size. Note that the two stop-gradient terms together have the same gradient as one
undetached ``mean((p_a - p_b)^2)`` (each branch is pulled towards the other by exactly one term), at twice its value.
"""

import torch
from torch import nn

from nnunet_mmssl.losses.consistency import probabilities
from nnunet_mmssl.losses.precision import float32_region


@float32_region
def contrastive_mutual_learning_loss(logits_a: torch.Tensor, logits_b: torch.Tensor,
                                     use_sigmoid: bool = False) -> torch.Tensor:
    """``mean((p_a - sg(p_b))^2) + mean((p_b - sg(p_a))^2)`` with ``p = softmax(logits)`` (Meng et al. 2025, eq. 6).

    Args:
        logits_a: (B, C, *S) raw logits of branch a (modality a) on unlabelled data.
        logits_b: (B, C, *S) raw logits of branch b.
        use_sigmoid: per-channel sigmoid instead of softmax (nnU-Net's region-based training).

    Returns:
        A scalar float32 tensor. Its gradient reaches ``logits_a`` only through the first term and ``logits_b`` only
        through the second; the pseudo-labels are detached.

    Raises:
        ValueError: if the shapes differ.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"contrastive_mutual_learning_loss needs equal shapes, got {tuple(logits_a.shape)} and "
                         f"{tuple(logits_b.shape)}.")
    p_a = probabilities(logits_a.float(), use_sigmoid)
    p_b = probabilities(logits_b.float(), use_sigmoid)
    return torch.mean((p_a - p_b.detach()) ** 2) + torch.mean((p_b - p_a.detach()) ** 2)


class ContrastiveMutualLearningLoss(nn.Module):
    """Module wrapper of :func:`contrastive_mutual_learning_loss`.

    Args:
        use_sigmoid: per-channel sigmoid instead of softmax.
    """

    def __init__(self, use_sigmoid: bool = False):
        super().__init__()
        self.use_sigmoid = use_sigmoid

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        """Args: logits_a, logits_b (B, C, *S). Returns: scalar loss."""
        return contrastive_mutual_learning_loss(logits_a, logits_b, self.use_sigmoid)

"""SMML's hierarchical consistency losses (Liang et al. 2025, eqs. 1-9, 11): PBC, FRC and the refinement KL.

Every function here runs in float32 with autocast switched off (:func:`~nnunet_mmssl.losses.precision.float32_region`):
FRC's per-class sums over a 64^3 feature map exceed float16's range, and the KL at temperature 6 and the entropies
need float32 logarithms.

Outputs are either softmax logits (B, C, *S) over classes or, for nnU-Net region datasets, sigmoid logits (B, R, *S)
of overlapping regions (``sigmoid=True``): each region is then an independent Bernoulli distribution, and cross
entropy, KL and entropy are summed over the regions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_mmssl.losses.precision import float32_region


def _log_probs(logits: torch.Tensor, sigmoid: bool, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log (1 - p)) for sigmoid outputs, (log_softmax, None) for softmax ones; float32."""
    z = logits.float() / temperature
    if sigmoid:
        return F.logsigmoid(z), F.logsigmoid(-z)
    return F.log_softmax(z, 1), None


@float32_region
def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, sigmoid: bool = False) -> torch.Tensor:
    """Eq. 1: per-voxel cross entropy (B, *S) against the labels.

    Args:
        logits: (B, C, *S).
        target: softmax: (B, *S) or (B, 1, *S) class indices; sigmoid: (B, R, *S) binary regions.
    """
    if sigmoid:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").sum(1)
    if target.ndim == logits.ndim:
        target = target[:, 0]
    return F.cross_entropy(logits.float(), target.long(), reduction="none")


@float32_region
def distribution_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, sigmoid: bool = False,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-voxel ``KL(p_teacher || p_student)`` (B, *S) of the temperature-scaled distributions."""
    log_t, log_t_neg = _log_probs(teacher_logits, sigmoid, temperature)
    log_s, log_s_neg = _log_probs(student_logits, sigmoid, temperature)
    if sigmoid:
        kl = log_t.exp() * (log_t - log_s) + log_t_neg.exp() * (log_t_neg - log_s_neg)
        return kl.sum(1)
    return (log_t.exp() * (log_t - log_s)).sum(1)


@float32_region
def pbc_loss(logits1: torch.Tensor, logits2: torch.Tensor, target: torch.Tensor, temperature: float = 6.0,
             sigmoid: bool = False, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-level bidirectional constraint (eqs. 1-3): ``(L1_pc, L2_pc)``.

    Where branch 1's cross entropy to the label is larger (``T = Q1 > Q2``), branch 1 learns from branch 2:
    ``KL(p2^tau || p1^tau)`` with branch 2 detached, averaged over those ``N21`` voxels; elsewhere branch 2 learns
    from branch 1 (averaged over ``N12``). The paper prints ``KL(Y1/tau || Y2/tau)`` for branch 1; we take the
    distillation direction (teacher first) of Hinton et al., which the paper cites, and no ``tau^2`` factor (none is
    printed). Gradient reaches only the less reliable branch of each voxel.

    Args:
        logits1, logits2: (B, C, *S) full-resolution logits of the two branches.
        target: labels as for :func:`pixel_cross_entropy`.
        temperature: tau (paper 6).
        sigmoid: region outputs.
        valid: optional (B, *S) bool of the voxels to use (ignore label).

    Returns:
        The two branches' losses (0 where a direction has no voxel).
    """
    with torch.no_grad():
        q1 = pixel_cross_entropy(logits1, target, sigmoid)
        q2 = pixel_cross_entropy(logits2, target, sigmoid)
        to_1 = q1 > q2
        to_2 = ~to_1
        if valid is not None:
            to_1 &= valid
            to_2 &= valid
    kl_1 = distribution_kl(logits2.detach(), logits1, sigmoid, temperature)
    kl_2 = distribution_kl(logits1.detach(), logits2, sigmoid, temperature)
    loss_1 = (kl_1 * to_1).sum() / to_1.sum().clamp_min(1)
    loss_2 = (kl_2 * to_2).sum() / to_2.sum().clamp_min(1)
    return loss_1, loss_2


@float32_region
def class_prototypes(features: torch.Tensor, classes: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: per-sample class prototypes (masked means of the features).

    Args:
        features: (B, D, *s) fused features.
        classes: (B, *S) long class of each voxel (resized to ``s`` by nearest neighbour here if needed), -1 = ignore.
        num_classes: C.

    Returns:
        ``(prototypes (B, C, D), present (B, C) bool)``: a class without voxels in a sample is absent.
    """
    if classes.shape[1:] != features.shape[2:]:
        classes = F.interpolate(classes[:, None].float(), size=features.shape[2:], mode="nearest")[:, 0].long()
    one_hot = torch.stack([(classes == c) for c in range(num_classes)], 1).to(features.dtype)  # (B, C, *s)
    counts = one_hot.flatten(2).sum(-1)  # (B, C)
    sums = torch.einsum("bcn,bdn->bcd", one_hot.flatten(2), features.flatten(2))
    return sums / counts.clamp_min(1).unsqueeze(-1), counts > 0


@float32_region
def class_entropy_weights(logits1: torch.Tensor, logits2: torch.Tensor, sigmoid: bool = False) -> torch.Tensor:
    """Eqs. 7-8: per sample and class, the mean over voxels of ``-p_c log p_c`` averaged over the two branches (B, C).

    The paper sums over voxels; we take the mean so that the weights do not scale with the patch size. For region
    outputs the class list is background + regions (see :func:`regions_to_classes`): a region's weight is its binary
    entropy, the background's the mean of the regions'.
    """
    def one(logits):
        log_p, log_q = _log_probs(logits, sigmoid)
        if sigmoid:
            entropy = -(log_p.exp() * log_p + log_q.exp() * log_q)  # (B, R, *S)
            per_region = entropy.flatten(2).mean(-1)
            return torch.cat([per_region.mean(1, keepdim=True), per_region], 1)
        return (-(log_p.exp() * log_p)).flatten(2).mean(-1)

    with torch.no_grad():
        return (one(logits1) + one(logits2)) / 2


@float32_region
def frc_loss(features1: torch.Tensor, features2: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor,
             num_classes: int) -> torch.Tensor:
    """Feature-level relational constraint (eqs. 4-9).

    Cosine relation matrices ``R_i`` ((B*C) x (B*C)) of the per-sample class prototypes of each branch,
    ``D^{b,c} = sum over columns of (R1 - R2)^2``, ``L_fc = sum_{b,c} D^{b,c} W^{b,c}``; prototypes of classes absent
    from a sample are left out (rows and columns). Gradient reaches both branches' features; the weights are
    constants.

    Args:
        features1, features2: (B, D, *s) fused features of the two branches.
        classes: (B, *S) long labels (-1 = ignore).
        weights: (B, C) from :func:`class_entropy_weights`.
        num_classes: C.
    """
    p1, present = class_prototypes(features1.float(), classes, num_classes)
    p2, _ = class_prototypes(features2.float(), classes, num_classes)
    # absent prototypes are masked out of rows and columns (no boolean indexing: no host-device sync on CUDA)
    keep = present.flatten().to(p1.dtype)
    v1 = F.normalize(p1.flatten(0, 1), dim=1)
    v2 = F.normalize(p2.flatten(0, 1), dim=1)
    pair = keep[:, None] * keep[None, :]
    difference = (((v1 @ v1.T - v2 @ v2.T) * pair) ** 2).sum(1)
    return (difference * weights.detach().flatten().to(difference.dtype) * keep).sum()


@float32_region
def refinement_kl(initial_logits: torch.Tensor, refined_logits: torch.Tensor, sigmoid: bool = False,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 11: ``KL(p_initial || p_refined)``, mean over voxels, gradient to both (none is stopped in the paper)."""
    kl = distribution_kl(initial_logits, refined_logits, sigmoid)
    if valid is None:
        return kl.mean()
    return (kl * valid).sum() / valid.sum().clamp_min(1)

"""Modality-level prototype bank (MLPB) and modality prototype contrastive learning (MPCL) of DBDC.

Chen et al., "Double Bank Dual Consistency" (dbdc_chen2024.txt), section III-A-2:

* eqs. (4)-(6): Sinkhorn-Knopp assignment of pixel embeddings to the class prototypes of their modality
  (:func:`sinkhorn_knopp`, as in SwAV and ProtoSeg);
* eq. (7): EMA update of the prototypes from the embeddings of correctly predicted pixels (:class:`PrototypeBank`);
* eqs. (8)-(12): the four MPCL terms and their mean (:func:`pseg_loss`, :func:`modality_contrast_loss`,
  :func:`prototype_contrast_loss`, :func:`prototype_distance_loss`, :func:`mpcl_loss`).

Shapes: ``K`` modalities, ``C`` classes (background included), ``D`` embedding channels, ``B`` samples, ``*S`` the
spatial axes (2D or 3D), ``N`` voxels. The prototypes are a buffer, never a parameter: every loss here detaches them,
so gradient reaches the embeddings (and through them the projector and the network) only; the prototypes move by
:meth:`PrototypeBank.update` alone.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_mmssl.diagnostics import debug_checks_enabled
from nnunet_mmssl.losses.precision import float32_region

MPCL_TERMS = ("pseg", "mc", "pc", "pd")


@torch.no_grad()
@float32_region
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft equipartitioned assignment of N items to C prototypes (eqs. 5-6; SwAV / ProtoSeg solver).

    ``Q = exp((scores - max) / epsilon)`` normalised to total 1; each iteration scales the rows to sum ``1/C``, then
    the columns to sum ``1/N``; the result is ``Q * N``, so every column (one item) sums to 1. With enough
    iterations every row sums to about ``N / C`` (equipartition). ``diag(u) exp(scores / epsilon) diag(v)`` of eq. (6)
    is exactly this product of row and column scalings.

    No gradient: computed under ``torch.no_grad`` on a detached copy, in float64 (``exp`` of cosine scores over 0.05
    spans 40 e-folds; float64 keeps every entry positive). A row or column that underflows to all zeros stays zero
    instead of turning into NaN.

    Args:
        scores: (C, N) similarities of N items to C prototypes (any float dtype).
        epsilon: entropic smoothness (``phi`` of eq. 5); smaller is closer to a hard assignment.
        iterations: Sinkhorn-Knopp iterations (3 in the paper's public code and in SwAV).
        mask: optional (N,) bool, the items that take part: the result equals ``sinkhorn_knopp`` of the masked
            items' columns alone (their columns), with zero columns elsewhere; ``N`` is then the number of masked
            items, a tensor (no host synchronisation).

    Returns:
        (C, N) assignment in float32 (float64 for float64 scores); columns sum to 1 (0 outside ``mask``). An empty
        ``N`` gives an empty (C, 0) tensor.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn_knopp needs (C, N) scores, got shape {tuple(scores.shape)}.")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn_knopp needs epsilon > 0, got {epsilon}.")
    num_prototypes, num_items = scores.shape
    out_dtype = torch.promote_types(scores.dtype, torch.float32)
    if num_items == 0 or num_prototypes == 0:
        return torch.zeros(scores.shape, dtype=out_dtype, device=scores.device)
    tiny = torch.finfo(torch.float64).tiny
    q = scores.detach().to(torch.float64)
    if mask is None:
        q = torch.exp((q - q.max()) / epsilon)
    else:
        mask = mask.to(device=q.device, dtype=torch.bool).reshape(1, -1)
        shift = torch.where(mask, q, torch.full_like(q, -torch.inf)).max()
        q = torch.where(mask, torch.exp((q - shift) / epsilon), torch.zeros_like(q))
        num_items = mask.sum()
    q = q / q.sum().clamp_min(tiny)
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True).clamp_min(tiny) / num_prototypes
        q = q / q.sum(dim=0, keepdim=True).clamp_min(tiny) / num_items
    return (q * num_items).to(out_dtype)


def _full_precision(device: torch.device):
    """Context that switches autocast off: the cosines feed a softmax at temperature 0.1 and Sinkhorn at 0.05."""
    return torch.autocast(device_type=device.type, enabled=False)


def _random_unit_prototypes(num_modalities: int, num_classes: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_modalities, num_classes, dim, generator=generator), dim=-1)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class PrototypeBank(nn.Module):
    """Per-modality class prototypes ``P_k = [p_c^k]`` (the MLPB of DBDC), updated by EMA, never by gradient.

    ``prototypes`` is a registered buffer of shape (K, C, D): saved in ``state_dict``, moved by ``.to()``, not a
    parameter (no optimiser sees it, no gradient reaches it). It is initialised with unit vectors drawn from a
    ``torch.Generator`` seeded with ``seed`` (same seed, same bank, on every rank).

    Args:
        num_modalities: K.
        num_classes: C (background included).
        dim: D, the embedding size (64 in the paper).
        momentum: EMA momentum ``alpha`` of eq. (7) (0.99 in the paper; ProtoSeg's public code uses 0.999).
        sinkhorn_epsilon: ``phi`` of eq. (5).
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        seed: seed of the initial prototypes.
    """

    prototypes: torch.Tensor

    def __init__(self, num_modalities: int, num_classes: int, dim: int = 64, momentum: float = 0.99,
                 sinkhorn_epsilon: float = 0.05, sinkhorn_iterations: int = 3, seed: int = 0):
        super().__init__()
        for name, value in (("num_modalities", num_modalities), ("num_classes", num_classes), ("dim", dim)):
            if int(value) < 1:
                raise ValueError(f"PrototypeBank needs {name} >= 1, got {value}.")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"PrototypeBank momentum must lie in [0, 1], got {momentum}.")
        self.num_modalities = int(num_modalities)
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.sinkhorn_epsilon = float(sinkhorn_epsilon)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.register_buffer("prototypes", _random_unit_prototypes(self.num_modalities, self.num_classes,
                                                                   self.dim, seed))

    def extra_repr(self) -> str:
        return (f"num_modalities={self.num_modalities}, num_classes={self.num_classes}, dim={self.dim}, "
                f"momentum={self.momentum}")

    @torch.no_grad()
    @float32_region
    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor,
               modality: int) -> torch.Tensor:
        """EMA update (eq. 7) of modality ``modality``'s prototypes from its correctly predicted voxels.

        Our reading of eqs. (4)-(7):

        1. Only the correctly predicted voxels (``correct``) take part; the others are ignored entirely.
        2. Their soft assignment ``Q = sinkhorn_knopp(P_k @ I^T)`` (C, M) over all C prototypes of modality k is
           computed (eqs. 5-6).
        3. The class mean of class c is the ``Q[c, n]``-weighted mean of the correct voxels whose label is c: the
           assignment is restricted to the voxel's own class, so voxels typical of their class weigh more, and a
           class never absorbs another class's voxels (the label decides the class, Sinkhorn only the weight).
        4. ``p_c = m * p_c + (1 - m) * mean_c`` then ``p_c /= ||p_c||`` (eq. 7 and re-projection on the sphere).
           A class without any correct voxel in the batch (on all ranks) keeps its prototype.

        Under ``torch.distributed`` the per-class weighted sums, weights and counts are all-reduced before the EMA,
        so every rank keeps identical prototypes (the Sinkhorn weights themselves are per rank). Scores and
        accumulation are in float32 whatever the embeddings' dtype, with autocast switched off.

        Args:
            embeddings: (N, D) L2-normalised embeddings of one modality's voxels (any float dtype; not modified).
            labels: (N,) long ground-truth classes in [0, C).
            correct: (N,) bool, True where the network's prediction equals the label.
            modality: the modality index k in [0, K).

        Returns:
            (C,) long: the number of correct voxels of each class that entered the update (summed over ranks).
        """
        if not 0 <= int(modality) < self.num_modalities:
            raise ValueError(f"PrototypeBank.update: modality {modality} is outside [0, {self.num_modalities}).")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"PrototypeBank.update needs (N, {self.dim}) embeddings, got {tuple(embeddings.shape)}.")
        n = embeddings.shape[0]
        if labels.shape != (n,) or correct.shape != (n,):
            raise ValueError(f"PrototypeBank.update needs labels and correct of shape ({n},), got "
                             f"{tuple(labels.shape)} and {tuple(correct.shape)}.")
        device = self.prototypes.device
        correct = correct.to(device=device, dtype=torch.bool)
        labels = labels.to(device=device, dtype=torch.long)
        if debug_checks_enabled() and bool(correct.any()):
            targets = labels[correct]
            if int(targets.min()) < 0 or int(targets.max()) >= self.num_classes:
                raise ValueError(f"PrototypeBank.update: labels must lie in [0, {self.num_classes}), got "
                                 f"[{int(targets.min())}, {int(targets.max())}].")
        # every voxel takes part with weight 0 unless correct: no boolean indexing (a host synchronisation)
        targets = torch.where(correct, labels, torch.zeros_like(labels))
        feats = embeddings.detach().to(device=device, dtype=torch.float32)
        own = self.prototypes[modality].float()
        with _full_precision(device):
            scores = own @ feats.T
        assignment = sinkhorn_knopp(scores, self.sinkhorn_epsilon, self.sinkhorn_iterations, mask=correct)
        weights = assignment.gather(0, targets[None])[0].float() * correct
        stats = torch.zeros(self.num_classes, self.dim + 2, device=device, dtype=torch.float32)
        stats[:, :self.dim].index_add_(0, targets, feats * weights[:, None])
        stats[:, self.dim].index_add_(0, targets, weights)
        stats[:, self.dim + 1].index_add_(0, targets, correct.float())
        if _distributed():
            torch.distributed.all_reduce(stats)
        sums, total_weight, counts = stats[:, :self.dim], stats[:, self.dim], stats[:, self.dim + 1]
        present = total_weight > 0
        means = sums / total_weight.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        updated = F.normalize(self.momentum * own + (1.0 - self.momentum) * means, dim=-1)
        new = torch.where(present[:, None], updated, own)
        self.prototypes[modality] = new.to(self.prototypes.dtype)
        return counts.round().long()


def _flatten(embeddings: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None,
             num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, D, *S), (B, [1,] *S), (B, [1,] *S) -> float32 (B, D, N), long (B, N) with invalid set to 0, float (B, N)."""
    if embeddings.ndim < 3:
        raise ValueError(f"MPCL needs (B, D, *S) embeddings, got shape {tuple(embeddings.shape)}.")
    batch, spatial = embeddings.shape[0], tuple(embeddings.shape[2:])
    if labels.ndim == embeddings.ndim and labels.shape[1] == 1:
        labels = labels[:, 0]
    if tuple(labels.shape) != (batch, *spatial):
        raise ValueError(f"MPCL labels must have shape {(batch, *spatial)} (or with a channel axis of 1), got "
                         f"{tuple(labels.shape)}.")
    if valid is None:
        mask = torch.ones(batch, *spatial, dtype=torch.bool, device=labels.device)
    else:
        if valid.ndim == embeddings.ndim and valid.shape[1] == 1:
            valid = valid[:, 0]
        if tuple(valid.shape) != (batch, *spatial):
            raise ValueError(f"MPCL valid mask must have shape {(batch, *spatial)}, got {tuple(valid.shape)}.")
        mask = valid.to(torch.bool)
    targets = torch.where(mask, labels.long(), torch.zeros((), dtype=torch.long, device=labels.device))
    if debug_checks_enabled() and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(f"MPCL labels of valid voxels must lie in [0, {num_classes}), got "
                         f"[{int(targets.min())}, {int(targets.max())}]; mark ignored voxels with `valid`.")
    return (embeddings.float().flatten(2), targets.flatten(1).to(embeddings.device),
            mask.flatten(1).to(device=embeddings.device, dtype=torch.float32))


def _check_bank(embeddings: torch.Tensor, prototypes: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    if prototypes.ndim != 3 or prototypes.shape[2] != embeddings.shape[1]:
        raise ValueError(f"MPCL needs (K, C, {embeddings.shape[1]}) prototypes for {embeddings.shape[1]}-channel "
                         f"embeddings, got {tuple(prototypes.shape)}.")
    modality = torch.as_tensor(modality, dtype=torch.long, device=embeddings.device).reshape(-1)
    if modality.numel() == 1 and embeddings.shape[0] != 1:
        modality = modality.expand(embeddings.shape[0])
    if modality.numel() != embeddings.shape[0]:
        raise ValueError(f"MPCL needs one modality index per sample ({embeddings.shape[0]}), got {modality.numel()}.")
    if debug_checks_enabled() and (int(modality.min()) < 0 or int(modality.max()) >= prototypes.shape[0]):
        raise ValueError(f"MPCL modality indices must lie in [0, {prototypes.shape[0]}), got {modality.tolist()}.")
    return modality


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


@float32_region
def prototype_similarity(embeddings: torch.Tensor, prototypes: torch.Tensor,
                         modality: torch.Tensor | int) -> torch.Tensor:
    """Cosine similarity ``s_k = <I_k, P_k>`` of every voxel with its own modality's class prototypes.

    Both sides are unit vectors, so the cosine is the dot product. The prototypes are detached. Computed in float32
    with autocast switched off (a half-precision cosine is off by ~1e-3, i.e. 1e-2 in the logits at tau = 0.1).

    Args:
        embeddings: (B, D, *S) embeddings, L2-normalised along D (2D or 3D; any float dtype).
        prototypes: (K, C, D) unit prototypes (e.g. ``PrototypeBank.prototypes``).
        modality: (B,) long modality index per sample (a scalar is broadcast to the batch).

    Returns:
        (B, C, *S) float32 similarities in [-1, 1], differentiable w.r.t. ``embeddings`` only.
    """
    modality = _check_bank(embeddings, prototypes, modality)
    own = prototypes.detach().float()[modality]  # (B, C, D)
    flat = embeddings.float().flatten(2)  # (B, D, N)
    with _full_precision(embeddings.device):
        similarity = torch.bmm(own, flat)
    return similarity.reshape(embeddings.shape[0], prototypes.shape[1], *embeddings.shape[2:])


@float32_region
def pseg_loss(similarity: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None,
              smooth: float = 1e-5) -> torch.Tensor:
    """Prototype segmentation loss, eq. (8): ``0.5 * Dice + 0.5 * CE`` on the raw cosine maps (no temperature).

    * CE: cross-entropy of ``softmax(s)`` with the labels, averaged over valid voxels.
    * Dice (our choice, nnU-Net-like): soft batch Dice ``(2 sum p*y + smooth) / (sum p + sum y + smooth)`` per class
      over all valid voxels of the batch, with ``smooth = 1e-5``; the loss is ``1 - mean`` of it over the classes
      present among the valid labels (background included, since the prototypes segment every class). An absent
      class would only add a constant ~1 with almost no gradient (its numerator is ``smooth``), so leaving it out
      only removes an offset.

    As printed, the logits are cosines in [-1, 1], so ``softmax(s)`` can never be sharp and the loss never reaches 0.

    Args:
        similarity: (B, C, *S) cosine similarities (:func:`prototype_similarity`).
        labels: (B, *S) or (B, 1, *S) long classes in [0, C) (any value where ``valid`` is False).
        valid: optional (B, *S) bool mask of the voxels to score.
        smooth: Dice smoothing.

    Returns:
        Scalar float32 tensor; 0 (still attached to the graph) when no voxel is valid.
    """
    num_classes = similarity.shape[1]
    logits, targets, mask = _flatten(similarity, labels, valid, num_classes)  # (B, C, N), (B, N), (B, N)
    ce = _masked_mean(F.cross_entropy(logits, targets, reduction="none"), mask)
    probs = torch.softmax(logits, dim=1) * mask[:, None]
    classes = torch.arange(num_classes, device=targets.device)
    onehot = (targets[:, None, :] == classes[None, :, None]).float() * mask[:, None]
    intersect = (probs * onehot).sum(dim=(0, 2))
    denominator = probs.sum(dim=(0, 2)) + onehot.sum(dim=(0, 2))
    dice = (2 * intersect + smooth) / (denominator + smooth)
    present = (onehot.sum(dim=(0, 2)) > 0).float()
    dice_loss = ((1.0 - dice) * present).sum() / present.sum().clamp_min(1.0)
    return 0.5 * dice_loss + 0.5 * ce


@float32_region
def modality_contrast_loss(embeddings: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                           modality: torch.Tensor | int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Modality contrastive loss, eq. (9): own-modality prototype of the class against the other modalities'.

    Per valid voxel ``i`` of class ``y`` in a sample of modality ``k``:
    ``-cos(i, p^k_y) + mean_{j != k} cos(i, p^j_y)``, averaged over valid voxels. With K = 1 the second term is
    exactly 0. The prototypes are detached.

    Args:
        embeddings: (B, D, *S) L2-normalised embeddings.
        labels: (B, *S) or (B, 1, *S) long classes in [0, C).
        prototypes: (K, C, D) unit prototypes.
        modality: (B,) long modality index per sample.
        valid: optional (B, *S) bool mask.

    Returns:
        Scalar float32 tensor in [-2, 2].
    """
    modality = _check_bank(embeddings, prototypes, modality)
    num_modalities, num_classes, dim = prototypes.shape
    flat, targets, mask = _flatten(embeddings, labels, valid, num_classes)
    bank = prototypes.detach().float().reshape(num_modalities * num_classes, dim)
    with _full_precision(embeddings.device):
        sims = torch.einsum("md,bdn->bmn", bank, flat)
    sims = sims.reshape(flat.shape[0], num_modalities, num_classes, -1)
    index = targets[:, None, None, :].expand(-1, num_modalities, 1, -1)
    per_modality = sims.gather(2, index)[:, :, 0]  # (B, K, N): cos with each modality's prototype of the class
    own = per_modality.gather(1, modality[:, None, None].expand(-1, 1, per_modality.shape[2]))[:, 0]
    if num_modalities > 1:
        others = (per_modality.sum(dim=1) - own) / (num_modalities - 1)
    else:
        others = torch.zeros_like(own)
    return _masked_mean(others - own, mask)


@float32_region
def prototype_contrast_loss(similarity: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None,
                            temperature: float = 0.1) -> torch.Tensor:
    """Prototype contrastive loss, eq. (10): InfoNCE over the C own-modality class prototypes.

    ``-log softmax(s / tau)[y]`` per valid voxel (positive: the voxel's class prototype; negatives: the other
    C - 1 prototypes of its modality), averaged over valid voxels.

    Args:
        similarity: (B, C, *S) cosine similarities (:func:`prototype_similarity`).
        labels: (B, *S) or (B, 1, *S) long classes in [0, C).
        valid: optional (B, *S) bool mask.
        temperature: ``tau`` of eq. (10).

    Returns:
        Scalar float32 tensor.
    """
    if temperature <= 0:
        raise ValueError(f"prototype_contrast_loss needs temperature > 0, got {temperature}.")
    logits, targets, mask = _flatten(similarity, labels, valid, similarity.shape[1])
    return _masked_mean(F.cross_entropy(logits / temperature, targets, reduction="none"), mask)


@float32_region
def prototype_distance_loss(similarity: torch.Tensor, labels: torch.Tensor,
                            valid: torch.Tensor | None = None) -> torch.Tensor:
    """Prototype distance loss, eq. (11): mean over valid voxels of ``(1 - i . p^k_y)^2``.

    Args:
        similarity: (B, C, *S) cosine similarities (:func:`prototype_similarity`).
        labels: (B, *S) or (B, 1, *S) long classes in [0, C).
        valid: optional (B, *S) bool mask.

    Returns:
        Scalar float32 tensor in [0, 4].
    """
    logits, targets, mask = _flatten(similarity, labels, valid, similarity.shape[1])
    positive = logits.gather(1, targets[:, None])[:, 0]
    return _masked_mean((1.0 - positive) ** 2, mask)


@float32_region
def mpcl_loss(embeddings: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
              modality: torch.Tensor | int, valid: torch.Tensor | None = None, temperature: float = 0.1,
              terms: Sequence[str] = MPCL_TERMS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MPCL loss, eq. (12): the mean of the requested terms (all four: ``(pseg + mc + pc + pd) / 4``).

    A subset of ``terms`` (the paper's Table III ablations) gives the mean over that subset. Gradient reaches the
    embeddings only; the prototypes are always detached. No voxel valid: a zero loss that is still attached to the
    graph, and zero terms (every term is a mean over valid voxels, 0 when there are none; no host check of
    ``valid``).

    Args:
        embeddings: (B, D, *S) L2-normalised embeddings (2D or 3D; any float dtype).
        labels: (B, *S) or (B, 1, *S) long classes in [0, C).
        prototypes: (K, C, D) unit prototypes (``PrototypeBank.prototypes``).
        modality: (B,) long modality index per sample (samples may differ; a scalar is broadcast).
        valid: optional (B, *S) bool mask of the voxels to score (e.g. not the ignore label).
        temperature: ``tau`` of eq. (10).
        terms: a non-empty subset of ``("pseg", "mc", "pc", "pd")``.

    Returns:
        ``(loss, values)``: the float32 scalar loss and a dict term name -> detached float32 scalar tensor (call
        ``.item()`` when logging).
    """
    terms = tuple(terms)
    unknown = [t for t in terms if t not in MPCL_TERMS]
    if not terms or unknown or len(set(terms)) != len(terms):
        raise ValueError(f"mpcl_loss terms must be a non-empty subset of {MPCL_TERMS} without repeats, got {terms}.")
    similarity = prototype_similarity(embeddings, prototypes, modality)
    parts: dict[str, torch.Tensor] = {}
    if "pseg" in terms:
        parts["pseg"] = pseg_loss(similarity, labels, valid)
    if "mc" in terms:
        parts["mc"] = modality_contrast_loss(embeddings, labels, prototypes, modality, valid)
    if "pc" in terms:
        parts["pc"] = prototype_contrast_loss(similarity, labels, valid, temperature)
    if "pd" in terms:
        parts["pd"] = prototype_distance_loss(similarity, labels, valid)
    loss = torch.stack([parts[t] for t in terms]).mean()
    return loss, {t: value.detach() for t, value in parts.items()}


class MPCLLoss(nn.Module):
    """Module wrapper of :func:`mpcl_loss` holding ``temperature`` and ``terms``."""

    def __init__(self, temperature: float = 0.1, terms: Sequence[str] = MPCL_TERMS):
        super().__init__()
        self.temperature = float(temperature)
        self.terms = tuple(terms)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                modality: torch.Tensor | int,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """See :func:`mpcl_loss`."""
        return mpcl_loss(embeddings, labels, prototypes, modality, valid, self.temperature, self.terms)

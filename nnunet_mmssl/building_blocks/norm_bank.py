"""Modality-level modulation bank (DBDC's MLMB, Chen et al. eqs. 1-3): one normalisation per modality.

Every normalisation layer of nnU-Net's planned U-Net becomes a :class:`ModalityNormBank` of K norms; all
convolutions stay shared. The bank normalises each sample with the norm of that sample's modality, read from a
:class:`ModalityContext` that the owning network fills at the start of its ``forward`` (one context object shared by
all banks of a network, so the modality travels with the batch, not as a module state that DDP or torch.compile would
have to know about).

The bank's norms are BatchNorm by default (``kind="batch"``): eqs. 1-3 keep per-modality running means and variances
(registered buffers, so they are saved in the state dict, moved with ``.to()`` and converted to SyncBatchNorm by
nnU-Net under DDP) and use them at inference. nnU-Net plans InstanceNorm because its batches are small; per-instance
statistics would make the bank's statistics meaningless (only the affine parameters would differ per modality), so
the paper's batch statistics are used and the README says so. ``kind="instance"`` keeps nnU-Net's InstanceNorm with
per-modality affine parameters, for comparison.

A batch may mix modalities: the bank then normalises each modality's samples together (its own batch statistics),
exactly as if each modality had been a separate forward pass. It does so without a host-device synchronisation and
without data-dependent Python branches (one graph under ``torch.compile``): per-sample means and variances are pooled
per modality with one-hot weights (law of total variance), and each sample is normalised by an affine map gathered
from its modality's statistics; a modality absent from the batch keeps its running statistics. A whole batch of one
modality known on the host (an ``int``, e.g. at prediction) takes that modality's own norm directly.

When the caller also knows on the host that the batch comes in contiguous runs of one modality each (``runs``:
``((k, n), ...)``, every modality in at most one run -- DBDC's trainer builds its batches that way), a BatchNorm bank
in training normalises each run with PyTorch's fused batch-norm kernel on that slice instead (the same statistics and
running-statistics update; no host-device synchronisation either: the run lengths are Python ints). The one-hot path
costs about four fused batch norms' time on the CPU (2026-12-07: a 64 x 32 x 48 x 48 batch, forward + backward,
177 ms against 44 ms for nn.BatchNorm2d and 60 ms for the split; one 3x3 convolution of that width took 174 ms), and a
residual-encoder U-Net has a norm after every convolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_mmssl.losses.precision import full_precision

#: norm classes of nnU-Net plans that :func:`replace_norms_with_banks` replaces
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
NORM_BANK_KINDS = ("batch", "instance")
NORM_BANK_SCOPES = ("none", "encoder", "encoder+bottleneck", "all")


class ModalityNotSetError(ValueError):
    """A multi-modality network was called without telling it the input's modality."""


def modality_not_set_message(modalities: Sequence[str]) -> str:
    names = "|".join(modalities)
    return (f"This model was trained on the unregistered modalities {list(modalities)} and needs the modality of the "
            f"input image: predict with nnUNetv2_mmssl_predict ... --modality {names} (or --modalities-from "
            f"dataset.json for a folder mixing modalities); plain nnUNetv2_predict cannot pass it, and the model "
            f"would otherwise have to guess.")


class ModalityContext:
    """The modality of the batch being processed, shared by all banks of one network.

    ``modality`` is None (not set), an ``int`` (every sample has that modality) or a (B,) long tensor of per-sample
    modality indices (read on the device only: no host synchronisation).
    """

    def __init__(self):
        self.modality: torch.Tensor | int | None = None
        #: with a (B,) tensor: ((k, n), ...) when the batch is known on the host to be contiguous runs of n samples
        #: of modality k, each modality in at most one run (see the module docstring); else None
        self.runs: tuple[tuple[int, int], ...] | None = None

    def set(self, modality: torch.Tensor | int | None, runs: Sequence[tuple[int, int]] | None = None) -> None:
        """Set the batch's modality: None, an index for the whole batch, or a (B,) long tensor, optionally with its
        contiguous modality runs (:func:`modality_runs`)."""
        self.modality = modality
        self.runs = None if runs is None else tuple((int(k), int(n)) for k, n in runs)

    def __deepcopy__(self, memo):  # a deep copy of a network gets its own (empty) context
        return ModalityContext()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.modality = None
        self.runs = None


def modality_runs(counts: Sequence[tuple[int, int]], batch: int) -> tuple[tuple[int, int], ...] | None:
    """The contiguous modality runs of a batch assembled from ``counts`` = ((modality, samples), ...) in order:
    neighbouring parts of one modality merged, empty parts dropped; None when a modality would appear in two
    separate runs (its statistics must pool over both: the banks then take the one-hot path).

    Raises:
        ValueError: the counts do not add up to ``batch``.
    """
    runs: list[list[int]] = []
    for k, n in counts:
        if n <= 0:
            continue
        if runs and runs[-1][0] == k:
            runs[-1][1] += n
        else:
            runs.append([int(k), int(n)])
    if sum(n for _, n in runs) != batch:
        raise ValueError(f"modality runs {list(counts)} cover {sum(n for _, n in runs)} samples of a batch of {batch}")
    if len({k for k, _ in runs}) != len(runs):
        return None
    return tuple((k, n) for k, n in runs)


def _make_norm(kind: str, conv_dim: int, num_features: int, momentum: float, eps: float) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if conv_dim == 2 else nn.BatchNorm3d)(num_features, eps=eps, momentum=momentum)
    if kind == "instance":
        return (nn.InstanceNorm2d if conv_dim == 2 else nn.InstanceNorm3d)(num_features, eps=eps, affine=True)
    raise ValueError(f"norm bank kind must be one of {NORM_BANK_KINDS}, got {kind!r}")


class ModalityNormBank(nn.Module):
    """K norms over the same features; each sample is normalised by the norm of its modality (eq. 1).

    Args:
        num_modalities: K (1 = a single shared norm, used outside the bank's scope).
        num_features: channels.
        conv_dim: 2 or 3.
        context: the network's :class:`ModalityContext`.
        kind: ``"batch"`` (running statistics per modality, eqs. 2-3) or ``"instance"``.
        momentum: PyTorch momentum of the running statistics (eq. 2-3's ``1 - alpha``; alpha = 0.99 -> 0.01).
        eps: eq. 1's epsilon.
    """

    def __init__(self, num_modalities: int, num_features: int, conv_dim: int, context: ModalityContext,
                 kind: str = "batch", momentum: float = 0.01, eps: float = 1e-5):
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        self.num_modalities = num_modalities
        self.kind = kind
        self.norms = nn.ModuleList(_make_norm(kind, conv_dim, num_features, momentum, eps)
                                   for _ in range(num_modalities))
        self._context = context

    def extra_repr(self) -> str:
        return f"modalities={self.num_modalities}, kind={self.kind}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_modalities == 1:
            return self.norms[0](x)
        modality = self._context.modality
        if modality is None:
            raise ModalityNotSetError("ModalityNormBank called without a modality; the owning network sets it "
                                      "in forward(x, modality=...).")
        if not isinstance(modality, torch.Tensor):
            return self.norms[int(modality)](x)
        if modality.shape[0] != x.shape[0]:
            raise ValueError(f"modality has {modality.shape[0]} entries for a batch of {x.shape[0]}")
        runs = self._context.runs
        if runs is not None and self.kind == "batch" and self.training and x[0, 0].numel() > 1:
            return self._forward_runs(x, runs)
        # (B, K) one-hot weights of the samples' modalities (an index outside [0, K) selects no norm)
        onehot = (modality.reshape(-1, 1) == torch.arange(self.num_modalities, device=x.device)).float()
        if self.kind == "instance":
            out = F.instance_norm(x, eps=self.norms[0].eps)
        else:
            out = x
        # the (B, K) x (K, C) selections and the statistics in float32 with autocast off: autocast would run these
        # products in float16 (E[x^2] - mean^2 loses its precision; lerp of the float32 running statistics refuses)
        with full_precision(x.device.type):
            weight = onehot @ torch.stack([n.weight for n in self.norms]).float()  # (B, C)
            bias = onehot @ torch.stack([n.bias for n in self.norms]).float()
            if self.kind == "batch":
                mean, var = self._batch_statistics(x, onehot)
                scale = weight * torch.rsqrt(var + self.norms[0].eps)
                weight, bias = scale, bias - mean * scale
        shape = (*x.shape[:2],) + (1,) * (x.ndim - 2)
        if out.dtype in (torch.float16, torch.bfloat16) and self.kind == "batch":
            # x * scale - mean * scale cancels: in half precision a channel whose mean is large against its spread
            # loses its normalised values (nn.BatchNorm's kernels compute in float32 too); the result in x's dtype
            with full_precision(x.device.type):
                return torch.addcmul(bias.view(shape), out.float(), weight.view(shape)).to(x.dtype)
        return torch.addcmul(bias.to(x.dtype).view(shape), out, weight.to(x.dtype).view(shape))

    def _forward_runs(self, x: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """Training with host-known contiguous runs: each run through its modality's norm as ``nn.BatchNorm`` does
        (the fused kernel; batch statistics of the run; the running statistics updated with its momentum unless
        frozen), without calling the norm module itself, so that a norm converted to SyncBatchNorm under DDP still
        uses this process's statistics, as the one-hot path does. The runs cover the batch (the network checks it
        once per forward; ``x.split`` refuses otherwise)."""
        outputs = []
        for (k, _), part in zip(runs, x.split([n for _, n in runs]), strict=True):
            norm = self.norms[k]
            track = norm.track_running_stats
            factor = 0.0 if norm.momentum is None else norm.momentum
            if track:
                norm.num_batches_tracked.add_(1)
                if norm.momentum is None:  # cumulative moving average, as nn.BatchNorm
                    factor = 1.0 / float(norm.num_batches_tracked)
            outputs.append(F.batch_norm(part, norm.running_mean if track else None,
                                        norm.running_var if track else None, norm.weight, norm.bias, True, factor,
                                        norm.eps))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _batch_statistics(self, x: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) mean and biased variance of each sample's modality: its batch statistics (pooled over the samples
        of that modality) in training, else its running statistics. Training updates each present modality's running
        statistics as ``nn.BatchNorm`` does (unbiased variance, momentum)."""
        norms = self.norms
        if not self.training and norms[0].track_running_stats:
            return (onehot @ torch.stack([n.running_mean for n in norms]).float(),
                    onehot @ torch.stack([n.running_var for n in norms]).float())
        dims = tuple(range(2, x.ndim))
        voxels = x[0, 0].numel()
        if x.dtype in (torch.float32, torch.float64):
            sample_var, sample_mean = torch.var_mean(x, dim=dims, correction=0)
            sample_var, sample_mean = sample_var.float(), sample_mean.float()
        else:  # half precision: accumulate in float32 without a float32 copy of x
            sample_mean = torch.sum(x, dim=dims, dtype=torch.float32) / voxels
            squares = torch.linalg.vector_norm(x, 2, dim=dims, dtype=torch.float32).square() / voxels
            sample_var = (squares - sample_mean.square()).clamp_min(0.0)
        samples = onehot.sum(0)  # (K,)
        share = onehot / samples.clamp_min(1.0)  # (B, K): each sample's share of its modality's statistics
        mean_k = share.T @ sample_mean  # (K, C)
        var_k = share.T @ (sample_var + sample_mean.square()) - mean_k.square()
        var_k = var_k.clamp_min(0.0)
        if norms[0].track_running_stats:
            self._update_running_statistics(mean_k.detach(), var_k.detach(), samples * voxels)
        return onehot @ mean_k, onehot @ var_k

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        present = count > 0
        unbiased = var * (count / (count - 1).clamp_min(1.0))[:, None]
        for k, norm in enumerate(self.norms):
            norm.num_batches_tracked.add_(present[k].to(norm.num_batches_tracked.dtype))
            if norm.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / norm.num_batches_tracked.clamp_min(1).to(mean.dtype)
            else:
                factor = norm.momentum
            for buffer, value in ((norm.running_mean, mean[k]), (norm.running_var, unbiased[k])):
                updated = torch.lerp(buffer.float(), value, factor)
                buffer.copy_(torch.where(present[k], updated, buffer.float()).to(buffer.dtype))


@contextlib.contextmanager
def running_statistics_frozen(module: nn.Module):
    """Within the context, every BatchNorm of ``module`` (a bank's too) in training mode still normalises with its
    batch statistics but leaves its running statistics and ``num_batches_tracked`` untouched (as
    ``track_running_stats=False`` does); restored on exit. DBDC's no-grad pseudo-label pass runs in it, so that a
    training step updates the running statistics once (its main pass), not twice."""
    frozen = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm in frozen:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in frozen:
            norm.track_running_stats = True


def _norm_children(module: nn.Module):
    """(parent, attribute name, norm) for every norm reachable from ``module`` without going through a bank."""
    for name, child in module.named_children():
        if isinstance(child, ModalityNormBank):
            continue
        if isinstance(child, _NORM_TYPES):
            yield module, name, child
        else:
            yield from _norm_children(child)


def _replace_in(module: nn.Module, num_modalities: int, conv_dim: int, context: ModalityContext, kind: str,
                momentum: float) -> int:
    # a norm may be reachable twice (nnU-Net's ConvDropoutNormReLU holds it as ``.norm`` and in its
    # ``all_modules`` Sequential): every place that holds it gets the same bank, so no bank is left unused
    banks: dict[int, ModalityNormBank] = {}
    for parent, name, norm in list(_norm_children(module)):
        bank = banks.get(id(norm))
        if bank is None:
            features = getattr(norm, "num_features", None) or getattr(norm, "num_channels", None)
            bank = ModalityNormBank(num_modalities, int(features), conv_dim, context, kind, momentum,
                                    eps=float(getattr(norm, "eps", 1e-5)))
            banks[id(norm)] = bank
        setattr(parent, name, bank)
    return len(banks)


def replace_norms_with_banks(encoder_stages: Sequence[nn.Module], decoder_stages: Sequence[nn.Module],
                             num_modalities: int, conv_dim: int, context: ModalityContext, scope: str = "all",
                             kind: str = "batch", momentum: float = 0.01) -> dict[str, int]:
    """Replace every norm of a U-Net's stages by a bank: K norms inside ``scope``, one shared norm outside.

    Args:
        encoder_stages: the encoder's stages; the last one is the bottleneck.
        decoder_stages: the decoder's stages.
        num_modalities: K.
        conv_dim: 2 or 3.
        context: the network's modality context.
        scope: where the norms are per modality (the paper's Table IV): ``"none"``, ``"encoder"``,
            ``"encoder+bottleneck"`` or ``"all"``.
        kind, momentum: see :class:`ModalityNormBank`.

    Returns:
        Number of per-modality banks and of shared norms made, ``{"banks": n, "shared": m}``.
    """
    if scope not in NORM_BANK_SCOPES:
        raise ValueError(f"norm bank scope must be one of {NORM_BANK_SCOPES}, got {scope!r}")
    *encoder, bottleneck = list(encoder_stages)
    parts = {"encoder": encoder, "bottleneck": [bottleneck], "decoder": list(decoder_stages)}
    banked = {"none": (), "encoder": ("encoder",), "encoder+bottleneck": ("encoder", "bottleneck"),
              "all": ("encoder", "bottleneck", "decoder")}[scope]
    counts = {"banks": 0, "shared": 0}
    for part, stages in parts.items():
        k = num_modalities if part in banked else 1
        for stage in stages:
            made = _replace_in(stage, k, conv_dim, context, kind, momentum)
            counts["banks" if k > 1 else "shared"] += made
    return counts

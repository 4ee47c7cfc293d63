"""SMML's masked dual-branch network (Liang et al. 2025, smml_liang2025.txt; METHODS.md section 4).

Per branch: one small encoder per modality (the encoder of the plans' U-Net -- nnU-Net's ``PlainConvEncoder``, or on
the residual-encoder (ResEnc) plans its ``ResidualEncoder``: stem, the planned residual blocks per stage -- with every
stage's width, and the stem's, scaled by :attr:`encoder_width` -- default ``1/sqrt(K)``, so that K encoders cost
about the convolutions of one nnU-Net encoder, as a convolution's cost grows with the square of its width; the plans'
``base`` arch kwarg says which, absent = plain, as in older plans), the features of masked-out modalities
zeroed at every scale (``F^k * M^k``), one fusion per scale (:class:`MaskedConvFusion`: concat -> 1x1 -> 3x3 -> 1x1
to nnU-Net's width of that stage) and nnU-Net's ``UNetDecoder`` of the plans on the fused features. Two independent
branches.

``forward(x)`` takes all K channels (nnU-Net's contract) and returns the mean of the two branches' logits (a list,
highest resolution first, under deep supervision). The modality mask is, in this order: the ``masks`` argument
(training: (2, B, K) bool, one mask per branch and sample), else :attr:`inference_mask` set by
:meth:`set_missing_modalities` (our predictor's ``--missing``), else every modality present. With
:attr:`return_branches` the forward returns ``(logits of branch 1, logits of branch 2, fused features of branch 1,
fused features of branch 2)`` for the losses (features of fusion stage :attr:`feature_stage`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from nnunet_mmssl.architectures.encoders import (
    PLAIN,
    build_decoder,
    build_encoder,
    check_kind,
    initialize_module,
)


def scaled_widths(features_per_stage: Sequence[int], width: float, multiple: int = 4) -> list[int]:
    """Stage widths times ``width``, rounded to a multiple of ``multiple`` (at least ``multiple``)."""
    return [max(multiple, int(round(f * width / multiple)) * multiple) for f in features_per_stage]


class MaskedConvFusion(nn.Module):
    """Fusion of K modality feature maps of one scale: concat -> 1x1 -> 3x3 -> 1x1 (METHODS.md's default).

    The masked modalities' maps arrive as zeros (the caller multiplies by the mask); norm and nonlinearity are
    nnU-Net's (the plans' norm_op and nonlin) after the first two convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, conv_op, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs):
        super().__init__()
        hidden = out_channels
        norm_kwargs = dict(norm_op_kwargs or {})
        nonlin_kwargs = dict(nonlin_kwargs or {})
        self.block = nn.Sequential(
            conv_op(in_channels, hidden, 1), norm_op(hidden, **norm_kwargs), nonlin(**nonlin_kwargs),
            conv_op(hidden, hidden, 3, padding=1), norm_op(hidden, **norm_kwargs), nonlin(**nonlin_kwargs),
            conv_op(hidden, out_channels, 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.block(torch.cat(features, 1))


class SMMLBranch(nn.Module):
    """K modality encoders + one fusion per scale + nnU-Net's decoder.

    Args:
        num_modalities: K.
        num_classes: output channels.
        kind: the plans' base U-Net, ``"plain"`` or ``"resenc"`` (:mod:`nnunet_mmssl.architectures.encoders`).
        arch: that U-Net's arch kwargs (ops as classes), full widths.
        encoder_width: width factor of the modality encoders.
    """

    def __init__(self, num_modalities: int, num_classes: int, kind: str, arch: dict, encoder_width: float):
        super().__init__()
        features_per_stage = list(arch["features_per_stage"])
        widths = scaled_widths(features_per_stage, encoder_width)
        narrow = {**arch, "features_per_stage": widths}
        for key in ("stem_channels", "bottleneck_channels"):  # the residual encoder's other widths, scaled alike
            value = arch.get(key)
            if value is not None:
                narrow[key] = scaled_widths([value], encoder_width)[0] if isinstance(value, int) else \
                    scaled_widths(value, encoder_width)
        self.encoders = nn.ModuleList(build_encoder(kind, 1, narrow, return_skips=True)
                                      for _ in range(num_modalities))
        conv_op, norm_op, norm_op_kwargs = arch["conv_op"], arch.get("norm_op"), arch.get("norm_op_kwargs")
        nonlin, nonlin_kwargs = arch.get("nonlin"), arch.get("nonlin_kwargs")
        self.fusions = nn.ModuleList(
            MaskedConvFusion(num_modalities * w, f, conv_op, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs)
            for w, f in zip(widths, features_per_stage, strict=True))
        template = self.encoders[0]
        # the decoder is nnU-Net's for an encoder of the plans' full widths (a description, not a module)
        full = SimpleNamespace(output_channels=features_per_stage, strides=template.strides,
                               kernel_sizes=template.kernel_sizes, conv_op=conv_op,
                               conv_bias=arch.get("conv_bias", False), norm_op=norm_op,
                               norm_op_kwargs=norm_op_kwargs, dropout_op=arch.get("dropout_op"),
                               dropout_op_kwargs=arch.get("dropout_op_kwargs"), nonlin=nonlin,
                               nonlin_kwargs=nonlin_kwargs)
        self.decoder = build_decoder(kind, full, num_classes, arch)
        self.encoder_widths = widths

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor] | torch.Tensor,
                                                                      list[torch.Tensor]]:
        """Logits and the fused features of every scale.

        Args:
            x: (B, K, *S) all modalities.
            mask: (B, K) bool, True = present.
        """
        shape = (mask.shape[0], 1) + (1,) * (x.ndim - 2)
        per_modality = []
        for k, encoder in enumerate(self.encoders):
            m = mask[:, k].to(x.dtype).view(shape)
            per_modality.append([f * m for f in encoder(x[:, k:k + 1])])  # masked out: zero at every scale
        fused = [fusion([skips[s] for skips in per_modality]) for s, fusion in enumerate(self.fusions)]
        return self.decoder(fused), fused


class SMMLNet(nn.Module):
    """Two :class:`SMMLBranch` es on the plans' PlainConvUNet or ResidualEncoderUNet kwargs (see module docstring).

    Args:
        input_channels: K modalities (channels), K >= 2.
        num_classes: output channels.
        n_stages ... nonlin_first: nnU-Net's ``PlainConvUNet`` arch kwargs (``n_conv_per_stage`` unused on ResEnc).
        encoder_width: width factor of each modality encoder; None = ``1/sqrt(K)``.
        feature_stage: fusion stage whose features the feature-level loss reads (0 = full resolution).
        num_branches: 2 (SMML) or 1 (the paper's single masked branch baseline).
        base: the plans' U-Net, ``"plain"`` (default, older plans) or ``"resenc"``.
        n_blocks_per_stage, block, bottleneck_channels, stem_channels: nnU-Net's ``ResidualEncoderUNet`` arch kwargs
            (``base="resenc"``); the modality encoders get the planned blocks per stage, widths scaled.
    """

    def __init__(self, input_channels: int, num_classes: int, n_stages: int, features_per_stage, conv_op,
                 kernel_sizes, strides, n_conv_per_stage=None, n_conv_per_stage_decoder=None,
                 conv_bias: bool = False, norm_op=None, norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None,
                 nonlin=None, nonlin_kwargs=None, deep_supervision: bool = False, nonlin_first: bool = False,
                 encoder_width: float | None = None, feature_stage: int = 1, num_branches: int = 2,
                 base: str = PLAIN, n_blocks_per_stage=None, block=None, bottleneck_channels=None,
                 stem_channels: int | None = None):
        super().__init__()
        if input_channels < 2:
            raise ValueError(f"SMML needs at least 2 modalities (input channels), got {input_channels}.")
        kind = check_kind(base)
        depth_name, depth = ("n_conv_per_stage", n_conv_per_stage) if kind == PLAIN else \
            ("n_blocks_per_stage", n_blocks_per_stage)
        if depth is None or n_conv_per_stage_decoder is None:
            raise ValueError(f"SMMLNet on the {kind} U-Net needs the plans' {depth_name} and n_conv_per_stage_decoder "
                             f"arch kwargs.")
        if isinstance(features_per_stage, int):
            features_per_stage = [features_per_stage] * n_stages
        if isinstance(depth, int):
            depth = [depth] * n_stages
        if isinstance(n_conv_per_stage_decoder, int):
            n_conv_per_stage_decoder = [n_conv_per_stage_decoder] * (n_stages - 1)
        arch = {"n_stages": n_stages, "features_per_stage": list(features_per_stage), "conv_op": conv_op,
                "kernel_sizes": kernel_sizes, "strides": strides, depth_name: depth,
                "n_conv_per_stage_decoder": n_conv_per_stage_decoder, "conv_bias": conv_bias, "norm_op": norm_op,
                "norm_op_kwargs": norm_op_kwargs, "dropout_op": dropout_op, "dropout_op_kwargs": dropout_op_kwargs,
                "nonlin": nonlin, "nonlin_kwargs": nonlin_kwargs, "deep_supervision": deep_supervision}
        if kind == PLAIN:
            arch["nonlin_first"] = nonlin_first
        else:
            arch.update({k: v for k, v in (("block", block), ("bottleneck_channels", bottleneck_channels),
                                           ("stem_channels", stem_channels)) if v is not None})
        self.base = kind
        self.num_modalities = int(input_channels)
        self.num_classes = num_classes
        self.encoder_width = float(encoder_width) if encoder_width else 1.0 / math.sqrt(self.num_modalities)
        self.feature_stage = int(min(max(feature_stage, 0), n_stages - 1))
        self.branches = nn.ModuleList(
            SMMLBranch(self.num_modalities, num_classes, kind, arch, self.encoder_width)
            for _ in range(int(num_branches)))
        if num_branches not in (1, 2):
            raise ValueError(f"num_branches must be 1 or 2, got {num_branches}")
        self.conv_op = conv_op
        self.return_branches = False
        #: (K,) bool of the modalities present at inference; None = all
        self.inference_mask: torch.Tensor | None = None

    @property
    def deep_supervision(self) -> bool:
        return self.branches[0].decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        for branch in self.branches:
            branch.decoder.deep_supervision = enabled

    def set_missing_modalities(self, channels: Sequence[int] | None) -> None:
        """Predict as if these channels (modality indices) were absent; None or empty = all present.

        Raises:
            ValueError: an index out of range, or every modality missing.
        """
        if not channels:
            self.inference_mask = None
            return
        missing = sorted({int(c) for c in channels})
        if missing[0] < 0 or missing[-1] >= self.num_modalities:
            raise ValueError(f"missing modality indices {missing} out of range 0..{self.num_modalities - 1}")
        mask = torch.ones(self.num_modalities, dtype=torch.bool)
        mask[missing] = False
        if not bool(mask.any()):
            raise ValueError("At least one modality must be present.")
        self.inference_mask = mask

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None):
        if x.shape[1] != self.num_modalities:
            raise ValueError(f"SMMLNet has {self.num_modalities} modality encoders but got {x.shape[1]} input "
                             f"channels.")
        if masks is None:
            present = self.inference_mask if self.inference_mask is not None else \
                torch.ones(self.num_modalities, dtype=torch.bool)
            mask = present.to(x.device).view(1, -1).expand(x.shape[0], -1)
            masks = torch.stack([mask, mask])
        out1, fused1 = self.branches[0](x, masks[0])
        if len(self.branches) == 1:
            if self.return_branches:
                return out1, out1, fused1[self.feature_stage], fused1[self.feature_stage]
            return out1
        out2, fused2 = self.branches[1](x, masks[1])
        if self.return_branches:
            return out1, out2, fused1[self.feature_stage], fused2[self.feature_stage]
        if isinstance(out1, (list, tuple)):
            return [(a + b) / 2 for a, b in zip(out1, out2, strict=True)]
        return (out1 + out2) / 2

    def compute_conv_feature_map_size(self, input_size) -> int:
        """nnU-Net's memory proxy for one sample: both branches' encoders, fusions and decoders."""
        total = 0
        for branch in self.branches:
            for encoder in branch.encoders:
                total += int(encoder.compute_conv_feature_map_size(input_size))
            size = list(input_size)
            for s, stride in enumerate(branch.encoders[0].strides):
                size = [i // j for i, j in zip(size, stride, strict=True)] if not isinstance(stride, int) else \
                    [i // stride for i in size]
                out = branch.fusions[s].block[-1].out_channels
                total += int(np.prod([3 * out, *size], dtype=np.int64))  # three conv outputs of the fusion
            total += int(branch.decoder.compute_conv_feature_map_size(input_size))
        return total

    @staticmethod
    def initialize(module):
        """nnU-Net's initialisation of its U-Nets: He; on the residual encoders each block's last norm at zero."""
        initialize_module(module)


def random_modality_masks(batch_size: int, num_modalities: int, generator: torch.Generator | None = None,
                          device=None) -> torch.Tensor:
    """(2, B, K) bool masks: per sample, two different non-empty subsets drawn uniformly from the 2^K - 1.

    Raises:
        ValueError: K < 2 (two different non-empty subsets need two modalities).
    """
    if num_modalities < 2:
        raise ValueError("SMML's two masks per sample need at least 2 modalities.")
    count = 2 ** num_modalities - 1
    first = torch.randint(1, count + 1, (batch_size,), generator=generator)
    # second: uniform over the other count - 1 subsets
    offset = torch.randint(1, count, (batch_size,), generator=generator)
    second = (first - 1 + offset) % count + 1
    bits = torch.arange(num_modalities)
    masks = torch.stack([(first.view(-1, 1) >> bits) & 1, (second.view(-1, 1) >> bits) & 1]).bool()
    return masks.to(device) if device is not None else masks

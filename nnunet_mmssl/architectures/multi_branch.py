"""Multi-branch U-Nets: one nnU-Net encoder/decoder pair per modality group.

The networks are built from the same recipe as nnU-Net's ``PlainConvUNet`` or ``ResidualEncoderUNet`` (the plans' arch
kwargs; each branch encoder is the planned one, :mod:`nnunet_mmssl.architectures.encoders`) plus
``modality_groups``: a list of channel-index lists, one per branch (default in the plans: first half / second half of
the channels). ``forward(x)`` takes all channels concatenated, as nnU-Net feeds them, and returns raw logits -- the
mean of the selected heads' logits, a list (highest resolution first) under deep supervision. Trainers that need
every head set ``return_heads = True`` (one flag instead of a second forward method, so DDP and torch.compile see
only ``forward``).
"""

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from nnunet_mmssl.architectures.encoders import (
    DEFAULT_BASE,
    DEPTH_KEY,
    SUPPORTED_BASES,
    build_decoder,
    build_encoder,
    check_kind,
    initialize_module,
)
from nnunet_mmssl.building_blocks import ComplementaryInformationFusion, build_mem


def validate_modality_groups(modality_groups: Sequence[Sequence[int]], input_channels: int) -> list[list[int]]:
    """Check that the groups are non-empty, disjoint lists of valid channel indices; return them as lists.

    Raises:
        ValueError: naming the offending group and the fix.
    """
    groups = [[int(c) for c in g] for g in modality_groups]
    if len(groups) < 1 or any(len(g) == 0 for g in groups):
        raise ValueError(f"modality_groups must be non-empty lists of channel indices, got {modality_groups!r}.")
    flat = [c for g in groups for c in g]
    bad = [c for c in flat if not 0 <= c < input_channels]
    if bad:
        raise ValueError(f"modality_groups {groups} name channel(s) {bad}, but the network has {input_channels} "
                         f"input channels (0..{input_channels - 1}). Fix the groups in the plans ('mmssl' block) "
                         f"or rerun nnUNetv2_mmssl_plan_and_preprocess with matching --modality-groups.")
    if len(set(flat)) != len(flat):
        raise ValueError(f"modality_groups {groups} use a channel twice; each channel belongs to one group.")
    return groups


def mean_of_heads(outputs: Sequence[torch.Tensor | Sequence[torch.Tensor]]) -> torch.Tensor | list[torch.Tensor]:
    """Average the heads' logits; scale by scale when each head is a deep-supervision list."""
    if len(outputs) == 1:
        return outputs[0]
    if isinstance(outputs[0], (list, tuple)):
        return [torch.stack(scale).mean(0) for scale in zip(*outputs)]
    return torch.stack(list(outputs)).mean(0)


class MultiBranchUNet(nn.Module):
    """One plans encoder + ``UNetDecoder`` per modality group, with a ``fuse`` hook between them.

    Each branch's encoder is the one nnU-Net's planned U-Net builds (``base``: ``"plain"`` = ``PlainConvEncoder`` of
    ``PlainConvUNet``, ``"resenc"`` = ``ResidualEncoder`` of ``ResidualEncoderUNet``, see
    :mod:`nnunet_mmssl.architectures.encoders`) on its group's channels; each decoder is nnU-Net's ``UNetDecoder`` on
    that encoder. Subclasses override :meth:`fuse` to exchange information between branches; the base class is the
    plain multi-branch baseline (no exchange). Each decoder's skips come from its own encoder.

    Args:
        input_channels: total number of input channels (all modalities).
        num_classes: output channels per head.
        modality_groups: channel indices of each branch, e.g. ``[[0], [1]]``.
        n_stages ... nonlin_first: nnU-Net's ``PlainConvUNet`` arch kwargs, used for every branch
            (``n_conv_per_stage`` for the plain base).
        base: ``"plain"`` (default: plans written before the residual encoder was supported) or ``"resenc"``.
        n_blocks_per_stage, block, bottleneck_channels, stem_channels: the ``ResidualEncoderUNet`` arch kwargs
            (``n_blocks_per_stage`` required for the residual base).

    Raises:
        ValueError: for an unknown ``base`` or when the base's depth per stage is missing.
    """

    def __init__(self, input_channels: int, num_classes: int, modality_groups: Sequence[Sequence[int]],
                 n_stages: int, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage=None,
                 n_conv_per_stage_decoder=None, conv_bias: bool = False, norm_op=None, norm_op_kwargs=None,
                 dropout_op=None, dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None,
                 deep_supervision: bool = False, nonlin_first: bool = False, base: str = DEFAULT_BASE,
                 n_blocks_per_stage=None, block=None, bottleneck_channels=None, stem_channels=None):
        super().__init__()
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.modality_groups = validate_modality_groups(modality_groups, input_channels)
        self.base = check_kind(base)
        arch = {"n_stages": n_stages, "features_per_stage": features_per_stage, "conv_op": conv_op,
                "kernel_sizes": kernel_sizes, "strides": strides, "n_conv_per_stage": n_conv_per_stage,
                "n_conv_per_stage_decoder": n_conv_per_stage_decoder, "conv_bias": conv_bias, "norm_op": norm_op,
                "norm_op_kwargs": norm_op_kwargs, "dropout_op": dropout_op, "dropout_op_kwargs": dropout_op_kwargs,
                "nonlin": nonlin, "nonlin_kwargs": nonlin_kwargs, "deep_supervision": deep_supervision,
                "nonlin_first": nonlin_first, "n_blocks_per_stage": n_blocks_per_stage, "block": block,
                "bottleneck_channels": bottleneck_channels, "stem_channels": stem_channels}
        for key in (DEPTH_KEY[self.base], "n_conv_per_stage_decoder"):
            if arch[key] is None:
                raise ValueError(f"{type(self).__name__} with base {self.base!r} needs {key} (the plans' "
                                 f"{SUPPORTED_BASES[self.base].rsplit('.', 1)[-1]} arch kwargs).")
        if block is None:  # the residual encoder's default (BasicBlockD)
            del arch["block"]
        self.conv_op = conv_op
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for group in self.modality_groups:
            encoder = build_encoder(self.base, len(group), arch, return_skips=True)
            self.encoders.append(encoder)
            self.decoders.append(build_decoder(self.base, encoder, num_classes, arch))
        self.bottleneck_channels = self.encoders[0].output_channels[-1]
        self.return_heads = False
        self.inference_heads: tuple[int, ...] | None = None

    @property
    def num_heads(self) -> int:
        return len(self.modality_groups)

    @property
    def deep_supervision(self) -> bool:
        return self.decoders[0].deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        for decoder in self.decoders:
            decoder.deep_supervision = enabled

    def split_modalities(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split (B, input_channels, *S) into one tensor per modality group."""
        if x.ndim < 3 or x.shape[1] != self.input_channels:
            raise ValueError(f"{type(self).__name__} expects input of shape (B, {self.input_channels}, *spatial) "
                             f"(modality groups {self.modality_groups}), got {tuple(x.shape)}.")
        return [x[:, g[0]:g[-1] + 1] if g == list(range(g[0], g[-1] + 1)) else x[:, g] for g in self.modality_groups]

    def fuse(self, skips: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Exchange information between branches. Args: skips[k] = encoder k's stage outputs. Identity here."""
        return skips

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor | list[torch.Tensor]]:
        """Return every head's logits (a deep-supervision list per head when enabled)."""
        skips = [encoder(xk) for encoder, xk in zip(self.encoders, self.split_modalities(x))]
        skips = self.fuse(skips)
        return [decoder(s) for decoder, s in zip(self.decoders, skips)]

    def forward(self, x: torch.Tensor):
        """Args: x (B, input_channels, *S). Returns: mean logits of ``inference_heads`` (all by default), or the
        list of all heads' logits when ``return_heads`` is set."""
        heads = self.forward_heads(x)
        if self.return_heads:
            return heads
        selected = range(len(heads)) if self.inference_heads is None else self.inference_heads
        return mean_of_heads([heads[i] for i in selected])

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Number of feature-map elements stored for backprop (nnU-Net's memory proxy), summed over branches."""
        total = np.int64(0)
        for encoder, decoder in zip(self.encoders, self.decoders):
            total += encoder.compute_conv_feature_map_size(input_size)
            total += decoder.compute_conv_feature_map_size(input_size)
        return int(total + self._fusion_feature_map_size(input_size))

    def _fusion_feature_map_size(self, input_size: Sequence[int]) -> int:
        return 0

    def bottleneck_size(self, input_size: Sequence[int]) -> list[int]:
        size = list(input_size)
        for stride in self.encoders[0].strides:
            size = [i // s for i, s in zip(size, stride)]
        return size

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's initialisation of the base (He; residual blocks' last norm zeroed), for ``network.apply``."""
        initialize_module(module)


class MemCifUNet(MultiBranchUNet):
    """Dual-branch U-Net of Chung et al. 2025 with MEM on each bottleneck and CIF between them.

    Bottleneck of branch k: ``f_e_k = MEM_k(f_ls_k)`` (if ``use_mem``); ``f_fu = CIF(f_e_1, ..., f_e_K)`` (if
    ``use_cif``) and branch k decodes from ``proj_k(cat(f_e_k, f_fu))``, a 1x1 convolution from 2C back to C so that
    nnU-Net's decoder is reused unchanged (METHODS.md §1 allows it; the README names it).

    Args:
        use_mem: enable the modality-specific enhancing module.
        use_cif: enable complementary information fusion.
        mem_type: ``channel_attention`` (DANet, default) or ``se``.
        other args: see :class:`MultiBranchUNet`.
    """

    def __init__(self, *args, use_mem: bool = True, use_cif: bool = True, mem_type: str = "channel_attention",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.use_mem = use_mem
        self.use_cif = use_cif
        channels = self.bottleneck_channels
        encoder = self.encoders[0]
        if use_mem:
            self.mems = nn.ModuleList(build_mem(mem_type, channels) for _ in self.modality_groups)
        if use_cif:
            self.cif = ComplementaryInformationFusion(
                self.conv_op, channels, num_inputs=self.num_heads, kernel_size=encoder.kernel_sizes[-1],
                conv_bias=encoder.conv_bias, norm_op=encoder.norm_op, norm_op_kwargs=encoder.norm_op_kwargs,
                nonlin=encoder.nonlin, nonlin_kwargs=encoder.nonlin_kwargs)
            self.cif_projections = nn.ModuleList(
                self.conv_op(2 * channels, channels, kernel_size=1, bias=True) for _ in self.modality_groups)

    def fuse(self, skips: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        bottlenecks = [s[-1] for s in skips]
        if self.use_mem:
            bottlenecks = [mem(b) for mem, b in zip(self.mems, bottlenecks)]
        if self.use_cif:
            fused = self.cif(bottlenecks)
            bottlenecks = [proj(torch.cat((b, fused), dim=1)) for proj, b in zip(self.cif_projections, bottlenecks)]
        return [s[:-1] + [b] for s, b in zip(skips, bottlenecks)]

    def _fusion_feature_map_size(self, input_size: Sequence[int]) -> int:
        voxels = int(np.prod(self.bottleneck_size(input_size)))
        c = self.bottleneck_channels
        per_branch = (c if self.use_mem else 0) + (c if self.use_cif else 0)
        return voxels * (per_branch * self.num_heads + (4 * c if self.use_cif else 0))

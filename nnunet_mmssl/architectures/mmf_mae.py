"""Dual-branch U-Net with multi-stage fusion (MMF) and modality-aware enhancement (MAE), Meng et al. 2025.

D. Meng, S. Li, H. Wu, G. Wang, X. Yan, "Semi-Supervised Multi-Modal Medical Image Segmentation for Complex
Situations", MICCAI 2025, Sec. 2.1 and Fig. 1 (METHODS.md §2). Each modality group has its own nnU-Net encoder (the
plans' plain or residual one) and ``UNetDecoder`` (:class:`~nnunet_mmssl.architectures.multi_branch.MultiBranchUNet`);
the two encoders run stage by stage so that they can exchange features:

* **Encoders** are the plans' (plain, or residual with its stem convolution before stage 0,
  :mod:`nnunet_mmssl.architectures.encoders`).
* **MMF** (eq. 3) after every encoder stage s except the bottleneck: ``fused_s = MMF_s(f_s_a, f_s_b)``
  ``= sigmoid(conv2(conv1(cat(f_s_a, f_s_b))))`` with two plain convolutions (no norm, no nonlinearity); both encoders
  continue their next stage from ``f_s_k + fused_s``. This is our reading of "captures and aligns multi-modal features
  F^ab at various encoding stages, and then transmits them to the next stage of each encoder": the fused map is added
  to, not substituted for, each branch's own features, so each branch keeps its modality-specific path.
* **Skips.** Decoder k's skip at stage s is ``f_s_k + fused_s``, i.e. exactly what encoder k passed on to its next
  stage (the features "after the multi-stage feature fusion process"). Without MMF it is ``f_s_k``, as in nnU-Net.
* **MAE** (eq. 2) on the two bottlenecks ``F_a``, ``F_b`` (the last stage, which MMF does not touch): per-channel
  weights ``W_k`` with ``W_a + W_b = 1`` and branch k decodes from ``W_k * F_k``
  (:class:`~nnunet_mmssl.building_blocks.multistage_fusion.ModalityAwareEnhancement`, implemented in :meth:`fuse`).

With ``use_mmf=False, use_mae=False`` the computation is exactly :class:`MultiBranchUNet`'s (the paper's
"Baseline" dual-branch network of Table 2).
"""

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from nnunet_mmssl.architectures.encoders import encoder_stem
from nnunet_mmssl.architectures.multi_branch import MultiBranchUNet
from nnunet_mmssl.building_blocks.multistage_fusion import ModalityAwareEnhancement, MultiModalFusion


class MMFMAEUNet(MultiBranchUNet):
    """Two-branch U-Net with MMF between the encoders at every non-bottleneck stage and MAE on the bottlenecks.

    Args:
        use_mmf: enable multi-stage multi-modal fusion (eq. 3).
        use_mae: enable modality-aware enhancement of the bottlenecks (eq. 2).
        mae_descriptor: ``"per_modality"`` (eq. 2 as written, default) or ``"shared"`` (SKNet-style descriptor of
            ``F_a + F_b``); see :class:`ModalityAwareEnhancement`.
        mae_reduction: channel reduction of MAE's first fully connected layer.
        mae_psi2_kernel_size: kernel of MAE's ``psi2``; None = the bottleneck's kernel, dilated.
        mae_psi2_dilation: dilation of MAE's ``psi2``; None = 2 with the bottleneck's kernel (a 3-kernel with the
            receptive field of a 5-kernel), 1 when ``mae_psi2_kernel_size`` is given (that kernel, undilated).
        other args: see :class:`MultiBranchUNet`; ``modality_groups`` must hold exactly two groups.

    Shapes:
        ``forward(x)``: x (B, input_channels, *S) -> (B, num_classes, *S) logits (a list, highest resolution first,
        under deep supervision); ``forward_heads(x)``: one such output per branch.

    Raises:
        ValueError: if ``modality_groups`` does not hold exactly two groups.
    """

    def __init__(self, *args, use_mmf: bool = True, use_mae: bool = True, mae_descriptor: str = "per_modality",
                 mae_reduction: int = 16, mae_psi2_kernel_size: int | Sequence[int] | None = None,
                 mae_psi2_dilation: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.num_heads != 2:
            raise ValueError(f"MMFMAEUNet (Meng et al. 2025) fuses exactly two modality groups, got "
                             f"{self.num_heads}: {self.modality_groups}. Give two groups, e.g. [[0], [1]] or "
                             f"[[0, 1], [2, 3]] (plans 'mmssl' block or the trainer's modality_groups).")
        self.use_mmf = use_mmf
        self.use_mae = use_mae
        encoder = self.encoders[0]
        common = {"conv_bias": encoder.conv_bias, "norm_op": encoder.norm_op, "norm_op_kwargs": encoder.norm_op_kwargs,
                  "nonlin": encoder.nonlin, "nonlin_kwargs": encoder.nonlin_kwargs}
        if use_mmf:
            self.mmf = nn.ModuleList(
                MultiModalFusion(self.conv_op, channels, num_inputs=2, kernel_size=kernel)
                for channels, kernel in zip(encoder.output_channels[:-1], encoder.kernel_sizes[:-1]))
        if use_mae:
            self.mae = ModalityAwareEnhancement(
                self.conv_op, self.bottleneck_channels, num_modalities=2, descriptor=mae_descriptor,
                reduction=mae_reduction, kernel_size=encoder.kernel_sizes[-1], psi2_kernel_size=mae_psi2_kernel_size,
                psi2_dilation=mae_psi2_dilation, **common)

    def encode(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Run both encoders stage by stage with MMF in between.

        Args:
            x: (B, input_channels, *S).

        Returns:
            skips[k][s]: what encoder k passed on after stage s (``f_s_k + fused_s`` with MMF, ``f_s_k`` without, the
            raw bottleneck at the last stage).
        """
        features = [encoder_stem(encoder, f) for encoder, f in zip(self.encoders, self.split_modalities(x))]
        skips: list[list[torch.Tensor]] = [[] for _ in self.encoders]
        last = len(self.encoders[0].stages) - 1
        for s in range(last + 1):
            features = [encoder.stages[s](f) for encoder, f in zip(self.encoders, features)]
            if self.use_mmf and s < last:
                fused = self.mmf[s](*features)
                features = [f + fused for f in features]
            for branch, f in zip(skips, features):
                branch.append(f)
        return skips

    def fuse(self, skips: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """MAE on the bottlenecks: branch k's last entry becomes ``W_k * F_k``; identity without MAE."""
        if not self.use_mae:
            return skips
        bottlenecks = self.mae([s[-1] for s in skips])
        return [s[:-1] + [b] for s, b in zip(skips, bottlenecks)]

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor | list[torch.Tensor]]:
        """Return both heads' logits (a deep-supervision list per head when enabled)."""
        skips = self.fuse(self.encode(x))
        return [decoder(s) for decoder, s in zip(self.decoders, skips)]

    def stage_sizes(self, input_size: Sequence[int]) -> list[list[int]]:
        """Spatial size of every encoder stage's output for an input of spatial size ``input_size``."""
        sizes, size = [], list(input_size)
        for stride in self.encoders[0].strides:
            size = [i // s for i, s in zip(size, stride)]
            sizes.append(size)
        return sizes

    def _fusion_feature_map_size(self, input_size: Sequence[int]) -> int:
        sizes = self.stage_sizes(input_size)
        total = 0
        if self.use_mmf:
            for mmf, size in zip(self.mmf, sizes[:-1]):
                # the block itself + the two residual sums f_s_k + fused_s
                total += mmf.compute_conv_feature_map_size(size) + 2 * mmf.channels * int(np.prod(size))
        if self.use_mae:
            total += self.mae.compute_conv_feature_map_size(sizes[-1])
        return int(total)

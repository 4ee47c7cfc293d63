"""Multi-stage fusion and modality-aware enhancement of Meng et al. 2025.

D. Meng, S. Li, H. Wu, G. Wang, X. Yan, "Semi-Supervised Multi-Modal Medical Image Segmentation for Complex
Situations", MICCAI 2025 (METHODS.md §2):

* :class:`MultiModalFusion` (MMF, eq. 3): ``f_fused = sigmoid(conv2(conv1(cat(f_a, f_b))))`` with two plain
  convolutions, applied after every encoder stage but the bottleneck.
* :class:`ModalityAwareEnhancement` (MAE, eq. 2): per-channel modality weights ``W_k`` from a selective-kernel style
  descriptor (two convolutions with different receptive fields, summed, global average pooling, fully connected
  layers), normalised by a softmax across the modalities; each modality's features are reweighted, ``W_k * F_k``.

One implementation for 2D and 3D: the convolution, normalisation and nonlinearity types are passed in (``conv_op``
etc.) as in dynamic-network-architectures. Each block reports its stored feature-map elements
(``compute_conv_feature_map_size``) for nnU-Net's memory estimate.
"""

from collections.abc import Sequence

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
from torch import nn

MAE_DESCRIPTORS = ("per_modality", "shared")


class MultiModalFusion(nn.Module):
    """MMF (Meng et al. 2025, eq. 3): ``f_fused = sigmoid(conv2(conv1(cat(f_1, ..., f_K))))``.

    Exactly the printed equation: two plain convolutions (``conv1``: K*C -> C, ``conv2``: C -> C, ``same`` padding,
    with bias) and a sigmoid; no normalisation and no nonlinearity between them ("a concatenation operation, two
    convolutional layers, and a non-linear activation function"). Unlike CIF, whose blocks carry norm + nonlin
    (Chung et al. name them), the gate therefore spans the whole of (0, 1).

    Args:
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        channels: C, the channels of each input and of the output.
        num_inputs: K, how many feature maps are concatenated (2 in the paper).
        kernel_size: kernel of both convolutions (odd; the encoder stage's kernel in :class:`MMFMAEUNet`).
        conv_bias: bias of both convolutions (True: no normalisation follows them).

    Shapes:
        inputs: K tensors (B, C, *S); output: (B, C, *S) with values in (0, 1).
    """

    def __init__(self, conv_op: type[nn.Module], channels: int, num_inputs: int = 2,
                 kernel_size: int | Sequence[int] = 3, conv_bias: bool = True):
        super().__init__()
        if num_inputs < 1:
            raise ValueError(f"{type(self).__name__} needs at least one input, got num_inputs={num_inputs}.")
        kernel = maybe_convert_scalar_to_list(conv_op, kernel_size)
        padding = [(k - 1) // 2 for k in kernel]
        self.channels = channels
        self.num_inputs = num_inputs
        self.conv1 = conv_op(num_inputs * channels, channels, kernel_size=kernel, padding=padding, bias=conv_bias)
        self.conv2 = conv_op(channels, channels, kernel_size=kernel, padding=padding, bias=conv_bias)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        """Args: features, K tensors (B, C, *S). Returns: f_fused (B, C, *S) in (0, 1)."""
        if len(features) != self.num_inputs:
            raise ValueError(f"{type(self).__name__} expects {self.num_inputs} feature maps, got {len(features)}.")
        return torch.sigmoid(self.conv2(self.conv1(torch.cat(features, dim=1))))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Stored elements for an input of spatial size ``input_size``: concat (K*C), conv1 (C), conv2 (C), sigmoid
        (C) maps."""
        voxels = int(np.prod(input_size, dtype=np.int64))
        return voxels * self.channels * (self.num_inputs + 3)


def _conv_norm_nonlin(conv_op: type[nn.Module], channels: int, kernel_size: int | Sequence[int], dilation: int,
                      conv_bias: bool, norm_op: type[nn.Module] | None, norm_op_kwargs: dict | None,
                      nonlin: type[nn.Module] | None, nonlin_kwargs: dict | None) -> nn.Sequential:
    """C -> C conv (``same`` padding, optional dilation) + norm + nonlin, as nnU-Net's conv blocks but dilatable."""
    kernel = maybe_convert_scalar_to_list(conv_op, kernel_size)
    layers: list[nn.Module] = [conv_op(channels, channels, kernel_size=kernel, stride=1, dilation=dilation,
                                       padding=[dilation * (k - 1) // 2 for k in kernel], bias=conv_bias)]
    if norm_op is not None:
        layers.append(norm_op(channels, **(norm_op_kwargs or {})))
    if nonlin is not None:
        layers.append(nonlin(**(nonlin_kwargs or {})))
    return nn.Sequential(*layers)


class ModalityAwareEnhancement(nn.Module):
    """MAE (Meng et al. 2025, eq. 2): per-channel modality weights, softmax across modalities, ``W_k * F_k``.

    Eq. (2) reads ``W^a = softmax(fc(gap(psi1(F^a) + psi2(F^a))))``, "similarly ... for the other modality". How the
    modalities meet is not written out; the softmax is taken across the modalities (selective-kernel style, Li et al.
    CVPR 2019, with modalities in place of kernel branches), so that ``sum_k W_k = 1`` per sample and channel and the
    weights "adjust the weights of various modalities" as the text says. Two descriptors are implemented:

    * ``descriptor="per_modality"`` (default, eq. 2 as written): modality k has its own ``psi1_k``, ``psi2_k`` and
      fully connected layers applied to its own features: ``s_k = GAP(psi1_k(F_k) + psi2_k(F_k))`` (B, C),
      ``logit_k = fc2_k(nonlin(fc1_k(s_k)))`` (B, C).
    * ``descriptor="shared"`` (SKNet's fuse step): ``U = psi1(F) + psi2(F)`` with ``F = sum_k F_k``; ``s = GAP(U)``;
      ``z = nonlin(fc1(s))`` shared; ``logit_k = fc2_k(z)``.

    Then ``W = softmax([logit_1, ..., logit_K], over k)`` (B, K, C) and the outputs are ``W_k * F_k``.
    ``fc1`` reduces C -> ``max(C // reduction, min_hidden)``; no normalisation in the fully connected path (batches
    are small in nnU-Net). ``psi1`` is conv(kernel_size) + norm + nonlin; ``psi2`` is conv(psi2_kernel_size) + norm +
    nonlin with dilation ``psi2_dilation``. By default ``psi2`` is ``psi1``'s kernel dilated by 2 (a 3x3(x3) kernel with
    a 5x5(x5) receptive field, SKNet's choice, at a fraction of a 5x5x5 kernel's parameters); giving
    ``psi2_kernel_size`` (e.g. 5) without ``psi2_dilation`` gives that literal, undilated kernel (the paper's
    "different kernel sizes").

    Args:
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        channels: C, channels of every modality's features.
        num_modalities: K (2 in the paper).
        descriptor: ``"per_modality"`` or ``"shared"`` (see above).
        reduction: channel reduction r of ``fc1``.
        min_hidden: lower bound of the hidden width of ``fc1``.
        kernel_size: kernel of ``psi1``.
        psi2_kernel_size: kernel of ``psi2``; None = ``kernel_size``.
        psi2_dilation: dilation of ``psi2``; None = 2 when ``psi2_kernel_size`` is None, else 1 (the kernel as
            given).
        conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs: as in dynamic-network-architectures; ``nonlin``
            (default ``nn.ReLU``) is also the activation after ``fc1``.

    Shapes:
        inputs: K tensors (B, C, *S); outputs: K tensors (B, C, *S); :meth:`modality_weights`: (B, K, C).
    """

    def __init__(self, conv_op: type[nn.Module], channels: int, num_modalities: int = 2,
                 descriptor: str = "per_modality", reduction: int = 16, min_hidden: int = 8,
                 kernel_size: int | Sequence[int] = 3, psi2_kernel_size: int | Sequence[int] | None = None,
                 psi2_dilation: int | None = None, conv_bias: bool = False, norm_op: type[nn.Module] | None = None,
                 norm_op_kwargs: dict | None = None, nonlin: type[nn.Module] | None = None,
                 nonlin_kwargs: dict | None = None):
        super().__init__()
        if descriptor not in MAE_DESCRIPTORS:
            raise ValueError(f"Unknown MAE descriptor {descriptor!r}; choose one of {list(MAE_DESCRIPTORS)}.")
        if num_modalities < 2:
            raise ValueError(f"ModalityAwareEnhancement weighs at least 2 modalities, got {num_modalities}.")
        if psi2_dilation is None:
            psi2_dilation = 2 if psi2_kernel_size is None else 1
        if reduction < 1 or psi2_dilation < 1:
            raise ValueError(f"reduction and psi2_dilation must be >= 1, got {reduction} and {psi2_dilation}.")
        self.channels = channels
        self.num_modalities = num_modalities
        self.descriptor = descriptor
        self.hidden = max(channels // reduction, min_hidden)
        nonlin = nn.ReLU if nonlin is None else nonlin
        nonlin_kwargs = {} if nonlin_kwargs is None else nonlin_kwargs
        common = {"conv_bias": conv_bias, "norm_op": norm_op, "norm_op_kwargs": norm_op_kwargs, "nonlin": nonlin,
                  "nonlin_kwargs": nonlin_kwargs}
        psi2_kernel_size = kernel_size if psi2_kernel_size is None else psi2_kernel_size
        num_descriptors = num_modalities if descriptor == "per_modality" else 1
        self.psi1 = nn.ModuleList(_conv_norm_nonlin(conv_op, channels, kernel_size, 1, **common)
                                  for _ in range(num_descriptors))
        self.psi2 = nn.ModuleList(_conv_norm_nonlin(conv_op, channels, psi2_kernel_size, psi2_dilation, **common)
                                  for _ in range(num_descriptors))
        self.fc1 = nn.ModuleList(nn.Linear(channels, self.hidden) for _ in range(num_descriptors))
        self.fc_nonlin = nonlin(**nonlin_kwargs)
        self.fc2 = nn.ModuleList(nn.Linear(self.hidden, channels) for _ in range(num_modalities))

    def _check(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != self.num_modalities:
            raise ValueError(f"ModalityAwareEnhancement expects {self.num_modalities} feature maps, got "
                             f"{len(features)}.")
        shapes = {tuple(f.shape) for f in features}
        if len(shapes) != 1 or features[0].ndim < 3 or features[0].shape[1] != self.channels:
            raise ValueError(f"ModalityAwareEnhancement expects {self.num_modalities} tensors of shape "
                             f"(B, {self.channels}, *S), got {[tuple(f.shape) for f in features]}.")

    def modality_weights(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Args: features, K tensors (B, C, *S). Returns: W (B, K, C), softmax over K (sums to 1 over K)."""
        self._check(features)
        inputs = list(features) if self.descriptor == "per_modality" else [torch.stack(list(features)).sum(0)]
        hidden = []
        for psi1, psi2, fc1, f in zip(self.psi1, self.psi2, self.fc1, inputs):
            squeezed = (psi1(f) + psi2(f)).flatten(2).mean(-1)
            hidden.append(self.fc_nonlin(fc1(squeezed)))
        logits = torch.stack([fc2(hidden[k if len(hidden) > 1 else 0]) for k, fc2 in enumerate(self.fc2)], dim=1)
        return torch.softmax(logits.float(), dim=1)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Args: features, K tensors F_k (B, C, *S). Returns: K tensors ``W_k * F_k`` (B, C, *S)."""
        weights = self.modality_weights(features)
        batch, spatial = weights.shape[0], (1,) * (features[0].ndim - 2)
        return [f * weights[:, k].to(f.dtype).reshape(batch, self.channels, *spatial) for k, f in enumerate(features)]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Stored elements for inputs of spatial size ``input_size`` (nnU-Net's proxy: one map per conv block):
        per descriptor psi1, psi2 and their sum; the K reweighted outputs."""
        voxels = int(np.prod(input_size, dtype=np.int64))
        return voxels * self.channels * (3 * len(self.psi1) + self.num_modalities)

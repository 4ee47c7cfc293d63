"""Cross-modal fusion blocks.

``ComplementaryInformationFusion`` is the CIF layer of Chung et al. 2025: the enhanced bottleneck features of the
modality branches are concatenated, passed through two conv(3) + norm + nonlin blocks and a sigmoid
(``f_fu = sigmoid(block2(block1(cat(f_e1, f_e2))))``, METHODS.md §1). One implementation for 2D and 3D: the
convolution, norm and nonlinearity types are passed in (``conv_op`` etc.) exactly as in dynamic-network-architectures.
"""

from collections.abc import Sequence

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from torch import nn


class ComplementaryInformationFusion(nn.Module):
    """Fuse K feature maps of C channels into one sigmoid-gated map of C channels.

    Args:
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        channels: C, the channels of each input and of the output.
        num_inputs: K, how many feature maps are concatenated.
        kernel_size: kernel of both conv blocks (the paper uses 3).
        conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs: as in dynamic-network-architectures.
    """

    def __init__(self, conv_op: type[nn.Module], channels: int, num_inputs: int = 2,
                 kernel_size: int | Sequence[int] = 3, conv_bias: bool = False,
                 norm_op: type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 nonlin: type[nn.Module] | None = None, nonlin_kwargs: dict | None = None):
        super().__init__()
        if num_inputs < 1:
            raise ValueError(f"{type(self).__name__} needs at least one input, got num_inputs={num_inputs}.")
        common = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, nonlin=nonlin,
                      nonlin_kwargs=nonlin_kwargs)
        self.channels = channels
        self.num_inputs = num_inputs
        self.block1 = ConvDropoutNormReLU(conv_op, num_inputs * channels, channels, kernel_size, 1, **common)
        self.block2 = ConvDropoutNormReLU(conv_op, channels, channels, kernel_size, 1, **common)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Args: features, K tensors (B, C, *S). Returns: f_fu (B, C, *S) in (0, 1)."""
        if len(features) != self.num_inputs:
            raise ValueError(f"{type(self).__name__} expects {self.num_inputs} feature maps, got {len(features)}.")
        return torch.sigmoid(self.block2(self.block1(torch.cat(list(features), dim=1))))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Stored elements for an input of spatial size ``input_size``: concat, both conv blocks, sigmoid."""
        voxels = int(np.prod(input_size, dtype=np.int64))
        convs = int(self.block1.compute_conv_feature_map_size(input_size)
                    + self.block2.compute_conv_feature_map_size(input_size))
        return convs + voxels * self.channels * (self.num_inputs + 1)

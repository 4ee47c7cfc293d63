"""Hand-computed values for building blocks that mutation testing (``benchmarks/mutation/mutate.py``) showed
untested: the CIF layer's defaults, its one-input case and its memory estimate."""

import pytest
import torch
from torch import nn

from nnunet_mmssl.building_blocks import ComplementaryInformationFusion


def test_cif_defaults_are_the_papers_two_inputs_3x3_convs_without_bias():
    # survivors: num_inputs=2 -> 1/3/-2, kernel_size=3 -> 1, conv_bias=False -> True
    cif = ComplementaryInformationFusion(nn.Conv2d, 4)
    assert cif.num_inputs == 2
    for block, in_channels in ((cif.block1, 8), (cif.block2, 4)):
        assert (block.conv.in_channels, block.conv.out_channels) == (in_channels, 4)
        assert block.conv.kernel_size == (3, 3) and block.conv.bias is None


def test_cif_with_a_single_input_is_allowed_and_zero_inputs_are_not():
    # survivor: num_inputs < 1 -> num_inputs <= 1
    cif = ComplementaryInformationFusion(nn.Conv3d, 2, num_inputs=1)
    out = cif([torch.randn(1, 2, 3, 3, 3)])
    assert out.shape == (1, 2, 3, 3, 3) and cif.block1.conv.in_channels == 2
    with pytest.raises(ValueError, match="at least one input, got num_inputs=0"):
        ComplementaryInformationFusion(nn.Conv2d, 2, num_inputs=0)


@pytest.mark.parametrize("conv_op,size", [(nn.Conv2d, (6, 5)), (nn.Conv3d, (2, 3, 5))])
def test_cif_feature_map_size_by_hand(conv_op, size):
    # survivors: every operator of compute_conv_feature_map_size. C = 4 channels, K = 3 inputs, 30 voxels:
    # two conv blocks of C outputs (2 * 4 * 30 = 240) + concat (K * C * 30 = 360) + sigmoid (C * 30 = 120)
    cif = ComplementaryInformationFusion(conv_op, 4, num_inputs=3)
    assert cif.compute_conv_feature_map_size(size) == 240 + 360 + 120

"""Reusable nn.Modules: attention, fusion, ... (2D and 3D through ``conv_op``)."""

from nnunet_mmssl.building_blocks.attention import ChannelSelfAttention, SqueezeExcitation, build_mem
from nnunet_mmssl.building_blocks.fusion import ComplementaryInformationFusion

__all__ = ["ChannelSelfAttention", "SqueezeExcitation", "build_mem", "ComplementaryInformationFusion"]

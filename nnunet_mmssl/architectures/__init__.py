"""Full networks buildable from nnU-Net plans."""

from nnunet_mmssl.architectures.multi_branch import MemCifUNet, MultiBranchUNet, mean_of_heads

__all__ = ["MemCifUNet", "MultiBranchUNet", "mean_of_heads"]

"""Channel attention blocks used to enhance modality-specific features.

``ChannelSelfAttention`` is the Modality-specific Enhancing Module (MEM) of Chung et al. 2025, implemented as the
channel attention module of DANet (Fu et al., CVPR 2019), which is what "channel-wise self-attention with skip
connection" denotes (see METHODS.md §1). ``SqueezeExcitation`` is the SE-style alternative (Hu et al., CVPR 2018).
Both work for 2D and 3D feature maps alike (any number of spatial dimensions).
"""

import torch
from torch import nn


class ChannelSelfAttention(nn.Module):
    """DANet channel attention with a learnable residual scale (MEM).

    For a feature map ``F`` of shape (B, C, *S) flattened to (B, C, N):
    ``E = F Fᵀ`` (B, C, C), ``A = softmax(rowmax(E) - E)``, ``f_a = A F`` and ``f_e = F + gamma * f_a`` with
    ``gamma`` a learnable scalar initialised to 0, so the block starts as the identity. The affinity is computed
    in float32 even under autocast because ``E`` sums over all N positions and overflows float16.

    Args:
        channels: number of channels C (kept only for ``extra_repr``; the block has one parameter).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Return the attended features ``f_a = A F`` with the shape of ``x`` (B, C, *S)."""
        b, c = x.shape[:2]
        with torch.autocast(device_type=x.device.type, enabled=False):
            f = x.reshape(b, c, -1).float()
            energy = torch.bmm(f, f.transpose(1, 2))
            energy = energy.amax(dim=-1, keepdim=True) - energy
            affinity = torch.softmax(energy, dim=-1)
            attended = torch.bmm(affinity, f)
        return attended.reshape(x.shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, C, *S). Returns: (B, C, *S) ``x + gamma * attention(x)``."""
        return x + self.gamma.to(x.dtype) * self.attention(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation channel gating with a residual connection (SE-style MEM option).

    ``f_e = F + F * sigmoid(W2 relu(W1 GAP(F)))``.

    Args:
        channels: number of channels C.
        reduction: bottleneck reduction of the two fully connected layers.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, C, *S). Returns: (B, C, *S)."""
        squeezed = x.flatten(2).mean(-1)
        weights = torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))
        return x + x * weights.reshape(*weights.shape, *([1] * (x.ndim - 2)))


MEM_TYPES = {"channel_attention": ChannelSelfAttention, "se": SqueezeExcitation}


def build_mem(mem_type: str, channels: int) -> nn.Module:
    """Build a modality-specific enhancing module by name (``channel_attention`` or ``se``)."""
    if mem_type not in MEM_TYPES:
        raise ValueError(f"Unknown mem_type {mem_type!r}; choose one of {sorted(MEM_TYPES)}.")
    return MEM_TYPES[mem_type](channels)

"""Mixed precision (issue #22): every loss and statistic stays finite and close to float32 under autocast.

nnU-Net trains on CUDA under float16 autocast. Here autocast is forced on the CPU (``torch.autocast("cpu",
dtype=float16)`` and bfloat16), which casts convolutions and matrix products (``matmul``, ``bmm``, ``einsum``,
``linear``) to the lower precision just as CUDA autocast does; that is the cast that overflowed SMML's FRC.

Sizes: the slow tests run each loss at the plans' real sizes, 3d_fullres 128^3 with batch 2 (SMML's stage-1 features
64^3) and a 2d patch of 512 x 512 with batch 12, fed activations made by the tail of the real fusion block at
nnU-Net's initialisation (instance norm + leaky ReLU + He-initialised 1x1 convolution), with BraTS-like labels (a
nested tumour covering ~13 % of the patch). The fast tests run every trainer's real ``train_step`` under forced
autocast on the fixture plans.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunet_mmssl.architectures.smml import MaskedConvFusion
from nnunet_mmssl.losses.smml import class_entropy_weights, frc_loss

LOW = [torch.float16, torch.bfloat16]
#: relative tolerance of a loss and of the gradient (norm of the difference / norm of the float32 gradient)
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
#: (batch, spatial shape of the full-resolution patch) of the plans' real configurations
SIZES = {"3d_fullres": (2, (128, 128, 128)), "2d": (12, (512, 512))}
#: nnU-Net's GradScaler starts at 2^16: the backward of a float16 graph runs on the scaled loss (per-voxel gradients of
#: a mean over 200,000 voxels are below float16's smallest normal number otherwise), the gradients are divided after
GRAD_SCALE = 2.0 ** 16


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))


def brats_like_classes(batch: int, shape: tuple[int, ...], num_classes: int = 4, seed: int = 0) -> torch.Tensor:
    """(B, *S) long: background, and nested spheres of classes 1..C-1 (a tumour over ~13 % of the patch)."""
    generator = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    classes = torch.zeros(batch, *shape, dtype=torch.long)
    for b in range(batch):
        centre = [s / 2 + float(torch.randint(-s // 8, s // 8 + 1, (1,), generator=generator)) for s in shape]
        distance = sum((g - c) ** 2 for g, c in zip(grids, centre)).sqrt() / (min(shape) / 2)
        for c, radius in enumerate((0.62, 0.4, 0.2)[:num_classes - 1], start=1):
            classes[b][distance < radius] = c
    return classes


def fusion_tail(conv_op, channels: int, seed: int) -> nn.Module:
    """Instance norm + leaky ReLU + 1x1 convolution of SMML's real fusion block, with nnU-Net's He initialisation."""
    torch.manual_seed(seed)
    norm = nn.InstanceNorm3d if conv_op is nn.Conv3d else nn.InstanceNorm2d
    block = MaskedConvFusion(channels, channels, conv_op, norm, {"eps": 1e-5, "affine": True}, nn.LeakyReLU,
                             {"inplace": True})
    block.apply(InitWeights_He(1e-2))
    return block.block[4:]


def pre_activations(classes: torch.Tensor, channels: int, seed: int) -> torch.Tensor:
    """(B, D, *s) smooth random field plus a per-class, per-channel offset: what the fusion block's 3x3 conv emits."""
    generator = torch.Generator().manual_seed(seed)
    batch, spatial = classes.shape[0], classes.shape[1:]
    coarse = torch.randn(batch, channels, *[max(2, s // 8) for s in spatial], generator=generator)
    field = F.interpolate(coarse, size=spatial, mode="trilinear" if len(spatial) == 3 else "bilinear")
    offsets = torch.randn(int(classes.max()) + 1, channels, generator=generator)
    field += offsets[classes].movedim(-1, 1)
    return field + 0.5 * torch.randn(field.shape, generator=generator)


@functools.lru_cache(maxsize=1)
def frc_case(size: str, channels: int):
    """Stage-1 fused features of both branches (two fusion tails, float32, detached) and the full-resolution
    classes, cached for the size."""
    batch, shape = SIZES[size]
    classes = brats_like_classes(batch, shape)
    small = classes[(slice(None), *[slice(None, None, 2)] * len(shape))]  # stage 1: half resolution
    conv = nn.Conv3d if len(shape) == 3 else nn.Conv2d
    with torch.no_grad():
        features = [fusion_tail(conv, channels, seed)(pre_activations(small, channels, seed + 2))
                    for seed in (1, 2)]
    logits = torch.randn(batch, 4, *shape, generator=torch.Generator().manual_seed(5)) * 3
    weights = class_entropy_weights(logits, logits.roll(1, 1))
    return features, classes, weights


def run_frc(features, classes, weights, dtype):
    """FRC and its gradient w.r.t. the features; under autocast the features arrive in ``dtype``, as the fusion
    block's 1x1 convolution emits them there, and the backward runs on the loss scaled by :data:`GRAD_SCALE`."""
    leaves = [f.clone().requires_grad_() for f in features]
    with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
        emitted = [leaf if dtype is None else leaf.to(dtype) for leaf in leaves]
        loss = frc_loss(emitted[0], emitted[1], classes, weights, 4)
    scale = 1.0 if dtype is None else GRAD_SCALE
    (loss * scale).backward()
    return loss.detach(), torch.cat([leaf.grad.flatten() for leaf in leaves]) / scale


@pytest.mark.slow
@pytest.mark.parametrize("size", ["3d_fullres", "2d"])
def test_frc_at_real_patch_sizes_is_finite_and_close_to_float32(size):
    case = frc_case(size, channels=32 if size == "2d" else 64)
    reference, reference_grad = run_frc(*case, None)
    assert math.isfinite(reference) and reference > 1e-3 and reference_grad.isfinite().all()
    for dtype in LOW:
        loss, grad = run_frc(*case, dtype)
        assert math.isfinite(loss) and grad.isfinite().all(), (size, dtype, loss)
        assert relative_error(loss, reference) < TOLERANCE[dtype], (size, dtype, float(loss), float(reference))
        assert relative_error(grad, reference_grad) < TOLERANCE[dtype], (size, dtype)

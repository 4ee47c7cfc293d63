"""Hand-computed values for semisup arithmetic that mutation testing (``benchmarks/mutation/mutate.py``) showed
untested: ramp boundaries, the EMA decay's closed interval, the clipped input noise."""

import math

import pytest
import torch

from nnunet_mmssl.semisup import cosine_rampdown, ema_decay, gaussian_noise, linear_rampup


def test_linear_rampup_clamps_below_zero_and_is_linear_from_zero():
    # survivor: max(current, 0.0) -> max(current, 1.0) (a ramp that starts as if one epoch had passed)
    assert linear_rampup(0.5, 10) == pytest.approx(0.05)
    assert linear_rampup(-3, 10) == 0.0
    assert linear_rampup(0, 4) == 0.0


def test_cosine_rampdown_accepts_any_positive_length():
    # survivor: rampdown_length <= 0 -> rampdown_length <= 1 (a length of one epoch refused)
    assert cosine_rampdown(0.5, 1) == pytest.approx(0.5 * (math.cos(math.pi * 0.5) + 1))
    assert cosine_rampdown(0.25, 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="> 0"):
        cosine_rampdown(0.1, -0.5)


def test_ema_decay_accepts_both_ends_of_its_interval():
    # survivors: 0.0 <= alpha -> 0.0 < alpha and alpha <= 1.0 -> alpha < 1.0
    assert ema_decay(0.0) == 0.0 and ema_decay(1.0) == 1.0
    assert ema_decay(1.0, 3) == pytest.approx(0.75)  # min(1 - 1/4, 1)
    for bad in (-1e-6, 1.0 + 1e-6):
        with pytest.raises(ValueError, match="in \\[0, 1\\]"):
            ema_decay(bad)


def test_clipped_noise_keeps_both_signs_inside_the_clip():
    # survivor: noise.clamp(-clip, clip) -> noise.clamp(clip, -clip) (every value -clip: the old max|.| check passed)
    x = torch.full((4096,), 3.0)
    noise = gaussian_noise(x, 1.0, clip=0.2, generator=torch.Generator().manual_seed(1)) - x
    assert noise.min().item() == pytest.approx(-0.2) and noise.max().item() == pytest.approx(0.2)
    inside = noise[noise.abs() < 0.199]
    assert inside.numel() > 400 and (inside > 0).any() and (inside < 0).any()  # N(0, 1): P(|e| < 0.2) ~ 0.16
    assert gaussian_noise(x, 1.0, clip=0.2, generator=torch.Generator().manual_seed(1)).mean().item() == \
        pytest.approx(3.0, abs=0.01)

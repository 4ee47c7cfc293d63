"""Ramp functions for the weight of unsupervised losses (pure functions of the epoch).

After SSL4MIS ``utils/ramps.py``; the sigmoid ramp-up is the one of Laine & Aila, "Temporal Ensembling for
Semi-Supervised Learning", ICLR 2017: ``exp(-5 (1 - t)^2)`` with ``t = clip(current / length, 0, 1)``.
A length of 0 means no ramp (weight 1 from the first epoch).
"""

import math


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """Sigmoid-shaped ramp from ~0.0067 at ``current = 0`` to 1 at ``current >= rampup_length``.

    Args:
        current: the current epoch (or iteration).
        rampup_length: epochs until the ramp reaches 1; ``0`` returns 1 everywhere.

    Returns:
        The ramp value in (0, 1].
    """
    if rampup_length < 0:
        raise ValueError(f"rampup_length must be >= 0, got {rampup_length}.")
    if rampup_length == 0:
        return 1.0
    t = min(max(current, 0.0), rampup_length) / rampup_length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(current: float, rampup_length: float) -> float:
    """Linear ramp from 0 to 1 over ``rampup_length``; 1 everywhere for a length of 0."""
    if rampup_length < 0:
        raise ValueError(f"rampup_length must be >= 0, got {rampup_length}.")
    if rampup_length == 0:
        return 1.0
    return float(min(max(current, 0.0), rampup_length) / rampup_length)


def cosine_rampdown(current: float, rampdown_length: float) -> float:
    """Cosine ramp-down from 1 to 0 over ``rampdown_length`` (Loshchilov & Hutter 2016)."""
    if rampdown_length <= 0:
        raise ValueError(f"rampdown_length must be > 0, got {rampdown_length}.")
    t = min(max(current, 0.0), rampdown_length)
    return float(0.5 * (math.cos(math.pi * t / rampdown_length) + 1))

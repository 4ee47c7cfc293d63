"""Pure semi-supervised arithmetic: ramps, (later) EMA teachers and pseudo-labels."""

from nnunet_mmssl.semisup.ramps import cosine_rampdown, linear_rampup, sigmoid_rampup

__all__ = ["cosine_rampdown", "linear_rampup", "sigmoid_rampup"]

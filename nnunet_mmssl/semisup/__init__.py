"""Pure semi-supervised arithmetic: ramps, EMA teachers and pseudo-labels."""

from nnunet_mmssl.semisup.ema import EMATeacher, ema_decay, gaussian_noise, make_teacher, update_ema_
from nnunet_mmssl.semisup.modality_weighting import ModalityWeighting, modality_adaptive_weights
from nnunet_mmssl.semisup.ramps import cosine_rampdown, linear_rampup, sigmoid_rampup

__all__ = ["cosine_rampdown", "linear_rampup", "sigmoid_rampup"]
__all__ += ["EMATeacher", "ema_decay", "gaussian_noise", "make_teacher", "update_ema_"]
__all__ += ["ModalityWeighting", "modality_adaptive_weights"]

"""Mean Teacher and MemCif with the weight set by the gradient share (``unsupervised_share_target``).

``<Trainer>_share0p05``, ``_share0p1`` and ``_share0p2`` are the parent trainer with
:attr:`~nnunet_mmssl.trainers.base.SSLTrainerBase.unsupervised_share_target` 0.05, 0.1 and 0.2: the unsupervised
weight starts at the parent's (paper) weight and follows, at each measurement of the gradient share, what makes
``‖∇(w·L_u)‖ / ‖∇L_s‖`` equal the target (:mod:`nnunet_mmssl.semisup.share_control`), times the parent's ramp.
They measure the share every :data:`SHARE_MEASURE_EVERY` iterations (the parents: every 20), so that a short run
gets enough measurements to steer and the controller's average (arithmetic, over about ten measurements) follows
the share within an epoch or two; a measuring step costs one more backward pass of the supervised loss. (Until
2026-12-07 they measured every 10 iterations and steered the geometric mean: ``share_averaging = "log"``,
``share_smoothing = 0.3``, ``gradient_share_every = 10`` reproduce that rule.) Everything else is the parent
trainer: ``nnUNetv2_train ID 2d FOLD -tr MeanTeacherTrainer_share0p2``; another target is a three-line subclass
setting ``unsupervised_share_target``.
"""

from nnunet_mmssl.trainers.mean_teacher import MeanTeacherTrainer
from nnunet_mmssl.trainers.memcif import MemCifSSLTrainer

#: gradient-share measurements of the share-target variants: every this many training iterations
SHARE_MEASURE_EVERY = 2


class MeanTeacherTrainer_share0p05(MeanTeacherTrainer):
    unsupervised_share_target = 0.05
    gradient_share_every = SHARE_MEASURE_EVERY


class MeanTeacherTrainer_share0p1(MeanTeacherTrainer):
    unsupervised_share_target = 0.1
    gradient_share_every = SHARE_MEASURE_EVERY


class MeanTeacherTrainer_share0p2(MeanTeacherTrainer):
    unsupervised_share_target = 0.2
    gradient_share_every = SHARE_MEASURE_EVERY


class MemCifSSLTrainer_share0p05(MemCifSSLTrainer):
    unsupervised_share_target = 0.05
    gradient_share_every = SHARE_MEASURE_EVERY


class MemCifSSLTrainer_share0p1(MemCifSSLTrainer):
    unsupervised_share_target = 0.1
    gradient_share_every = SHARE_MEASURE_EVERY


class MemCifSSLTrainer_share0p2(MemCifSSLTrainer):
    unsupervised_share_target = 0.2
    gradient_share_every = SHARE_MEASURE_EVERY


"""Baselines on nnU-Net's own U-Net (METHODS.md §5): Mean Teacher and supervised-only.

:class:`MeanTeacherTrainer` is the Mean Teacher of Tarvainen & Valpola, "Mean teachers are better role models:
Weight-averaged consistency targets improve semi-supervised deep learning results", NeurIPS 2017, as used as a
baseline by the multi-modal papers (Meng et al. 2025 Table 1 "MT"; multi-modal images concatenated along the channel
axis, which is what nnU-Net does anyway). The network is nnU-Net's default one from the plans (all channels as input;
``build_network_architecture`` is not overridden): ``PlainConvUNet`` on ``nnUNetPlans``, ``ResidualEncoderUNet`` on the
residual-encoder presets (``nnUNetResEncUNetM/L/XLPlans``), as for ``nnUNetTrainer``.

One training step:

* student forward on ``cat(labelled, unlabelled + noise)``: Gaussian noise with std :attr:`input_noise_std` (0.1,
  optionally clipped to :attr:`input_noise_clip`) on the student's unlabelled input only; the labelled input stays as
  nnU-Net feeds it (nnU-Net's augmentation already perturbs it). Tarvainen & Valpola give student and teacher
  independent noise; SSL4MIS noises the teacher's input (std 0.1, clipped to 0.2); we noise the student's so that
  the target stays the clean-input prediction;
* supervised loss: nnU-Net's deep-supervised Dice+CE (``self.loss``) on the labelled part;
* teacher forward, without gradient, on the *clean* unlabelled input. The teacher is kept in the student's mode
  (``train()`` while training, as in Tarvainen & Valpola's code); with nnU-Net's instance norm (no running
  statistics) and no dropout the mode changes nothing;
* unsupervised loss: ``mean((softmax(student_u) - softmax(teacher_u))^2)`` at full resolution (the first
  deep-supervision output), weighted by ``unsupervised_weight * sigmoid_rampup(progress, unsupervised_rampup_fraction)``
  = ``0.1 * exp(-5 (1 - min(progress, 0.04) / 0.04)^2)`` with ``progress`` the fraction of the run done (sigmoid ramp
  of Laine & Aila 2017; weight 0.1 and the softmax MSE as in SSL4MIS). The ramp covers the first 4 % of the run: 40
  of nnU-Net's 1000 epochs, as Tarvainen & Valpola ramp over 5 of 180 CIFAR epochs (3 %). SSL4MIS instead ramps over
  its whole run (200 units of 150 iterations = its 30,000 iterations); we do not follow it, because a whole-run ramp
  leaves the average weight at 38 % of the nominal one;
* after each optimizer step the teacher becomes the EMA of the student (:attr:`ema_alpha` 0.99, warm-up
  ``min(1 - 1 / (step + 1), alpha)``, :mod:`nnunet_mmssl.semisup.ema`).

The teacher is training-only: it is stored under the checkpoint key ``mmssl_state`` as
``{"teacher": state_dict, "ema_step": int}`` and restored on ``--c``. Inference uses the *student* (nnU-Net's
``network_weights``), as SSL4MIS evaluates its mean-teacher models; the teacher is not exported.

:class:`PlainSupervisedTrainer` is the supervised-only baseline on the same U-Net, with the same logs as our
semi-supervised trainers (unsupervised loss and weight logged as 0).
"""

import torch

from nnunet_mmssl.losses.consistency import cross_modal_consistency_loss
from nnunet_mmssl.semisup.ema import EMATeacher, gaussian_noise
from nnunet_mmssl.trainers.base import SSLTrainerBase


def full_resolution(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The highest-resolution logits of a network output (the first entry under deep supervision)."""
    return output[0] if isinstance(output, (list, tuple)) else output


def split_batch(output: torch.Tensor | list[torch.Tensor], num_first: int):
    """Split a (deep-supervision list of) (B, ...) output into its first ``num_first`` samples and the rest."""
    if isinstance(output, (list, tuple)):
        return [o[:num_first] for o in output], [o[num_first:] for o in output]
    return output[:num_first], output[num_first:]


def mean_teacher_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             use_sigmoid: bool = False) -> torch.Tensor:
    """``mean((softmax(student) - sg(softmax(teacher)))^2)``; gradient to the student only.

    Args:
        student_logits: (B, C, *S) student logits on (noised) unlabelled data.
        teacher_logits: (B, C, *S) teacher logits on the clean unlabelled data (detached here).
        use_sigmoid: sigmoid instead of softmax (region-based training).
    """
    return cross_modal_consistency_loss(student_logits, teacher_logits.detach(), use_sigmoid)


class MeanTeacherTrainer(SSLTrainerBase):
    """Mean Teacher on nnU-Net's planned U-Net, plain or residual encoder (see module docstring)."""

    #: EMA decay of the teacher's weights
    ema_alpha: float = 0.99
    #: std of the Gaussian noise added to the student's unlabelled input
    input_noise_std: float = 0.1
    #: clip the noise to [-clip, clip]; None = no clipping (SSL4MIS: 0.2)
    input_noise_clip: float | None = None
    unsupervised_weight: float = 0.1
    #: the sigmoid ramp covers the first 4 % of the run (40 of nnU-Net's 1000 epochs)
    unsupervised_rampup_fraction: float = 0.04
    #: the EMA teacher, created in :meth:`initialize`
    teacher: EMATeacher | None = None
    #: set by :meth:`load_checkpoint_extra_state` (tells :meth:`load_checkpoint` whether the checkpoint had a teacher)
    _teacher_restored: bool = False

    def make_teacher(self) -> EMATeacher:
        """A fresh teacher: a copy of the current student (the bare module, not the DDP/compile wrapper) on the
        trainer's device."""
        return EMATeacher(self.network_module, alpha=self.ema_alpha).to(self.device)

    def initialize(self):
        # after nnU-Net's initialize: under DDP the network is wrapped by then and DDP has broadcast rank 0's
        # weights, so every rank's teacher starts from the same student (tests/test_ddp.py)
        super().initialize()
        if self.teacher is None:
            self.teacher = self.make_teacher()

    def noised(self, unlabeled: torch.Tensor) -> torch.Tensor:
        """The student's view of the unlabelled batch: ``unlabeled + N(0, input_noise_std^2)`` (clipped)."""
        return gaussian_noise(unlabeled, self.input_noise_std, clip=self.input_noise_clip)

    def compute_losses(self, data: torch.Tensor, target, unlabeled: torch.Tensor | None):
        num_labelled = data.shape[0]
        inputs = data if unlabeled is None else torch.cat((data, self.noised(unlabeled)))
        labelled, unlabelled_out = split_batch(self.network(inputs), num_labelled)
        sup_loss = self.loss(labelled, target)
        if unlabeled is None:
            return sup_loss, torch.zeros((), device=data.device)
        self.teacher.module.train(self.network.training)
        teacher_logits = full_resolution(self.teacher(unlabeled))
        unsup_loss = mean_teacher_consistency(full_resolution(unlabelled_out), teacher_logits,
                                              use_sigmoid=self.label_manager.has_regions)
        return sup_loss, unsup_loss

    def after_optimizer_step(self) -> None:
        self.teacher.update(self.network_module)

    def checkpoint_extra_state(self) -> dict:
        return {} if self.teacher is None else self.teacher.state_dict()

    def load_checkpoint_extra_state(self, state: dict) -> None:
        if self.teacher is None:
            if getattr(self, "network", None) is None:
                raise RuntimeError("The Mean Teacher state can only be restored after initialize() built the network.")
            self.teacher = self.make_teacher()
        self.teacher.load_state_dict(state)
        self._teacher_restored = True

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's loading plus the teacher; a checkpoint without one restarts the teacher from the student."""
        self._teacher_restored = False
        super().load_checkpoint(filename_or_checkpoint)
        if not self._teacher_restored:
            self.print_to_log_file("Checkpoint has no Mean Teacher state: the teacher restarts as a copy of the "
                                   "loaded student.")
            self.teacher = self.make_teacher()


class PlainSupervisedTrainer(SSLTrainerBase):
    """Supervised-only baseline on nnU-Net's planned U-Net: nnU-Net's Dice+CE on labelled data, our logs."""

    use_unlabeled = False

    def compute_losses(self, data: torch.Tensor, target, unlabeled: torch.Tensor | None):
        return self.loss(self.network(data), target), torch.zeros((), device=data.device)

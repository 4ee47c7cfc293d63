"""Mean Teacher arithmetic: EMA of weights, the teacher copy, input noise.

A. Tarvainen, H. Valpola, "Mean teachers are better role models: Weight-averaged consistency targets improve
semi-supervised deep learning results", NeurIPS 2017. The teacher's weights are an exponential moving average of the
student's, ``theta'_t = a theta'_{t-1} + (1 - a) theta_t`` (their eq. 1); their public code warms the decay up,
``a_t = min(1 - 1 / (t + 1), alpha)``, so that early teachers are not dominated by the random initialisation.

Conventions here:

* ``step`` is the number of optimizer steps taken so far *including* the one just taken (their ``global_step``,
  incremented before ``update_ema_variables``), so the first update uses ``a = 0.5``; ``step=0`` gives ``a = 0``
  (copy; SSL4MIS passes the 0-based iteration, so its first update copies). ``step=None`` uses ``alpha`` unchanged.
* Parameters are averaged; **buffers are copied** from the student (e.g. batch-norm running statistics), as in USB's
  EMA object. Tarvainen & Valpola average parameters only and let the train-mode teacher's batch norm update its own
  statistics. nnU-Net's instance norm has no buffers, so the choice does not matter for nnU-Net's networks.
* The teacher's parameters have ``requires_grad = False``; it receives no gradient from any loss.
"""

import copy

import torch
from torch import nn

from nnunet_mmssl.losses.precision import float32_region


def ema_decay(alpha: float, step: int | None = None) -> float:
    """Effective EMA decay: ``min(1 - 1 / (step + 1), alpha)``, or ``alpha`` when ``step`` is None.

    Raises:
        ValueError: for alpha outside [0, 1] or a negative step.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"EMA alpha must be in [0, 1], got {alpha}.")
    if step is None:
        return float(alpha)
    if step < 0:
        raise ValueError(f"EMA step must be >= 0, got {step}.")
    return float(min(1.0 - 1.0 / (step + 1), alpha))


def _matching(teacher: dict, student: dict, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if teacher.keys() != student.keys():
        missing, extra = sorted(student.keys() - teacher.keys()), sorted(teacher.keys() - student.keys())
        raise ValueError(f"Teacher and student {kind} differ: missing in teacher {missing}, extra in teacher {extra}. "
                         f"Make the teacher with make_teacher(student).")
    return [(teacher[name], student[name]) for name in student]


@torch.no_grad()
@float32_region
def update_ema_(teacher: nn.Module, student: nn.Module, alpha: float, step: int | None = None) -> float:
    """In place: ``teacher_param = a * teacher_param + (1 - a) * student_param``; buffers copied from the student.

    Args:
        teacher: the EMA model (same architecture as ``student``), modified in place.
        student: the trained model.
        alpha: EMA decay (0.99 in Tarvainen & Valpola's default for their ConvNets; SSL4MIS also uses 0.99).
        step: optimizer steps taken so far, for the warm-up ``min(1 - 1 / (step + 1), alpha)``; None = no warm-up.

    Returns:
        The decay ``a`` that was used.

    Raises:
        ValueError: if the two models' parameter or buffer names differ.
    """
    decay = ema_decay(alpha, step)
    pairs = _matching(dict(teacher.named_parameters()), dict(student.named_parameters()), "parameters")
    if pairs:
        # one fused multi-tensor update instead of one small kernel per parameter (same arithmetic as lerp_)
        torch._foreach_lerp_([t for t, _ in pairs], [s.detach().to(t.dtype) for t, s in pairs], 1.0 - decay)
    for t, s in _matching(dict(teacher.named_buffers()), dict(student.named_buffers()), "buffers"):
        t.copy_(s)
    return decay


def make_teacher(student: nn.Module) -> nn.Module:
    """Deep copy of ``student`` with ``requires_grad = False`` on every parameter.

    The copy keeps the student's device and its train/eval mode (the caller decides the teacher's mode; this function
    does not call ``eval()``).
    """
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def gaussian_noise(x: torch.Tensor, std: float, clip: float | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + eps`` with ``eps ~ N(0, std^2)`` i.i.d. per element, optionally clipped to ``[-clip, clip]``.

    Args:
        x: any tensor, e.g. (B, C, *S) images; not modified.
        std: noise standard deviation; 0 returns ``x`` itself.
        clip: clip the noise (SSL4MIS uses ``std=0.1, clip=0.2``); None = no clipping.
        generator: optional random generator (tests).

    Returns:
        A new tensor with the shape and dtype of ``x``.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}.")
    if std == 0:
        return x
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * std
    if clip is not None:
        noise = noise.clamp(-clip, clip)
    return x + noise


class EMATeacher:
    """A Mean Teacher: an EMA copy of a student with its step counter and checkpoint state.

    Args:
        student: the model whose weights are averaged; the teacher starts as a copy (:func:`make_teacher`).
        alpha: EMA decay.
        warmup: use the decay warm-up ``min(1 - 1 / (step + 1), alpha)``.

    Attributes:
        module: the teacher network (no gradients).
        step: optimizer steps seen (number of :meth:`update` calls, plus the restored count).
    """

    def __init__(self, student: nn.Module, alpha: float = 0.99, warmup: bool = True):
        ema_decay(alpha)
        self.module = make_teacher(student)
        self.alpha = alpha
        self.warmup = warmup
        self.step = 0

    def update(self, student: nn.Module) -> float:
        """Count one optimizer step and move the teacher towards ``student``. Returns the decay used."""
        self.step += 1
        return update_ema_(self.module, student, self.alpha, self.step if self.warmup else None)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor):
        """Teacher forward without gradient (in the module's current train/eval mode)."""
        return self.module(x)

    def to(self, device: torch.device | str) -> "EMATeacher":
        self.module.to(device)
        return self

    def state_dict(self) -> dict:
        """``{"teacher": module state_dict, "ema_step": int}``."""
        return {"teacher": self.module.state_dict(), "ema_step": int(self.step)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (strictly).

        Raises:
            KeyError: naming the missing key.
        """
        missing = [k for k in ("teacher", "ema_step") if k not in state]
        if missing:
            raise KeyError(f"Mean Teacher state lacks {missing}; got keys {sorted(state)}.")
        self.module.load_state_dict(state["teacher"], strict=True)
        self.step = int(state["ema_step"])

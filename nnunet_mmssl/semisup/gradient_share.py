"""How much the unsupervised term moves the weights: the gradient share of a semi-supervised step.

``share = ‖∇_θ (w · L_unsup)‖₂ / ‖∇_θ L_sup‖₂`` over the trained parameters θ (all of them flattened into one
vector). A share of 0.01 means the unlabelled data contribute a hundredth of the update's size before clipping: they
cannot change the model much, whatever the loss curve looks like. Pure functions; the trainer decides when to
measure (:attr:`~nnunet_mmssl.trainers.base.SSLTrainerBase.gradient_share_every`).
"""

from collections.abc import Iterable, Sequence

import torch

from nnunet_mmssl.losses.precision import float32_region


@float32_region
def global_norm(grads: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """Euclidean norm of all gradients flattened into one vector (``None`` entries count as zeros).

    Returns:
        A float32 scalar tensor on the gradients' device (CPU when every entry is ``None``).
    """
    squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    if not squares:
        return torch.zeros(())
    return torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()


def share_ratio(unsup_norm: torch.Tensor | float, sup_norm: torch.Tensor | float) -> float:
    """``unsup_norm / sup_norm`` as a float; ``inf`` when only the unsupervised term has a gradient, NaN for 0/0."""
    unsup, sup = float(unsup_norm), float(sup_norm)
    if sup == 0.0:
        return float("nan") if unsup == 0.0 else float("inf")
    return unsup / sup


@float32_region(cast_inputs=False)
def gradient_share(sup_loss: torch.Tensor, weighted_unsup_loss: torch.Tensor,
                   params: Sequence[torch.Tensor], retain_graph: bool = True) -> float:
    """``‖∇ weighted_unsup_loss‖ / ‖∇ sup_loss‖`` over ``params``, without touching ``param.grad``.

    Two backward passes through the graph (``torch.autograd.grad``); the graph is kept (``retain_graph``) so that
    the step's own backward can follow.

    Args:
        sup_loss: scalar supervised loss.
        weighted_unsup_loss: scalar ``w * L_unsup`` (the weight already applied).
        params: the trained parameters (``requires_grad``).
        retain_graph: keep the graph for a later backward.

    Returns:
        The share as a float (see :func:`share_ratio` for the degenerate cases).
    """
    params = [p for p in params if p.requires_grad]
    g_sup = _grads(sup_loss, params, retain_graph=True)
    g_unsup = _grads(weighted_unsup_loss, params, retain_graph=retain_graph)
    return share_ratio(global_norm(g_unsup), global_norm(g_sup))


def _grads(loss: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool) -> list[torch.Tensor | None]:
    if not loss.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True))


@float32_region
def difference_norm(total: Sequence[torch.Tensor | None], part: Sequence[torch.Tensor | None],
                    part_scale: float = 1.0) -> torch.Tensor:
    """``‖total − part / part_scale‖₂`` over matching lists of gradients (``None`` = zeros).

    With ``total`` the gradient of ``L_sup + w L_unsup`` and ``part`` that of ``L_sup`` (one backward pass less than
    :func:`gradient_share`), this is the norm of the unsupervised term's gradient. ``part_scale`` divides ``part``
    first (a gradient taken of a loss scaled by AMP's GradScaler, compared with unscaled ``total``).
    """
    if len(total) != len(part):
        raise ValueError(f"difference_norm needs matching gradient lists, got {len(total)} and {len(part)}.")
    squares = []
    for t, p in zip(total, part):
        if t is None and p is None:
            continue
        t = torch.zeros_like(p, dtype=torch.float32) if t is None else t.detach().float()
        d = t if p is None else t - p.detach().float() / part_scale
        squares.append(d.pow(2).sum())
    if not squares:
        return torch.zeros(())
    return torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()

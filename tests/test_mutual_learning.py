import math

import pytest
import torch

from nnunet_mmssl.losses import (
    ContrastiveMutualLearningLoss,
    contrastive_mutual_learning_loss,
    cross_modal_consistency_loss,
)


@pytest.mark.parametrize("spatial", [(1, 1), (1, 1, 1)])
def test_hand_computed_value(spatial):
    # one voxel, two classes: logits (0, 0) -> p = (0.5, 0.5); logits (log 3, 0) -> p = (0.75, 0.25)
    a = torch.zeros(1, 2, *spatial)
    b = torch.zeros(1, 2, *spatial)
    b[0, 0] = math.log(3.0)
    # each term: mean over the two class entries of 0.25^2 = 0.0625; the two terms are summed
    assert contrastive_mutual_learning_loss(a, b).item() == pytest.approx(0.125)
    assert contrastive_mutual_learning_loss(a, a).item() == 0.0
    assert ContrastiveMutualLearningLoss()(a, b).item() == pytest.approx(0.125)


def test_sigmoid_for_regions_and_dtype():
    a = torch.zeros(1, 1, 1, 1, dtype=torch.float16)
    b = torch.full((1, 1, 1, 1), math.log(3.0), dtype=torch.float16)  # sigmoid -> 0.75
    loss = contrastive_mutual_learning_loss(a, b, use_sigmoid=True)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(0.125, abs=1e-4)
    assert ContrastiveMutualLearningLoss(use_sigmoid=True)(a, b).item() == pytest.approx(0.125, abs=1e-4)


@pytest.mark.parametrize("spatial", [(4, 4), (2, 4, 4)])
def test_gradient_reaches_both_heads_once(spatial):
    a = torch.randn(2, 3, *spatial, requires_grad=True)
    b = torch.randn(2, 3, *spatial, requires_grad=True)
    contrastive_mutual_learning_loss(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    # each head is pulled by exactly one term: the gradient equals that of one undetached MSE
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    cross_modal_consistency_loss(a2, b2).backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_pseudo_labels_carry_no_gradient():
    # b's only path into the term ||p_a - sg(p_b)||^2 is through the stop-gradient: with a frozen, b's gradient must
    # come from the second term alone, ||p_b - sg(p_a)||^2 = mean((p_b - p_a)^2), not twice that.
    a = torch.randn(1, 3, 4, 4)
    b = torch.randn(1, 3, 4, 4, requires_grad=True)
    (grad_b,) = torch.autograd.grad(contrastive_mutual_learning_loss(a, b), b)
    b_ref = b.detach().clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(torch.mean((torch.softmax(b_ref, 1) - torch.softmax(a, 1)) ** 2), b_ref)
    torch.testing.assert_close(grad_b, grad_ref)
    # term 1 alone = the loss minus term 2 (a is frozen, so term 2 is an ordinary MSE in b): no gradient reaches b
    b_leaf = torch.randn(1, 3, 4, 4, requires_grad=True)
    term2 = torch.mean((torch.softmax(b_leaf, 1) - torch.softmax(a, 1)) ** 2)
    (grad_term1,) = torch.autograd.grad(contrastive_mutual_learning_loss(a, b_leaf) - term2, b_leaf)
    torch.testing.assert_close(grad_term1, torch.zeros_like(grad_term1))


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"\(1, 2, 4, 4\) and \(1, 3, 4, 4\)"):
        contrastive_mutual_learning_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))

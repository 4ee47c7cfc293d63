import math

import pytest
import torch

from nnunet_mmssl.losses import CrossModalConsistencyLoss, cross_modal_consistency_loss, pairwise_consistency_loss
from nnunet_mmssl.semisup import cosine_rampdown, linear_rampup, sigmoid_rampup


@pytest.mark.parametrize("spatial", [(1, 1), (1, 1, 1)])
def test_consistency_hand_computed(spatial):
    # one pixel, two classes: logits (0, 0) -> p = (0.5, 0.5); logits (log 3, 0) -> p = (0.75, 0.25)
    a = torch.zeros(1, 2, *spatial)
    b = torch.zeros(1, 2, *spatial)
    b[0, 0] = math.log(3.0)
    # mean over the two class entries of (0.25)^2
    assert cross_modal_consistency_loss(a, b).item() == pytest.approx(0.0625)
    assert cross_modal_consistency_loss(a, a).item() == 0.0


def test_consistency_sigmoid_for_regions():
    a = torch.zeros(1, 1, 1, 1)
    b = torch.full((1, 1, 1, 1), math.log(3.0))  # sigmoid -> 0.75
    assert cross_modal_consistency_loss(a, b, use_sigmoid=True).item() == pytest.approx(0.0625)


def test_consistency_gradient_flows_into_both_heads():
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, requires_grad=True)
    cross_modal_consistency_loss(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_consistency_gradient_stops_at_detached_side_and_at_other_params():
    """Our code decides where gradient goes: Mean Teacher's consistency detaches the teacher side itself (the test
    passes live tensors), MemCif's cross-modal consistency sends gradient to both heads, symmetrically."""
    from nnunet_mmssl.trainers.mean_teacher import mean_teacher_consistency

    torch.manual_seed(0)
    x = torch.randn(2, 1, 4, 4)
    student, teacher = torch.nn.Conv2d(1, 3, 1), torch.nn.Conv2d(1, 3, 1)
    student_logits, teacher_logits = student(x), teacher(x)
    student_logits.retain_grad()
    teacher_logits.retain_grad()
    loss = mean_teacher_consistency(student_logits, teacher_logits)
    loss.backward()
    assert teacher_logits.grad is None and teacher.weight.grad is None and teacher.bias.grad is None
    assert student.weight.grad.abs().sum() > 0
    # value and student gradient of mean((softmax(s) - softmax(t))^2) with t a constant (README, Mean Teacher row)
    target = torch.softmax(teacher(x), dim=1).detach()
    probe = student(x).detach().requires_grad_()
    expected = torch.mean((torch.softmax(probe, dim=1) - target) ** 2)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(student_logits.grad, probe.grad)

    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, requires_grad=True)
    cross_modal_consistency_loss(a, b).backward()
    a_swapped, b_swapped = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    cross_modal_consistency_loss(b_swapped, a_swapped).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    torch.testing.assert_close(a.grad, a_swapped.grad)  # each head gets the same pull whichever side it is on
    torch.testing.assert_close(b.grad, b_swapped.grad)


def test_pairwise_mean_and_module():
    logits = [torch.randn(1, 2, 3, 3) for _ in range(3)]
    expected = sum(cross_modal_consistency_loss(logits[i], logits[j]) for i, j in [(0, 1), (0, 2), (1, 2)]) / 3
    torch.testing.assert_close(pairwise_consistency_loss(logits), expected)
    torch.testing.assert_close(CrossModalConsistencyLoss()(logits[:2]), cross_modal_consistency_loss(*logits[:2]))
    with pytest.raises(ValueError, match="at least two heads"):
        pairwise_consistency_loss(logits[:1])
    with pytest.raises(ValueError, match="equal shapes"):
        cross_modal_consistency_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(10, 10) == 1.0
    assert sigmoid_rampup(50, 10) == 1.0
    assert sigmoid_rampup(-3, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(7, 0) == 1.0
    with pytest.raises(ValueError):
        sigmoid_rampup(1, -1)


def test_linear_and_cosine():
    assert linear_rampup(2, 8) == 0.25 and linear_rampup(9, 8) == 1.0 and linear_rampup(3, 0) == 1.0
    assert cosine_rampdown(0, 10) == 1.0
    assert cosine_rampdown(5, 10) == pytest.approx(0.5)
    assert cosine_rampdown(10, 10) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        cosine_rampdown(1, 0)

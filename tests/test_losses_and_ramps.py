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
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, requires_grad=True)
    unrelated = torch.randn(3, requires_grad=True)
    loss = cross_modal_consistency_loss(a, b.detach()) + 0 * unrelated.detach().sum()
    loss.backward()
    assert a.grad.abs().sum() > 0
    assert b.grad is None and unrelated.grad is None


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

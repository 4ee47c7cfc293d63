"""Hand-computed values for the arithmetic that mutation testing (``benchmarks/mutation/mutate.py``) showed untested.

Each test closes a surviving mutant of the "before" run (named in the comment); settings are asymmetric so that a
swapped argument, a moved threshold or a changed constant gives another number.
"""

import math

import pytest
import torch

from nnunet_mmssl.losses.consistency import cross_modal_consistency_loss, probabilities
from nnunet_mmssl.losses.prototypes import MPCLLoss, mpcl_loss, prototype_contrast_loss, sinkhorn_knopp
from nnunet_mmssl.losses.smml import class_entropy_weights, class_prototypes
from nnunet_mmssl.losses.targets import class_map_from_target, regions_to_classes


# -------------------------------------------------------------------------------------------- losses/consistency.py
def test_probabilities_default_to_a_softmax_over_classes():
    # survivor: use_sigmoid=False -> True as the default of probabilities()
    logits = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)
    assert probabilities(logits).flatten().tolist() == pytest.approx([0.75, 0.25])
    assert probabilities(logits, use_sigmoid=True).flatten().tolist() == pytest.approx([0.75, 0.5])


def test_printed_reduction_takes_one_reference_voxel_and_refuses_zero():
    # survivors: reference_voxels <= 0 -> < 0 (zero accepted, the loss silently 0) and -> <= 1 (one refused)
    a, b = torch.zeros(2, 2, 3, 3), torch.zeros(2, 2, 3, 3)
    b[:, 0] = math.log(3.0)  # p = (0.75, 0.25) against (0.5, 0.5): sum over classes of the squares = 0.125
    assert cross_modal_consistency_loss(a, b, reduction="printed", reference_voxels=1).item() == pytest.approx(0.125)
    with pytest.raises(ValueError, match="reference_voxels must be > 0, got 0"):
        cross_modal_consistency_loss(a, b, reduction="printed", reference_voxels=0)


# ------------------------------------------------------------------------------------------------ losses/targets.py
def test_labels_become_classes_without_a_mask():
    target = torch.tensor([[[[0.0, 1.0, 2.0], [3.0, 1.0, 0.0]]]])  # (B=1, 1, 2, 3), float as nnU-Net loads it
    classes, valid = class_map_from_target(target, has_regions=False, ignore_label=None)
    assert valid is None and classes.dtype == torch.long
    assert classes.tolist() == [[[0, 1, 2], [3, 1, 0]]]


def test_the_ignore_label_becomes_background_and_leaves_the_mask():
    target = torch.tensor([[[[0.0, 3.0, 2.0], [3.0, 1.0, 0.0]]]])
    classes, valid = class_map_from_target(target, has_regions=False, ignore_label=3)
    assert classes.tolist() == [[[0, 0, 2], [0, 1, 0]]]
    assert valid.tolist() == [[[True, False, True], [False, True, True]]]


def _regions() -> torch.Tensor:
    """(B=2, R=2, 2, 2): region 1 top row, region 2 right column, soft values around the 0.5 threshold."""
    first = torch.tensor([[[0.9, 0.6], [0.4, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])  # (R, 2, 2), sample 0
    second = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.45], [0.55, 0.0]]])  # sample 1
    return torch.stack([first, second])


def test_regions_become_the_index_of_the_last_region_containing_the_voxel():
    # sample 0: (0,0) region 1 only -> 1; (0,1) 0.6 in region 1 -> 1; (1,0) 0.4 is not > 0.5 -> 0; (1,1) region 2 -> 2
    # sample 1: (0,0) region 1 -> 1; (0,1) 0.45 not in region 2 -> 1; (1,0) 0.55 in region 2 -> 2; (1,1) none -> 0
    classes, valid = class_map_from_target(_regions(), has_regions=True, ignore_label=None)
    assert valid is None
    assert classes.tolist() == [[[1, 1], [0, 2]], [[1, 1], [2, 0]]]
    overlap = torch.ones(1, 3, 1, 1, 1, dtype=torch.bool)  # 3D, a voxel in all three regions: the last one wins
    assert regions_to_classes(overlap).tolist() == [[[[3]]]]
    assert regions_to_classes(torch.zeros(1, 3, 1, 1, 1, dtype=torch.bool)).tolist() == [[[[0]]]]


def test_with_an_ignore_label_the_last_region_channel_is_the_ignore_mask():
    mask = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])[:, None]  # (B, 1, 2, 2), 1 = ignored
    classes, valid = class_map_from_target(torch.cat([_regions(), mask], 1), has_regions=True, ignore_label=7)
    assert classes.tolist() == [[[1, 1], [0, 2]], [[1, 1], [2, 0]]]  # the mask channel is not a region
    assert valid.tolist() == [[[True, False], [True, True]], [[False, True], [True, True]]]


# --------------------------------------------------------------------------------------------------- losses/smml.py
def test_a_class_with_one_voxel_has_that_voxels_features_as_prototype():
    # survivor: counts.clamp_min(1) -> clamp_min(2) (a one-voxel class halved)
    features = torch.tensor([[[1.0, 3.0, 5.0], [2.0, 4.0, -6.0]]])  # (B=1, D=2, 3 voxels)
    prototypes, present = class_prototypes(features, torch.tensor([[0, 0, 1]]), 3)
    assert prototypes[0].tolist() == [[2.0, 3.0], [5.0, -6.0], [0.0, 0.0]]
    assert present.tolist() == [[True, True, False]]


def test_prototypes_of_3d_features_at_a_lower_resolution_use_nearest_classes():
    classes = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    classes[0, 0, 0, 0] = 1  # nearest neighbour to a 2 x 2 x 2 grid keeps voxels (0 or 2, 0 or 2, 0 or 2)
    classes[0, 1, 1, 1] = 1  # dropped by the resize
    features = torch.arange(16.0).view(1, 2, 2, 2, 2)
    prototypes, present = class_prototypes(features, classes, 2)
    assert prototypes[0, 1].tolist() == [0.0, 8.0]  # the voxel (0, 0, 0) of both feature channels
    assert prototypes[0, 0].tolist() == pytest.approx([4.0, 12.0])  # mean of the other seven: (28 / 7, 84 / 7)
    assert present.tolist() == [[True, True]]


def test_entropy_weights_of_3d_outputs_are_one_number_per_class():
    # survivor: flatten(2) -> flatten(-2) (the same in 2D; in 3D a weight per slice instead of per class)
    logits = torch.zeros(2, 2, 2, 3, 2)
    logits[:, 0, 0] = math.log(3.0)  # first slice: p = (0.75, 0.25); second slice uniform
    weights = class_entropy_weights(logits, logits)
    h = 0.5 * math.log(2)  # -0.5 ln 0.5
    expected = [(-0.75 * math.log(0.75) + h) / 2, (-0.25 * math.log(0.25) + h) / 2]
    assert weights.shape == (2, 2)
    assert weights[0].tolist() == pytest.approx(expected) and weights[1].tolist() == pytest.approx(expected)


# --------------------------------------------------------------------------------------------- losses/prototypes.py
@pytest.mark.parametrize("masked", [False, True])
def test_sinkhorn_divides_the_scores_by_epsilon(masked):
    # survivor: (q - q.max()) / epsilon -> * epsilon (the existing hand computation uses epsilon = 1)
    # epsilon 0.5, scores = ln [[2, 1], [1, 1]]: exp((scores - ln 2) / 0.5) = [[1, 1/4], [1/4, 1/4]]
    # rows to 1/2: [[2/5, 1/10], [1/4, 1/4]]; columns to 1/2 and times N = 2: [[8/13, 2/7], [5/13, 5/7]]
    scores = torch.log(torch.tensor([[2.0, 1.0], [1.0, 1.0]]))
    mask = torch.ones(2, dtype=torch.bool) if masked else None
    q = sinkhorn_knopp(scores, epsilon=0.5, iterations=1, mask=mask)
    torch.testing.assert_close(q, torch.tensor([[8 / 13, 2 / 7], [5 / 13, 5 / 7]]))


@pytest.mark.parametrize("channel_axis", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_labels_and_valid_mask_may_carry_nnunets_channel_axis(channel_axis, transpose):
    # survivors: labels.shape[1] == 1 -> != 1, valid.shape[1] == 1 -> shape[0] / shape[2] / == 2, `and` -> `or`.
    # B = 2 and spatial (2, 1) or (1, 2): with the channel axis, shape[1] = 1 differs from shape[0] and shape[2];
    # without it, shape[1] is a spatial size (1 when transposed), so only ndim tells the two forms apart.
    # two voxels, tau = 0.1: logits (1, -1) with class 0 -> ln(1 + e^-2); (2, 5) with class 1 -> ln(1 + e^-3)
    similarity = torch.tensor([[[[0.1], [0.2]], [[-0.1], [0.5]]]]).expand(2, -1, -1, -1)  # (B=2, C=2, 2, 1)
    labels, valid = torch.tensor([[[0], [1]]] * 2), torch.tensor([[[True], [False]]] * 2)  # (B, 2, 1)
    if transpose:
        similarity, labels, valid = similarity.transpose(-1, -2), labels.transpose(-1, -2), valid.transpose(-1, -2)
    if channel_axis:
        labels, valid = labels[:, None], valid[:, None]  # (B, 1, *S), as nnU-Net's targets
    both = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-3))) / 2
    assert prototype_contrast_loss(similarity, labels).item() == pytest.approx(both, abs=1e-6)
    first_only = math.log1p(math.exp(-2))
    assert prototype_contrast_loss(similarity, labels, valid).item() == pytest.approx(first_only, abs=1e-6)


def test_mpcl_default_temperature_is_the_papers_0_1():
    # survivor: MPCLLoss(temperature=0.1 -> 1.1) as the default
    # one voxel (0.6, 0.8) of class 1, prototypes e1 and e2: similarities (0.6, 0.8) / 0.1 -> ln(1 + e^-2)
    embeddings = torch.tensor([0.6, 0.8]).view(1, 2, 1, 1)
    prototypes = torch.eye(2).view(1, 2, 2)  # (K=1, C=2, D=2)
    labels = torch.ones(1, 1, 1, dtype=torch.long)
    expected = math.log1p(math.exp(-2))
    loss, _ = MPCLLoss(terms=("pc",))(embeddings, labels, prototypes, 0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert mpcl_loss(embeddings, labels, prototypes, 0, terms=("pc",))[0].item() == pytest.approx(expected, abs=1e-6)

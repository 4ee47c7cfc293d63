"""SMML's results guarded against silent changes (issue #24): the paper's masks, eq. 10's priors of the kept
modalities only, FRC once in the objective, the refinement KL's direction, region-mode (sigmoid) terms by hand,
the single-branch baseline's masking and the SRNs' gradient clipping.

Most tests drive :meth:`SMMLTrainer.compute_losses` on a trainer shell whose branches return fixed logits and
features (no nnU-Net set-up); three use real trainers on the fixture plans.
"""

import math
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nnunet_mmssl.trainers.smml import SMMLRefiners, SMMLTrainer, SMMLTrainer_single, branch_masks

TAU = 6.0


def _stub(regions: bool = False, **attributes) -> SMMLTrainer:
    """An SMMLTrainer shell: no task loss (only the terms under test), no priors, two modalities."""
    trainer = object.__new__(SMMLTrainer)
    trainer.label_manager = SimpleNamespace(has_regions=regions, ignore_label=None)
    trainer.num_input_channels = 2
    trainer.priors_enabled = False
    trainer.device = torch.device("cpu")
    trainer.loss = lambda output, target: torch.zeros(())
    trainer.refiners = trainer.refiners_ddp = None
    trainer.use_pbc = trainer.use_frc = trainer.use_srn = False
    for key, value in attributes.items():
        setattr(trainer, key, value)
    return trainer


def _fixed_branches(trainer, logits1, logits2, feat1=None, feat2=None):
    feat1 = torch.zeros(1, 2, *logits1.shape[2:]) if feat1 is None else feat1
    feat2 = torch.zeros(1, 2, *logits1.shape[2:]) if feat2 is None else feat2
    trainer._branch_outputs = lambda data, masks=None: ([logits1], [logits2], feat1, feat2)


class _FixedRefiner(nn.Module):
    """Returns fixed refined logits and records its input."""

    def __init__(self, refined: torch.Tensor):
        super().__init__()
        self.refined = refined
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach())
        return self.refined


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bernoulli_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


# ---------------------------------------------------------------- masks (defect 3)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_masks_mask_one_or_more_and_keep_one_uniformly(k):
    generator = torch.Generator().manual_seed(0)
    n = 20000
    masks = branch_masks(n, k, generator=generator)
    assert masks.shape == (2, n, k)
    kept = masks.sum(-1)
    assert bool((kept >= 1).all()) and bool((kept <= k - 1).all())  # never empty, never the full set
    assert bool((masks[0] != masks[1]).any(-1).all())  # two different masks per sample
    codes = (masks.long() << torch.arange(k)).sum(-1)  # subset code per branch and sample
    subsets = 2 ** k - 2
    for branch in codes:
        frequencies = torch.bincount(branch, minlength=2 ** k).float() / n
        assert frequencies[0] == 0 and frequencies[-1] == 0
        assert torch.allclose(frequencies[1:-1], torch.full((subsets,), 1 / subsets), atol=0.02)
    if k == 2:  # one modality each, the two branches complementary
        assert bool((masks[0] == ~masks[1]).all())


def test_full_set_is_an_option_and_the_trainer_default_follows_the_paper():
    generator = torch.Generator().manual_seed(0)
    masks = branch_masks(20000, 2, full_set=True, generator=generator)
    full = masks.all(-1).float().mean(-1)
    assert torch.allclose(full, torch.full((2,), 1 / 3), atol=0.02)  # uniform over the 3 non-empty subsets
    assert bool(masks.any(-1).all())
    assert SMMLTrainer.mask_full_set is False
    trainer = _stub()
    trainer.dual_branch = True
    torch.manual_seed(0)
    drawn = trainer.training_masks(torch.zeros(5000, 3, 1, 1))
    assert not bool(drawn.all(-1).any()) and bool(drawn.any(-1).all())
    trainer.mask_full_set = True
    torch.manual_seed(0)
    assert bool(trainer.training_masks(torch.zeros(5000, 3, 1, 1)).all(-1).any())


# ---------------------------------------------------------------- FRC once (defect 2)
def test_frc_enters_the_objective_once_with_its_hand_computed_gradient():
    labels = torch.tensor([[[[0, 0, 1, 1]]]]).float()  # (B, 1, 1, 4): class 0 at v0, v1; class 1 at v2, v3
    logits = torch.tensor([[[[2.0, 1.0, -1.0, -3.0]], [[-1.0, 0.0, 1.0, 2.0]]]])
    feat1 = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 1.0]]]], requires_grad=True)
    feat2 = torch.tensor([[[[1.0, 1.0, 1.0, 1.0]], [[0.0, 0.0, 0.5, 0.5]]]], requires_grad=True)
    trainer = _stub(use_frc=True, dual_branch=True)
    _fixed_branches(trainer, logits.clone(), logits.clone(), feat1, feat2)
    loss, _ = trainer.compute_losses(torch.zeros(1, 2, 1, 4), [labels], None)

    # by hand: prototypes (1,0), (0,1) in branch 1 (cos 0) and (1,0), (1,0.5) in branch 2 (cos^2 0.8); each class row
    # D = 0.8; W = the mean over voxels of -p log p of the class (both branches alike)
    p = torch.softmax(logits, 1)[0, :, 0]  # (C, voxels)
    weights = (-(p * p.log())).mean(-1)
    assert loss.item() == pytest.approx(0.8 * float(weights.sum()), rel=1e-5)

    # gradient: the same relation loss written out once
    f1, f2 = feat1.detach().clone().requires_grad_(), feat2.detach().clone().requires_grad_()

    def relation(f):
        protos = torch.stack([f[0, :, 0, :2].mean(-1), f[0, :, 0, 2:].mean(-1)])  # (C, D)
        v = protos / protos.norm(dim=1, keepdim=True)
        return v @ v.T

    ((relation(f1) - relation(f2)) ** 2).sum(1).mul(weights).sum().backward()
    loss.backward()
    torch.testing.assert_close(feat1.grad, f1.grad)
    torch.testing.assert_close(feat2.grad, f2.grad)
    assert feat2.grad.abs().sum() > 0


# ---------------------------------------------------------------- refinement KL direction, SRN input (softmax)
def test_refinement_kl_is_initial_to_refined_by_hand_and_srn_reads_softmax():
    initial = torch.tensor([math.log(0.9), math.log(0.1)]).view(1, 2, 1, 1)
    refined = torch.zeros(1, 2, 1, 1)  # p = (0.5, 0.5)
    trainer = _stub(use_srn=True, dual_branch=True)
    trainer.refiners = SMMLRefiners([_FixedRefiner(refined), _FixedRefiner(refined)])
    _fixed_branches(trainer, initial.clone(), initial.clone())
    loss, _ = trainer.compute_losses(torch.zeros(1, 2, 1, 1), [torch.zeros(1, 1, 1, 1)], None)
    forward = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(initial || refined) = 0.3681
    reverse = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(refined || initial) = 0.5108
    assert abs(forward - reverse) > 0.1
    assert loss.item() == pytest.approx(2 * forward, rel=1e-5)  # one KL per branch
    for refiner in trainer.refiners:
        torch.testing.assert_close(refiner.inputs[0].flatten(), torch.tensor([0.9, 0.1]))


# ---------------------------------------------------------------- region mode (sigmoid) by hand
def test_region_mode_srn_input_and_refinement_kl_are_sigmoid_by_hand():
    initial = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)  # two regions, one voxel
    refined = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    trainer = _stub(regions=True, use_srn=True, dual_branch=True)
    trainer.refiners = SMMLRefiners([_FixedRefiner(refined), _FixedRefiner(refined)])
    _fixed_branches(trainer, initial.clone(), initial.clone())
    regions = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    loss, _ = trainer.compute_losses(torch.zeros(1, 2, 1, 1), [regions], None)
    expected = sum(_bernoulli_kl(_sigmoid(a), _sigmoid(b)) for a, b in ((2.0, 0.5), (-1.0, 0.5)))
    assert loss.item() == pytest.approx(2 * expected, rel=1e-5)
    for refiner in trainer.refiners:  # per-region probabilities (0.881, 0.269), not a softmax (0.953, 0.047)
        torch.testing.assert_close(refiner.inputs[0].flatten(), torch.tensor([_sigmoid(2.0), _sigmoid(-1.0)]))


def test_region_mode_pbc_by_hand():
    # two regions, two voxels: at v0 branch 1 is right and branch 2 wrong, at v1 the other way round
    logits1 = torch.tensor([[[[3.0, -2.0]], [[-2.0, 1.5]]]], requires_grad=True)
    logits2 = torch.tensor([[[[-1.0, 2.5]], [[0.5, -3.0]]]], requires_grad=True)
    regions = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])  # (B, R, 1, 2)
    trainer = _stub(regions=True, use_pbc=True, dual_branch=True, pbc_temperature=TAU)
    _fixed_branches(trainer, logits1, logits2)
    loss, _ = trainer.compute_losses(torch.zeros(1, 2, 1, 2), [regions], None)

    def bce(logit, y):
        p = _sigmoid(logit)
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    l1, l2, y = logits1.detach()[0, :, 0], logits2.detach()[0, :, 0], regions[0, :, 0]
    expected = 0.0
    for v in range(2):
        q1 = sum(bce(float(l1[r, v]), float(y[r, v])) for r in range(2))
        q2 = sum(bce(float(l2[r, v]), float(y[r, v])) for r in range(2))
        teacher, student = (l2, l1) if q1 > q2 else (l1, l2)
        assert (q1 > q2) == (v == 1)  # one voxel in each direction: each direction's mean is that voxel
        expected += sum(_bernoulli_kl(_sigmoid(float(teacher[r, v]) / TAU), _sigmoid(float(student[r, v]) / TAU))
                        for r in range(2))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.all(logits1.grad[0, :, 0, 0] == 0) and torch.all(logits2.grad[0, :, 0, 1] == 0)


# ---------------------------------------------------------------- real trainers on the fixture plans
@pytest.fixture()
def harness():
    import trainer_harness

    root = tempfile.mkdtemp(prefix="smml-guards-")
    trainer_harness.set_folders(root)
    return trainer_harness, root


def test_srn_reads_only_the_priors_of_the_modalities_its_branch_kept(harness):
    from plans_fixtures import PLANS

    from nnunet_mmssl.dataloading.priors import priors_data_identifier

    h, root = harness
    identifier = priors_data_identifier(PLANS["configurations"]["2d"]["data_identifier"])
    os.makedirs(os.path.join(root, "preprocessed", PLANS["dataset_name"], identifier))
    trainer = h.make_trainer(SMMLTrainer, seed=0)
    assert trainer.priors_enabled
    k, heads = trainer.num_input_channels, trainer.label_manager.num_segmentation_heads
    # sample 0: branch 1 keeps modality 0, branch 2 modality 1; sample 1 the other way round
    masks = torch.tensor([[[True, False], [False, True]], [[False, True], [True, False]]])
    drawn = []
    trainer.training_masks = lambda data: drawn.append(1) or masks
    seen = [[], []]
    for branch, refiner in enumerate(trainer.refiners):
        refiner.register_forward_pre_hook(lambda m, args, b=branch: seen[b].append(args[0].detach().clone()))
    (labelled, unlabelled), = h.batches(trainer, seed=0, count=1)
    assert labelled["data"].shape[0] == 2
    priors = torch.empty_like(labelled["data"])
    for s in range(2):
        for m in range(k):
            priors[s, m] = 0.1 * (m + 1) + 0.5 * s  # distinguishable per sample and modality
    labelled = {**labelled, "data": torch.cat([labelled["data"], priors], 1)}
    h.run_steps(trainer, [(labelled, unlabelled)], seed=0)
    assert drawn == [1]
    for branch in range(2):
        srn_input = seen[branch][0]
        assert srn_input.shape[1] == heads + k
        for s in range(2):
            for m in range(k):
                expected = priors[s, m] if masks[branch, s, m] else torch.zeros_like(priors[s, m])
                torch.testing.assert_close(srn_input[s, heads + m], expected)


def test_single_branch_baseline_is_trained_on_masked_inputs(harness):
    h, _ = harness
    trainer = h.make_trainer(SMMLTrainer_single, seed=0)
    net = trainer.network_module
    calls = []
    net.register_forward_hook(lambda m, args, kwargs, out: calls.append((args[0], kwargs.get("masks"), out)),
                              with_kwargs=True)
    (labelled, _), = h.batches(trainer, seed=0, count=1)
    torch.manual_seed(3)
    with torch.no_grad():
        trainer.compute_losses(labelled["data"], labelled["target"], None)
    (x, masks, out), = calls
    assert masks is not None
    kept = masks[0].sum(-1)
    assert bool((kept >= 1).all()) and bool((kept < x.shape[1]).all())  # every sample masks one or more
    # applied: what the masked channels hold does not change the branch's prediction
    noise = torch.randn_like(x) * 10
    perturbed = torch.where(masks[0].view(*masks[0].shape, 1, 1), x, noise)
    assert not torch.equal(perturbed, x)
    with torch.no_grad():
        again, _ = net.branches[0](perturbed, masks[0])
    torch.testing.assert_close(again[0], out[0][0])


def test_srn_gradients_are_clipped_like_the_network(harness):
    h, _ = harness
    trainer = h.make_trainer(SMMLTrainer, seed=0)
    original = trainer.compute_losses
    trainer.compute_losses = lambda *args: tuple(1e6 * value for value in original(*args))  # huge gradients
    h.run_steps(trainer, h.batches(trainer, seed=0, count=1), seed=0)

    def norm(parameters):
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])))

    assert norm(trainer.refiners.parameters()) == pytest.approx(12.0, rel=1e-3)
    assert norm(trainer.network.parameters()) == pytest.approx(12.0, rel=1e-3)

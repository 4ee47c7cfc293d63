"""SMML (issue #12): masks, network, PBC / FRC / refinement losses, trainer steps on the fixture plans."""

import itertools
import math
import sys
import tempfile

import pytest
import torch
from torch import nn

from nnunet_mmssl.architectures.smml import SMMLNet, random_modality_masks, scaled_widths
from nnunet_mmssl.losses.smml import (
    class_entropy_weights,
    class_prototypes,
    distribution_kl,
    frc_loss,
    pbc_loss,
    pixel_cross_entropy,
    refinement_kl,
)


def _net(dim: int = 2, k: int = 4, classes: int = 3, deep_supervision: bool = True, **kwargs) -> SMMLNet:
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
    return SMMLNet(k, classes, 3, [8, 16, 32], conv, 3, [1, 2, 2], 1, 1, True, norm, {"eps": 1e-5, "affine": True},
                   None, None, nn.LeakyReLU, {"inplace": True}, deep_supervision, **kwargs)


# ---------------------------------------------------------------- masks
def test_masks_reach_every_subset_never_empty_and_differ_between_branches():
    generator = torch.Generator().manual_seed(0)
    masks = random_modality_masks(4000, 4, generator=generator)
    assert masks.shape == (2, 4000, 4) and masks.dtype == torch.bool
    assert bool(masks.any(-1).all())  # at least one modality kept
    assert bool((masks[0] != masks[1]).any(-1).all())  # two different masks per sample
    for branch in masks:
        seen = {tuple(m.tolist()) for m in branch}
        assert len(seen) == 2 ** 4 - 1  # every non-empty subset reachable
    with pytest.raises(ValueError, match="at least 2"):
        random_modality_masks(2, 1)


def test_encoder_widths_make_k_encoders_cost_about_one():
    widths = scaled_widths([32, 64, 128, 256, 320], 1 / math.sqrt(4))
    assert widths == [16, 32, 64, 128, 160]
    net = _net(k=4)
    assert net.encoder_width == pytest.approx(0.5)
    assert net.branches[0].encoder_widths == [4, 8, 16]


@pytest.mark.parametrize("dim", [2, 3])
def test_forward_shapes_and_mean_of_branches(dim):
    torch.manual_seed(0)
    net = _net(dim)
    x = torch.randn(2, 4, *([16] * dim))
    out = net(x)
    assert [tuple(o.shape) for o in out] == [(2, 3, *([16 // s] * dim)) for s in (1, 2)]  # 3 stages: 2 decoder outputs
    net.return_branches = True
    out1, out2, feat1, feat2 = net(x)
    assert torch.allclose(out[0], (out1[0] + out2[0]) / 2)
    assert feat1.shape == (2, 16, *([8] * dim))  # fusion stage 1: the plans' width, half resolution


def test_masked_modality_gets_no_gradient_and_does_not_change_the_output():
    torch.manual_seed(0)
    net = _net(deep_supervision=False)
    net.return_branches = True
    x = torch.randn(2, 4, 16, 16)
    masks = torch.ones(2, 2, 4, dtype=torch.bool)
    masks[:, :, 2] = False  # modality 2 masked in both branches, all samples
    out1, out2, _, _ = net(x, masks=masks)
    (out1.sum() + out2.sum()).backward()
    for branch in net.branches:
        assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in branch.encoders[2].parameters())
        assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in branch.encoders[0].parameters())
    with torch.no_grad():  # the masked channel's values do not matter
        y = x.clone()
        y[:, 2] = torch.randn(2, 16, 16) * 100
        assert torch.allclose(net(x, masks=masks)[0], net(y, masks=masks)[0])


def test_inference_mask_from_missing_modalities():
    torch.manual_seed(0)
    net = _net(deep_supervision=False).eval()
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        full = net(x)
        net.set_missing_modalities([1, 3])
        part = net(x)
        masks = torch.tensor([True, False, True, False]).view(1, 1, 4).expand(2, 1, 4)
        assert torch.allclose(part, net(x, masks=masks))
        assert not torch.allclose(full, part)
    with pytest.raises(ValueError, match="At least one"):
        net.set_missing_modalities([0, 1, 2, 3])
    with pytest.raises(ValueError, match="out of range"):
        net.set_missing_modalities([4])


# ---------------------------------------------------------------- PBC
def test_pbc_direction_mask_and_kl_with_temperature_by_hand():
    # 2 classes, 2 voxels: voxel 0 label 0, voxel 1 label 1
    l1 = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]]).permute(1, 0, 2)  # (B=1, C=2, S=2)
    l2 = torch.tensor([[[0.0, 0.0]], [[0.0, 3.0]]]).permute(1, 0, 2)
    target = torch.tensor([[0, 1]])
    q1, q2 = pixel_cross_entropy(l1, target), pixel_cross_entropy(l2, target)
    # voxel 0: branch 1 more reliable (q1 < q2) -> branch 2 learns; voxel 1: branch 2 more reliable -> branch 1 learns
    assert bool(q1[0, 0] < q2[0, 0]) and bool(q1[0, 1] > q2[0, 1])
    tau = 6.0

    def kl(t, s):  # KL(softmax(t/tau) || softmax(s/tau)) of one voxel, by hand
        pt = torch.softmax(torch.tensor(t) / tau, 0)
        ps = torch.softmax(torch.tensor(s) / tau, 0)
        return float((pt * (pt.log() - ps.log())).sum())

    a = l1.clone().requires_grad_(True)
    b = l2.clone().requires_grad_(True)
    loss1, loss2 = pbc_loss(a, b, target, temperature=tau)
    assert loss1.item() == pytest.approx(kl([0.0, 3.0], [0.0, 0.0]), rel=1e-5)  # voxel 1: branch 2 -> branch 1
    assert loss2.item() == pytest.approx(kl([2.0, 0.0], [0.0, 0.0]), rel=1e-5)  # voxel 0: branch 1 -> branch 2
    (loss1 + loss2).backward()
    # gradient only into the less reliable branch of each voxel
    assert float(a.grad[0, :, 0].abs().sum()) == 0 and float(a.grad[0, :, 1].abs().sum()) > 0
    assert float(b.grad[0, :, 1].abs().sum()) == 0 and float(b.grad[0, :, 0].abs().sum()) > 0


def test_pbc_regions_and_valid_mask():
    torch.manual_seed(0)
    l1, l2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    regions = (torch.rand(2, 3, 4, 4) > 0.5).float()
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    loss1, loss2 = pbc_loss(l1, l2, regions, sigmoid=True, valid=valid)
    assert loss1.item() == 0 and loss2.item() == 0
    loss1, loss2 = pbc_loss(l1, l2, regions, sigmoid=True)
    assert loss1.item() > 0 and loss2.item() > 0
    # Bernoulli KL summed over regions equals the two-class softmax KL of (0, z) per region
    kl = distribution_kl(l1, l2, sigmoid=True)
    two_class = sum(distribution_kl(torch.stack([torch.zeros_like(l1[:, r]), l1[:, r]], 1),
                                    torch.stack([torch.zeros_like(l2[:, r]), l2[:, r]], 1)) for r in range(3))
    assert torch.allclose(kl, two_class, atol=1e-5)


# ---------------------------------------------------------------- FRC
def test_prototypes_and_relation_loss_by_hand():
    # B=1, D=2, 4 voxels; classes 0,0,1,1
    features1 = torch.tensor([[[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]]])
    features2 = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]])
    classes = torch.tensor([[0, 0, 1, 1]])
    protos, present = class_prototypes(features1, classes, 3)
    assert torch.allclose(protos[0, 0], torch.tensor([2.0, 0.0]))
    assert torch.allclose(protos[0, 1], torch.tensor([0.0, 2.0]))
    assert present.tolist() == [[True, True, False]]
    # branch 1: prototypes orthogonal (cos 0); branch 2: (1, 0) and (1, 1)/sqrt2 (cos 1/sqrt2)
    weights = torch.tensor([[0.5, 2.0, 7.0]])  # class 2 absent: its weight must not count
    loss = frc_loss(features1, features2, classes, weights, 3)
    d = (0 - 1 / math.sqrt(2)) ** 2  # each row has one off-diagonal difference; diagonals are 1 - 1 = 0
    assert loss.item() == pytest.approx(0.5 * d + 2.0 * d, rel=1e-5)
    f1 = features1.clone().requires_grad_(True)
    f2 = features2.clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    frc_loss(f1, f2, classes, w, 3).backward()
    assert f1.grad.abs().sum() > 0 and f2.grad.abs().sum() > 0
    assert w.grad is None  # the uncertainty weights are constants


def test_entropy_weights_by_hand():
    logits = torch.zeros(1, 2, 3, 3)  # uniform over 2 classes: -p log p = 0.5 ln 2 for each class everywhere
    weights = class_entropy_weights(logits, logits)
    assert torch.allclose(weights, torch.full((1, 2), 0.5 * math.log(2)))
    confident = torch.tensor([10.0, -10.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3)
    mixed = class_entropy_weights(confident, logits)
    assert float(mixed[0, 0]) == pytest.approx(0.25 * math.log(2), rel=1e-3)
    regions = class_entropy_weights(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), sigmoid=True)
    assert regions.shape == (1, 4) and torch.allclose(regions, torch.full((1, 4), math.log(2)))


def test_refinement_kl_gradient_reaches_both():
    a = torch.randn(1, 3, 4, 4, requires_grad=True)
    b = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = refinement_kl(a, b)
    assert loss.item() > 0 and refinement_kl(a, a).item() == pytest.approx(0, abs=1e-6)
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


# ---------------------------------------------------------------- trainers on the fixture plans
@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import trainer_harness

    trainer_harness.set_folders(tempfile.mkdtemp(prefix="smml-test-"))
    return trainer_harness


@pytest.mark.parametrize("name", ["SMMLTrainer", "SMMLTrainer_single", "SMMLTrainer_singleSRN", "SMMLTrainer_dual",
                                  "SMMLTrainer_dualPBC", "SMMLTrainer_dualFRC", "SMMLTrainer_dualPBCFRC",
                                  "SMMLSSLTrainer", "ModalityDropoutTrainer"])
def test_trainers_take_steps_and_learn(harness, name):
    import nnunet_mmssl.trainers as trainers

    trainer = harness.make_trainer(getattr(trainers, name), seed=0)
    step = harness.batches(trainer, seed=0, count=1)
    # the same batch and the same random masks four times (the RNG reseeded alike): the loss must fall
    outputs = [harness.run_steps(trainer, step, seed=0)[0] for _ in range(4)]
    objectives = [float(o["objective"]) for o in outputs]
    assert all(math.isfinite(v) for v in objectives)
    assert objectives[-1] < objectives[0]
    if name.startswith("SMML"):
        net = trainer.network_module
        assert len(net.branches) == (1 if "single" in name else 2)
        has_srn = name in ("SMMLTrainer", "SMMLTrainer_singleSRN", "SMMLSSLTrainer")
        assert (trainer.refiners is not None) == has_srn
        if has_srn:  # the SRN is trained (its weights moved) but is not part of the predicting network
            assert any(p.grad is not None for p in trainer.refiners.parameters())
            assert not any(k.startswith("refiners") for k in net.state_dict())


def test_smml_srn_state_round_trip(harness):
    from nnunet_mmssl.trainers import SMMLTrainer

    trainer = harness.make_trainer(SMMLTrainer, seed=0)
    harness.run_steps(trainer, harness.batches(trainer, seed=1, count=1), seed=0)
    state = trainer.checkpoint_extra_state()
    other = harness.make_trainer(SMMLTrainer, seed=5)
    other.load_checkpoint_extra_state(state)
    for a, b in zip(trainer.refiners.state_dict().values(), other.refiners.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_every_subset_of_the_fixture_predicts(harness):
    from nnunet_mmssl.trainers import SMMLTrainer

    trainer = harness.make_trainer(SMMLTrainer, seed=0)
    net = trainer.network_module.eval()
    x = torch.randn(1, 2, *trainer.configuration_manager.patch_size)
    outputs = []
    with torch.no_grad():
        for missing in ([], [0], [1]):
            net.set_missing_modalities(missing)
            outputs.append(net(x)[0])
    assert all(not torch.allclose(a, b) for a, b in itertools.combinations(outputs, 2))


# ---------------------------------------------------------------- semi-supervised SMML (beyond the paper)
def _ssl_stub(threshold: float, use_frc: bool, regions: bool = False):
    """An SMMLSSLTrainer shell whose branches return fixed logits/features (no nnU-Net set-up needed)."""
    from types import SimpleNamespace

    from nnunet_mmssl.trainers import SMMLSSLTrainer

    trainer = object.__new__(SMMLSSLTrainer)
    trainer.label_manager = SimpleNamespace(has_regions=regions)
    trainer.pseudo_label_threshold = threshold
    trainer.use_frc = use_frc
    return trainer


def _fixed_branches(trainer, logits1, logits2, feat1=None, feat2=None):
    feat1 = torch.zeros(1, 2, *logits1.shape[2:]) if feat1 is None else feat1
    feat2 = torch.zeros(1, 2, *logits1.shape[2:]) if feat2 is None else feat2
    trainer._branch_outputs = lambda data: ([logits1], [logits2], feat1, feat2)


def test_ssl_consistency_by_hand_and_gradient_only_into_the_less_reliable_branch():
    tau = 6.0
    # three voxels, two classes: v0 both say class 0 (branch 1 surer), v1 unsure (mean 0.5: below the threshold),
    # v2 both say class 1 (branch 2 surer)
    logits1 = torch.tensor([[[[3.0, 0.0, 0.0]], [[0.0, 0.5, 4.0]]]], requires_grad=True)
    logits2 = torch.tensor([[[[2.0, 0.5, 0.0]], [[0.0, 0.0, 5.0]]]], requires_grad=True)
    trainer = _ssl_stub(threshold=0.9, use_frc=False)
    _fixed_branches(trainer, logits1, logits2)
    loss = trainer.unlabeled_consistency(torch.zeros(1, 2, 1, 3))

    def kl(t, s):  # KL(softmax(t/tau) || softmax(s/tau)) of one voxel
        pt, ps = torch.softmax(torch.tensor(t) / tau, 0), torch.softmax(torch.tensor(s) / tau, 0)
        return float((pt * (pt / ps).log()).sum())

    # v0: branch 2 learns from branch 1; v2: branch 1 learns from branch 2; each direction averaged over one voxel
    expected = kl([3.0, 0.0], [2.0, 0.0]) + kl([0.0, 5.0], [0.0, 4.0])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    g1, g2 = logits1.grad[0, :, 0], logits2.grad[0, :, 0]  # (C, voxel)
    assert torch.all(g1[:, 0] == 0) and torch.any(g1[:, 2] != 0)  # branch 1 is the teacher at v0, student at v2
    assert torch.all(g2[:, 2] == 0) and torch.any(g2[:, 0] != 0)
    assert torch.all(g1[:, 1] == 0) and torch.all(g2[:, 1] == 0)  # the unsure voxel takes no part


def test_ssl_consistency_nothing_confident_gives_zero_and_no_gradient():
    logits1 = torch.zeros(1, 2, 1, 3, requires_grad=True)
    logits2 = torch.zeros(1, 2, 1, 3, requires_grad=True)
    feat1 = torch.randn(1, 2, 1, 3, requires_grad=True)
    feat2 = torch.randn(1, 2, 1, 3, requires_grad=True)
    trainer = _ssl_stub(threshold=0.9, use_frc=True)
    _fixed_branches(trainer, logits1, logits2, feat1, feat2)
    loss = trainer.unlabeled_consistency(torch.zeros(1, 2, 1, 3))
    loss.backward()
    assert loss.item() == 0.0
    for t in (logits1, logits2, feat1, feat2):
        assert t.grad is None or torch.all(t.grad == 0)


def test_ssl_frc_uses_the_pseudo_label_classes():
    """FRC's prototypes come from the confident pseudo-label's classes; both branches' features get gradient."""
    logits = torch.tensor([[[[4.0, 4.0, -4.0, -4.0]], [[-4.0, -4.0, 4.0, 4.0]]]])
    feat1 = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 1.0]]]], requires_grad=True)
    feat2 = torch.tensor([[[[1.0, 1.0, 1.0, 1.0]], [[0.0, 0.0, 0.5, 0.5]]]], requires_grad=True)
    trainer = _ssl_stub(threshold=0.9, use_frc=True)
    trainer.use_pbc = False
    _fixed_branches(trainer, logits.clone(), logits.clone(), feat1, feat2)
    loss = trainer.unlabeled_consistency(torch.zeros(1, 2, 1, 4))
    # branch 1: prototypes (1,0) and (0,1) -> cos 0; branch 2: (1,0) and (1,0.5) -> cos^2 = 0.8 = D of each class
    # row; weights = the mean entropy of each class's probability over the voxels
    p = torch.softmax(logits, 1)
    weights = (-(p * p.log())).flatten(2).mean(-1)[0]
    assert loss.item() == pytest.approx(0.8 * float(weights.sum()), rel=1e-5)  # L_fc once (issue #24)
    loss.backward()
    assert feat1.grad.abs().sum() > 0 and feat2.grad.abs().sum() > 0


def test_ssl_consistency_on_regions():
    # one region, two voxels: confident inside (p ~ 0.98) and confident outside; sigmoid KL per region
    logits1 = torch.tensor([[[[4.0, -4.0]]]], requires_grad=True)
    logits2 = torch.tensor([[[[3.0, -5.0]]]], requires_grad=True)
    trainer = _ssl_stub(threshold=0.9, use_frc=False, regions=True)
    _fixed_branches(trainer, logits1, logits2)
    loss = trainer.unlabeled_consistency(torch.zeros(1, 2, 1, 2))
    loss.backward()
    # v0: region present, branch 1 surer -> branch 2 learns; v1: absent, branch 2 surer -> branch 1 learns
    assert logits1.grad[0, 0, 0, 0] == 0 and logits1.grad[0, 0, 0, 1] != 0
    assert logits2.grad[0, 0, 0, 1] == 0 and logits2.grad[0, 0, 0, 0] != 0
    assert loss.item() > 0


def test_ssl_trainer_uses_the_unlabelled_batch_with_its_ramped_weight(harness):
    from nnunet_mmssl.trainers import SMMLSSLTrainer, SMMLTrainer

    trainer = harness.make_trainer(SMMLSSLTrainer, seed=0)
    assert trainer.use_unlabeled and not SMMLTrainer.use_unlabeled
    trainer.pseudo_label_threshold = 0.0  # every voxel takes part, so the unsupervised term is non-zero
    trainer.unsupervised_rampup_fraction = 0.0
    calls = []
    original = trainer.unlabeled_consistency
    trainer.unlabeled_consistency = lambda x: calls.append(x) or original(x)
    steps = harness.batches(trainer, seed=0, count=1)
    out = harness.run_steps(trainer, steps, seed=0)[0]
    assert len(calls) == 1 and torch.equal(calls[0], steps[0][1]["data"])
    assert float(out["unsup_loss"]) > 0
    assert float(out["objective"]) == pytest.approx(float(out["sup_loss"]) + float(out["unsup_loss"]), rel=1e-5)

"""The unsupervised terms: gradient share, eq. 4's reductions, ramps relative to the run, the step using them."""

import copy
import math

import numpy as np
import pytest
import torch
from plans_fixtures import DATASET_JSON, PLANS

from nnunet_mmssl.architectures.multi_branch import mean_of_heads
from nnunet_mmssl.losses.consistency import PAPER_SAMPLE_VOXELS, cross_modal_consistency_loss, pairwise_consistency_loss
from nnunet_mmssl.semisup.gradient_share import difference_norm, global_norm, gradient_share, share_ratio
from nnunet_mmssl.semisup.ramps import sigmoid_rampup
from nnunet_mmssl.trainers import MeanTeacherTrainer, MemCifSSLTrainer, MMFMCMLTrainer
from nnunet_mmssl.trainers.memcif import MemCifSSLTrainer_printedConsistency


# ---------------------------------------------------------------------------------------------- gradient share
def test_gradient_share_hand_computed():
    a = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor([2.0, -1.0], requires_grad=True)
    frozen = torch.tensor(5.0, requires_grad=False)
    sup = 3 * a ** 2 + frozen * a  # d/da = 6a + 5 = 11, d/db = 0
    unsup = (b * torch.tensor([3.0, 4.0])).sum() + a  # d/da = 1, d/db = (3, 4)
    # weighted by 0.5: |(0.5, 1.5, 2)| = sqrt(0.25 + 2.25 + 4) = sqrt(6.5); |sup grad| = 11
    share = gradient_share(sup, 0.5 * unsup, [a, b, frozen])
    assert share == pytest.approx(math.sqrt(6.5) / 11)
    assert a.grad is None and b.grad is None  # measuring does not touch .grad


def test_difference_norm_equals_the_unsupervised_gradient_and_undoes_the_scale():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    sup = (a ** 2).sum()  # grad a = (2, 4), b = 0
    unsup = b ** 2 + a[0]  # grad a = (1, 0), b = 6
    scale = 1024.0
    sup_grads = torch.autograd.grad(scale * sup, [a, b], retain_graph=True, allow_unused=True)
    assert sup_grads[1] is None
    (sup + unsup).backward()
    assert difference_norm([a.grad, b.grad], sup_grads, scale).item() == pytest.approx(math.sqrt(1 + 36))
    assert global_norm(sup_grads).item() / scale == pytest.approx(math.sqrt(20))
    with pytest.raises(ValueError, match="matching"):
        difference_norm([a.grad], sup_grads)


def test_share_ratio_degenerate_cases():
    assert share_ratio(1.0, 4.0) == 0.25
    assert math.isinf(share_ratio(1.0, 0.0)) and math.isnan(share_ratio(0.0, 0.0))


# ---------------------------------------------------------------------------------------------- eq. 4 reductions
def _logits(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities.log()


@pytest.mark.parametrize("spatial", [(3, 4), (2, 3, 4)])
def test_consistency_reductions_hand_computed(spatial):
    # sample 0: p_a = (0.75, 0.25), p_b = (0.25, 0.75) everywhere -> class-summed squared difference 0.5 per voxel
    # sample 1: identical -> 0
    voxels = int(np.prod(spatial))
    p_a = torch.empty(2, 2, *spatial)
    p_b = torch.empty(2, 2, *spatial)
    p_a[:, 0], p_a[:, 1] = 0.75, 0.25
    p_b[0, 0], p_b[0, 1] = 0.25, 0.75
    p_b[1] = p_a[1]
    a, b = _logits(p_a), _logits(p_b)
    # mean over samples, classes, voxels: sample 0 has 0.25 in every entry, sample 1 none
    assert cross_modal_consistency_loss(a, b, reduction="mean").item() == pytest.approx(0.125)
    # printed: (1/M) sum_j ||p1_j - p2_j||^2 = (0.5 * voxels + 0) / 2, rescaled from `voxels` to the reference
    literal = (0.5 * voxels + 0.0) / 2
    for reference in (voxels, 57_600, 7):
        assert cross_modal_consistency_loss(a, b, reduction="printed", reference_voxels=reference).item() == \
            pytest.approx(literal * reference / voxels)
    # printed / mean = classes x reference voxels
    assert cross_modal_consistency_loss(a, b, reduction="printed").item() == \
        pytest.approx(cross_modal_consistency_loss(a, b).item() * 2 * PAPER_SAMPLE_VOXELS)


def test_printed_reduction_on_a_paper_slice_is_the_literal_sum():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 240, 240), torch.randn(3, 4, 240, 240)
    literal = ((torch.softmax(a, 1) - torch.softmax(b, 1)) ** 2).flatten(1).sum(1).mean()
    torch.testing.assert_close(cross_modal_consistency_loss(a, b, reduction="printed"), literal, rtol=1e-4, atol=0)


def test_printed_reduction_is_patch_size_independent_and_sends_gradient_to_both_heads():
    torch.manual_seed(1)
    small_a, small_b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    tiled_a, tiled_b = small_a.repeat(1, 1, 4, 4), small_b.repeat(1, 1, 4, 4)  # same statistics on a 4x4 larger patch
    torch.testing.assert_close(cross_modal_consistency_loss(small_a, small_b, reduction="printed"),
                               cross_modal_consistency_loss(tiled_a, tiled_b, reduction="printed"))
    a, b = small_a.clone().requires_grad_(), small_b.clone().requires_grad_()
    pairwise_consistency_loss([a, b], reduction="printed").backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="Unknown consistency reduction"):
        cross_modal_consistency_loss(a, b, reduction="sum")


# ---------------------------------------------------------------------------------------------- ramps
def _ramped(trainer_class, num_epochs: int, iterations: int, epoch: int, iteration: int) -> float:
    trainer = object.__new__(trainer_class)
    trainer.num_epochs, trainer.num_iterations_per_epoch = num_epochs, iterations
    trainer.current_epoch, trainer.iteration_in_epoch = epoch, iteration
    return trainer.current_unsupervised_weight()


def test_ramp_is_a_fraction_of_the_run():
    assert MeanTeacherTrainer.unsupervised_rampup_fraction == 0.04
    # the same fraction of a 10 x 25 run and of nnU-Net's 1000 x 250 run gives the same weight
    for short, long in [((0, 0), (0, 0)), ((0, 5), (20, 0)), ((0, 7), (28, 0)), ((0, 10), (40, 0)), ((5, 0), (500, 0))]:
        expected = _ramped(MeanTeacherTrainer, 1000, 250, *long)
        assert _ramped(MeanTeacherTrainer, 10, 25, *short) == pytest.approx(expected)
    assert _ramped(MeanTeacherTrainer, 1000, 250, 0, 0) == pytest.approx(0.1 * math.exp(-5))
    assert _ramped(MeanTeacherTrainer, 1000, 250, 20, 0) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert _ramped(MeanTeacherTrainer, 1000, 250, 40, 0) == pytest.approx(0.1)
    # a 15-epoch run reaches the full weight after 4 % of it (the fixed 40-epoch ramp never did)
    assert _ramped(MeanTeacherTrainer, 15, 250, 1, 0) == pytest.approx(0.1)
    assert sigmoid_rampup(0.02, 0.04) == pytest.approx(math.exp(-5 * 0.25))
    # constant-weight methods ignore the schedule
    assert _ramped(MemCifSSLTrainer, 10, 25, 0, 0) == 0.01 and _ramped(MMFMCMLTrainer, 10, 25, 3, 7) == 1.0


# ---------------------------------------------------------------------------------------------- the training step
def _targets(batch: int = 2, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    full = (torch.rand(batch, 1, 16, 16, generator=generator) > 0.5).float()
    return [full, full[:, :, ::2, ::2], full[:, :, ::4, ::4]]


@pytest.fixture
def make_trainer(tmp_path, monkeypatch):
    """A real trainer of ours on the minimal 2d plans, initialised on the CPU (no data loaders)."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    data_folder = tmp_path / "preprocessed" / PLANS["dataset_name"] / "nnUNetPlans_2d"
    data_folder.mkdir(parents=True)
    (data_folder / "placeholder.b2nd").touch()  # nnU-Net infers its dataset class from the file endings

    def make(trainer_class, seed: int = 0):
        plans = copy.deepcopy(PLANS)
        plans["continue_training"] = False
        plans["configurations"]["2d"]["batch_dice"] = False
        torch.manual_seed(seed)
        trainer = trainer_class(plans, "2d", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
        trainer.initialize()
        trainer.print_to_log_file = lambda *args, **kwargs: None
        trainer.num_iterations_per_epoch = 4
        trainer.on_train_epoch_start()
        return trainer

    return make


def _stream(batches):
    batches = list(batches)
    return iter([{"data": b} for b in batches])


def _grads(network):
    return [None if p.grad is None else p.grad.clone() for p in network.parameters()]


def _clipped(grads, max_norm: float = 12.0):
    norm = torch.norm(torch.stack([g.norm() for g in grads if g is not None]))
    factor = min(1.0, max_norm / (float(norm) + 1e-6))
    return [None if g is None else g * factor for g in grads]


@pytest.mark.parametrize("trainer_class", [MemCifSSLTrainer, MemCifSSLTrainer_printedConsistency])
def test_train_step_backpropagates_sup_plus_weighted_unsup_of_the_unlabelled_slice(make_trainer, trainer_class):
    trainer = make_trainer(trainer_class)
    torch.manual_seed(4)
    data, unlabeled = torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    reference = copy.deepcopy(trainer.network)  # the weights before the step
    reference.return_heads = True
    heads = reference(data)
    sup = sum(trainer.loss(h, _targets()) for h in heads)
    unsup = pairwise_consistency_loss([h[0] for h in reference(unlabeled)], reduction=trainer.consistency_reduction)
    expected = _clipped(torch.autograd.grad(sup + 0.01 * unsup, list(reference.parameters()), allow_unused=True))

    trainer.dataloader_unlabeled = _stream([unlabeled])
    out = trainer.train_step({"data": data, "target": _targets()})
    assert float(out["unsup_loss"]) == pytest.approx(unsup.item(), rel=1e-4)
    assert float(out["sup_loss"]) == pytest.approx(sup.item(), rel=1e-4)
    assert float(out["objective"]) == pytest.approx((sup + 0.01 * unsup).item(), rel=1e-4)
    for name_grad, got, want in zip(trainer.network.named_parameters(), _grads(trainer.network), expected):
        if want is None:
            assert got is None or got.abs().max() == 0, name_grad[0]
        else:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6, msg=name_grad[0])
    # nnU-Net's train_losses: the loss of the fused output, as nnU-Net validates it (not the sum over heads)
    assert float(out["loss"]) == pytest.approx(trainer.loss(mean_of_heads(heads), _targets()).item(), rel=1e-4)
    assert float(out["loss"]) < 0.75 * float(out["sup_loss"])


@pytest.mark.parametrize("trainer_class", [MemCifSSLTrainer, MeanTeacherTrainer])
def test_train_step_measures_the_gradient_share_of_the_step(make_trainer, trainer_class):
    trainer = make_trainer(trainer_class)
    trainer.current_epoch, trainer.num_epochs = 2, 10  # Mean Teacher: past its ramp, weight 0.1
    torch.manual_seed(5)
    data, unlabeled = torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    network_before = copy.deepcopy(trainer.network.state_dict())
    teacher_before = copy.deepcopy(getattr(trainer, "teacher", None))
    weight = trainer.current_unsupervised_weight()
    trainer.dataloader_unlabeled = _stream([unlabeled, unlabeled])
    # iteration 2 * 4 + 0 = 8 of the run: not a multiple of gradient_share_every (20), so not measured
    assert math.isnan(float(trainer.train_step({"data": data, "target": _targets()})["grad_share"]))

    # the expected share from the pre-step weights, both terms through torch.autograd.grad
    trainer.network.load_state_dict(network_before)
    trainer.teacher = copy.deepcopy(teacher_before)
    torch.manual_seed(7)  # Mean Teacher draws the student's input noise
    sup, unsup = trainer.compute_losses(data, _targets(), unlabeled)
    expected = gradient_share(sup, weight * unsup, [p for p in trainer.network.parameters() if p.requires_grad])
    assert 0 < expected < math.inf

    trainer.network.load_state_dict(network_before)
    trainer.teacher = copy.deepcopy(teacher_before)
    trainer.gradient_share_every, trainer.iteration_in_epoch = 1, 0
    torch.manual_seed(7)
    out = trainer.train_step({"data": data, "target": _targets()})
    assert float(out["grad_share"]) == pytest.approx(expected, rel=1e-3)


def test_supervised_variant_logs_no_share(make_trainer):
    from nnunet_mmssl.trainers import MemCifSupervisedTrainer

    trainer = make_trainer(MemCifSupervisedTrainer)
    trainer.gradient_share_every = 1
    out = trainer.train_step({"data": torch.randn(2, 2, 16, 16), "target": _targets()})
    assert math.isnan(float(out["grad_share"])) and float(out["unsup_weight"]) == 0.0


def test_teacher_does_not_move_when_the_grad_scaler_skips_the_step(make_trainer):
    trainer = make_trainer(MeanTeacherTrainer)
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    first = next(trainer.network.parameters())
    handle = first.register_hook(lambda g: g * float("inf"))  # overflowing gradients: GradScaler skips the step
    teacher_before = copy.deepcopy(trainer.teacher.module.state_dict())
    student_before = copy.deepcopy(trainer.network.state_dict())
    trainer.dataloader_unlabeled = _stream([torch.randn(2, 2, 16, 16) for _ in range(2)])
    trainer.train_step({"data": torch.randn(2, 2, 16, 16), "target": _targets()})
    assert trainer.grad_scaler.get_scale() == 2.0 ** 7  # the scaler saw the overflow and skipped
    assert trainer.teacher.step == 0
    for name, value in trainer.teacher.module.state_dict().items():
        torch.testing.assert_close(value, teacher_before[name], msg=name)
    for name, value in trainer.network.state_dict().items():
        torch.testing.assert_close(value, student_before[name], msg=name)
    handle.remove()
    trainer.train_step({"data": torch.randn(2, 2, 16, 16), "target": _targets()})
    assert trainer.teacher.step == 1  # a step that was taken updates the teacher
    assert not torch.equal(trainer.teacher.module.state_dict()[next(iter(teacher_before))],
                           teacher_before[next(iter(teacher_before))])


def test_epoch_logs_average_the_sampled_shares_and_the_weights(make_trainer):
    trainer = make_trainer(MemCifSSLTrainer)
    outputs = [{"loss": np.array(1.0), "sup_loss": np.array(2.0), "unsup_loss": np.array(0.5),
                "objective": np.array(2.1), "unsup_weight": np.float64(w), "grad_share": np.float64(s)}
               for w, s in [(0.1, np.nan), (0.2, 0.02), (0.3, np.nan), (0.4, 0.04)]]
    trainer.on_train_epoch_end(outputs)
    log = trainer.logger
    assert log.get_value("unsup_grad_shares", step=-1) == pytest.approx(0.03)
    assert log.get_value("unsup_weights", step=-1) == pytest.approx(0.25)
    assert log.get_value("train_objectives", step=-1) == pytest.approx(2.1)
    assert log.get_value("train_losses", step=-1) == pytest.approx(1.0)
    for o in outputs:
        o["grad_share"] = np.float64(np.nan)
    trainer.current_epoch = 1
    trainer.on_train_epoch_end(outputs)
    assert math.isnan(log.get_value("unsup_grad_shares", step=-1))

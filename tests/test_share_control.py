"""The weight set by the gradient share (issue #26 part 2): ``unsupervised_share_target``.

The controller (:mod:`nnunet_mmssl.semisup.share_control`) on a toy problem — a small MLP, a supervised regression and
an unsupervised term 40 times steeper, minibatches drawn at random so that each measured share is noisy — and in our
real trainers on the tiny 2d fixture plans (built and initialised by nnU-Net's code, tests/trainer_harness.py):
the share reaches the target from below and from above, the weight stays within its bounds and changes by at most
``max_factor`` per measurement, the ramp scales the share instead of being undone, nothing changes when the option
is off, the state travels through a checkpoint (``--c``), and the trainers log and plot the weight, share and target.
"""

import copy
import math
import statistics

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trainer_harness as harness
from torch import nn

from nnunet_mmssl.semisup.gradient_share import gradient_share
from nnunet_mmssl.semisup.ramps import sigmoid_rampup
from nnunet_mmssl.semisup.share_control import ShareController
from nnunet_mmssl.trainers import (
    MeanTeacherTrainer,
    MeanTeacherTrainer_share0p1,
    MemCifSSLTrainer,
    MemCifSSLTrainer_share0p1,
)
from nnunet_mmssl.trainers.base import SHARE_STATE_KEY
from nnunet_mmssl.trainers.checkpoint_io import read_extra_state

TARGET = 0.1


def toy_run(start_weight: float, steps: int = 60, ramp: float = 1.0, **settings) -> tuple[list, list, ShareController]:
    """Train the toy with the controller; returns the measured shares, the controller's weight at each step, it."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    x_sup, y_sup = torch.randn(256, 6, generator=generator), torch.randn(256, 2, generator=generator)
    x_unsup, y_unsup = torch.randn(256, 6, generator=generator), torch.randn(256, 2, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    controller = ShareController(TARGET, start_weight, **settings)
    shares, weights = [], []
    for _ in range(steps):
        i, j = torch.randint(0, 256, (16,), generator=generator), torch.randint(0, 256, (16,), generator=generator)
        sup = F.mse_loss(model(x_sup[i]), y_sup[i])
        unsup = 40.0 * F.mse_loss(model(x_unsup[j]), y_unsup[j])
        applied = ramp * controller.weight
        share = gradient_share(sup, applied * unsup, list(model.parameters()))
        shares.append(share)
        weights.append(controller.weight)
        controller.update(share, applied)
        optimizer.zero_grad()
        (sup + applied * unsup).backward()
        optimizer.step()
    return shares, weights, controller


def geometric_mean(values) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


# ------------------------------------------------------------------ the controller on the toy problem
@pytest.mark.parametrize("start_weight", [1e-4, 1.0], ids=["share-below-target", "share-above-target"])
def test_toy_share_reaches_the_target_from_both_sides(start_weight):
    shares, weights, _ = toy_run(start_weight)
    assert shares[0] < TARGET / 10 if start_weight < 1e-2 else shares[0] > TARGET * 10  # far off at the start
    assert statistics.fmean(shares[-20:]) == pytest.approx(TARGET, rel=0.15)  # the mean share (the default rule)
    steps = [w2 / w1 for w1, w2 in zip(weights, weights[1:])]
    assert max(max(steps), 1 / min(steps)) <= 3.0 + 1e-9  # smooth: at most max_factor per measurement


def test_toy_weight_stays_within_its_bounds():
    shares, weights, _ = toy_run(1e-4, max_weight=1e-3)  # the target needs ~1e-3 .. 3e-3: capped
    assert max(weights) <= 1e-3 and weights[-1] == 1e-3
    assert geometric_mean(shares[-20:]) < TARGET
    shares, weights, _ = toy_run(1.0, min_weight=0.05)  # the target needs less than 0.05: floored
    assert min(weights) >= 0.05 and weights[-1] == 0.05
    assert geometric_mean(shares[-20:]) > 2 * TARGET


def test_toy_ramp_scales_the_share_and_is_not_undone():
    """A ramp held at 0.25: the share settles at 0.25 x target, the controller's weight where it settles without."""
    shares, _, ramped = toy_run(1e-4, ramp=0.25)
    _, _, plain = toy_run(1e-4)
    assert statistics.fmean(shares[-20:]) == pytest.approx(0.25 * TARGET, rel=0.15)
    assert ramped.weight == pytest.approx(plain.weight, rel=0.15)


# ------------------------------------------------------------------ the controller's rules
def test_update_in_log_space_by_the_rate_then_capped():
    """The rule before 2026-12-07 (``averaging="log"``): the average of log u, by hand."""
    controller = ShareController(0.1, 0.01, rate=0.5, smoothing=0.3, max_factor=3.0, averaging="log")
    assert controller.update(0.004, 0.02)  # unit share 0.2: ideal weight 0.5
    assert controller.unit_share == pytest.approx(0.2)
    assert controller.ideal_weight == pytest.approx(0.5)
    assert controller.weight == pytest.approx(0.03)  # half way in log space is x sqrt(50) = 7.07: capped at x3
    controller.update(0.2, 0.1)  # unit share 2: the average moves 30 % of the way in log space (ū = 0.2 * 10^0.3)
    assert math.log(controller.unit_share) == pytest.approx(math.log(0.2) + 0.3 * math.log(10.0))
    ideal = 0.1 / (0.2 * 10 ** 0.3)
    assert controller.ideal_weight == pytest.approx(ideal)
    assert controller.weight == pytest.approx(math.sqrt(0.03 * ideal))  # half way in log space (x2.9: not capped)
    controller.update(0.01, 0.1)  # unit share 0.1 < ū: the weight rises less than the ideal
    assert controller.smoothed_share == pytest.approx(controller.weight * controller.unit_share)
    assert controller.updates == 3


def test_update_arithmetic_average_by_the_rate_then_capped():
    """The default (``averaging="mean"``): the average of u itself, by hand."""
    controller = ShareController(0.1, 0.01, rate=0.5, smoothing=0.2, max_factor=3.0)
    assert controller.averaging == "mean" and ShareController(0.1, 0.01).smoothing == 0.1
    assert controller.update(0.004, 0.02)  # unit share 0.2 initialises the average: ideal weight 0.5
    assert controller.unit_share == pytest.approx(0.2) and controller.weight == pytest.approx(0.03)  # x3 cap
    controller.update(0.2, 0.1)  # unit share 2: ū = 0.2 + 0.2 * (2 - 0.2) = 0.56 (the log rule: 0.317)
    assert controller.unit_share == pytest.approx(0.56)
    assert controller.ideal_weight == pytest.approx(0.1 / 0.56)
    assert controller.weight == pytest.approx(math.sqrt(0.03 * 0.1 / 0.56))  # half way in log space: x2.44
    assert controller.smoothed_share == pytest.approx(controller.weight * 0.56)


@pytest.mark.parametrize("averaging", ["mean", "log"])
def test_bimodal_shares_mean_averaging_holds_the_mean_share(averaging):
    """Measurements alternating between a batch where the unsupervised term is nearly silent (unit share 1e-5) and
    one where it acts (0.01), as in a real MemCif run: the arithmetic average holds the mean share at the target;
    the log average steers the geometric mean, so the weight climbs and the mean share is many times the target."""
    controller = ShareController(0.2, 0.01, max_weight=1e4, averaging=averaging)
    shares = []
    for step in range(300):
        applied = controller.weight
        shares.append(applied * (0.01 if step % 2 else 1e-5))
        controller.update(shares[-1], applied)
    mean_share = statistics.fmean(shares[-100:])
    if averaging == "mean":
        assert mean_share == pytest.approx(0.2, rel=0.1)
        assert controller.weight == pytest.approx(0.2 / 0.005, rel=0.1)  # target / mean unit share
    else:
        assert mean_share > 5 * 0.2 and controller.weight > 400  # ~ target / sqrt(1e-5 * 0.01) = 632


@pytest.mark.parametrize("share, applied", [(float("nan"), 0.1), (float("inf"), 0.1), (0.0, 0.1), (0.01, 0.0)])
def test_uninformative_measurements_are_skipped(share, applied):
    controller = ShareController(0.1, 0.01)
    before = controller.state_dict()
    assert not controller.update(share, applied)
    assert controller.state_dict() == before


@pytest.mark.parametrize("settings, name", [({"target": 0.0}, "target"), ({"target": float("nan")}, "target"),
                                            ({"min_weight": 0.0}, "min_weight"),
                                            ({"min_weight": 1.0, "max_weight": 0.5}, "max_weight"),
                                            ({"smoothing": 0.0}, "smoothing"), ({"rate": 1.5}, "rate"),
                                            ({"max_factor": 0.5}, "max_factor"), ({"weight": -1.0}, "weight"),
                                            ({"averaging": "median"}, "averaging")])
def test_invalid_settings_are_refused_naming_them(settings, name):
    arguments = {"target": 0.1, "weight": 0.01, **settings}
    with pytest.raises(ValueError, match=f"ShareController {name} .*must be"):
        ShareController(**arguments)


def test_start_weight_is_clipped_into_the_bounds():
    assert ShareController(0.1, 500.0, max_weight=100.0).weight == 100.0
    assert ShareController(0.1, 1e-9, min_weight=1e-4).weight == 1e-4


def test_state_round_trips_and_bad_state_is_refused():
    controller = ShareController(0.1, 0.01)
    for share in (0.002, 0.004, 0.01):
        controller.update(share, controller.weight)
    state = copy.deepcopy(controller.state_dict())
    restored = ShareController(0.1, 0.01)
    restored.load_state_dict(state)
    assert restored.state_dict() == controller.state_dict() and restored.updates == 3
    with pytest.raises(ValueError, match="not one written by ShareController"):
        restored.load_state_dict({"weight": 0.1})
    with pytest.raises(ValueError, match="weight or average <= 0 or a non-finite"):
        restored.load_state_dict({**state, "weight": float("nan")})
    with pytest.raises(ValueError, match="weight or average <= 0 or a non-finite"):
        restored.load_state_dict({**state, "unit_share": -1.0})


def test_state_written_before_the_arithmetic_rule_is_read():
    """A checkpoint of 2026-12-06 holds the average of log u: read as ū = exp(it)."""
    controller = ShareController(0.1, 0.01)
    controller.load_state_dict({"target": 0.2, "weight": 0.5, "log_unit_share": math.log(0.04), "updates": 7})
    assert controller.unit_share == pytest.approx(0.04) and controller.weight == 0.5 and controller.updates == 7
    assert controller.target == 0.1 and controller.averaging == "mean"  # the controller's own, not the state's
    with pytest.raises(ValueError, match="not one written by ShareController"):  # exp overflows: refused, named
        controller.load_state_dict({"weight": 0.5, "log_unit_share": 1e6, "updates": 1})


# ------------------------------------------------------------------ real trainers
@pytest.fixture
def folders(tmp_path, monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(key, raising=False)
    harness.set_folders(str(tmp_path))
    return tmp_path


def steps_recorded(trainer, step_batches, seed: int) -> tuple[list[dict], list[float]]:
    """:func:`trainer_harness.run_steps`, also returning the controller's weight before each step."""
    trainer.on_train_epoch_start()
    outputs, controller_weights = [], []
    for index, (labelled, unlabelled) in enumerate(step_batches):
        trainer.dataloader_unlabeled = iter([unlabelled])
        torch.manual_seed(seed + index)
        controller_weights.append(trainer.share_controller.weight if trainer.share_controller else None)
        outputs.append(trainer.train_step(labelled))
    return outputs, controller_weights


@pytest.mark.parametrize("parent", [MeanTeacherTrainer, MemCifSSLTrainer], ids=lambda c: c.__name__)
def test_off_is_inert(folders, parent):
    """Off: the paper weight x ramp, no controller, log key or checkpoint entry; a controller pinned to the paper
    weight (bounds = the weight) trains bit-identically, so the option adds nothing but the weight it sets."""
    pinned = type(f"{parent.__name__}_pinned", (parent,), {
        "unsupervised_share_target": TARGET, "share_weight_bounds": (parent.unsupervised_weight,) * 2})
    steps = harness.batches(harness.make_trainer(parent, seed=9), seed=1, count=4)
    runs = {}
    for trainer_class in (parent, pinned):
        trainer = harness.make_trainer(trainer_class, seed=0)
        trainer.gradient_share_every = 2
        trainer.num_epochs, trainer.num_iterations_per_epoch = 1, 50  # MT's ramp over 4 % of 50 steps: 2 steps
        runs[trainer_class] = trainer, harness.run_steps(trainer, steps, seed=5)
    off, off_outputs = runs[parent]
    on, on_outputs = runs[pinned]
    expected = [parent.unsupervised_weight * (sigmoid_rampup(i / 50, parent.unsupervised_rampup_fraction)
                                               if parent.unsupervised_rampup_fraction else 1.0) for i in range(4)]
    assert [float(o["unsup_weight"]) for o in off_outputs] == expected
    assert off.share_controller is None and "unsup_share_targets" not in off.logger.local_logger.my_fantastic_logging
    assert on.share_controller.updates == 2  # the pinned run measured and steered (to its only possible weight)
    for key in ("loss", "sup_loss", "unsup_loss", "objective", "unsup_weight", "grad_share"):
        assert np.array_equal([o[key] for o in off_outputs], [o[key] for o in on_outputs], equal_nan=True), key
    for (name, a), b in zip(off.network_module.state_dict().items(), on.network_module.state_dict().values()):
        assert torch.equal(a, b), name
    off.save_checkpoint(str(folders / "off.pth"))
    assert SHARE_STATE_KEY not in (read_extra_state(str(folders / "off.pth")) or {})


@pytest.mark.parametrize("trainer_class", [MeanTeacherTrainer_share0p1, MemCifSSLTrainer_share0p1],
                         ids=lambda c: c.__name__)
def test_trainer_steers_logs_plots_and_resumes_the_weight(folders, trainer_class, monkeypatch):
    steps = harness.batches(harness.make_trainer(trainer_class, seed=9), seed=1, count=7)
    first = harness.make_trainer(trainer_class, seed=0)
    first.gradient_share_every = 1
    first.num_epochs, first.num_iterations_per_epoch = 1, 50  # MT's ramp: the first 2 of 50 steps
    outputs, controller_weights = steps_recorded(first, steps[:5], seed=5)
    applied = [float(o["unsup_weight"]) for o in outputs]
    ramp = [sigmoid_rampup(i / 50, first.unsupervised_rampup_fraction) if first.unsupervised_rampup_fraction else 1.0
            for i in range(5)]
    assert applied == [r * w for r, w in zip(ramp, controller_weights)]  # the ramp on top of the controller's weight
    assert controller_weights[0] == trainer_class.unsupervised_weight  # starts at the paper weight
    shares = [float(o["grad_share"]) for o in outputs]
    assert shares[0] < TARGET / 10  # both trainers start far below a 10 % share at their paper weights
    assert all(b > a for a, b in zip(controller_weights, controller_weights[1:]))  # so the weight rises
    assert shares[-1] > 5 * shares[0] and first.share_controller.updates == 5
    replay = ShareController(TARGET, trainer_class.unsupervised_weight)  # fed the measured share, the applied weight
    for share, weight in zip(shares, applied):
        replay.update(share, weight)
    assert replay.state_dict() == first.share_controller.state_dict()

    first.on_train_epoch_end(outputs)  # logged per epoch: the applied weight, the measured share, the target
    log = first.logger.local_logger.my_fantastic_logging
    assert log["unsup_weights"] == [pytest.approx(float(np.mean(applied)))]
    assert log["unsup_grad_shares"] == [pytest.approx(float(np.mean(shares)))]
    assert log["unsup_share_targets"] == [TARGET]
    for key, value in (("val_losses", 0.5), ("mean_fg_dice", 0.1), ("dice_per_class_or_region", [0.1]),
                       ("epoch_start_timestamps", 0.0), ("epoch_end_timestamps", 1.0)):  # lrs: at the epoch's start
        first.logger.log(key, value, 0)
    figures, close = [], plt.close
    monkeypatch.setattr("nnunet_mmssl.trainers.logging.plt.close", figures.append)
    first.logger.local_logger.plot_progress_png(str(folders))
    share_panel = [ax for ax in figures[0].axes if ax.get_yscale() == "log"][0]  # progress.png's share panel
    lines = {line.get_label(): line.get_ydata() for line in share_panel.get_lines()}
    close(figures[0])
    assert list(lines["unsup_share_targets"]) == [TARGET] and "unsup_grad_shares" in lines

    first.save_checkpoint(str(folders / "checkpoint_latest.pth"))  # --c: the controller resumes where it was
    first.current_epoch += 1
    saved = copy.deepcopy(first.share_controller.state_dict())
    continued, _ = steps_recorded(first, steps[5:], seed=50)
    resumed = harness.make_trainer(trainer_class, seed=1, initialize=False)
    resumed.load_checkpoint(str(folders / "checkpoint_latest.pth"))
    assert resumed.share_controller.state_dict() == saved
    resumed.gradient_share_every, resumed.num_epochs, resumed.num_iterations_per_epoch = 1, 1, 50
    again, _ = steps_recorded(resumed, steps[5:], seed=50)
    assert [o["unsup_weight"] for o in again] == [o["unsup_weight"] for o in continued]
    assert resumed.share_controller.state_dict() == first.share_controller.state_dict()


def test_trainer_settings_reach_the_controller(folders):
    """share_averaging / share_smoothing / share_rate / bounds of a trainer are the controller's; the _share*
    trainers measure every 2 iterations and average arithmetically by default."""
    from nnunet_mmssl.trainers.share_variants import SHARE_MEASURE_EVERY

    assert SHARE_MEASURE_EVERY == 2 and MemCifSSLTrainer_share0p1.gradient_share_every == 2
    default = harness.make_trainer(MemCifSSLTrainer_share0p1, seed=0, initialize=False).share_controller
    assert (default.averaging, default.smoothing, default.rate) == ("mean", 0.1, 0.5)
    old_rule = type("MemCifSSLTrainer_share0p1_log", (MemCifSSLTrainer_share0p1,), {
        "share_averaging": "log", "share_smoothing": 0.25, "share_rate": 0.4, "share_weight_bounds": (1e-3, 7.0)})
    controller = harness.make_trainer(old_rule, seed=0, initialize=False).share_controller
    assert (controller.averaging, controller.smoothing, controller.rate) == ("log", 0.25, 0.4)
    assert (controller.min_weight, controller.max_weight, controller.target) == (1e-3, 7.0, TARGET)


def test_share_target_without_measurements_is_refused(folders):
    never = type("MeanTeacherTrainer_share0p1_never", (MeanTeacherTrainer_share0p1,), {"gradient_share_every": 0})
    with pytest.raises(ValueError, match=r"unsupervised_share_target 0.1 needs .*\(gradient_share_every > 0, is 0\)"):
        harness.make_trainer(never, seed=0, initialize=False)


def test_study_pairs_the_share_trainers_with_their_parents_twins():
    from nnunet_mmssl.cli.study import parse_pairs

    trainers = ["PlainSupervisedTrainer", "MeanTeacherTrainer_share0p05", "MemCifSupervisedTrainer",
                "MemCifSSLTrainer_share0p2"]
    assert parse_pairs([], trainers) == {"MeanTeacherTrainer_share0p05": "PlainSupervisedTrainer",
                                         "MemCifSSLTrainer_share0p2": "MemCifSupervisedTrainer"}


def _ddp_worker(rank: int, port: int, root: str) -> None:
    """One rank of a 2-process gloo run of MeanTeacherTrainer_share0p1 (each rank its own data)."""
    import os
    from datetime import timedelta

    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), nnUNet_n_proc_DA="0", nnUNet_compile="false")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    nnunet_trainer_module.DDP = lambda module, device_ids=None, **kwargs: nn.parallel.DistributedDataParallel(
        module, **kwargs)  # nnU-Net's DDP call without its CUDA-only device_ids
    harness.set_folders(root)
    torch.manual_seed(1000 + rank)
    trainer = MeanTeacherTrainer_share0p1(harness.plans(), "2d", 0, harness.DATASET_JSON.copy(), torch.device("cpu"))
    trainer.device, trainer.grad_scaler = torch.device("cpu"), None
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.initialize()
    trainer.gradient_share_every = 1
    outputs = harness.run_steps(trainer, harness.batches(trainer, seed=rank, count=3), seed=50 + rank)
    torch.save({"is_ddp": trainer.is_ddp, "controller": trainer.share_controller.state_dict(),
                "weights": [float(o["unsup_weight"]) for o in outputs],
                "sup_losses": [float(o["sup_loss"]) for o in outputs]}, os.path.join(root, f"rank{rank}.pth"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_steer_the_same_weight(tmp_path):
    """Each rank measures its own share; the ranks' mean steers one weight, so their weights never differ."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in range(2))
    assert zero["is_ddp"] and one["is_ddp"] and zero["sup_losses"] != one["sup_losses"]  # different data
    assert zero["controller"]["updates"] == 3 and zero["controller"] == one["controller"]
    assert zero["weights"] == one["weights"] and zero["weights"][2] > zero["weights"][0]

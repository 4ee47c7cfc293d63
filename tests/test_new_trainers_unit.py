import copy
import inspect
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from plans_fixtures import ARCH_2D, DATASET_JSON, PLANS

from nnunet_mmssl.architectures.mmf_mae import MMFMAEUNet
from nnunet_mmssl.trainers import (
    MeanTeacherTrainer,
    MMFMCMLSupervisedTrainer,
    MMFMCMLTrainer,
    MMFMCMLTrainer_baseline,
    MMFMCMLTrainer_MMF,
    MMFMCMLTrainer_MMF_MAE,
    MMFMCMLTrainer_MMF_MCML,
    MMSSLTrainerBase,
    PlainSupervisedTrainer,
    SSLTrainerBase,
)
from nnunet_mmssl.trainers import mean_teacher as mean_teacher_module

MMF_TRAINERS = [MMFMCMLTrainer, MMFMCMLTrainer_baseline, MMFMCMLTrainer_MMF, MMFMCMLTrainer_MMF_MAE,
                MMFMCMLTrainer_MMF_MCML, MMFMCMLSupervisedTrainer]
NEW_TRAINERS = MMF_TRAINERS + [MeanTeacherTrainer, PlainSupervisedTrainer]


@pytest.mark.parametrize("trainer", NEW_TRAINERS)
def test_init_signature_equals_nnunet(trainer):
    assert inspect.signature(trainer.__init__) == inspect.signature(nnUNetTrainer.__init__)
    assert isinstance(inspect.getattr_static(trainer, "build_network_architecture"), staticmethod)


def test_baselines_keep_nnunets_network_builder():
    """The baselines build exactly nnU-Net's network (same class, same parameters for the same seed); our builder
    only checks the plans' class names first (safe_load), so a foreign class is refused before import."""
    from nnunet_mmssl.safe_load import UnsafeModelError

    manager = PlansManager(copy.deepcopy(PLANS))
    config = manager.get_configuration("2d")
    torch.manual_seed(0)
    reference = nnUNetTrainer.build_network_architecture(manager, config, 2, 2, True)
    for trainer in (MeanTeacherTrainer, PlainSupervisedTrainer):
        assert trainer.set_deep_supervision_enabled is nnUNetTrainer.set_deep_supervision_enabled
        torch.manual_seed(0)
        network = trainer.build_network_architecture(manager, config, 2, 2, True)
        assert type(network) is type(reference)
        for (name, a), (other, b) in zip(network.state_dict().items(), reference.state_dict().items(), strict=True):
            assert name == other and torch.equal(a, b)
        bad = copy.deepcopy(PLANS)
        bad["configurations"]["2d"]["architecture"]["network_class_name"] = "collections.OrderedDict"
        bad_manager = PlansManager(bad)
        with pytest.raises(UnsafeModelError, match="collections.OrderedDict"):
            trainer.build_network_architecture(bad_manager, bad_manager.get_configuration("2d"), 2, 2, True)


@pytest.mark.parametrize("trainer,mmf,mae,mcml", [
    (MMFMCMLTrainer, True, True, True), (MMFMCMLTrainer_baseline, False, False, False),
    (MMFMCMLTrainer_MMF, True, False, False), (MMFMCMLTrainer_MMF_MAE, True, True, False),
    (MMFMCMLTrainer_MMF_MCML, True, False, True), (MMFMCMLSupervisedTrainer, True, True, False)])
def test_plans_with_network_builds_the_table2_variants(trainer, mmf, mae, mcml):
    plans = copy.deepcopy(PLANS)
    new_plans = MMSSLTrainerBase.plans_with_network(object.__new__(trainer), plans, "2d", DATASET_JSON)
    assert plans == PLANS
    manager = PlansManager(new_plans)
    config = manager.get_configuration("2d")
    assert config.network_arch_class_name == "nnunet_mmssl.architectures.mmf_mae.MMFMAEUNet"
    kwargs = config.network_arch_init_kwargs
    assert kwargs["modality_groups"] == [[1], [0]] and kwargs["use_mmf"] is mmf and kwargs["use_mae"] is mae
    assert trainer.use_mcml is mcml and trainer.use_unlabeled is mcml
    network = trainer.build_network_architecture(manager, config, 2, 2, enable_deep_supervision=False)
    assert isinstance(network, MMFMAEUNet)
    assert hasattr(network, "mmf") is mmf and hasattr(network, "mae") is mae
    assert network(torch.randn(1, 2, 16, 16)).shape == (1, 2, 16, 16)
    obj = object.__new__(trainer)
    obj.current_epoch = 0
    assert obj.current_unsupervised_weight() == (1.0 if mcml else 0.0)


def test_mmf_trainer_needs_two_groups():
    plans = copy.deepcopy(PLANS)
    plans["mmssl"]["modality_groups"] = [[0, 1]]
    manager = PlansManager(MMSSLTrainerBase.plans_with_network(object.__new__(MMFMCMLTrainer), plans, "2d",
                                                               DATASET_JSON))
    with pytest.raises(ValueError, match="exactly two modality groups"):
        MMFMCMLTrainer.build_network_architecture(manager, manager.get_configuration("2d"), 2, 2, False)


def nnunet_loss(deep_supervision: bool = True):
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(loss, [2 / 3, 1 / 3, 0]) if deep_supervision else loss


def targets(batch: int = 2):
    torch.manual_seed(3)
    full = (torch.rand(batch, 1, 16, 16) > 0.5).float()
    return [full, full[:, :, ::2, ::2], full[:, :, ::4, ::4]]


def test_mmf_unsupervised_loss_and_joint_step_reach_both_branches():
    manager = PlansManager(MMSSLTrainerBase.plans_with_network(object.__new__(MMFMCMLTrainer), PLANS, "2d",
                                                               DATASET_JSON))
    trainer = object.__new__(MMFMCMLTrainer)
    trainer.label_manager = SimpleNamespace(has_regions=False)
    trainer.device = torch.device("cpu")
    trainer.loss = nnunet_loss()
    trainer.network = MMFMCMLTrainer.build_network_architecture(manager, manager.get_configuration("2d"), 2, 2, True)
    trainer.network.return_heads = True
    # one voxel, two classes: p_a = (1/2, 1/2), p_b = (3/4, 1/4). Each direction's term mean((p - sg(q))^2) = 1/16.
    a = torch.zeros(1, 2, 1, 1, requires_grad=True)
    b = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1).requires_grad_()
    loss = trainer.unsupervised_loss([a, b], torch.zeros(1))
    assert loss.item() == pytest.approx(1 / 16 + 1 / 16)
    loss.backward()
    # head a is pulled only by its own term, towards the constant p_b: d/dz_a of mean((p_a - p_b)^2) = J_a (p_a - p_b)
    # with J_a = diag(p_a) - p_a p_a^T -> (-1/8, 1/8); likewise head b towards p_a -> (3/32, -3/32). Without the
    # stop-gradients each head would also get the other term's pull (twice these); without a term, zero.
    torch.testing.assert_close(a.grad.flatten(), torch.tensor([-1 / 8, 1 / 8]))
    torch.testing.assert_close(b.grad.flatten(), torch.tensor([3 / 32, -3 / 32]))
    sup, unsup = trainer.compute_losses(torch.randn(2, 2, 16, 16), targets(), torch.randn(2, 2, 16, 16))
    assert sup.ndim == 0 and unsup.item() > 0
    unsup.backward()
    for encoder in trainer.network.encoders:
        assert sum(p.grad.abs().sum() for p in encoder.parameters() if p.grad is not None) > 0
    no_mcml = object.__new__(MMFMCMLTrainer_MMF)
    with pytest.raises(RuntimeError, match="use_unlabeled = False"):
        no_mcml.unsupervised_loss([a, b], torch.zeros(1))


def plain_unet(seed: int = 0) -> PlainConvUNet:
    torch.manual_seed(seed)
    return get_network_from_plans(ARCH_2D["network_class_name"], ARCH_2D["arch_kwargs"],
                                  ARCH_2D["_kw_requires_import"], 2, 2, allow_init=True, deep_supervision=True)


def mean_teacher(seed: int = 0) -> MeanTeacherTrainer:
    trainer = object.__new__(MeanTeacherTrainer)
    trainer.network = plain_unet(seed)
    trainer.is_ddp = False
    trainer.device = torch.device("cpu")
    trainer.label_manager = SimpleNamespace(has_regions=False)
    trainer.loss = nnunet_loss()
    return trainer


def test_mean_teacher_settings_and_ramp():
    assert (MeanTeacherTrainer.ema_alpha, MeanTeacherTrainer.input_noise_std) == (0.99, 0.1)
    trainer = object.__new__(MeanTeacherTrainer)
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.iteration_in_epoch = 1000, 250, 0
    trainer.current_epoch = 0
    assert trainer.current_unsupervised_weight() == pytest.approx(0.1 * np.exp(-5))
    trainer.current_epoch = 40  # 4 % of nnU-Net's 1000 epochs
    assert trainer.current_unsupervised_weight() == pytest.approx(0.1)


def test_mean_teacher_losses_noise_and_gradients(monkeypatch):
    trainer = mean_teacher()
    trainer.teacher = trainer.make_teacher()
    noised, teacher_inputs = [], []
    real_noise = mean_teacher_module.gaussian_noise
    monkeypatch.setattr(mean_teacher_module, "gaussian_noise",
                        lambda x, std, clip: noised.append((x, std, clip)) or real_noise(x, std, clip))
    trainer.teacher.module.register_forward_pre_hook(lambda module, args: teacher_inputs.append(args[0]))
    data, unlabeled = torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    sup, unsup = trainer.compute_losses(data, targets(), unlabeled)
    assert len(noised) == 1 and noised[0][0] is unlabeled  # the labelled input is not noised
    assert noised[0][1:] == (0.1, None)
    assert len(teacher_inputs) == 1 and teacher_inputs[0] is unlabeled  # the teacher sees the clean input
    assert unsup.item() > 0 and sup.requires_grad and unsup.requires_grad
    unsup.backward()
    assert sum(p.grad.abs().sum() for p in trainer.network.parameters() if p.grad is not None) > 0
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.module.parameters())
    sup_only, zero = trainer.compute_losses(data, targets(), None)
    assert zero.item() == 0.0 and sup_only.requires_grad


def test_mean_teacher_ema_step_after_optimizer_step():
    trainer = mean_teacher()
    trainer.teacher = trainer.make_teacher()
    before = copy.deepcopy(trainer.teacher.module.state_dict())
    with torch.no_grad():
        for p in trainer.network.parameters():
            p.add_(1.0)
    trainer.after_optimizer_step()
    assert trainer.teacher.step == 1
    student = dict(trainer.network.named_parameters())
    for name, p in trainer.teacher.module.named_parameters():
        torch.testing.assert_close(p, 0.5 * before[name] + 0.5 * student[name])  # warm-up: decay 0.5 at step 1


def test_mean_teacher_checkpoint_round_trip():
    trainer = mean_teacher(seed=0)
    trainer.teacher = trainer.make_teacher()
    with torch.no_grad():
        for p in trainer.network.parameters():
            p.mul_(0.5)
    for _ in range(3):
        trainer.after_optimizer_step()
    state = trainer.checkpoint_extra_state()
    assert set(state) == {"teacher", "ema_step"} and state["ema_step"] == 3
    resumed = mean_teacher(seed=1)  # as after initialize(): a network, no teacher yet
    resumed.load_checkpoint_extra_state(copy.deepcopy(state))
    assert resumed.teacher.step == 3 and resumed._teacher_restored
    for (name, a), b in zip(trainer.teacher.module.state_dict().items(), resumed.teacher.module.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert not torch.equal(next(resumed.teacher.module.parameters()), next(resumed.network.parameters()))
    without_network = object.__new__(MeanTeacherTrainer)
    with pytest.raises(RuntimeError, match="after initialize"):
        without_network.load_checkpoint_extra_state(state)
    assert object.__new__(MeanTeacherTrainer).checkpoint_extra_state() == {}


def test_plain_supervised_trainer():
    trainer = mean_teacher()
    trainer.__class__ = PlainSupervisedTrainer
    assert PlainSupervisedTrainer.use_unlabeled is False
    sup, unsup = trainer.compute_losses(torch.randn(2, 2, 16, 16), targets(), None)
    assert sup.requires_grad and unsup.item() == 0.0
    trainer.current_epoch = 3
    assert trainer.current_unsupervised_weight() == 0.0


@pytest.mark.parametrize("with_state", [True, False])
def test_mean_teacher_load_checkpoint_restores_or_restarts_the_teacher(monkeypatch, with_state):
    source = mean_teacher(seed=0)
    source.teacher = source.make_teacher()
    source.teacher.step = 5
    state = source.checkpoint_extra_state()

    def fake_load(self, filename):  # SSLTrainerBase.load_checkpoint after nnU-Net loaded the student weights
        self.network.load_state_dict(plain_unet(seed=2).state_dict())
        if with_state:
            self.load_checkpoint_extra_state(state)

    monkeypatch.setattr(SSLTrainerBase, "load_checkpoint", fake_load)
    trainer = mean_teacher(seed=1)
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.teacher = trainer.make_teacher()  # made by initialize() from the not yet loaded student
    trainer.load_checkpoint("checkpoint_latest.pth")
    expected = source.teacher.module if with_state else trainer.network
    assert trainer.teacher.step == (5 if with_state else 0)
    for a, b in zip(trainer.teacher.module.state_dict().values(), expected.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_nnunet_finds_the_new_trainers_by_name(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_mmssl._ext_trainer_hook import EXT_TRAINER_FOLDER

    monkeypatch.setenv("nnUNet_extTrainer", EXT_TRAINER_FOLDER)
    for trainer in NEW_TRAINERS:
        assert recursive_find_trainer_class_by_name(trainer.__name__) is trainer

import copy
import inspect
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.training.logging.nnunet_logger import MetaLogger
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from plans_fixtures import DATASET_JSON, PLANS

from nnunet_mmssl.architectures import MemCifUNet
from nnunet_mmssl.dataloading import UnlabeledDataError, find_unlabeled_cases
from nnunet_mmssl.trainers import (
    MemCifSSLTrainer,
    MemCifSSLTrainer_noCIF,
    MemCifSSLTrainer_noMEM,
    MemCifSSLTrainer_plain,
    MemCifSupervisedTrainer,
    MMSSLTrainerBase,
)
from nnunet_mmssl.trainers.logging import MMSSLLocalLogger, register_log_keys

ALL_TRAINERS = [MemCifSSLTrainer, MemCifSSLTrainer_noCIF, MemCifSSLTrainer_noMEM, MemCifSSLTrainer_plain,
                MemCifSupervisedTrainer]


@pytest.mark.parametrize("trainer", ALL_TRAINERS)
def test_init_signature_equals_nnunet(trainer):
    assert inspect.signature(trainer.__init__) == inspect.signature(nnUNetTrainer.__init__)
    assert isinstance(inspect.getattr_static(trainer, "build_network_architecture"), staticmethod)


@pytest.mark.parametrize("configuration", ["2d", "2d_child"])
@pytest.mark.parametrize("trainer,mem,cif", [(MemCifSSLTrainer, True, True), (MemCifSSLTrainer_noMEM, False, True),
                                             (MemCifSSLTrainer_noCIF, True, False),
                                             (MemCifSSLTrainer_plain, False, False)])
def test_plans_with_network_builds_the_variant_without_mutating_input(trainer, mem, cif, configuration):
    plans = copy.deepcopy(PLANS)
    before = copy.deepcopy(plans)
    new_plans = MMSSLTrainerBase.plans_with_network(object.__new__(trainer), plans, configuration, DATASET_JSON)
    assert plans == before
    manager = PlansManager(new_plans)
    config = manager.get_configuration(configuration)
    assert config.network_arch_class_name.endswith("MemCifUNet")
    assert config.network_arch_init_kwargs["modality_groups"] == [[1], [0]]
    assert config.network_arch_init_kwargs["use_mem"] is mem and config.network_arch_init_kwargs["use_cif"] is cif
    network = trainer.build_network_architecture(manager, config, 2, 2, enable_deep_supervision=False)
    assert isinstance(network, MemCifUNet)
    assert hasattr(network, "mems") is mem and hasattr(network, "cif") is cif
    assert network(torch.randn(1, 2, 16, 16)).shape == (1, 2, 16, 16)


def test_stock_plans_are_refused_by_our_network_builder():
    manager = PlansManager(copy.deepcopy(PLANS))
    with pytest.raises(TypeError, match="not one of our multi-branch networks"):
        MemCifSSLTrainer.build_network_architecture(manager, manager.get_configuration("2d"), 2, 2, False)
    from nnunet_mmssl.trainers.dbdc import DBDCTrainer
    from nnunet_mmssl.trainers.smml import SMMLTrainer

    for trainer, expected in ((DBDCTrainer, "not DBDCUNet or DBDCResEncUNet. Use .*written by DBDCTrainer"),
                              (SMMLTrainer, "not SMMLNet. Use .*written by SMMLTrainer")):
        with pytest.raises(TypeError, match=f"The plans build PlainConvUNet, {expected}"):
            trainer.build_network_architecture(manager, manager.get_configuration("2d"), 2, 2, False)


def test_unknown_configuration_is_named():
    with pytest.raises(ValueError, match="'3d_fullres' is not in the plans"):
        MMSSLTrainerBase.plans_with_network(object.__new__(MemCifSSLTrainer), PLANS, "3d_fullres", DATASET_JSON)


def test_weights_and_losses_of_memcif():
    ssl = object.__new__(MemCifSSLTrainer)
    ssl.current_epoch = 0
    assert ssl.current_unsupervised_weight() == 0.01
    sup = object.__new__(MemCifSupervisedTrainer)
    sup.current_epoch = 5
    assert sup.current_unsupervised_weight() == 0.0


def test_logger_registration_checkpoint_and_plot(tmp_path):
    meta = MetaLogger(str(tmp_path), False)
    local = register_log_keys(meta, ("train_unsup_losses", "unsup_weights"))
    assert isinstance(meta.local_logger, MMSSLLocalLogger)
    with pytest.raises(RuntimeError, match="twice"):
        register_log_keys(meta, ("x",))
    for epoch in range(2):
        for key in local.my_fantastic_logging:
            value = [0.5] if key == "dice_per_class_or_region" else float(epoch + 1)
            if key != "ema_fg_dice":
                meta.log(key, value, epoch)
    meta.plot_progress_png(str(tmp_path))
    assert (tmp_path / "progress.png").stat().st_size > 0
    checkpoint = meta.get_checkpoint()
    assert checkpoint["unsup_weights"] == [1.0, 2.0]
    fresh = MetaLogger(str(tmp_path), True)
    register_log_keys(fresh, ("train_unsup_losses", "unsup_weights", "new_key"))
    fresh.load_checkpoint(checkpoint)
    assert fresh.get_value("unsup_weights", None) == [1.0, 2.0]
    # a key the checkpoint lacks (an older version's log) is NaN for its epochs, so the lists stay aligned
    assert len(fresh.get_value("new_key", None)) == 2 and np.isnan(fresh.get_value("new_key", None)).all()
    fresh.log("new_key", 0.25, 2)
    assert fresh.get_value("new_key", None)[2] == 0.25


def _write(path, shape=(4, 8, 8)):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.float32)), str(path))


def test_find_unlabeled_cases_and_errors(tmp_path):
    folder = tmp_path / "imagesUnlabeled"
    assert find_unlabeled_cases(str(tmp_path), DATASET_JSON) == {}
    folder.mkdir()
    for name in ("u1_0000.nii.gz", "u1_0001.nii.gz", "u2_0000.nii.gz", "u2_0001.nii.gz"):
        _write(folder / name)
    cases = find_unlabeled_cases(str(tmp_path), DATASET_JSON)
    assert list(cases) == ["u1", "u2"] and [os.path.basename(p) for p in cases["u1"]] == ["u1_0000.nii.gz",
                                                                                             "u1_0001.nii.gz"]
    _write(folder / "u3_0000.nii.gz")
    with pytest.raises(UnlabeledDataError, match=r"'u3'.*lacks channel\(s\) \[1\].*u3_0001.nii.gz"):
        find_unlabeled_cases(str(tmp_path), DATASET_JSON)
    (folder / "u3_0000.nii.gz").unlink()
    _write(folder / "u4_0002.nii.gz")
    with pytest.raises(UnlabeledDataError, match="channel index 2"):
        find_unlabeled_cases(str(tmp_path), DATASET_JSON)
    (folder / "u4_0002.nii.gz").unlink()
    _write(folder / "scan.nii.gz")
    with pytest.raises(UnlabeledDataError, match="scan.nii.gz does not follow"):
        find_unlabeled_cases(str(tmp_path), DATASET_JSON)


def test_missing_unlabelled_folder_message(tmp_path):
    from nnunet_mmssl.dataloading.unlabeled_loader import open_unlabeled_dataset

    with pytest.raises(UnlabeledDataError, match="nnUNetv2_mmssl_plan_and_preprocess"):
        open_unlabeled_dataset(str(tmp_path / "nnUNetPlans_2d_unlabeled"))

"""Memory budgets: each trainer's step estimate, the budgeted planner, data sharing, and the trainers' check."""

import copy
import json

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from plans_fixtures import ARCH_2D, DATASET_JSON, PLANS

from nnunet_mmssl.planners.memory import (
    MMSSLExperimentPlanner,
    network_feature_map_size,
    share_preprocessed_data,
    step_feature_map_size,
)
from nnunet_mmssl.trainers import (
    MeanTeacherTrainer,
    MemCifSSLTrainer,
    MemCifSupervisedTrainer,
    MMFMCMLTrainer,
    PlainSupervisedTrainer,
)
from nnunet_mmssl.trainers.registry import resolve_trainer_class

GROUPS = [[0], [1]]
PATCH = [16, 16]


def _step(trainer, batch_size=1):
    return step_feature_map_size(trainer, ARCH_2D, GROUPS, PATCH, 2, 2, batch_size)


def test_step_estimates_count_networks_and_streams():
    plain = network_feature_map_size(ARCH_2D, PATCH, 2, 2)
    assert plain > 0
    assert _step(PlainSupervisedTrainer) == plain
    # the teacher's forward runs without gradient: only the student's labelled + unlabelled samples count
    assert _step(MeanTeacherTrainer) == 2 * plain
    memcif = _step(MemCifSupervisedTrainer)
    assert memcif > 2 * plain  # two encoders and decoders plus MEM / CIF maps
    assert _step(MemCifSSLTrainer) == 2 * memcif
    assert _step(MemCifSSLTrainer, batch_size=3) == 6 * memcif
    assert _step(MMFMCMLTrainer) > _step(MemCifSSLTrainer)  # fusion at every stage


def test_fixed_unlabelled_batch_is_counted_as_it_is():
    class FixedUnlabelled(MemCifSSLTrainer):
        unlabeled_batch_size = 1

    assert _step(FixedUnlabelled, batch_size=4) == pytest.approx(_step(MemCifSupervisedTrainer, batch_size=5))


def test_resolve_trainer_class():
    assert resolve_trainer_class("MemCifSSLTrainer") is MemCifSSLTrainer
    assert resolve_trainer_class("nnUNetTrainer").__name__ == "nnUNetTrainer"
    with pytest.raises(ValueError, match="NoSuchTrainer"):
        resolve_trainer_class("NoSuchTrainer")


def test_planner_sizes_classes_and_leaves_names_to_the_caller():
    # the planner does not import the trainers (tests/test_import_graph.py): a name needs the caller's resolver
    with pytest.raises(TypeError, match=r"\['MemCifSSLTrainer'\] but no resolve_trainer"):
        MMSSLExperimentPlanner(931, 0.3, budget_trainers=(MeanTeacherTrainer, "MemCifSSLTrainer"))


def test_share_preprocessed_data_only_where_preprocessing_is_identical():
    base = copy.deepcopy(PLANS)
    ours = copy.deepcopy(PLANS)
    ours["configurations"]["2d"]["data_identifier"] = "nnUNetMMSSLPlans_2d"
    ours["configurations"]["2d"]["batch_size"] = 1
    shared, own = share_preprocessed_data(ours, base)
    assert shared["configurations"]["2d"]["data_identifier"] == "nnUNetPlans_2d" and own == []
    assert ours["configurations"]["2d"]["data_identifier"] == "nnUNetMMSSLPlans_2d", "input must not be modified"
    ours["configurations"]["2d"]["spacing"] = [2.0, 2.0]
    shared, own = share_preprocessed_data(ours, base)
    assert shared["configurations"]["2d"]["data_identifier"] == "nnUNetMMSSLPlans_2d" and own == ["2d"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A phantom planned by nnU-Net (nnUNetPlans) and by our budgeted planner, with a small GPU memory target so
    that memory, not the image size, limits the plans."""
    from nnunet_mmssl.dataset_conversion import PHANTOM_LABEL_GLOB, PHANTOM_MODALITY_GLOBS, convert_dataset
    from nnunet_mmssl.dataset_conversion.phantom import make_phantom_cases
    from nnunet_mmssl.planners.plan_and_preprocess import plan_and_preprocess

    root = tmp_path_factory.mktemp("memplan")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_raw", str(root / "raw"))
        mp.setenv("nnUNet_preprocessed", str(root / "pre"))
        mp.setenv("nnUNet_results", str(root / "results"))
        src = make_phantom_cases(root / "phantom", num_labeled=3, num_unlabeled=1, shape=(16, 64, 64), seed=5)
        convert_dataset([str(src / "labeled"), str(src / "unlabeled")], PHANTOM_MODALITY_GLOBS, PHANTOM_LABEL_GLOB,
                        str(root / "raw"), 931, "MemPlan", num_labeled=3, num_test=0, seed=0)
        messages = []
        plan_and_preprocess(931, ["2d", "3d_fullres"], num_processes=1, gpu_memory_target_in_gb=0.3,
                            preprocess=False, progress=messages.append)
        folder = root / "pre" / "Dataset931_MemPlan"
        plans = json.loads((folder / "nnUNetPlans.json").read_text())
        mmssl = json.loads((folder / "nnUNetMMSSLPlans.json").read_text())
        planner = MMSSLExperimentPlanner(931, 0.3, resolve_trainer=resolve_trainer_class)
        yield plans, mmssl, planner, messages


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_budgeted_plans_fit_every_budget_trainer(planned, configuration):
    plans, mmssl, _, _ = planned
    record = mmssl["mmssl"]["memory"][configuration]
    assert record["budget_trainers"] == ["MeanTeacherTrainer", "MemCifSSLTrainer", "MMFMCMLTrainer"]
    budget = record["feature_map_budget"]
    ours = PlansManager(mmssl).get_configuration(configuration)
    stock = PlansManager(plans).get_configuration(configuration)
    channels, classes = 2, 2
    for trainer in (MeanTeacherTrainer, MemCifSSLTrainer, MMFMCMLTrainer):
        need = step_feature_map_size(trainer, mmssl["configurations"][configuration]["architecture"], GROUPS,
                                     ours.patch_size, channels, classes, ours.batch_size)
        # nnU-Net's rule with its rounding of the batch size: estimate * batch <= reference * ref_bs (+ half a sample)
        assert need <= budget * (ours.batch_size + 0.5) / ours.batch_size
        on_stock = step_feature_map_size(trainer, plans["configurations"][configuration]["architecture"], GROUPS,
                                         stock.patch_size, channels, classes, stock.batch_size)
        # 3d is memory-bound here (the planner shrinks the patch); the tiny 2d slices are bound by nnU-Net's
        # minimum batch size and 5 %-of-the-dataset rule in both plans
        assert on_stock > need if configuration == "3d_fullres" else on_stock >= need
    assert MMFMCMLTrainer.__name__ in " ".join(planned[3])
    assert planned[2].budget_trainers == [MeanTeacherTrainer, MemCifSSLTrainer, MMFMCMLTrainer]  # names resolved
    # the plain network on nnU-Net's own plans is what nnU-Net budgets: within the same reference
    plain = network_feature_map_size(plans["configurations"][configuration]["architecture"], stock.patch_size,
                                     channels, classes) * stock.batch_size
    assert plain <= budget * (stock.batch_size + 0.5) / stock.batch_size


def test_budgeted_plans_share_nnunet_data_and_keep_nnunet_plans(planned):
    plans, mmssl, _, _ = planned
    for configuration in ("2d", "3d_fullres"):
        assert mmssl["configurations"][configuration]["data_identifier"] == f"nnUNetPlans_{configuration}"
    assert "memory" not in plans["mmssl"], "nnU-Net's own plans stay nnU-Net's"
    assert plans["plans_name"] == "nnUNetPlans" and mmssl["plans_name"] == "nnUNetMMSSLPlans"


def test_trainer_memory_check_warns_on_stock_plans_and_not_on_budgeted(planned, tmp_path, monkeypatch, capsys):
    plans, mmssl, _, _ = planned
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    dataset_json = dict(DATASET_JSON, channel_names={"0": "MRA", "1": "MRB"})
    results = {}
    for name, p in (("stock", plans), ("budgeted", mmssl)):
        trainer = MemCifSSLTrainer(dict(p, continue_training=False), "3d_fullres", 0, dataset_json,
                                   device=torch.device("cpu"))
        # what initialize() sets, without the preprocessed data it also looks for
        trainer.num_input_channels, trainer.batch_size = 2, trainer.configuration_manager.batch_size
        trainer.network = trainer.build_network_architecture(
            trainer.plans_manager, trainer.configuration_manager, 2, 2, True)
        results[name] = trainer.memory_check()
    out = capsys.readouterr().out
    assert results["stock"]["ratio"] > 3 and "what nnU-Net planned" in results["stock"]["source"]
    assert "-p nnUNetMMSSLPlans" in out and out.count("WARNING: one step of MemCifSSLTrainer") == 1
    assert results["budgeted"]["ratio"] <= 1.25 and "nnUNetMMSSLPlans" in results["budgeted"]["source"]


def test_dbdc_step_counts_every_modality_and_both_perturbed_batches():
    from nnunet_mmssl.trainers import DBDCSupervisedTrainer, DBDCTrainer, DBDCTrainer_lossIpc

    plain = network_feature_map_size(ARCH_2D, PATCH, 1, 2)
    voxels = PATCH[0] * PATCH[1]

    def step(trainer, modalities):
        return step_feature_map_size(trainer, ARCH_2D, [[0]], PATCH, 1, 2, modalities=modalities)

    # per sample: the plain U-Net's maps + the projector's full-resolution maps (inputs of 3 decoder stages + 3 x D)
    one = step(DBDCSupervisedTrainer, ["CT"])
    assert one > plain
    assert step(DBDCSupervisedTrainer, ["CT", "MR"]) == 2 * one  # one labelled batch per modality
    # + an image-perturbed and a feature-perturbed unlabelled batch per modality (the pseudo-label pass stores nothing)
    assert step(DBDCTrainer, ["CT", "MR"]) == 2 * 3 * one
    assert step(DBDCTrainer_lossIpc, ["CT", "MR", "T1", "T2"]) == 4 * 2 * one
    projector = one - plain
    assert projector % voxels == 0 and projector // voxels >= 3 * DBDCTrainer.embedding_dim


def test_smml_step_counts_both_branches_of_k_encoders():
    from nnunet_mmssl.trainers import SMMLTrainer, SMMLTrainer_single

    plain = network_feature_map_size(ARCH_2D, PATCH, 2, 2)
    dual = _step(SMMLTrainer)
    single = _step(SMMLTrainer_single)
    assert dual == 2 * single  # two identical branches, one labelled batch (SMML is supervised)
    assert single > plain  # K narrow encoders + fusion + nnU-Net's decoder exceed one plain U-Net
    assert resolve_trainer_class("SMMLTrainer") is SMMLTrainer

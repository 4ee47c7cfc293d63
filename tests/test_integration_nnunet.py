"""End to end through nnU-Net's real console scripts on a tiny phantom (slow: a few minutes on 2 CPU cores).

convert -> plan/preprocess (2d, 3d_fullres; once per session, tests/phantom_workspace.py) -> nnUNetv2_train (a
user's own subclass of MemCifSSLTrainer, found through nnUNet_extTrainer next to ours) -> --c resume ->
nnUNetv2_predict / nnUNetv2_mmssl_predict --head -> nnUNetv2_mmssl_evaluate.

For CI's time budget the trainers train in 2d only, and only those whose console path is covered nowhere else:
MemCifSSLTrainer's networks in 3d are run by tests/test_architectures.py (every multi-branch network in 3d) and
tests/test_compile.py (MemCifSSLTrainer 3d_fullres steps, compiled and eager); MeanTeacherTrainer trains through
nnUNetv2_train in tests/test_resume.py (its unsupervised losses and its teacher asserted there) and
PlainSupervisedTrainer in tests/test_study.py's end-to-end study (train, predict, score), with its zero
unsupervised term in tests/test_new_trainers_unit.py::test_plain_supervised_trainer.
"""

import json
import os
import textwrap

import phantom_workspace
import pytest
import torch
from console_harness import console_environment, run_consoles
from console_harness import run_console as _run

pytestmark = pytest.mark.slow

DATASET_ID = phantom_workspace.DATASET_ID
USER_TRAINERS = textwrap.dedent('''
    import torch
    from nnunet_mmssl.trainers import MemCifSSLTrainer, MMFMCMLTrainer


    def _short(trainer):
        trainer.num_epochs = 2
        trainer.num_iterations_per_epoch = 2
        trainer.num_val_iterations_per_epoch = 1


    class MemCifSSLTrainer_itest(MemCifSSLTrainer):
        """A user's own variant in their own folder: 2 epochs of 2 iterations."""

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            _short(self)


    class MMFMCMLTrainer_itest(MMFMCMLTrainer):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            _short(self)


''')




@pytest.fixture(scope="module")
def workspace(tmp_path_factory, planned_phantom):
    root = tmp_path_factory.mktemp("itest")
    env = console_environment(root, "my_trainers.py", USER_TRAINERS)
    phantom_workspace.copy_into(planned_phantom, root)
    return root, env


@pytest.fixture(scope="module")
def trained(workspace):
    """MemCifSSLTrainer_itest and MMFMCMLTrainer_itest (2d) through nnUNetv2_train, both at once (CI's time budget:
    each command's start -- importing torch and nnU-Net -- runs on one core)."""
    root, env = workspace
    run_consoles([["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", name, "-device", "cpu"]
                  for name in ("MemCifSSLTrainer_itest", "MMFMCMLTrainer_itest")], env)
    return root, env


def test_plans_and_unlabelled_preprocessing(workspace):
    root, _ = workspace
    pre = root / "preprocessed" / "Dataset901_ITest"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert plans["mmssl"]["modality_groups"] == [[0], [1]]
    # nnU-Net's own configurations are untouched: stock trainers see the plans they always see
    assert plans["configurations"]["2d"]["architecture"]["network_class_name"].endswith("PlainConvUNet")
    for configuration in ("2d", "3d_fullres"):
        labelled = sorted(p.name for p in (pre / f"nnUNetPlans_{configuration}").glob("*.pkl"))
        unlabelled = sorted(p.name for p in (pre / f"nnUNetPlans_{configuration}_unlabeled").glob("*.pkl"))
        assert len(labelled) == 3 and len(unlabelled) == 3
        assert not set(labelled) & set(unlabelled)
    # the memory-budgeted plans for our trainers share nnU-Net's preprocessed data (same spacing, normalisation)
    mmssl = json.loads((pre / "nnUNetMMSSLPlans.json").read_text())
    assert {c: mmssl["configurations"][c]["data_identifier"] for c in ("2d", "3d_fullres")} == \
        {"2d": "nnUNetPlans_2d", "3d_fullres": "nnUNetPlans_3d_fullres"}
    assert set(mmssl["mmssl"]["memory"]) >= {"2d", "3d_fullres"}
    assert not (pre / "nnUNetMMSSLPlans_2d").exists()
    fingerprint = json.loads((pre / "dataset_fingerprint.json").read_text())
    assert len(fingerprint["spacings"]) == 3, "the fingerprint must come from the labelled cases only"


def test_train_predict_evaluate(trained):
    root, env = trained
    configuration = "2d"
    model = root / "results" / "Dataset901_ITest" / f"MemCifSSLTrainer_itest__nnUNetPlans__{configuration}"
    fold = model / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "progress.png").is_file()
    assert (fold / "validation" / "summary.json").is_file(), "nnU-Net's final validation must run"
    plans = json.loads((model / "plans.json").read_text())
    arch = plans["configurations"][configuration]["architecture"]
    assert arch["network_class_name"] == "nnunet_mmssl.architectures.multi_branch.MemCifUNet"
    assert arch["arch_kwargs"]["modality_groups"] == [[0], [1]] and arch["arch_kwargs"]["use_mem"] is True
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = checkpoint["logging"]
    assert len(logging["train_unsup_losses"]) == 2 and all(v > 0 for v in logging["train_unsup_losses"])
    assert logging["unsup_weights"] == [0.01, 0.01]
    assert checkpoint["current_epoch"] == 2

    raw = root / "raw" / "Dataset901_ITest"
    out = root / f"pred_{configuration}"
    head_out = root / f"pred_head_{configuration}"
    run_consoles([["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c",
                   configuration, "-f", "0", "-tr", "MemCifSSLTrainer_itest", "-device", "cpu", "--disable_tta",
                   "-npp", "1", "-nps", "1"],
                  ["nnUNetv2_mmssl_predict", "-i", str(raw / "imagesTs"), "-o", str(head_out), "-d", str(DATASET_ID),
                   "-c", configuration, "-f", "0", "-tr", "MemCifSSLTrainer_itest", "-device", "cpu", "--disable_tta",
                   "--head", "MRA", "-npp", "1", "-nps", "1"]], env)
    assert len(list(out.glob("*.nii.gz"))) == 2
    assert len(list(head_out.glob("*.nii.gz"))) == 2
    result = _run(["nnUNetv2_mmssl_evaluate", "-ref", str(raw / "labelsTs"), "-pred", str(out)], env)
    assert "Dice" in result.stdout
    summary = json.loads((out / "summary_mmssl.json").read_text())
    assert summary["n_cases"] == 2
    dice = summary["mean"]["1"]["dice"]
    assert dice is not None and 0.0 <= dice <= 1.0


def test_resume_restores_epoch_optimizer_and_logs(workspace, monkeypatch):
    """Train 1 epoch in-process, then resume with --c semantics into a 2-epoch run."""
    root, env = workspace
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA"):
        monkeypatch.setenv(key, env[key])
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_mmssl.trainers import MemCifSupervisedTrainer

    pre = root / "preprocessed" / "Dataset901_ITest"
    plans = load_json(str(pre / "nnUNetPlans.json"))
    dataset_json = load_json(str(pre / "dataset.json"))

    def make(epochs, continue_training):
        trainer = MemCifSupervisedTrainer({**plans, "continue_training": continue_training}, "2d", 1, dataset_json,
                                          torch.device("cpu"))
        trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = epochs, 2, 1
        trainer.save_every = 1
        trainer.perform_actual_validation = lambda *a, **k: None
        return trainer

    first = make(1, False)
    first.run_training()
    checkpoint_file = os.path.join(first.output_folder, "checkpoint_final.pth")
    saved = torch.load(checkpoint_file, map_location="cpu", weights_only=False)

    second = make(2, True)
    second.load_checkpoint(checkpoint_file)
    assert second.current_epoch == 1
    assert second.logger.get_value("train_sup_losses", step=None) == saved["logging"]["train_sup_losses"]
    state = second.optimizer.state_dict()
    assert state["state"].keys() == saved["optimizer_state"]["state"].keys()
    for key, value in saved["optimizer_state"]["state"].items():
        torch.testing.assert_close(state["state"][key]["momentum_buffer"], value["momentum_buffer"])
    second.run_training()
    assert len(second.logger.get_value("train_sup_losses", step=None)) == 2
    assert second.logger.get_value("unsup_weights", step=None) == [0.0, 0.0]


def test_mmfmcml_trains_predicts_and_each_head_is_scored(trained):
    root, env = trained
    name = "MMFMCMLTrainer_itest"
    fold = root / "results" / "Dataset901_ITest" / f"{name}__nnUNetPlans__2d" / "fold_0"
    assert (fold / "validation" / "summary.json").is_file()
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    unsup = checkpoint["logging"]["train_unsup_losses"]
    assert len(unsup) == 2 and all(v > 0 for v in unsup)
    raw = root / "raw" / "Dataset901_ITest"
    out = root / f"pred_{name}"
    heads = root / f"pred_heads_{name}"
    run_consoles([["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c",
                   "2d", "-f", "0", "-tr", name, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                  ["nnUNetv2_mmssl_predict", "-i", str(raw / "imagesTs"), "-o", str(heads), "-d", str(DATASET_ID),
                   "-c", "2d", "-f", "0", "-tr", name, "-device", "cpu", "--disable_tta", "--each-head", "-npp", "1",
                   "-nps", "1"]], env)
    assert len(list(out.glob("*.nii.gz"))) == 2
    # per-head evaluation, as in the paper's Table 2 (the evaluate console script is run above; here in-process)
    from nnunet_mmssl.cli.evaluate import main as evaluate

    assert sorted(p.name for p in heads.iterdir()) == ["fused", "head_0_MRA", "head_1_MRB"]
    for folder in heads.iterdir():
        assert evaluate(["-ref", str(raw / "labelsTs"), "-pred", str(folder)]) == 0
        assert json.loads((folder / "summary_mmssl.json").read_text())["n_cases"] == 2

"""End to end through nnU-Net's real console scripts on a tiny phantom (slow: a few minutes on 2 CPU cores).

convert -> plan/preprocess (2d, 3d_fullres) -> nnUNetv2_train (a user's own subclass of MemCifSSLTrainer, found
through nnUNet_extTrainer next to ours) -> --c resume -> nnUNetv2_predict / nnUNetv2_mmssl_predict --head ->
nnUNetv2_mmssl_evaluate.
"""

import json
import os
import textwrap

import pytest
import torch
from console_harness import console_environment
from console_harness import run_console as _run

pytestmark = pytest.mark.slow

DATASET_ID = 901
NEW_TRAINERS = ["MMFMCMLTrainer", "MeanTeacherTrainer", "PlainSupervisedTrainer"]
USER_TRAINERS = textwrap.dedent('''
    import torch
    from nnunet_mmssl.trainers import MemCifSSLTrainer, MeanTeacherTrainer, MMFMCMLTrainer, PlainSupervisedTrainer


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


    class MeanTeacherTrainer_itest(MeanTeacherTrainer):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            _short(self)


    class PlainSupervisedTrainer_itest(PlainSupervisedTrainer):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            _short(self)
''')




@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from nnunet_mmssl.dataset_conversion.phantom import make_phantom_cases

    root = tmp_path_factory.mktemp("itest")
    env = console_environment(root, "my_trainers.py", USER_TRAINERS)
    src = make_phantom_cases(root / "phantom", num_labeled=5, num_unlabeled=3, shape=(12, 32, 32),
                             spacing=(2.0, 1.0, 1.0), seed=3)
    _run(["nnUNetv2_mmssl_convert", "-i", str(src / "labeled"), str(src / "unlabeled"), "--modality", "MRA=MRA.nii.gz",
          "--modality", "MRB=MRB.nii.gz", "--label", "seg.nii.gz", "--num-labeled", "3", "--num-test", "2",
          "-d", str(DATASET_ID), "-n", "ITest", "-o", env["nnUNet_raw"]], env)
    _run(["nnUNetv2_mmssl_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-np", "1"], env)
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


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_train_predict_evaluate(workspace, configuration):
    root, env = workspace
    _run(["nnUNetv2_train", str(DATASET_ID), configuration, "0", "-tr", "MemCifSSLTrainer_itest", "-device", "cpu"],
         env)
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
    _run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c",
          configuration, "-f", "0", "-tr", "MemCifSSLTrainer_itest", "-device", "cpu", "--disable_tta", "-npp", "1",
          "-nps", "1"], env)
    assert len(list(out.glob("*.nii.gz"))) == 2
    head_out = root / f"pred_head_{configuration}"
    _run(["nnUNetv2_mmssl_predict", "-i", str(raw / "imagesTs"), "-o", str(head_out), "-d", str(DATASET_ID), "-c",
          configuration, "-f", "0", "-tr", "MemCifSSLTrainer_itest", "-device", "cpu", "--disable_tta",
          "--head", "MRA", "-npp", "1", "-nps", "1"], env)
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


@pytest.mark.parametrize("trainer", NEW_TRAINERS)
def test_new_trainers_train_and_predict(workspace, trainer):
    root, env = workspace
    name = f"{trainer}_itest"
    _run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", name, "-device", "cpu"], env)
    fold = root / "results" / "Dataset901_ITest" / f"{name}__nnUNetPlans__2d" / "fold_0"
    assert (fold / "validation" / "summary.json").is_file()
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    unsup = checkpoint["logging"]["train_unsup_losses"]
    if trainer == "PlainSupervisedTrainer":
        assert unsup == [0.0, 0.0]
    else:
        assert all(v > 0 for v in unsup)
    if trainer == "MeanTeacherTrainer":
        teacher = checkpoint["mmssl_state"]["teacher"]
        assert teacher.keys() == checkpoint["network_weights"].keys()
        assert any(not torch.equal(teacher[k], checkpoint["network_weights"][k]) for k in teacher)
    raw = root / "raw" / "Dataset901_ITest"
    out = root / f"pred_{name}"
    _run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c", "2d",
          "-f", "0", "-tr", name, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    assert len(list(out.glob("*.nii.gz"))) == 2
    if trainer == "MMFMCMLTrainer":  # per-head evaluation, as in the paper's Table 2
        heads = root / f"pred_heads_{name}"
        _run(["nnUNetv2_mmssl_predict", "-i", str(raw / "imagesTs"), "-o", str(heads), "-d", str(DATASET_ID), "-c",
              "2d", "-f", "0", "-tr", name, "-device", "cpu", "--disable_tta", "--each-head", "-npp", "1", "-nps",
              "1"], env)
        assert sorted(p.name for p in heads.iterdir()) == ["fused", "head_0_MRA", "head_1_MRB"]
        for folder in heads.iterdir():
            _run(["nnUNetv2_mmssl_evaluate", "-ref", str(raw / "labelsTs"), "-pred", str(folder)], env)
            assert json.loads((folder / "summary_mmssl.json").read_text())["n_cases"] == 2

"""SMML end to end through the console scripts (issue #12).

A tiny 4-channel brain-tumour-like set (T1, T1ce, T2, FLAIR; BraTS-like numbering with enhancing = 4) ->
``nnUNetv2_mmssl_convert --label-map 4=3 --regions WT TC ET`` -> priors for the training cases in ``priorsTr/`` ->
``nnUNetv2_mmssl_plan_and_preprocess`` (priors preprocessed beside the data) -> ``nnUNetv2_train -tr SMMLTrainer``
(a user's short subclass, 3d_fullres, priors read by the refinement network) -> ``nnUNetv2_mmssl_predict --missing``
with two channel files absent from the input folder -> ``nnUNetv2_mmssl_evaluate_missing`` over all 15 subsets.
"""

import json
import os
import shutil
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk
from console_harness import console_environment, run_consoles
from console_harness import run_console as _run

pytestmark = pytest.mark.slow

DATASET_ID = 913
NAME = "SMMLPhantom"
CHANNELS = ["T1", "T1ce", "T2", "FLAIR"]
USER_TRAINERS = textwrap.dedent('''
    import torch
    from nnunet_mmssl.trainers import SMMLTrainer


    class SMMLTrainer_itest(SMMLTrainer):
        """2 epochs of 2 iterations."""

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 2
            self.num_iterations_per_epoch = 2
            self.num_val_iterations_per_epoch = 1
''')




def _write_case(folder, rng, labelled: bool) -> None:
    """A lesion of three nested parts; each sequence shows some of them (as in BraTS) under noise."""
    shape = (8, 24, 24)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    centre = (rng.integers(3, 5), rng.integers(9, 15), rng.integers(9, 15))
    r = np.sqrt(((z - centre[0]) * 2.0) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    whole, core, enhancing = r < 7, r < 4.5, (r < 4.5) & (r > 2.5)
    seg = np.zeros(shape, np.uint8)
    seg[whole] = 1  # edema
    seg[core] = 2  # necrosis
    seg[enhancing] = 4  # enhancing, BraTS numbering
    brain = np.sqrt(((z - 4) * 2.0) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) < 12
    shows = {"T1": core, "T1ce": enhancing, "T2": whole & ~core, "FLAIR": whole}
    folder.mkdir(parents=True)
    for name in CHANNELS:
        image = brain * (100 + 80 * shows[name]) + rng.normal(0, 10, shape)
        item = sitk.GetImageFromArray(image.astype(np.float32))
        item.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(item, str(folder / f"{name}.nii.gz"))
    if labelled:
        item = sitk.GetImageFromArray(seg)
        item.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(item, str(folder / "seg.nii.gz"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("smml_itest")
    env = console_environment(root, "my_smml_trainers.py", USER_TRAINERS)
    rng = np.random.default_rng(3)
    for i in range(8):
        _write_case(root / "sources" / f"patient_{i}", rng, labelled=i < 6)
    _run(["nnUNetv2_mmssl_convert", "-i", str(root / "sources"),
          *[a for name in CHANNELS for a in ("--modality", f"{name}={name}.nii.gz")], "--label", "seg.nii.gz",
          "--labels", "background=0", "edema=1", "necrosis=2", "enhancing=3", "--label-map", "1=1", "2=2", "4=3",
          "--regions", "WT=1,2,3", "TC=2,3", "ET=3", "--num-labeled", "4", "--num-test", "2", "-d", str(DATASET_ID),
          "-n", NAME], env)
    raw = root / "raw" / f"Dataset{DATASET_ID:03d}_{NAME}"
    priors = raw / "priorsTr"
    priors.mkdir()
    for label_file in (raw / "labelsTr").iterdir():  # a "zero-shot" prior per sequence: the whole tumour, blurred
        label = sitk.ReadImage(str(label_file))
        prior = sitk.Cast(sitk.SmoothingRecursiveGaussian(sitk.Cast(label > 0, sitk.sitkFloat32), 1.0),
                          sitk.sitkFloat32)
        prior = sitk.Clamp(prior, sitk.sitkFloat32, 0.0, 1.0)
        case = label_file.name[:-len(".nii.gz")]
        for c in range(len(CHANNELS)):
            sitk.WriteImage(prior, str(priors / f"{case}_{c:04d}.nii.gz"))
    _run(["nnUNetv2_mmssl_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2"], env)
    pre = root / "preprocessed" / f"Dataset{DATASET_ID:03d}_{NAME}"
    # a copy whose second prior is off its image's grid, planned while the training runs (CI's time budget)
    bad = root / "raw" / f"Dataset{DATASET_ID + 1:03d}_{NAME}Bad"
    shutil.copytree(raw, bad)
    bad_prior = sorted((bad / "priorsTr").iterdir())[1]
    item = sitk.GetImageFromArray(np.zeros((8, 24, 20), np.float32))
    item.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(item, str(bad_prior))
    trained, bad_plan = run_consoles([
        ["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", "SMMLTrainer_itest", "-device", "cpu"],
        ["nnUNetv2_mmssl_plan_and_preprocess", "-d", str(DATASET_ID + 1), "-c", "3d_fullres", "-np", "2"]], env,
        ok=False)
    assert trained.returncode == 0, f"{trained.stdout[-3000:]}\n{trained.stderr[-3000:]}"
    model = root / "results" / f"Dataset{DATASET_ID:03d}_{NAME}" / "SMMLTrainer_itest__nnUNetPlans__3d_fullres"
    return {"root": root, "env": env, "raw": raw, "pre": pre, "model": model, "bad": bad, "bad_prior": bad_prior,
            "bad_plan": bad_plan}


def test_regions_and_priors_are_preprocessed_beside_the_data(workspace):
    raw, pre = workspace["raw"], workspace["pre"]
    dataset_json = json.loads((raw / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}
    assert list(dataset_json["channel_names"].values()) == CHANNELS
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    identifier = plans["configurations"]["3d_fullres"]["data_identifier"]
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dataset = infer_dataset_class(str(pre / identifier))(str(pre / identifier))
    assert len(dataset.identifiers) == 4
    for case in dataset.identifiers:
        data, seg, _, _ = dataset.load_case(case)
        priors = np.load(pre / f"{identifier}_priors" / f"{case}.npy")
        assert priors.shape == (4, *data.shape[1:])
        assert 0 <= priors.min() and priors.max() <= 1
        tumour = np.asarray(seg[0]) > 0  # the prior (blurred whole tumour) sits on the preprocessed label
        assert priors[0][tumour].mean() > 0.6 and priors[0][~tumour].mean() < 0.2


def test_a_prior_off_its_image_grid_stops_preprocessing_before_anything_is_written(workspace):
    """``nnUNetv2_mmssl_plan_and_preprocess`` on the copy with a prior off its grid (run by the fixture)."""
    root, other, bad, result = workspace["root"], workspace["bad"], workspace["bad_prior"], workspace["bad_plan"]
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and bad.name in message[0] and "image grid" in message[0]
    assert not (root / "preprocessed" / other.name).exists()


def test_smml_trains_with_priors(workspace):
    model = workspace["model"]
    log = "".join(p.read_text() for p in (model / "fold_0").glob("training_log_*.txt"))
    assert "SRN priors from" in log
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    summary = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    assert len(summary["mean"]) == 3  # nnU-Net's final validation scores the three regions


def test_predict_with_two_channel_files_absent(workspace):
    root, raw, env = workspace["root"], workspace["raw"], workspace["env"]
    images = root / "input_missing"
    shutil.copytree(raw / "imagesTs", images)
    for f in list(images.iterdir()):
        if f.name.endswith(("_0001.nii.gz", "_0002.nii.gz")):  # no T1ce, no T2: the patient has no such file
            f.unlink()
    out = root / "pred_missing"
    base = ["nnUNetv2_mmssl_predict", "-i", str(images), "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "0",
            "-tr", "SMMLTrainer_itest", "-device", "cpu", "--disable_tta"]
    # both at once (CI's time budget): without --missing the absent files are an error that names the fix
    refused, done = run_consoles([base + ["-o", str(root / "pred_refused")],
                                  base + ["-o", str(out), "--missing", "T1ce", "T2"]], env, ok=False)
    assert refused.returncode != 0 and "--missing" in refused.stderr + refused.stdout
    assert not list((root / "pred_refused").glob("*.nii.gz")) if (root / "pred_refused").exists() else True
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    cases = sorted(f.name for f in (raw / "labelsTs").iterdir())
    assert sorted(f.name for f in out.iterdir() if f.name.endswith(".nii.gz")) == cases
    reference = sitk.ReadImage(str(raw / "labelsTs" / cases[0]))
    prediction = sitk.ReadImage(str(out / cases[0]))
    assert prediction.GetSize() == reference.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(prediction)).tolist()) <= {0, 1, 2, 3}


def test_every_subset_is_evaluated(workspace, capsys, monkeypatch):
    root, raw, env = workspace["root"], workspace["raw"], workspace["env"]
    out = root / "missing_eval"
    cmd = ["nnUNetv2_mmssl_evaluate_missing", "-i", str(raw / "imagesTs"), "-ref", str(raw / "labelsTs"), "-o",
           str(out), "-m", str(workspace["model"]), "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "0"]
    _run(cmd, env)
    result = json.loads((out / "missing_modalities.json").read_text())
    assert result["channels"] == CHANNELS and result["regions"] == ["WT", "TC", "ET"]
    assert len(result["subsets"]) == 15 and result["n_cases"] == 2
    assert (out / "missing_modalities_dice.png").stat().st_size > 0
    table = (out / "missing_modalities.txt").read_text()
    assert all(region in table for region in ("WT", "TC", "ET"))
    # resumable: every finished subset is kept (the rerun in-process: nothing to import or predict again)
    from nnunet_mmssl.cli.evaluate_missing import main as evaluate_missing

    # the user's trainer folder, as the console script's environment has it
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([env["nnUNet_extTrainer"],
                                                             os.environ.get("nnUNet_extTrainer", "")]))
    capsys.readouterr()
    assert evaluate_missing(cmd[1:]) == 0
    assert "15 subset(s) already complete" in capsys.readouterr().out

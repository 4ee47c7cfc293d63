"""Unregistered path end to end through the console scripts (issue #11).

CT-like cases of some "patients" (lesion labelled 5) and MR-like cases of others (lesion labelled 1), each modality
with its own grid and spacing: ``nnUNetv2_mmssl_convert --source-modality`` (label map CT:5=1) ->
``nnUNetv2_mmssl_plan_and_preprocess`` -> ``nnUNetv2_train -tr DBDCTrainer`` (a user's short subclass, 2d) -> plain
``nnUNetv2_predict`` refused with the modality message -> ``nnUNetv2_mmssl_predict --modality`` /
``--modalities-from`` -> ``nnUNetv2_mmssl_evaluate --modalities-from`` (per-modality rows).

2d only (CI's time budget): nothing on this path depends on the dimension but the networks, whose 3d forms are run
elsewhere -- DBDCTrainer's real 3d steps on plain plans in tests/test_device_script.py (the unregistered phantom),
DBDCTrainer 3d_fullres trained and predicted from its model folder by nnU-Net's predictor in
tests/test_resenc_dbdc_smml.py, the DBDC blocks in 3d in tests/test_dbdc_blocks.py.
"""

import json
import shutil
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk
from console_harness import console_environment, run_consoles
from console_harness import run_console as _run

pytestmark = pytest.mark.slow

DATASET_ID = 911
USER_TRAINERS = textwrap.dedent('''
    import torch
    from nnunet_mmssl.trainers import DBDCTrainer


    class DBDCTrainer_itest(DBDCTrainer):
        """2 epochs of 2 iterations."""

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 2
            self.num_iterations_per_epoch = 2
            self.num_val_iterations_per_epoch = 1
''')




@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from nnunet_mmssl.dataset_conversion.unregistered_phantom import make_unregistered_phantom_sources

    root = tmp_path_factory.mktemp("dbdc_itest")
    env = console_environment(root, "my_dbdc_trainers.py", USER_TRAINERS)
    # small volumes with each modality's own grid, spacing and label numbering
    geometry = {"CT": ((10, 32, 32), (2.5, 1.2, 1.2), 5), "MR": ((8, 28, 28), (3.0, 1.4, 1.4), 1)}
    src = make_unregistered_phantom_sources(root / "sources", num_labeled=4, num_unlabeled=2, seed=5,
                                            geometry=geometry)
    _run(["nnUNetv2_mmssl_convert", "-i", str(src / "CT"), str(src / "MR"), "--source-modality", "CT", "MR",
          "--image", "image.nii.gz", "--label", "label.nii.gz", "--label-map", "CT:5=1", "--labels", "background=0",
          "lesion=1", "--num-labeled", "3", "--num-test", "1", "-d", str(DATASET_ID), "-n", "DBDCPhantom"], env)
    raw = root / "raw" / f"Dataset{DATASET_ID:03d}_DBDCPhantom"
    _run(["nnUNetv2_mmssl_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "2"], env)
    return {"root": root, "env": env, "raw": raw,
            "pre": root / "preprocessed" / f"Dataset{DATASET_ID:03d}_DBDCPhantom"}


def test_conversion_and_planning_per_modality(workspace):
    raw, pre = workspace["raw"], workspace["pre"]
    dataset_json = json.loads((raw / "dataset.json").read_text())
    block = dataset_json["mmssl"]
    assert dataset_json["channel_names"] == {"0": "CT+MR"}
    assert block["layout"] == "unregistered" and block["modalities"] == ["CT", "MR"]
    assert block["intensity_schemes"] == {"CT": "CTNormalization", "MR": "ZScoreNormalization"}
    written = {f.name[:-len("_0000.nii.gz")] for sub in ("imagesTr", "imagesTs", "imagesUnlabeled")
               for f in (raw / sub).iterdir()}
    assert written == set(block["case_modality"])
    for label in (raw / "labelsTr").iterdir():  # CT's 5 mapped onto the shared label 1
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label))))) <= {0, 1}
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    properties = plans["mmssl"]["modality_intensity_properties"]
    assert properties["CT"]["source"].endswith("labelled CT cases")
    assert properties["CT"]["mean"] > 50  # the CT lesion's Hounsfield-like values (40 + 50), not MR's ~400
    splits = json.loads((pre / "splits_final.json").read_text())
    for fold in splits:  # stratified: both modalities validated in every fold
        assert {block["case_modality"][c] for c in fold["val"]} == {"CT", "MR"}


def test_train_predict_evaluate(workspace, tmp_path):
    env, raw = workspace["env"], workspace["raw"]
    configuration = "2d"
    _run(["nnUNetv2_train", str(DATASET_ID), configuration, "0", "-tr", "DBDCTrainer_itest", "-device", "cpu"], env)
    model = (workspace["root"] / "results" / f"Dataset{DATASET_ID:03d}_DBDCPhantom" /
             f"DBDCTrainer_itest__nnUNetPlans__{configuration}")
    fold = model / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    per_modality = json.loads((fold / "validation" / "summary_per_modality.json").read_text())
    assert set(per_modality) == {"CT", "MR"}
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "per-modality pseudo dice CT" in log and "MAW weights" in log

    # four independent commands at once (CI's time budget: their start is most of their time):
    # stock nnUNetv2_predict cannot pass the modality: refused with the fix, no output written;
    # our predictor: missing --modality is the same clear error (one line, exit 2);
    # one modality's folder with --modality, and the mixed test folder with --modalities-from
    case_modality = json.loads((raw / "dataset.json").read_text())["mmssl"]["case_modality"]
    ct_only = tmp_path / "ct_in"
    ct_only.mkdir()
    for image in (raw / "imagesTs").iterdir():
        if case_modality[image.name[:-len("_0000.nii.gz")]] == "CT":
            shutil.copy(image, ct_only / image.name)
    out = tmp_path / "pred"
    plain, missing, ct_run, mixed_run = run_consoles([
        ["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(tmp_path / "plain"), "-d", str(DATASET_ID), "-c",
         configuration, "-tr", "DBDCTrainer_itest", "-f", "0", "-device", "cpu"],
        ["nnUNetv2_mmssl_predict", "-i", str(raw / "imagesTs"), "-o", str(tmp_path / "none"), "-m", str(model), "-f",
         "0", "-device", "cpu"],
        ["nnUNetv2_mmssl_predict", "-i", str(ct_only), "-o", str(tmp_path / "ct_out"), "-m", str(model), "-f", "0",
         "-device", "cpu", "--modality", "CT"],
        ["nnUNetv2_mmssl_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-m", str(model), "-f", "0",
         "-device", "cpu", "--modalities-from", str(raw / "dataset.json")]], env, ok=False)
    assert plain.returncode != 0
    assert "--modality CT|MR" in plain.stdout + plain.stderr
    assert not list((tmp_path / "plain").glob("*.nii.gz")) if (tmp_path / "plain").exists() else True
    assert missing.returncode == 2 and "--modality CT|MR" in missing.stderr
    for done in (ct_run, mixed_run):
        assert done.returncode == 0, f"{done.args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert len(list((tmp_path / "ct_out").glob("*.nii.gz"))) == len(list(ct_only.iterdir()))
    predictions = sorted(p.name for p in out.glob("*.nii.gz"))
    assert predictions == sorted(p.name for p in (raw / "labelsTs").iterdir())
    # the CT prediction of the mixed run equals the CT-only run (same modality, same normalisation)
    for name in (p.name for p in (tmp_path / "ct_out").glob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ct_out" / name)))
        assert np.array_equal(a, b)
        reference = sitk.ReadImage(str(raw / "labelsTs" / name))
        assert sitk.ReadImage(str(out / name)).GetSize() == reference.GetSize()  # back on the case's own grid

    summary = tmp_path / "summary.json"
    evaluated = _run(["nnUNetv2_mmssl_evaluate", "-ref", str(raw / "labelsTs"), "-pred", str(out), "-o",
                      str(summary), "--modalities-from", str(raw / "mmssl_split.json")], env)
    assert "mean over modalities" in evaluated.stdout
    result = json.loads(summary.read_text())
    rows = result["per_modality"]["modalities"]
    assert set(rows) == {"CT", "MR"} and all(r["n_cases"] == 1 for r in rows.values())
    dice = [rows[m]["mean"]["1"]["dice"] for m in ("CT", "MR")]
    assert result["per_modality"]["mean_over_modalities"]["mean"]["1"]["dice"] == pytest.approx(np.mean(dice))

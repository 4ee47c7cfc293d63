"""Self-training (``nnUNetv2_mmssl_selftrain``): ignore-label arithmetic, the derived dataset, test-case exclusion,
resume and errors (fast, nnU-Net's training replaced); one end-to-end run through nnU-Net's own commands (slow)."""

import hashlib
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mmssl.semisup.selftrain import (
    MANIFEST,
    STATE_FILE,
    SelfTrainError,
    SelfTraining,
    ignore_label_value,
    mask_uncertain,
    normalised_entropy,
    with_ignore_label,
)
from nnunet_mmssl.semisup.uncertainty import predictive_entropy

LABELS = {"background": 0, "lesion": 1}
REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
SHAPE = (2, 4, 4)


# ---------------------------------------------------------------------------------------------- arithmetic
def test_ignore_label_placed_by_hand_computed_entropy():
    # four voxels, three classes; normalised entropy H / log 3 by hand:
    #   (1, 0, 0) -> 0;  (0.8, 0.1, 0.1) -> -(0.8 ln 0.8 + 0.2 ln 0.1) / ln 3 = 0.5820;
    #   (0.5, 0.5, 0) -> ln 2 / ln 3 = 0.6309;  (1/3, 1/3, 1/3) -> 1
    p = np.array([[1.0, 0.8, 0.5, 1 / 3], [0.0, 0.1, 0.5, 1 / 3], [0.0, 0.1, 0.0, 1 / 3]],
                 dtype=np.float32).reshape(3, 1, 2, 2)
    expected = np.array([0.0, -(0.8 * math.log(0.8) + 0.2 * math.log(0.1)) / math.log(3), math.log(2) / math.log(3),
                         1.0]).reshape(1, 2, 2)
    h = normalised_entropy(predictive_entropy(p, sigmoid=False), 3, sigmoid=False)
    np.testing.assert_allclose(h, expected, atol=1e-6)
    labels = {"background": 0, "a": 1, "b": 2}
    ignore = ignore_label_value(labels)
    assert ignore == 3
    segmentation = p.argmax(0)
    masked = mask_uncertain(segmentation, h, 0.6, ignore)
    assert masked.reshape(-1).tolist() == [0, 0, 3, 3]  # 0.582 kept, 0.631 and 1 ignored
    assert mask_uncertain(segmentation, h, 0.59, ignore).reshape(-1).tolist() == [0, 0, 3, 3]
    assert mask_uncertain(segmentation, h, 0.5, ignore).reshape(-1).tolist() == [0, 3, 3, 3]
    assert mask_uncertain(segmentation, h, 1.0, ignore).reshape(-1).tolist() == [0, 0, 0, 0]  # 1 ignores none
    assert segmentation.reshape(-1).tolist() == [0, 0, 0, 0]  # the input is not modified


def test_region_entropy_is_normalised_by_log_2_and_the_ignore_label_follows_nnunets_rules():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    # two regions, h(0.5) = ln 2, h(0.9) = -(0.9 ln 0.9 + 0.1 ln 0.1): mean over regions / ln 2
    p = np.array([[0.5, 0.9], [0.5, 0.5]], dtype=np.float32).reshape(2, 1, 2)
    h09 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    h = normalised_entropy(predictive_entropy(p, sigmoid=True), 2, sigmoid=True)
    np.testing.assert_allclose(h.reshape(-1), [1.0, (h09 + math.log(2)) / 2 / math.log(2)], atol=1e-6)
    assert ignore_label_value(REGIONS) == 4  # the highest integer of any region + 1
    labels = with_ignore_label(REGIONS)
    assert labels["ignore"] == 4 and "ignore" not in REGIONS  # a copy
    manager = LabelManager(labels, regions_class_order=[1, 2, 3])  # nnU-Net's own checks (highest, an integer)
    assert manager.has_ignore_label and manager.ignore_label == 4 and manager.has_regions
    assert manager.num_segmentation_heads == 3
    assert ignore_label_value({**REGIONS, "ignore": 4}) == 4  # an existing ignore label is kept


# ---------------------------------------------------------------------------------------------- the pipeline
def _write(array, path):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(path))


def _raw_dataset(root, labels=LABELS, regions_class_order=None):
    """Dataset900_Src: 3 labelled (lab_0..2), 3 unlabelled (unl_0..2), 1 in imagesTs."""
    raw = root / "raw" / "Dataset900_Src"
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs"):
        os.makedirs(raw / sub)
    rng = np.random.default_rng(0)
    top = max(v for value in labels.values() for v in (value if isinstance(value, list) else [value]))
    for k in range(3):
        for c in range(2):
            _write(rng.normal(size=SHAPE).astype(np.float32), raw / "imagesTr" / f"lab_{k}_{c:04d}.nii.gz")
            _write(rng.normal(size=SHAPE).astype(np.float32), raw / "imagesUnlabeled" / f"unl_{k}_{c:04d}.nii.gz")
        _write(rng.integers(0, top + 1, SHAPE).astype(np.uint8), raw / "labelsTr" / f"lab_{k}.nii.gz")
    for c in range(2):
        _write(rng.normal(size=SHAPE).astype(np.float32), raw / "imagesTs" / f"ts_0_{c:04d}.nii.gz")
    dataset_json = {"channel_names": {"0": "A", "1": "B"}, "labels": labels, "numTraining": 3, "numUnlabeled": 3,
                    "file_ending": ".nii.gz"}
    if regions_class_order:
        dataset_json["regions_class_order"] = regions_class_order
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    pre = root / "preprocessed" / "Dataset900_Src"
    os.makedirs(pre)
    (pre / "nnUNetPlans.json").write_text(json.dumps({"dataset_name": "Dataset900_Src", "plans_name": "nnUNetPlans",
                                                      "configurations": {"2d": {"batch_size": 2}}}))
    return raw


def _tree_hash(folder) -> str:
    digest = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(base, name)
            digest.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def _entropy_of(case: str) -> np.ndarray:
    """The fake teacher's normalised entropy of a case: voxel index / voxels (so a threshold t ignores the last
    (1 - t) of the voxels in C order)."""
    return (np.arange(np.prod(SHAPE), dtype=np.float32) / np.prod(SHAPE)).reshape(SHAPE)


class FakeSelfTraining(SelfTraining):
    """nnU-Net's training, prediction and preprocessing replaced by files; every call recorded."""

    calls: list = []
    fail_at: str | None = None

    def _call(self, what):
        type(self).calls.append(what)
        if type(self).fail_at == what:
            raise KeyboardInterrupt  # a kill in the middle of the stage

    def train(self, dataset_name, trainer, fold, log):
        self._call(f"train {dataset_name} {fold}")
        folder = self.model_folder_of(dataset_name, trainer)
        os.makedirs(os.path.join(folder, f"fold_{fold}"), exist_ok=True)
        open(os.path.join(folder, f"fold_{fold}", "checkpoint_final.pth"), "wb").close()
        with open(os.path.join(self.raw_root, dataset_name, "dataset.json")) as handle:
            (dataset_json := json.load(handle))
        for name, content in (("plans.json", {"configurations": {}}), ("dataset.json", dataset_json)):
            with open(os.path.join(folder, name), "w") as handle:
                json.dump(content, handle)

    def pseudolabel(self, model_folder, folds, input_folder, output):
        self._call(f"pseudolabel {os.path.basename(os.path.dirname(model_folder))} {','.join(folds)}")
        type(self).pool_seen = sorted(os.listdir(input_folder))
        with open(os.path.join(model_folder, "dataset.json")) as handle:
            labels = json.load(handle)["labels"]
        sigmoid = any(isinstance(v, list) for v in labels.values())
        outputs = len([k for k in labels if k not in ("background", "ignore")]) + (0 if sigmoid else 1)
        top = math.log(2) if sigmoid else math.log(outputs)
        for sub in ("labels", "uncertainty"):
            os.makedirs(os.path.join(output, sub), exist_ok=True)
        cases = sorted({f[:-len("_0000.nii.gz")] for f in os.listdir(input_folder)})
        for case in cases:
            _write(np.ones(SHAPE, np.uint8) * (3 if sigmoid else 1), os.path.join(output, "labels", case + ".nii.gz"))
            _write((_entropy_of(case) * top).astype(np.float32),
                   os.path.join(output, "uncertainty", case + "_entropy.nii.gz"))

    def preprocess(self, dataset_name, log, unlabeled):
        self._call(f"preprocess {dataset_name}")


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    FakeSelfTraining.calls, FakeSelfTraining.fail_at = [], None
    return tmp_path


def _run(tmp_path, **kwargs):
    kwargs = {"derived_id": 910, "device": "cpu", "threshold": 0.5, "progress": lambda m: None, **kwargs}
    return FakeSelfTraining("900", "2d", str(tmp_path / "work"), **kwargs).run()


@pytest.mark.parametrize("regions", [False, True], ids=["labels", "regions"])
def test_derived_dataset_manifest_ignore_label_and_untouched_source(env, regions):
    raw = _raw_dataset(env, REGIONS if regions else LABELS, [1, 2, 3] if regions else None)
    before = _tree_hash(raw)
    state = _run(env, rounds=2)
    assert _tree_hash(raw) == before  # the user's raw dataset is only read
    assert FakeSelfTraining.calls == ["train Dataset900_Src all", "pseudolabel Dataset900_Src all",
                                      "preprocess Dataset910_SrcSelfTrainR1", "train Dataset910_SrcSelfTrainR1 all",
                                      "pseudolabel Dataset910_SrcSelfTrainR1 all",
                                      "preprocess Dataset911_SrcSelfTrainR2", "train Dataset911_SrcSelfTrainR2 all"]
    derived = env / "raw" / "Dataset910_SrcSelfTrainR1"
    dataset_json = json.loads((derived / "dataset.json").read_text())
    ignore = 4 if regions else 2
    assert dataset_json["labels"] == {**(REGIONS if regions else LABELS), "ignore": ignore}
    assert dataset_json["numTraining"] == 6 and "numUnlabeled" not in dataset_json
    assert dataset_json.get("regions_class_order") == ([1, 2, 3] if regions else None)
    manifest = json.loads((derived / MANIFEST).read_text())
    assert manifest["source_dataset"] == "Dataset900_Src" and manifest["source_id"] == 900
    assert manifest["round"] == 1 and manifest["threshold"] == 0.5 and manifest["ignore_label"] == ignore
    assert manifest["pseudo_labelled_cases"] == ["unl_0", "unl_1", "unl_2"]
    assert manifest["labelled_cases"] == ["lab_0", "lab_1", "lab_2"]
    assert manifest["model_folder"] == str(env / "work" / "nnUNet_results" / "Dataset900_Src" /
                                           "nnUNetTrainer__nnUNetPlans__2d")
    assert manifest["sigmoid_regions"] == regions
    second = json.loads((env / "raw" / "Dataset911_SrcSelfTrainR2" / MANIFEST).read_text())
    assert second["round"] == 2 and second["model_folder"].endswith(
        os.path.join("Dataset910_SrcSelfTrainR1", "nnUNetTrainer__nnUNetPlans__2d"))
    # labelled cases copied byte for byte; pseudo-labels: the teacher's label, the ignore label where H/Hmax > 0.5
    for name in ("labelsTr/lab_1.nii.gz", "imagesTr/lab_1_0001.nii.gz"):
        assert (derived / name).read_bytes() == (raw / name).read_bytes()
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(derived / "labelsTr" / "unl_2.nii.gz")))
    uncertain = _entropy_of("unl_2") > 0.5
    assert uncertain.sum() == 15  # voxels 17..31 of 32 (16/32 = 0.5 is kept)
    assert (label[uncertain] == ignore).all() and (label[~uncertain] == (3 if regions else 1)).all()
    assert manifest["pseudo_labels"]["unl_2"]["ignored_voxels"] == 15
    image = sitk.ReadImage(str(derived / "labelsTr" / "unl_2.nii.gz"))
    assert image.GetSpacing() == (1.0, 1.0, 2.0)  # on the case's grid
    assert sorted(state["done"]) == ["round_1/dataset", "round_1/preprocess", "round_1/pseudolabel", "round_1/train",
                                     "round_2/dataset", "round_2/preprocess", "round_2/pseudolabel", "round_2/train",
                                     "teacher"]


def test_test_cases_never_reach_the_teacher_the_pool_or_the_derived_dataset(env):
    raw = _raw_dataset(env)
    _run(env, test_cases=["lab_2", "unl_1"])
    assert "unl_1_0000.nii.gz" not in FakeSelfTraining.pool_seen and len(FakeSelfTraining.pool_seen) == 4
    derived = env / "raw" / "Dataset910_SrcSelfTrainR1"
    names = os.listdir(derived / "imagesTr") + os.listdir(derived / "labelsTr")
    assert not [n for n in names if n.startswith(("lab_2", "unl_1", "ts_0"))]
    manifest = json.loads((derived / MANIFEST).read_text())
    assert manifest["test_cases_excluded"] == ["lab_2", "unl_1"]
    assert manifest["labelled_cases"] == ["lab_0", "lab_1"] and manifest["pseudo_labelled_cases"] == ["unl_0", "unl_2"]
    # the teacher trains on a fold without the labelled test case (appended to splits_final.json), not on 'all'
    splits = json.loads((env / "preprocessed" / "Dataset900_Src" / "splits_final.json").read_text())
    assert FakeSelfTraining.calls[0] == f"train Dataset900_Src {len(splits) - 1}"
    assert splits[-1] == {"train": ["lab_0", "lab_1"], "val": ["lab_0", "lab_1"]}
    assert (raw / "labelsTr" / "lab_2.nii.gz").is_file()


def test_a_rerun_skips_finished_stages_and_refuses_other_settings(env):
    _raw_dataset(env)
    FakeSelfTraining.fail_at = "train Dataset910_SrcSelfTrainR1 all"
    with pytest.raises(KeyboardInterrupt):
        _run(env)
    state = json.loads((env / "work" / STATE_FILE).read_text())
    assert sorted(state["done"]) == ["round_1/dataset", "round_1/preprocess", "round_1/pseudolabel", "teacher"]
    FakeSelfTraining.calls, FakeSelfTraining.fail_at = [], None
    _run(env)
    assert FakeSelfTraining.calls == ["train Dataset910_SrcSelfTrainR1 all"]  # only what was left
    FakeSelfTraining.calls = []
    _run(env)
    assert FakeSelfTraining.calls == []
    with pytest.raises(SelfTrainError, match=r"other settings \(threshold: 0.5\).*same settings"):
        _run(env, threshold=0.3)
    # another work folder may not take over (and rewrite) this run's derived dataset
    with pytest.raises(SelfTrainError, match=r"Dataset910_SrcSelfTrainR1, belongs to the self-training run in "
                                             r".*work\. Continue that run"):
        FakeSelfTraining("900", "2d", str(env / "other"), derived_id=910, device="cpu")


def test_model_folder_as_teacher(env):
    _raw_dataset(env)
    model = env / "teacher" / "nnUNetTrainer__nnUNetPlans__2d"
    os.makedirs(model / "fold_1")
    (model / "fold_1" / "checkpoint_final.pth").write_bytes(b"")
    (model / "plans.json").write_text("{}")
    (model / "dataset.json").write_text(json.dumps({"labels": LABELS}))
    _run(env, model_folder=str(model))
    assert FakeSelfTraining.calls[:2] == ["pseudolabel teacher 1", "preprocess Dataset910_SrcSelfTrainR1"]
    manifest = json.loads((env / "raw" / "Dataset910_SrcSelfTrainR1" / MANIFEST).read_text())
    assert manifest["model_folder"] == str(model) and manifest["folds"] == ["1"]


def _cli(argv, capsys):
    from nnunet_mmssl.cli.selftrain import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("extra, message", [
    (["--test", "nope"], "--test nope: no such case"),
    (["--threshold", "1.5"], "--threshold 1.5: the normalised entropy lies in [0, 1]"),
    (["--threshold", "nan"], "--threshold"),
    (["--rounds", "0"], "--rounds 0: must be at least 1"),
    (["--derived-id", "900"], "would use the source's id 900"),
    (["--derived-id", "5"], "id 5 is taken by Dataset005_Other"),
    (["-c", "3d_fullres"], "-c 3d_fullres: not in"),
    (["-m", "MODEL"], "is not a trained model folder (no plans.json)"),
    (["--test-file", "MISSING"], "the test-case file does not exist"),
    (["-tr", "NoSuchTrainer"], "unknown trainer 'NoSuchTrainer'"),
])
def test_bad_input_is_one_line_and_exit_2(env, capsys, extra, message):
    _raw_dataset(env)
    os.makedirs(env / "raw" / "Dataset005_Other")
    extra = [str(env / "nowhere") if e in ("MODEL", "MISSING") else e for e in extra]
    code, err = _cli(["-d", "900", "-o", str(env / "work"), "-device", "cpu", *extra], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("nnUNetv2_mmssl_selftrain: error: ") and message in err
    assert not (env / "raw" / "Dataset910_SrcSelfTrainR1").exists()
    assert not [n for n in os.listdir(env / "raw") if "SelfTrain" in n]


# ---------------------------------------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
def test_selftrain_end_to_end_on_the_phantom(tmp_path, monkeypatch, planned_phantom):
    """Teacher and student through nnUNetv2_train (2d, 1 epoch of 1 iteration), pseudo-labels by nnU-Net's
    predictor, the derived dataset preprocessed by nnUNetv2_preprocess with the source's plans; then a rerun. The
    source is a copy of the session's converted and planned phantom (tests/phantom_workspace.py: our convert and
    plan console scripts; 3 labelled, 2 test, 3 unlabelled cases)."""
    import phantom_workspace

    from nnunet_mmssl.cli.selftrain import main

    phantom_workspace.copy_into(planned_phantom, tmp_path)
    raw, pre = tmp_path / "raw", tmp_path / "preprocessed"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    source = raw / phantom_workspace.DATASET
    before = _tree_hash(source)
    argv = ["-d", str(phantom_workspace.DATASET_ID), "-c", "2d", "-o", str(tmp_path / "work"), "--epochs", "1",
            "--iterations", "1",
            "--val-iterations", "1", "-device", "cpu", "--derived-id", "904", "--disable_tta", "-np", "1",
            "--threshold", "0.3"]
    assert main(argv) == 0
    assert _tree_hash(source) == before
    derived = raw / "Dataset904_ITestSelfTrainR1"
    manifest = json.loads((derived / MANIFEST).read_text())
    pool = sorted(f[:-len("_0000.nii.gz")] for f in os.listdir(source / "imagesUnlabeled")
                  if f.endswith("_0000.nii.gz"))
    labelled = sorted(f[:-len(".nii.gz")] for f in os.listdir(source / "labelsTr"))
    assert manifest["pseudo_labelled_cases"] == pool and manifest["labelled_cases"] == labelled and len(pool) == 3
    tests = {f[:-len("_0000.nii.gz")] for f in os.listdir(source / "imagesTs") if f.endswith("_0000.nii.gz")}
    assert not tests & {f[:-len(".nii.gz")] for f in os.listdir(derived / "labelsTr")}
    # the pseudo-labels carry the ignore label exactly where the teacher's normalised entropy is above 0.3
    pseudo = tmp_path / "work" / "round_1" / "pseudolabels"
    for case in pool:
        teacher = sitk.GetArrayFromImage(sitk.ReadImage(str(pseudo / "labels" / f"{case}.nii.gz")))
        entropy = sitk.GetArrayFromImage(sitk.ReadImage(str(pseudo / "uncertainty" / f"{case}_entropy.nii.gz")))
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(derived / "labelsTr" / f"{case}.nii.gz")))
        uncertain = entropy / math.log(2) > 0.3
        assert (written[uncertain] == 2).all() and (written[~uncertain] == teacher[~uncertain]).all()
    # the student's network is the teacher's (the source's plans) and it trained on the derived dataset
    plans = json.loads((pre / derived.name / "nnUNetPlans.json").read_text())
    source_plans = json.loads((pre / source.name / "nnUNetPlans.json").read_text())
    assert plans["configurations"] == source_plans["configurations"] and plans["dataset_name"] == derived.name
    student = tmp_path / "work" / "nnUNet_results" / derived.name / "nnUNetTrainer__selftrain__nnUNetPlans__2d"
    assert (student / "fold_all" / "checkpoint_final.pth").is_file()
    assert json.loads((student / "dataset.json").read_text())["labels"]["ignore"] == 2
    stamp = os.path.getmtime(student / "fold_all" / "checkpoint_final.pth")
    assert main(argv) == 0  # resumed: every stage done, nothing trained again
    assert os.path.getmtime(student / "fold_all" / "checkpoint_final.pth") == stamp

"""Bad input to every console script of ours (and to nnUNetv2_train with our trainers).

Each case asserts: a non-zero exit, exactly one ``PROG: error:`` line that names the file or value and says the fix,
no "Traceback", and no partial output. ``main(argv)`` is called in-process where possible; a few real subprocess runs
check the console scripts end to end (no traceback, and one with ``--verbose``). The preprocessing of unlabelled
cases is checked against a killed run (SIGKILL mid-way) and two concurrent runs.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from console_harness import assert_user_error, listing

from nnunet_mmssl.dataloading.image_checks import ImageFileError, check_image_file, read_image_checked
from nnunet_mmssl.dataset_conversion import PHANTOM_LABEL_GLOB, PHANTOM_MODALITY_GLOBS, convert_dataset
from nnunet_mmssl.dataset_conversion.phantom import make_phantom_cases

PHANTOM_SHAPE = (8, 20, 20)
CONVERT_ARGS = ["--modality", "MRA=MRA.nii.gz", "--modality", "MRB=MRB.nii.gz", "--label", "seg.nii.gz"]
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------


def write_float(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 3.0)) -> Path:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), useCompression=str(path).endswith(".gz"))
    return path


def truncate(path: Path, keep: float | int = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    return path


def put_nonfinite(path: Path, value: float = np.nan, count: int = 3) -> Path:
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array.flat[:count] = value
    new = sitk.GetImageFromArray(array)
    new.CopyInformation(image)
    sitk.WriteImage(new, str(path), useCompression=True)
    return path


def not_an_image(path: Path, gzipped: bool = False) -> Path:
    text = b"<html>404 Not Found</html>\n"
    path.write_bytes(gzip.compress(text) if gzipped else text)
    return path


@pytest.fixture(scope="module")
def phantom_sources(tmp_path_factory) -> Path:
    """Phantom case folders: 3 labelled (phantom_000..002) and 2 unlabelled (phantom_003, 004)."""
    return make_phantom_cases(tmp_path_factory.mktemp("phantom"), num_labeled=3, num_unlabeled=2,
                              shape=PHANTOM_SHAPE, seed=7)


@pytest.fixture
def sources(phantom_sources, tmp_path) -> Path:
    """A private copy of the phantom case folders, free to break."""
    return Path(shutil.copytree(phantom_sources, tmp_path / "src"))


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch) -> Path:
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    return tmp_path


def convert_phantom(sources: Path, raw: Path, dataset_id: int, with_unlabeled: bool = True) -> Path:
    inputs = [str(sources / "labeled")] + ([str(sources / "unlabeled")] if with_unlabeled else [])
    return convert_dataset(inputs, PHANTOM_MODALITY_GLOBS, PHANTOM_LABEL_GLOB, str(raw), dataset_id, "Bad",
                           num_labeled=3, num_test=0, seed=0)


# ------------------------------------------------------------------------------------------------------------------
# the shared reader/checker
# ------------------------------------------------------------------------------------------------------------------


def test_simpleitk_really_reads_truncated_nifti_and_nan_as_zeros(tmp_path):
    """The premise of the checks: SimpleITK (nnU-Net's reader) is silent about both defects."""
    array = np.random.default_rng(0).normal(100, 10, (6, 20, 20)).astype(np.float32)
    truncate(write_float(tmp_path / "t.nii.gz", array))
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "t.nii.gz"))) == 0).sum() > 0
    truncate(write_float(tmp_path / "t.nii", array))
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "t.nii"))) == 0).sum() > 0
    with_nan = array.copy()
    with_nan.flat[:3] = np.nan
    write_float(tmp_path / "nan.nii.gz", with_nan)
    read = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nan.nii.gz")))
    assert np.isfinite(read).all() and (read == 0).sum() == 3  # NaN became 0


@pytest.mark.parametrize("name, damage, expected", [
    ("half.nii.gz", lambda p: truncate(p, 0.5), "is truncated"),
    ("trailer.nii.gz", lambda p: truncate(p, len(p.read_bytes()) - 4), "is truncated"),
    ("plain.nii", lambda p: truncate(p, 0.5), "NIfTI header needs"),
    ("regz.nii.gz", lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:3000])),
     "NIfTI header needs"),
    ("crc.nii.gz", lambda p: p.write_bytes(p.read_bytes()[:-8] + b"\0\0\0\0" + p.read_bytes()[-4:]), "corrupt"),
    ("nan.nii.gz", lambda p: put_nonfinite(p, np.nan, 3), "3 NaN, 0 +Inf, 0 -Inf"),
    ("inf.nii.gz", lambda p: put_nonfinite(p, -np.inf, 2), "0 NaN, 0 +Inf, 2 -Inf"),
    ("nan.nrrd", lambda p: put_nonfinite(p, np.inf, 1), "0 NaN, 1 +Inf"),
    ("text.nii.gz", not_an_image, "not a gzip file"),
    ("textgz.nii.gz", lambda p: not_an_image(p, gzipped=True), "cannot be read"),
    ("text.nrrd", not_an_image, "cannot be read as an image"),
    ("empty.nii.gz", lambda p: p.write_bytes(b""), "is empty"),
])
def test_image_checks_reject_with_the_file_name(tmp_path, name, damage, expected):
    path = write_float(tmp_path / name, np.random.default_rng(0).normal(100, 10, (6, 20, 20)))
    read_image_checked(path)  # intact first
    damage(path)
    for check in (read_image_checked, check_image_file):
        with pytest.raises(ImageFileError) as info:
            check(path)
        assert str(path) in str(info.value) and expected in str(info.value)
        assert any(fix in str(info.value) for fix in ("Re-export", "Replace them", "save the image again"))


# ------------------------------------------------------------------------------------------------------------------
# nnUNetv2_mmssl_convert
# ------------------------------------------------------------------------------------------------------------------

CONVERT_CASES = {
    # name: (damage(sources, raw), extra args, expected substrings)
    "missing modality file": (lambda s, r: (s / "labeled/phantom_001/MRB.nii.gz").unlink(), [],
                              ["phantom_001", "'MRB'", "no file matches", "Exactly one file per modality"]),
    "unknown modality": (lambda s, r: None, ["--modality", "T2=T2.nii.gz"],
                         ["'T2'", "no file matches", "Exactly one file per modality"]),
    "extra channel file": (lambda s, r: shutil.copy(s / "labeled/phantom_000/MRA.nii.gz",
                                                    s / "labeled/phantom_000/old_MRA.nii.gz"),
                           ["--modality", "MRA=*MRA.nii.gz"], ["phantom_000", "2 files match", "Exactly one"]),
    "mismatched grids": (lambda s, r: write_float(s / "labeled/phantom_002/MRB.nii.gz", np.ones((8, 20, 18))), [],
                         ["phantom_002", "MRB.nii.gz", "not on the same grid", "size"]),
    "NaN voxels": (lambda s, r: put_nonfinite(s / "unlabeled/phantom_004/MRA.nii.gz", np.nan, 5), [],
                   ["unlabeled/phantom_004/MRA.nii.gz", "5 NaN", "Replace them"]),
    "Inf voxels": (lambda s, r: put_nonfinite(s / "labeled/phantom_000/MRB.nii.gz", np.inf, 2), [],
                   ["labeled/phantom_000/MRB.nii.gz", "2 +Inf", "Replace them"]),
    "truncated image": (lambda s, r: truncate(s / "labeled/phantom_001/MRA.nii.gz"), [],
                        ["labeled/phantom_001/MRA.nii.gz", "is truncated", "Re-export"]),
    "truncated gzip trailer": (lambda s, r: truncate(s / "unlabeled/phantom_003/MRB.nii.gz",
                                                     len((s / "unlabeled/phantom_003/MRB.nii.gz").read_bytes()) - 4),
                               [], ["unlabeled/phantom_003/MRB.nii.gz", "is truncated"]),
    "truncated label": (lambda s, r: truncate(s / "labeled/phantom_002/seg.nii.gz"), [],
                        ["labeled/phantom_002/seg.nii.gz", "is truncated"]),
    "non-image file": (lambda s, r: not_an_image(s / "labeled/phantom_000/MRB.nii.gz"), [],
                       ["labeled/phantom_000/MRB.nii.gz", "not"]),
    "existing dataset id": (lambda s, r: (r / "Dataset555_Other").mkdir(parents=True), [],
                            ["dataset id 555 is already used", "Dataset555_Other", "Choose another id"]),
    "existing output": (lambda s, r: (r / "Dataset555_Bad").mkdir(parents=True), [],
                        ["Dataset555_Bad", "exists", "--overwrite"]),
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_bad_input(case, sources, tmp_path, capsys):
    from nnunet_mmssl.cli.convert import PROG, main

    damage, extra, expected = CONVERT_CASES[case]
    raw = tmp_path / "raw"
    damage(sources, raw)
    before = listing(raw)
    code = main(["-i", str(sources / "labeled"), str(sources / "unlabeled"), *CONVERT_ARGS, *extra, "-d", "555",
                 "-n", "Bad", "-o", str(raw), "-q"])
    assert_user_error(code, capsys.readouterr().err, PROG, *expected)
    assert listing(raw) == before, "the converter left (partial) output behind"


def test_convert_intact_phantom_converts(sources, tmp_path, capsys):
    """The control of the cases above: the undamaged sources convert."""
    from nnunet_mmssl.cli.convert import main

    raw = tmp_path / "raw"
    assert main(["-i", str(sources / "labeled"), str(sources / "unlabeled"), *CONVERT_ARGS, "-d", "555", "-n", "Bad",
                 "-o", str(raw), "-q"]) == 0
    assert len(list((raw / "Dataset555_Bad" / "imagesUnlabeled").iterdir())) == 4
    assert [p.name for p in raw.iterdir()] == ["Dataset555_Bad"]


def test_convert_verbose_shows_the_traceback(sources, tmp_path, capsys):
    from nnunet_mmssl.cli.convert import PROG, main

    truncate(sources / "labeled/phantom_001/MRA.nii.gz")
    code = main(["-i", str(sources / "labeled"), *CONVERT_ARGS, "-d", "555", "-n", "Bad", "-o", str(tmp_path / "raw"),
                 "-q", "--verbose"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and f"{PROG}: error:" in err


# ------------------------------------------------------------------------------------------------------------------
# nnUNetv2_mmssl_plan_and_preprocess (all of these fail before nnU-Net's fingerprint: seconds, nothing written)
# ------------------------------------------------------------------------------------------------------------------

def _unl(raw: Path, channel: int = 0) -> Path:
    return raw / "Dataset556_Bad" / "imagesUnlabeled" / f"Bad_003_{channel:04d}.nii.gz"


PLAN_CASES = {
    # name: (with unlabelled cases, damage(raw), extra args, expected substrings)
    "empty unlabelled folder": (False, lambda raw: None, [],
                                ["No unlabelled cases found in", "imagesUnlabeled", "--no-unlabeled"]),
    "truncated unlabelled image": (True, lambda raw: truncate(_unl(raw)), [],
                                   ["Bad_003_0000.nii.gz", "is truncated", "Re-export"]),
    "NaN in a labelled image": (True, lambda raw: put_nonfinite(
        raw / "Dataset556_Bad/imagesTr/Bad_001_0001.nii.gz"), [], ["imagesTr/Bad_001_0001.nii.gz", "3 NaN"]),
    "non-image unlabelled file": (True, lambda raw: not_an_image(_unl(raw, 1)), [],
                                  ["Bad_003_0001.nii.gz", "not a gzip file"]),
    "unlabelled case lacking a channel": (True, lambda raw: _unl(raw, 1).unlink(), [],
                                          ["'Bad_003'", "lacks channel(s) [1]", "Bad_003_0001.nii.gz"]),
    "wrong channel index": (True, lambda raw: shutil.copy(_unl(raw), _unl(raw, 2)), [],
                            ["Bad_003_0002.nii.gz", "channel index 2", "declares 2 channels"]),
    "labelled case without label": (True, lambda raw: (raw / "Dataset556_Bad/labelsTr/Bad_000.nii.gz").unlink(), [],
                                    ["'Bad_000'", "no label", "Add the label"]),
    "unknown modality group": (True, lambda raw: None, ["--modality-groups", "MRA", "FLAIR"], ["FLAIR"]),
    "unknown dataset id": (True, lambda raw: None, ["-d", "557"], ["557"]),
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_plan_and_preprocess_bad_input(case, sources, nnunet_env, capsys):
    from nnunet_mmssl.cli.plan_and_preprocess import PROG, main

    with_unlabeled, damage, extra, expected = PLAN_CASES[case]
    raw = nnunet_env / "raw"
    convert_phantom(sources, raw, 556, with_unlabeled)
    damage(raw)
    args = ["-d", "556", "-c", "2d", "-np", "1", "--no-mmssl-plans"]
    if "-d" in extra:
        args = args[2:]
    code = main(args + extra)
    assert_user_error(code, capsys.readouterr().err, PROG, *expected)
    assert listing(nnunet_env / "preprocessed") == [], "plan_and_preprocess wrote something before failing"


# ------------------------------------------------------------------------------------------------------------------
# nnUNetv2_mmssl_evaluate (the summary JSON is written atomically: never there after an error)
# ------------------------------------------------------------------------------------------------------------------

def _label(path: Path, value: int = 1) -> Path:
    array = np.zeros((4, 8, 8), np.uint8)
    array[1:3, 2:6, 2:6] = value
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=True)
    return path


EVALUATE_CASES = {
    "missing prediction": (lambda ref, pred: (pred / "case_1.nii.gz").unlink(),
                           ["case_1", "no prediction", "Predict these cases"]),
    "truncated prediction": (lambda ref, pred: truncate(pred / "case_1.nii.gz"),
                             ["case_1.nii.gz", "is truncated", "Re-export"]),
    "non-image reference": (lambda ref, pred: not_an_image(ref / "case_0.nii.gz"),
                            ["case_0.nii.gz", "not a gzip file"]),
    "NaN in a reference": (lambda ref, pred: put_nonfinite(ref / "case_0.nii.gz"),
                           ["case_0.nii.gz", "3 NaN", "Replace them"]),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_evaluate_bad_input(case, tmp_path, capsys):
    from nnunet_mmssl.cli.evaluate import PROG, main

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for k in range(2):
        _label(ref / f"case_{k}.nii.gz")
        _label(pred / f"case_{k}.nii.gz")
    damage, expected = EVALUATE_CASES[case]
    damage(ref, pred)
    before = listing(pred)
    code = main(["-ref", str(ref), "-pred", str(pred), "-l", "1"])
    assert_user_error(code, capsys.readouterr().err, PROG, *expected)
    assert listing(pred) == before, "no summary JSON (nor its temporary file) after an error"


# ------------------------------------------------------------------------------------------------------------------
# nnUNetv2_mmssl_demo (request errors are found before minutes of work, and nothing is created)
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    (["--num-test", "0"], ["--num-test 0", "at least 1"]),
    (["--num-unlabeled", "0"], ["--num-unlabeled 0", "at least 1"]),
    (["--trainers", "MemCifSSLTrainer_demo", "NoSuchTrainer"], ["NoSuchTrainer", "unknown trainer"]),
    (["existing"], ["exists and is not empty", "--overwrite"]),
])
def test_demo_bad_request(tmp_path, capsys, extra, expected):
    from nnunet_mmssl.cli.demo import PROG, main

    output = tmp_path / "demo"
    if extra == ["existing"]:
        output.mkdir()
        (output / "keep.txt").write_text("mine")
        extra = []
    before = listing(output)
    code = main(["-o", str(output), *extra])
    assert_user_error(code, capsys.readouterr().err, PROG, *expected)
    assert listing(output) == before


def test_demo_cuda_without_gpu(tmp_path, capsys):
    import torch

    from nnunet_mmssl.cli.demo import PROG, main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_user_error(main(["-o", str(tmp_path / "d"), "-device", "cuda"]), capsys.readouterr().err, PROG,
                      "-device cuda", "-device cpu")
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------------------------------------
# nnUNetv2_mmssl_predict (a stock nnUNetTrainer model folder with random weights: enough for every check before
# prediction; the prediction itself is replaced to test the temporary output folder)
# ------------------------------------------------------------------------------------------------------------------

def _stock_model_folder(folder: Path, plans: dict, dataset_json: dict) -> Path:
    """A stock ``nnUNetTrainer`` model folder (plans, dataset.json, fold_0 with a randomly initialised network)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    manager = PlansManager(copy.deepcopy(plans))
    torch.manual_seed(0)
    network = nnUNetTrainer.build_network_architecture(manager, manager.get_configuration("2d"), 2, 2,
                                                       enable_deep_supervision=False)
    torch.save({"trainer_name": "nnUNetTrainer", "init_args": {"configuration": "2d"},
                "network_weights": network.state_dict(), "inference_allowed_mirroring_axes": (0, 1)},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


def _phantom_inputs(phantom_sources: Path, inputs: Path) -> Path:
    """Two labelled phantom cases as a prediction input folder (CASE_XXXX.nii.gz)."""
    inputs.mkdir()
    for k, case in enumerate(("phantom_000", "phantom_001")):
        for channel, modality in enumerate(("MRA", "MRB")):
            shutil.copy(phantom_sources / "labeled" / case / f"{modality}.nii.gz",
                        inputs / f"case{k}_{channel:04d}.nii.gz")
    return inputs


@pytest.fixture
def stock_model(nnunet_env, phantom_sources) -> tuple[Path, Path]:
    """(model folder ``nnUNetTrainer__nnUNetPlans__2d`` of Dataset999_X with fold_0, input folder with 2 cases)."""
    from plans_fixtures import DATASET_JSON, PLANS

    folder = _stock_model_folder(nnunet_env / "results" / "Dataset999_X" / "nnUNetTrainer__nnUNetPlans__2d", PLANS,
                                 DATASET_JSON)
    inputs = _phantom_inputs(phantom_sources, nnunet_env / "input")
    (inputs / "notes.txt").write_text("ignored: not the model's file ending")
    return folder, inputs


PREDICT_CASES = {
    # name: (damage(inputs) or None, args after -i/-o, expected substrings)
    "input case lacking a channel": (lambda i: (i / "case1_0001.nii.gz").unlink(), ["-m", "{model}"],
                                     ["'case1'", "lacks channel(s) [1]", "case1_0001.nii.gz"]),
    "input with an extra channel": (lambda i: shutil.copy(i / "case0_0000.nii.gz", i / "case0_0002.nii.gz"),
                                    ["-m", "{model}"], ["case0_0002.nii.gz", "channel index 2"]),
    "truncated input": (lambda i: truncate(i / "case0_0001.nii.gz"), ["-m", "{model}"],
                        ["case0_0001.nii.gz", "is truncated", "Re-export"]),
    "NaN input": (lambda i: put_nonfinite(i / "case1_0000.nii.gz"), ["-m", "{model}"],
                  ["case1_0000.nii.gz", "3 NaN", "Replace them"]),
    "non-image input": (lambda i: not_an_image(i / "case1_0000.nii.gz"), ["-m", "{model}"],
                        ["case1_0000.nii.gz", "not a gzip file"]),
    "badly named input": (lambda i: shutil.copy(i / "case0_0000.nii.gz", i / "brain.nii.gz"), ["-m", "{model}"],
                          ["brain.nii.gz", "CASE_XXXX.nii.gz", "Rename it"]),
    "empty input folder": (lambda i: [p.unlink() for p in i.glob("*.nii.gz")], ["-m", "{model}"],
                           ["holds no CASE_XXXX.nii.gz files", "channels"]),
    "model of another trainer": (None, ["-d", "999", "-c", "2d", "-tr", "MemCifSSLTrainer"],
                                 ["MemCifSSLTrainer__nnUNetPlans__2d", "no plans.json",
                                  "nnUNetTrainer__nnUNetPlans__2d", "-tr"]),
    "--head on a stock nnUNetTrainer model": (None, ["-m", "{model}", "--head", "MRA"],
                                              ["single-head network", "Drop --head"]),
    "untrained fold": (None, ["-m", "{model}", "-f", "0", "1"],
                       ["fold(s) ['1']", "folds with checkpoint_final.pth: ['0']", "-f 0"]),
    "unknown dataset": (None, ["-d", "998", "-c", "2d"], ["998"]),
}


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_predict_bad_input(case, stock_model, tmp_path, capsys):
    from nnunet_mmssl.cli.predict import PROG, main

    model, inputs = stock_model
    damage, args, expected = PREDICT_CASES[case]
    if damage is not None:
        damage(inputs)
    args = [a.replace("{model}", str(model)) for a in args]
    out = tmp_path / "pred"
    folds = [] if "-f" in args else ["-f", "0"]
    code = main(["-i", str(inputs), "-o", str(out), "-device", "cpu", *folds, *args])
    assert_user_error(code, capsys.readouterr().err, PROG, *expected)
    assert not out.exists() and not list(tmp_path.glob(".pred*")), "predict left (partial) output behind"


def test_predict_cuda_without_gpu(stock_model, tmp_path, capsys):
    import torch

    from nnunet_mmssl.cli.predict import PROG, main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    model, inputs = stock_model
    code = main(["-i", str(inputs), "-o", str(tmp_path / "pred"), "-m", str(model), "-f", "0", "-device", "cuda"])
    assert_user_error(code, capsys.readouterr().err, PROG, "-device cuda", "-device cpu")


@pytest.mark.parametrize("fail", [False, True])
def test_predict_writes_under_a_temporary_name(stock_model, tmp_path, capsys, monkeypatch, fail):
    """Predictions appear in -o only when the whole run is done; a failure mid-way leaves nothing."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_mmssl.cli.predict import PROG, main

    model, inputs = stock_model
    out = tmp_path / "pred"
    seen = {}

    def fake_predict(self, source, output_folder, **kwargs):
        seen["folder"] = output_folder
        seen["final_exists_during_run"] = out.exists()
        _label(Path(output_folder, "case0.nii.gz"))  # complete images: every written prediction is read back
        if fail:
            raise RuntimeError("export worker died")
        _label(Path(output_folder, "case1.nii.gz"))

    monkeypatch.setattr(nnUNetPredictor, "predict_from_files", fake_predict)
    code = main(["-i", str(inputs), "-o", str(out), "-m", str(model), "-f", "0", "-device", "cpu"])
    assert Path(seen["folder"]).name.startswith(".pred.partial-") and not seen["final_exists_during_run"]
    assert not list(tmp_path.glob(".pred*"))
    if fail:
        assert_user_error(code, capsys.readouterr().err, PROG, "export worker died")
        assert not out.exists()
    else:
        assert code == 0 and sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "case1.nii.gz"]


# ------------------------------------------------------------------------------------------------------------------
# preprocessing of unlabelled cases: a killed run, leftovers, two runs at once
# ------------------------------------------------------------------------------------------------------------------

ARCH_2D_SMALL = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv2d",
                    "kernel_sizes": [[3, 3]] * 2, "strides": [[1, 1], [2, 2]], "n_conv_per_stage": [1, 1],
                    "n_conv_per_stage_decoder": [1], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
from plans_fixtures import RESAMPLING  # noqa: E402

PP_PLANS = {
    "dataset_name": "Dataset558_Bad", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [3, 1, 1],
    "original_median_shape_after_transp": [8, 20, 20], "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
    "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {
        str(c): {"max": 600.0, "mean": m, "median": m, "min": 0.0, "percentile_00_5": 0.0, "percentile_99_5": 550.0,
                 "std": 50.0} for c, m in ((0, 100.0), (1, 400.0))},
    "configurations": {"2d": {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
                              "batch_size": 2, "patch_size": [20, 20], "median_image_size_in_voxels": [20, 20],
                              "spacing": [1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"] * 2,
                              "use_mask_for_norm": [False, False], "batch_dice": True, "architecture": ARCH_2D_SMALL,
                              **RESAMPLING}},
    "mmssl": {"modality_groups": [[0], [1]]},
}
PP_SCRIPT = textwrap.dedent('''
    import json, sys, time
    from nnunet_mmssl.dataloading import unlabeled_preprocessing as up

    raw, pre, plans_file, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    original = up._preprocess_one

    def slow(*args):
        original(*args)
        print("case done", flush=True)
        time.sleep(pause)

    up._preprocess_one = slow
    up.preprocess_unlabeled(raw, pre, json.load(open(plans_file)), ["2d"], num_processes=1,
                            progress=lambda m: print(m, flush=True))
    print("finished", flush=True)
''')


@pytest.fixture(scope="module")
def pp_dataset(phantom_sources, tmp_path_factory) -> dict:
    """A raw dataset with 5 unlabelled cases, its plans, and a clean preprocessing of it (the reference)."""
    from nnunet_mmssl.dataloading.unlabeled_preprocessing import preprocess_unlabeled

    root = tmp_path_factory.mktemp("pp")
    sources = make_phantom_cases(root / "src", num_labeled=1, num_unlabeled=5, shape=PHANTOM_SHAPE, seed=3)
    raw = convert_dataset([str(sources / "labeled"), str(sources / "unlabeled")], PHANTOM_MODALITY_GLOBS,
                          PHANTOM_LABEL_GLOB, str(root / "raw"), 558, "Bad", num_labeled=1, num_test=0, seed=0)
    plans_file = root / "plans.json"
    plans_file.write_text(json.dumps(PP_PLANS))
    reference = preprocess_unlabeled(str(raw), str(root / "clean"), copy.deepcopy(PP_PLANS), ["2d"],
                                     num_processes=1, progress=lambda m: None)["2d"]
    script = root / "pp.py"
    script.write_text(PP_SCRIPT)
    return {"raw": raw, "plans_file": plans_file, "reference": Path(reference), "script": script}


def read_folder(folder: Path) -> dict:
    """case id -> (data, seg, properties) of a preprocessed folder, via nnU-Net's dataset class."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dataset_class = infer_dataset_class(str(folder))
    dataset = dataset_class(str(folder), dataset_class.get_identifiers(str(folder)))
    result = {}
    for identifier in dataset.identifiers:
        data, seg, _, properties = dataset.load_case(identifier)
        result[identifier] = (np.asarray(data[:]), np.asarray(seg[:]), repr(sorted(properties.items())))
    return result


def assert_same_folder(folder: Path, reference: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in reference.iterdir())
    got, expected = read_folder(folder), read_folder(reference)
    assert sorted(got) == sorted(expected) and len(got) == 5
    for case in expected:
        np.testing.assert_array_equal(got[case][0], expected[case][0])
        np.testing.assert_array_equal(got[case][1], expected[case][1])
        assert got[case][2] == expected[case][2]


def leftovers(pre: Path) -> list[str]:
    return sorted(p.name for p in pre.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")
                  or p.name.endswith(".partial"))


def start_pp(dataset: dict, pre: Path, pause: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(dataset["script"]), str(dataset["raw"]), str(pre),
                             str(dataset["plans_file"]), str(pause)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(process: subprocess.Popen, marker: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    assert any(marker in line for line in lines), "".join(lines)
    return lines


@pytest.mark.parametrize("previous", [False, True])
def test_killed_preprocessing_never_leaves_a_half_written_folder(pp_dataset, tmp_path, previous):
    """SIGKILL after the first of 5 cases: the final folder is absent (or the previous complete one); the rerun
    removes the leftover and equals a clean run."""
    from nnunet_mmssl.dataloading.unlabeled_preprocessing import preprocess_unlabeled

    pre = tmp_path / "pre"
    final = pre / "nnUNetPlans_2d_unlabeled"
    if previous:
        shutil.copytree(pp_dataset["reference"], final)
    process = start_pp(pp_dataset, pre, pause=30)
    try:
        wait_for(process, "case done")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    partial = [p for p in pre.iterdir() if p.name.startswith(".nnUNetPlans_2d_unlabeled.partial-")]
    assert len(partial) == 1 and len(list(partial[0].iterdir())) >= 2, "the killed run wrote into its temp folder"
    if previous:
        assert_same_folder(final, pp_dataset["reference"])  # untouched by the killed run
    else:
        assert not final.exists()
    messages = []
    preprocess_unlabeled(str(pp_dataset["raw"]), str(pre), copy.deepcopy(PP_PLANS), ["2d"], num_processes=1,
                         progress=messages.append)
    assert any("left by an interrupted run" in m for m in messages)
    assert leftovers(pre) == []
    assert_same_folder(final, pp_dataset["reference"])


def test_rerun_removes_leftovers_of_older_runs(pp_dataset, tmp_path):
    from nnunet_mmssl.dataloading.unlabeled_preprocessing import preprocess_unlabeled

    pre = tmp_path / "pre"
    final = pre / "nnUNetPlans_2d_unlabeled"
    for stale in (".nnUNetPlans_2d_unlabeled.partial-abc", ".nnUNetPlans_2d_unlabeled.old-xyz/nnUNetPlans_2d_unlabeled",
                  "nnUNetPlans_2d_unlabeled.partial"):
        (pre / stale).mkdir(parents=True)
        (pre / stale / "Bad_099.b2nd").write_bytes(b"half")
    final.mkdir()
    (final / "Bad_098.b2nd").write_bytes(b"from an older dataset")
    preprocess_unlabeled(str(pp_dataset["raw"]), str(pre), copy.deepcopy(PP_PLANS), ["2d"], num_processes=1,
                         progress=lambda m: None)
    assert leftovers(pre) == []
    assert_same_folder(final, pp_dataset["reference"])


def test_a_second_run_waits_for_the_lock_holder(pp_dataset, tmp_path):
    """While another run holds the folder's lock, a run waits (writes nothing) and then builds a complete folder."""
    from nnunet_mmssl.dataloading.unlabeled_preprocessing import folder_lock

    pre = tmp_path / "pre"
    pre.mkdir()
    final = pre / "nnUNetPlans_2d_unlabeled"
    with folder_lock(str(final), progress=lambda m: None):
        process = start_pp(pp_dataset, pre, pause=0)
        try:
            wait_for(process, "Waiting for another run")
            time.sleep(1.0)
            assert process.poll() is None and not final.exists() and leftovers(pre) == []
        except BaseException:
            process.kill()
            raise
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "finished" in output, output
    assert leftovers(pre) == []
    assert_same_folder(final, pp_dataset["reference"])


@pytest.mark.slow
def test_two_runs_at_once_give_one_complete_folder(pp_dataset, tmp_path):
    pre = tmp_path / "pre"
    first, second = start_pp(pp_dataset, pre, pause=0.2), start_pp(pp_dataset, pre, pause=0.2)
    outputs = [p.communicate(timeout=180)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert leftovers(pre) == []
    assert_same_folder(pre / "nnUNetPlans_2d_unlabeled", pp_dataset["reference"])


# ------------------------------------------------------------------------------------------------------------------
# end to end: the real console scripts in a subprocess (no traceback; --verbose shows it)
# ------------------------------------------------------------------------------------------------------------------

def _script(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.skip(f"console script {name} is not installed beside {sys.executable}")
    return str(path)


def _subprocess_env(root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"))
    return env


def _scenario(name: str, sources: Path, root: Path, stock_model) -> tuple[list[str], list[str]]:
    """(command, expected substrings) of one end-to-end bad-input scenario."""
    if name == "convert":
        truncate(sources / "labeled/phantom_001/MRA.nii.gz")
        return ([_script("nnUNetv2_mmssl_convert"), "-i", str(sources / "labeled"), *CONVERT_ARGS, "-d", "559",
                 "-n", "Bad", "-o", str(root / "raw"), "-q"], ["phantom_001/MRA.nii.gz", "is truncated"])
    if name == "plan_and_preprocess":
        convert_phantom(sources, root / "raw", 559, with_unlabeled=False)
        return ([_script("nnUNetv2_mmssl_plan_and_preprocess"), "-d", "559", "-c", "2d", "-np", "1"],
                ["No unlabelled cases", "--no-unlabeled"])
    if name == "predict":
        model, inputs = stock_model
        (inputs / "case1_0001.nii.gz").unlink()
        return ([_script("nnUNetv2_mmssl_predict"), "-i", str(inputs), "-o", str(root / "pred"), "-m", str(model),
                 "-f", "0", "-device", "cpu"], ["'case1'", "lacks channel(s) [1]"])
    if name == "evaluate":
        for folder in ("ref", "pred"):
            (root / folder).mkdir()
        _label(root / "ref" / "case_0.nii.gz")
        _label(root / "pred" / "case_9.nii.gz")
        return ([_script("nnUNetv2_mmssl_evaluate"), "-ref", str(root / "ref"), "-pred", str(root / "pred")],
                ["case_0", "no prediction"])
    return ([_script("nnUNetv2_mmssl_demo"), "-o", str(root / "demo"), "--num-test", "0"], ["--num-test 0"])


@pytest.mark.parametrize("name", ["convert", "plan_and_preprocess", pytest.param("predict", marks=pytest.mark.slow),
                                  "evaluate", "demo"])
def test_console_scripts_end_to_end_without_traceback(name, sources, stock_model, tmp_path):
    root = tmp_path
    command, expected = _scenario(name, sources, root, stock_model)
    before = listing(root)
    result = subprocess.run(command, env=_subprocess_env(root), capture_output=True, text=True, timeout=300)
    prog = Path(command[0]).name
    assert_user_error(result.returncode, result.stderr, prog, *expected)
    assert "Traceback" not in result.stdout
    assert listing(root) == before, "no partial output"
    if name == "convert":
        verbose = subprocess.run(command + ["--verbose"], env=_subprocess_env(root), capture_output=True, text=True,
                                 timeout=300)
        assert verbose.returncode == 2 and "Traceback" in verbose.stderr and "is truncated" in verbose.stderr


# ------------------------------------------------------------------------------------------------------------------
# nnUNetv2_train with our trainers: a missing or empty preprocessed unlabelled folder
# ------------------------------------------------------------------------------------------------------------------

def test_open_unlabeled_dataset_messages(tmp_path):
    from nnunet_mmssl.dataloading.unlabeled_loader import open_unlabeled_dataset
    from nnunet_mmssl.dataloading.unlabeled_preprocessing import UnlabeledDataError

    folder = tmp_path / "nnUNetPlans_2d_unlabeled"
    with pytest.raises(UnlabeledDataError) as info:
        open_unlabeled_dataset(str(folder))
    assert str(folder) in str(info.value) and "nnUNetv2_mmssl_plan_and_preprocess" in str(info.value)
    assert "Supervised" in str(info.value) or "supervised" in str(info.value)
    folder.mkdir()
    with pytest.raises(UnlabeledDataError) as info:
        open_unlabeled_dataset(str(folder))
    assert str(folder) in str(info.value) and "holds no cases" in str(info.value)
    assert "nnUNetv2_mmssl_plan_and_preprocess" in str(info.value)


@pytest.fixture(scope="module")
def train_dataset(pp_dataset, tmp_path_factory) -> tuple[Path, dict]:
    """nnU-Net's preprocessing of the labelled case of ``pp_dataset`` with PP_PLANS (no unlabelled folder)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    root = tmp_path_factory.mktemp("train")
    raw = pp_dataset["raw"]
    pre = root / "preprocessed" / raw.name
    pre.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps(PP_PLANS))
    shutil.copy(raw / "dataset.json", pre / "dataset.json")
    env = {"nnUNet_raw": str(raw.parent), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        preprocess([558], "nnUNetPlans", configurations=["2d"], num_processes=[1], verbose=False)
    return pre, dict(os.environ, **env, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_nnunet_train_our_trainer_without_unlabelled_data(train_dataset, state):
    """What a user sees end to end: our message as one line, no traceback (our trainers' excepthook), and the
    traceback with NNUNET_MMSSL_VERBOSE=1."""
    pre, env = train_dataset
    folder = pre / "nnUNetPlans_2d_unlabeled"
    shutil.rmtree(folder, ignore_errors=True)
    if state == "empty":
        folder.mkdir()
    train = ("import sys; from nnunetv2.run.run_training import run_training_entry as m; "
             "sys.argv[0] = 'nnUNetv2_train'; sys.exit(m())")
    command = [sys.executable, "-c", train, "558", "2d", "all", "-tr", "MemCifSSLTrainer", "-device", "cpu"]
    # with the folder missing, the NNUNET_MMSSL_VERBOSE=1 run at the same time (CI's time budget: two starts overlap)
    verbose_err = tempfile.TemporaryFile("w+")  # a file, so that the child never waits on a full pipe
    verbose = subprocess.Popen(command, env=dict(env, NNUNET_MMSSL_VERBOSE="1"), stdout=subprocess.DEVNULL,
                               stderr=verbose_err, text=True) if state == "missing" else None
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        if verbose is not None:
            verbose.wait(timeout=600)
            verbose_err.seek(0)
        verbose_err = verbose_err.read()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("nnUNetv2_train: error: Preprocessed unlabelled data not found" if state == "missing"
                           else "nnUNetv2_train: error: The unlabelled folder"), result.stderr[-3000:]
    assert str(folder) in last
    assert ("not found" if state == "missing" else "holds no cases") in last
    assert "nnUNetv2_mmssl_plan_and_preprocess" in last
    if state == "missing":
        assert verbose.returncode != 0 and "Traceback" in verbose_err and "UnlabeledDataError" in verbose_err


@pytest.mark.slow
def test_real_prediction_lands_complete(nnunet_env, phantom_sources, tmp_path, capsys):
    """A real nnU-Net prediction (stock nnUNetTrainer, random weights, PP_PLANS) through our temporary folder: -o
    holds every case and nnU-Net's side files, nothing is left beside it, and an existing -o keeps its other files."""
    from nnunet_mmssl.cli.predict import main

    dataset_json = {"channel_names": {"0": "MRA", "1": "MRB"}, "labels": {"background": 0, "lesion": 1},
                    "numTraining": 1, "file_ending": ".nii.gz"}
    folder = _stock_model_folder(nnunet_env / "results" / "Dataset558_Bad" / "nnUNetTrainer__nnUNetPlans__2d",
                                 PP_PLANS, dataset_json)
    inputs = _phantom_inputs(phantom_sources, tmp_path / "input")
    out = tmp_path / "pred"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    assert main(["-i", str(inputs), "-o", str(out), "-m", str(folder), "-f", "0", "-device", "cpu", "--disable_tta",
                 "-npp", "1", "-nps", "1"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert {"case0.nii.gz", "case1.nii.gz", "mine.txt"} <= set(names), names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pred")]
    prediction = sitk.ReadImage(str(out / "case0.nii.gz"))
    assert prediction.GetSize() == sitk.ReadImage(str(inputs / "case0_0000.nii.gz")).GetSize()

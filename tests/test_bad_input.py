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
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

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


def assert_user_error(code: int, err: str, prog: str, *expected: str) -> str:
    """Exit code 2, exactly one ``PROG: error:`` line containing every ``expected`` substring, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, err
    for substring in expected:
        assert substring in errors[0], f"{substring!r} not in {errors[0]!r}"
    return errors[0]


def listing(folder: Path) -> list[str]:
    """Every path below ``folder`` (hidden ones included), relative; [] if it does not exist."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


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

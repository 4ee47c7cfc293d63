"""Bad input data (issue #23): names that are paths, duplicate cases, a 2D slice among 3D cases, output inside a
source, modality groups that do not partition the channels, damaged priors, and labels that exist nowhere.

Each error case asserts: exit code 2, exactly one ``PROG: error:`` line naming the file or value and the fix, no
traceback, and nothing published (nor written outside the output). Helpers and the phantom come from
``test_bad_input``; ``main(argv)`` is called in-process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_bad_input import (
    CONVERT_ARGS,
    PHANTOM_SHAPE,
    assert_user_error,
    convert_phantom,
    listing,
    put_nonfinite,
    truncate,
)

from nnunet_mmssl.dataset_conversion.phantom import make_phantom_cases
from nnunet_mmssl.names import check_safe_name, is_safe_name


@pytest.fixture(scope="module")
def phantom_sources(tmp_path_factory) -> Path:
    """3 labelled (phantom_000..002) and 2 unlabelled (phantom_003, 004) phantom cases."""
    return make_phantom_cases(tmp_path_factory.mktemp("phantom"), num_labeled=3, num_unlabeled=2,
                              shape=PHANTOM_SHAPE, seed=7)


@pytest.fixture
def sources(phantom_sources, tmp_path) -> Path:
    return Path(shutil.copytree(phantom_sources, tmp_path / "src"))


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch) -> Path:
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    return tmp_path


def convert(sources: Path, raw: Path, *extra: str, inputs: tuple[str, ...] = ("labeled", "unlabeled"),
            args: list[str] | None = None) -> int:
    from nnunet_mmssl.cli.convert import main

    return main(["-i", *(str(sources / i) for i in inputs), *(CONVERT_ARGS if args is None else args), *extra,
                 "-d", "555", "-n", "Bad", "-o", str(raw), "-q"])


# ------------------------------------------------------------------------------------------------------------------
# names are never paths
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, problem", [
    ("../../x", "path separator"), ("T1/pre", "path separator"), ("a\\b", "path separator"), ("..", "'..'"),
    ("a..b", "'..'"), (".hidden", "starts with '.'"), ("", "is empty"), ("T1\n", "control character"),
    ("x" * 101, "101 characters"), ("T1 pre", "contains ' '"), ("T1:pre", "contains ':'"),
])
def test_check_safe_name_refuses(name, problem):
    assert not is_safe_name(name)
    with pytest.raises(ValueError) as info:
        check_safe_name(name, "channel name", "dataset.json")
    message = str(info.value)
    assert "\n" not in message.replace(repr(name), "") and "dataset.json" in message and "channel name" in message
    assert problem in message and "Use only letters, digits" in message


@pytest.mark.parametrize("name", ["T1", "FLAIR", "t1_ce", "CT+MR", "T1-w.v2", "x" * 100])
def test_check_safe_name_accepts(name):
    assert check_safe_name(name, "channel name", "x") == name and is_safe_name(name)


@pytest.mark.parametrize("extra, expected", [
    (["--modality", "../../x=MRA.nii.gz", "--modality", "MRB=MRB.nii.gz"], ["'../../x'", "path separator"]),
    (["--modality", "T1/pre=MRA.nii.gz", "--modality", "MRB=MRB.nii.gz"], ["'T1/pre'", "path separator"]),
    (["--modality", ".MRA=MRA.nii.gz", "--modality", "MRB=MRB.nii.gz"], ["'.MRA'", "starts with '.'"]),
    (["--modality", "MRA=MRA.nii.gz", "--modality", "MRB=MRB.nii.gz", "--regions", "../WT=1"],
     ["--regions", "'../WT'"]),
])
def test_convert_refuses_path_names(sources, tmp_path, capsys, extra, expected):
    from nnunet_mmssl.cli.convert import PROG

    before = listing(tmp_path)
    code = convert(sources, tmp_path / "raw", args=["--label", "seg.nii.gz", *extra])
    assert_user_error(code, capsys.readouterr().err, PROG, *expected, "Use only letters, digits")
    assert listing(tmp_path) == before, "nothing written, inside or outside the output"


def test_convert_unregistered_refuses_path_names(sources, tmp_path, capsys):
    from nnunet_mmssl.cli.convert import PROG, main

    before = listing(tmp_path)
    code = main(["-i", str(sources / "labeled"), str(sources / "unlabeled"), "--source-modality", "../../CT", "MR",
                 "--image", "MRA.nii.gz", "--label", "seg.nii.gz", "-d", "555", "-n", "Bad", "-o",
                 str(tmp_path / "raw"), "-q"])
    assert_user_error(code, capsys.readouterr().err, PROG, "--source-modality", "'../../CT'", "Use only letters")
    assert listing(tmp_path) == before


# ------------------------------------------------------------------------------------------------------------------
# converter: one patient once, one dimension, nothing inside the sources, the label map that fixes a label
# ------------------------------------------------------------------------------------------------------------------

def _symlinked_case(s: Path) -> str:
    os.symlink(s / "labeled" / "phantom_000", s / "labeled" / "phantom_005", target_is_directory=True)
    return "phantom_005"


def _symlinked_file(s: Path) -> str:
    target = s / "unlabeled" / "phantom_003" / "MRB.nii.gz"
    target.unlink()
    os.symlink(s / "labeled" / "phantom_001" / "MRB.nii.gz", target)
    return "phantom_003"


def _copied_case(s: Path) -> str:
    shutil.copytree(s / "labeled" / "phantom_002", s / "unlabeled" / "phantom_009")
    return "phantom_009"


def _hard_link(s: Path) -> str:
    target = s / "unlabeled" / "phantom_004" / "MRA.nii.gz"
    target.unlink()
    os.link(s / "labeled" / "phantom_000" / "MRA.nii.gz", target)
    return "phantom_004"


@pytest.mark.parametrize("damage, how", [(_symlinked_case, "the same file"), (_symlinked_file, "the same file"),
                                         (_hard_link, "the same file"), (_copied_case, "identical")])
def test_convert_refuses_a_case_twice(sources, tmp_path, capsys, damage, how):
    from nnunet_mmssl.cli.convert import PROG

    case = damage(sources)
    raw = tmp_path / "raw"
    code = convert(sources, raw, "--num-test", "1")
    assert_user_error(code, capsys.readouterr().err, PROG, case, how, "Remove one of the two case folders")
    assert listing(raw) == []


def _slice_2d(path: Path) -> None:
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(image[:, :, 4], str(path), useCompression=True)


def test_convert_refuses_a_2d_case_among_3d_cases(sources, tmp_path, capsys):
    from nnunet_mmssl.cli.convert import PROG

    for name in ("MRA", "MRB", "seg"):
        _slice_2d(sources / "labeled" / "phantom_001" / f"{name}.nii.gz")
    raw = tmp_path / "raw"
    code = convert(sources, raw)
    assert_user_error(code, capsys.readouterr().err, PROG, "phantom_001", "MRA.nii.gz", "is a 2D image",
                      "4 case(s) are 3D", "999", "Remove the 2D case(s)")
    assert listing(raw) == []


def test_convert_all_2d_cases_is_a_2d_dataset(sources, tmp_path, capsys):
    """The control: a dataset of 2D cases only converts (nnU-Net's 2D mode)."""
    for case in sorted((sources / "labeled").iterdir()) + sorted((sources / "unlabeled").iterdir()):
        for path in case.iterdir():
            _slice_2d(path)
    raw = tmp_path / "raw"
    assert convert(sources, raw) == 0
    written = sitk.ReadImage(str(raw / "Dataset555_Bad" / "imagesTr" / "Bad_000_0000.nii.gz"))
    assert written.GetDimension() == 2 and written.GetSize() == (PHANTOM_SHAPE[2], PHANTOM_SHAPE[1])


@pytest.mark.parametrize("where", ["root inside a source", "source inside the dataset folder"])
def test_convert_writes_nothing_inside_its_sources(sources, tmp_path, capsys, where):
    from nnunet_mmssl.cli.convert import PROG, main

    if where == "root inside a source":
        raw, inputs, expected = sources / "labeled", [sources / "labeled", sources / "unlabeled"], \
            ["-o/--output-root", str(sources / "labeled"), "inside the source folder", "outside every source"]
    else:
        raw = tmp_path / "raw"
        moved = raw / "Dataset555_Bad" / "cases"
        shutil.copytree(sources / "labeled", moved)
        inputs, expected = [moved], [str(moved), "inside the dataset folder", "--overwrite would replace it"]
    before = listing(tmp_path)
    code = main(["-i", *map(str, inputs), *CONVERT_ARGS, "-d", "555", "-n", "Bad", "-o", str(raw), "-q",
                 "--overwrite"])
    assert_user_error(code, capsys.readouterr().err, PROG, *expected)
    assert listing(tmp_path) == before


def test_label_error_suggests_the_label_map_that_fixes_it(sources, tmp_path, capsys):
    from nnunet_mmssl.cli.convert import PROG

    for case in ("phantom_000", "phantom_001", "phantom_002"):  # the data set numbers its lesion 7
        path = sources / "labeled" / case / "seg.nii.gz"
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        array[array == 1] = 7
        new = sitk.GetImageFromArray(array)
        new.CopyInformation(image)
        sitk.WriteImage(new, str(path), useCompression=True)
    raw = tmp_path / "raw"
    code = convert(sources, raw)
    line = assert_user_error(code, capsys.readouterr().err, PROG, "phantom_000", "seg.nii.gz", "value 7",
                             "--label-map 7=1", "--labels NAME=VALUE")
    assert listing(raw) == []
    suggestion = line.split("e.g. ")[1].split(" (")[0].split()
    assert suggestion == ["--label-map", "7=1"]
    assert convert(sources, raw, *suggestion) == 0  # the suggested fix works
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "Dataset555_Bad" / "labelsTr" / "Bad_000.nii.gz")))
    assert set(np.unique(written)) == {0, 1}


# ------------------------------------------------------------------------------------------------------------------
# plan_and_preprocess: modality groups partition the channels; priors checked whole before anything is written
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups, expected", [
    (["MRA", "MRA"], ["--modality-groups MRA MRA", "channel 0 ('MRA')", "again", "exactly one group"]),
    (["0", "MRA,MRB"], ["channel 0 ('MRA')", "again in 'MRA,MRB'", "exactly one group"]),
    (["MRA"], ["--modality-groups MRA", "channel(s) 1 ('MRB') in no group", "exactly one group"]),
])
def test_modality_groups_must_partition_the_channels(sources, nnunet_env, capsys, groups, expected):
    from nnunet_mmssl.cli.plan_and_preprocess import PROG, main

    convert_phantom(sources, nnunet_env / "raw", 556)
    code = main(["-d", "556", "-c", "2d", "-np", "1", "--no-mmssl-plans", "--modality-groups", *groups])
    assert_user_error(code, capsys.readouterr().err, PROG, *expected)
    assert listing(nnunet_env / "preprocessed") == []


def _write_priors(raw: Path, value=None) -> list[Path]:
    """A prior in [0, 1] for every channel of every labelled case, on its image's grid."""
    written = []
    for image_file in sorted((raw / "imagesTr").iterdir()):
        image = sitk.ReadImage(str(image_file))
        array = (sitk.GetArrayFromImage(image) > np.median(sitk.GetArrayFromImage(image))).astype(np.float32)
        prior = sitk.GetImageFromArray(array * (1.0 if value is None else value))
        prior.CopyInformation(image)
        path = raw / "priorsTr" / image_file.name
        path.parent.mkdir(exist_ok=True)
        sitk.WriteImage(prior, str(path), useCompression=True)
        written.append(path)
    return written


PRIOR_CASES = {
    "NaN prior": (lambda p: put_nonfinite(p, np.nan, 3), ["3 NaN", "Replace them"]),
    "Inf prior": (lambda p: put_nonfinite(p, np.inf, 2), ["2 +Inf", "Replace them"]),
    "truncated prior": (lambda p: truncate(p, 0.6), ["is truncated", "Re-export"]),
    "prior out of range": (lambda p: _scale(p, 255.0), ["[0, 255]", "Rescale it"]),
}


def _scale(path: Path, factor: float) -> Path:
    image = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * factor)
    new.CopyInformation(image)
    sitk.WriteImage(new, str(path), useCompression=True)
    return path


@pytest.mark.parametrize("case", sorted(PRIOR_CASES))
def test_priors_are_checked_whole_before_anything_is_written(case, sources, nnunet_env, capsys):
    from nnunet_mmssl.cli.plan_and_preprocess import PROG, main

    raw = Path(convert_phantom(sources, nnunet_env / "raw", 556))
    priors = _write_priors(raw)
    damage, expected = PRIOR_CASES[case]
    damage(priors[-1])  # the last file: every other prior is read first
    code = main(["-d", "556", "-c", "2d", "-np", "1", "--no-mmssl-plans"])
    assert_user_error(code, capsys.readouterr().err, PROG, priors[-1].name, *expected)
    assert listing(nnunet_env / "preprocessed") == [], "no fingerprint, plans or preprocessing before the check"


# ------------------------------------------------------------------------------------------------------------------
# scores that cannot lie
# ------------------------------------------------------------------------------------------------------------------

def _label(path: Path, value: int = 1, shift: int = 0) -> Path:
    array = np.zeros((4, 8, 8), np.uint8)
    array[1:3, 2 + shift:6, 2:6] = value
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=True)
    return path


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for k in range(2):
        _label(ref / f"case_{k}.nii.gz")
        _label(pred / f"case_{k}.nii.gz", shift=k)
    return ref, pred


@pytest.mark.parametrize("extra, expected", [
    (["-l", "9"], ["-l/-r 9", "no reference and no prediction", "nothing to score", "-l 1"]),
    (["-r", "ET=9,8"], ["-l/-r ET", "no reference and no prediction", "-l 1"]),
    (["-l", "0"], ["label 0", "background", "foreground labels only"]),
    (["-r", "0,1"], ["'0,1'", "label 0", "background"]),
])
def test_evaluate_refuses_labels_that_score_nothing(folders, capsys, extra, expected):
    from nnunet_mmssl.cli.evaluate import PROG, main

    ref, pred = folders
    before = listing(pred)
    code = main(["-ref", str(ref), "-pred", str(pred), *extra])
    assert_user_error(code, capsys.readouterr().err, PROG, *expected)
    assert listing(pred) == before, "no summary written"


def test_evaluate_absent_label_beside_a_real_one_is_na(folders, capsys):
    from nnunet_mmssl.cli.evaluate import PROG, main

    ref, pred = folders
    assert main(["-ref", str(ref), "-pred", str(pred), "-l", "1", "9"]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith(f"{PROG}: warning: label 9")]
    assert len(warning) == 1 and "reported as n/a" in warning[0]
    row = next(line for line in captured.out.splitlines() if line.startswith("9 "))
    assert "n/a" in row and "1.0000" not in row
    summary = json.loads((pred / "summary_mmssl.json").read_text())
    assert summary["mean"]["9"]["dice"] is None and summary["absent"] == ["9"]
    assert summary["foreground_mean"]["dice"] == pytest.approx(summary["mean"]["1"]["dice"])
    assert 0 < summary["mean"]["1"]["dice"] < 1


def test_evaluate_warns_about_reference_labels_the_model_never_predicts(tmp_path, capsys):
    """References numbered 7 against a 0/1 model: Dice 0 everywhere, now with the reason."""
    from nnunet_mmssl.cli.evaluate import PROG, main

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for k in range(2):
        _label(ref / f"case_{k}.nii.gz", value=7)
        _label(pred / f"case_{k}.nii.gz", value=1)
    for extra, names in (([], ["label 7 occurs in 2 reference(s) but in no prediction", "label(s) [1] occur only"]),
                         (["-l", "1"], ["label 1 occurs in 2 prediction(s) but in no reference", "--label-map",
                                        "reference label(s) [7] are not evaluated"])):
        assert main(["-ref", str(ref), "-pred", str(pred), *extra]) == 0
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{PROG}: warning:")]
        for name in names:
            assert any(name in line for line in warnings), (name, warnings)
        summary = json.loads((pred / "summary_mmssl.json").read_text())
        assert summary["labels_in_references"] == [7] and summary["labels_in_predictions"] == [1]
        assert summary["foreground_mean"]["dice"] == 0.0


def test_per_modality_mean_of_a_label_absent_in_one_modality_is_na():
    from nnunet_mmssl.evaluation.report import aggregate_by_modality

    def case(name, convention, dice):
        return {"case": name, "metrics": {"2": {"dice": dice, "sensitivity": 1.0, "hd95": 0.0, "asd": 0.0,
                                                "convention": convention}}}

    result = {"mean": {"2": {}}, "metric_per_case": [case("a", "both_empty", 1.0), case("b", None, 0.5)]}
    per = aggregate_by_modality(result, {"a": "CT", "b": "MR"})
    assert math.isnan(per["modalities"]["CT"]["mean"]["2"]["dice"])
    assert per["modalities"]["MR"]["mean"]["2"]["dice"] == 0.5
    assert per["mean_over_modalities"]["mean"]["2"]["dice"] == 0.5


def test_missing_modalities_absent_label_is_na_not_100(tmp_path):
    from nnunet_mmssl.evaluation.missing_modalities import (
        check_scored_labels,
        evaluate_missing_modalities,
        format_missing_table,
    )

    ref = tmp_path / "ref"
    ref.mkdir()
    for k in range(2):
        _label(ref / f"case{k}.nii.gz")

    def predict(missing, output_folder):
        for k in range(2):
            shutil.copy(ref / f"case{k}.nii.gz", Path(output_folder) / f"case{k}.nii.gz")

    channels = {"0": "A", "1": "B"}
    summary = evaluate_missing_modalities(predict, str(ref), str(tmp_path / "out"), channels, ["case0", "case1"],
                                          labels={"one": 1, "nine": 9}, progress=False)
    assert all(s["mean"]["one"]["dice"] == 1.0 for s in summary["subsets"])
    assert all(s["mean"]["nine"]["dice"] is None for s in summary["subsets"])
    assert math.isnan(summary["average_over_subsets"]["nine"]["dice"])
    nine = next(line for line in format_missing_table(summary).splitlines() if line.startswith("nine"))
    assert "100.0" not in nine and nine.split()[1:] == ["n/a"] * 4
    assert len(summary["warnings"]) == 1 and "label/region 'nine'" in summary["warnings"][0]
    assert "subsets 10_A, 01_B, 11_A-B" in summary["warnings"][0]
    # before any prediction: only labels that exist nowhere -> an error; a reference label the model lacks -> warning
    model = {"labels": {"background": 0, "one": 1}}
    with pytest.raises(ValueError, match=r"-l/-r 9, in no reference .* never predicted by the model"):
        check_scored_labels(str(ref), ["case0", "case1"], ".nii.gz", model, labels=[9])
    with pytest.raises(ValueError, match="background"):
        check_scored_labels(str(ref), ["case0", "case1"], ".nii.gz", model, labels=[0])
    assert check_scored_labels(str(ref), ["case0", "case1"], ".nii.gz", model, labels=[1]) == []
    warnings = check_scored_labels(str(ref), ["case0", "case1"], ".nii.gz", {"labels": {"background": 0, "x": 2}})
    assert len(warnings) == 1 and "reference label(s) [1]" in warnings[0] and "never predicted" in warnings[0]

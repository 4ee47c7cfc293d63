"""Folder evaluation, JSON summary, table and the nnUNetv2_mmssl_evaluate CLI on tiny synthetic NIfTI files."""

import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mmssl.cli.evaluate import main
from nnunet_mmssl.evaluation import evaluate_folders, format_table, resolve_label_definitions

SHAPE = (5, 6, 7)  # numpy (z, y, x)
SPACING_XYZ = (1.0, 1.0, 3.0)  # SimpleITK (x, y, z): slices 3 mm apart


def _write(path, array, spacing_xyz=SPACING_XYZ):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))  # array axes (z, y, x)
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(path))


def _folders(tmp_path):
    ref_dir, pred_dir = tmp_path / "labelsTr", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    return ref_dir, pred_dir


def _voxel(z, y, x, label=1):
    a = np.zeros(SHAPE, np.uint8)
    a[z, y, x] = label
    return a


def test_spacing_order_is_honoured(tmp_path):
    # Spacing (x, y, z) = (1, 1, 3) -> array order (z, y, x) = (3, 1, 1).
    # case_z: the predicted voxel is one slice (z) away -> HD95 = ASD = 3 mm.
    # case_x: one column (x) away -> 1 mm. A reader that forgot to reverse the spacing would swap them.
    ref_dir, pred_dir = _folders(tmp_path)
    _write(ref_dir / "case_z.nii.gz", _voxel(2, 2, 2))
    _write(pred_dir / "case_z.nii.gz", _voxel(3, 2, 2))
    _write(ref_dir / "case_x.nii.gz", _voxel(2, 2, 2))
    _write(pred_dir / "case_x.nii.gz", _voxel(2, 2, 3))
    result = evaluate_folders(ref_dir, pred_dir)
    by_case = {rec["case"]: rec for rec in result["metric_per_case"]}
    assert by_case["case_z"]["spacing"] == [3.0, 1.0, 1.0]
    assert by_case["case_z"]["metrics"]["1"]["hd95"] == pytest.approx(3.0)
    assert by_case["case_z"]["metrics"]["1"]["asd"] == pytest.approx(3.0)
    assert by_case["case_x"]["metrics"]["1"]["hd95"] == pytest.approx(1.0)
    assert result["mean"]["1"]["hd95"] == pytest.approx(2.0)
    assert result["std"]["1"]["hd95"] == pytest.approx(1.0)  # population std of [3, 1]
    assert result["n_cases"] == 2


def _multilabel_pair():
    # Reference: label 1 on x = 0..3, label 2 on x = 4..5 (row z=2, y=2). Prediction: label 1 on x = 0..2, label 2 on
    # x = 3..5. Label 1: TP 3, FN 1 -> Dice 6/7, sens 3/4. Label 2: TP 2, FP 1 -> Dice 4/5, sens 1.
    # Region {1, 2} = x 0..5 in both -> Dice 1. Region {2} = label 2.
    ref = np.zeros(SHAPE, np.uint8)
    ref[2, 2, 0:4] = 1
    ref[2, 2, 4:6] = 2
    pred = np.zeros(SHAPE, np.uint8)
    pred[2, 2, 0:3] = 1
    pred[2, 2, 3:6] = 2
    return ref, pred


def test_labels_and_regions(tmp_path):
    ref_dir, pred_dir = _folders(tmp_path)
    ref, pred = _multilabel_pair()
    _write(ref_dir / "c1.nii.gz", ref)
    _write(pred_dir / "c1.nii.gz", pred)

    by_label = evaluate_folders(ref_dir, pred_dir, labels=[1, 2])
    assert list(by_label["mean"]) == ["1", "2"]
    assert by_label["mean"]["1"]["dice"] == pytest.approx(6 / 7)
    assert by_label["mean"]["1"]["sensitivity"] == pytest.approx(3 / 4)
    assert by_label["mean"]["2"]["dice"] == pytest.approx(4 / 5)
    assert by_label["foreground_mean"]["dice"] == pytest.approx((6 / 7 + 4 / 5) / 2)

    by_region = evaluate_folders(ref_dir, pred_dir, regions=[[1, 2], [2]])
    assert list(by_region["mean"]) == ["1,2", "2"]
    assert by_region["label_definitions"] == {"1,2": [1, 2], "2": [2]}
    assert by_region["mean"]["1,2"]["dice"] == pytest.approx(1.0)
    assert by_region["mean"]["1,2"]["hd95"] == 0.0
    assert by_region["mean"]["2"]["dice"] == pytest.approx(4 / 5)

    named = evaluate_folders(ref_dir, pred_dir, regions={"whole": [1, 2], "core": [2]})
    assert list(named["mean"]) == ["whole", "core"]
    assert named["mean"]["core"]["dice"] == pytest.approx(4 / 5)


def test_resolve_label_definitions_errors():
    assert resolve_label_definitions() is None
    assert resolve_label_definitions(labels={"liver": 1}) == {"liver": (1,)}
    with pytest.raises(ValueError, match="integer"):
        resolve_label_definitions(labels=[1.5])
    with pytest.raises(ValueError, match="empty region"):
        resolve_label_definitions(regions=[[]])
    with pytest.raises(ValueError, match="duplicate"):
        resolve_label_definitions(labels=[1], regions=[[1]])


def test_default_labels_nan_exclusion_and_json(tmp_path):
    # Default labels = nonzero labels in any reference = {1, 2}.
    # case a: label 1 and 2 present and predicted perfectly.
    # case b: label 2 absent from reference and prediction -> both_empty (sensitivity NaN, excluded);
    #         label 1 predicted perfectly. Prediction also contains label 5, found in no reference -> warning.
    # case c: label 2 absent in reference but predicted -> ref_empty (dice 0, sensitivity NaN, HD = diagonal).
    ref_dir, pred_dir = _folders(tmp_path)
    ref_a, _ = _multilabel_pair()
    _write(ref_dir / "a.nii.gz", ref_a)
    _write(pred_dir / "a.nii.gz", ref_a)
    _write(ref_dir / "b.nii.gz", _voxel(1, 1, 1))
    pred_b = _voxel(1, 1, 1)
    pred_b[4, 5, 6] = 5
    _write(pred_dir / "b.nii.gz", pred_b)
    _write(ref_dir / "c.nii.gz", _voxel(1, 1, 1))
    pred_c = _voxel(1, 1, 1)
    pred_c[3, 3, 3] = 2
    _write(pred_dir / "c.nii.gz", pred_c)

    out = tmp_path / "out" / "summary.json"
    with pytest.warns(UserWarning, match=r"\[5\].*only in predictions"):
        result = evaluate_folders(ref_dir, pred_dir, output_file=out)
    assert list(result["mean"]) == ["1", "2"]
    conventions = {rec["case"]: rec["metrics"]["2"]["convention"] for rec in result["metric_per_case"]}
    assert conventions == {"a": None, "b": "both_empty", "c": "ref_empty"}
    assert result["excluded"]["2"] == {"dice": 0, "sensitivity": 2, "hd95": 0, "asd": 0}
    assert result["excluded"]["1"]["sensitivity"] == 0
    assert result["convention_counts"]["2"] == {"both_empty": 1, "ref_empty": 1, "pred_empty": 0}
    assert result["mean"]["2"]["sensitivity"] == pytest.approx(1.0)  # only case a counts
    assert result["mean"]["2"]["dice"] == pytest.approx((1 + 1 + 0) / 3)
    # (z, y, x) spacing (3, 1, 1), shape (5, 6, 7): diagonal = sqrt(15^2 + 6^2 + 7^2) = sqrt(310)
    diagonal = math.sqrt(15**2 + 6**2 + 7**2)
    assert result["mean"]["2"]["hd95"] == pytest.approx(diagonal / 3)
    assert "both_empty" in result["conventions"]

    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    loaded = json.loads(out.read_text(), parse_constant=reject)  # NaN / Infinity tokens would call reject
    assert loaded["n_cases"] == 3
    by_case = {rec["case"]: rec for rec in loaded["metric_per_case"]}
    assert by_case["b"]["metrics"]["2"]["sensitivity"] is None
    assert loaded["mean"]["2"]["dice"] == pytest.approx(result["mean"]["2"]["dice"])
    assert not [p for p in os.listdir(out.parent) if p.endswith(".tmp")]
    # the table renders both the in-memory result and the reloaded JSON (None for NaN)
    assert "n/a" in format_table(loaded, per_case=True)


def test_all_nan_metric_gives_nan_mean_and_null(tmp_path):
    ref_dir, pred_dir = _folders(tmp_path)
    _write(ref_dir / "a.nii.gz", _voxel(1, 1, 1))
    _write(pred_dir / "a.nii.gz", _voxel(1, 1, 1))
    with pytest.warns(UserWarning, match="label 3 occurs in no reference and no prediction"):
        result = evaluate_folders(ref_dir, pred_dir, labels=[1, 3], output_file=tmp_path / "s.json")
    assert math.isnan(result["mean"]["3"]["sensitivity"]) and result["excluded"]["3"]["sensitivity"] == 1
    # label 3 exists nowhere: no score (issue #23), never the per-case both_empty Dice 1 as its mean
    assert math.isnan(result["mean"]["3"]["dice"]) and result["absent"] == ["3"]
    assert result["foreground_mean"]["dice"] == result["mean"]["1"]["dice"] == 1.0
    with open(tmp_path / "s.json") as f:
        saved = json.load(f)
    assert saved["mean"]["3"]["sensitivity"] is None and saved["mean"]["3"]["dice"] is None


def test_missing_prediction_names_the_case(tmp_path):
    ref_dir, pred_dir = _folders(tmp_path)
    _write(ref_dir / "case_001.nii.gz", _voxel(1, 1, 1))
    _write(ref_dir / "case_002.nii.gz", _voxel(1, 1, 1))
    _write(pred_dir / "case_001.nii.gz", _voxel(1, 1, 1))
    with pytest.raises(FileNotFoundError, match=r"case_002") as info:
        evaluate_folders(ref_dir, pred_dir)
    assert "case_001" not in str(info.value) and str(pred_dir) in str(info.value)


def test_extra_prediction_is_ignored_with_warning(tmp_path):
    ref_dir, pred_dir = _folders(tmp_path)
    _write(ref_dir / "a.nii.gz", _voxel(1, 1, 1))
    _write(pred_dir / "a.nii.gz", _voxel(1, 1, 1))
    _write(pred_dir / "extra.nii.gz", _voxel(1, 1, 1))
    (pred_dir / "a.npz").write_bytes(b"not an image")  # other nnU-Net outputs are not picked up
    with pytest.warns(UserWarning, match="extra"):
        result = evaluate_folders(ref_dir, pred_dir)
    assert [rec["case"] for rec in result["metric_per_case"]] == ["a"]


def test_folder_errors(tmp_path):
    ref_dir, pred_dir = _folders(tmp_path)
    with pytest.raises(ValueError, match="contains no files ending with '.nii.gz'"):
        evaluate_folders(ref_dir, pred_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_folders(tmp_path / "nope", pred_dir)


def test_grid_mismatch_names_both_files(tmp_path):
    ref_dir, pred_dir = _folders(tmp_path)
    _write(ref_dir / "a.nii.gz", _voxel(1, 1, 1))
    _write(pred_dir / "a.nii.gz", np.zeros((5, 6, 8), np.uint8))
    with pytest.raises(ValueError, match="grid size") as info:
        evaluate_folders(ref_dir, pred_dir)
    message = str(info.value)
    assert str(ref_dir / "a.nii.gz") in message and str(pred_dir / "a.nii.gz") in message


def test_multiprocessing_matches_serial(tmp_path):
    ref_dir, pred_dir = _folders(tmp_path)
    ref, pred = _multilabel_pair()
    for i in range(3):
        _write(ref_dir / f"c{i}.nii.gz", np.roll(ref, i, axis=1))
        _write(pred_dir / f"c{i}.nii.gz", np.roll(pred, i, axis=0))
    serial = evaluate_folders(ref_dir, pred_dir, labels=[1, 2])
    parallel = evaluate_folders(ref_dir, pred_dir, labels=[1, 2], num_processes=2)
    assert serial["metric_per_case"] == parallel["metric_per_case"]


def test_format_table(tmp_path):
    ref_dir, pred_dir = _folders(tmp_path)
    ref, pred = _multilabel_pair()
    _write(ref_dir / "c1.nii.gz", ref)
    _write(pred_dir / "c1.nii.gz", pred)
    result = evaluate_folders(ref_dir, pred_dir, regions=[[1, 2], [2]])
    table = format_table(result)
    for token in ("Label/region", "Dice", "Sensitivity", "HD95 (mm)", "ASD (mm)", "1,2", "1.0000 ± 0.0000", "0.8000"):
        assert token in table
    assert "Per case" not in table
    assert "c1" in format_table(result, per_case=True)


def test_cli_success_prints_table_and_writes_default_summary(tmp_path, capsys):
    ref_dir, pred_dir = _folders(tmp_path)
    ref, pred = _multilabel_pair()
    _write(ref_dir / "c1.nii.gz", ref)
    _write(pred_dir / "c1.nii.gz", pred)
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir), "-l", "1", "2", "--per-case"]) == 0
    out = capsys.readouterr().out
    assert "Dice" in out and "0.8571" in out and "Per case" in out
    summary = json.loads((pred_dir / "summary_mmssl.json").read_text())
    assert summary["mean"]["1"]["dice"] == pytest.approx(6 / 7)

    summary_file = str(tmp_path / "s.json")
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir), "-r", "WT=1,2", "2", "-o", summary_file]) == 0
    assert "WT" in capsys.readouterr().out
    assert list(json.loads((tmp_path / "s.json").read_text())["mean"]) == ["WT", "2"]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["-l", "one"], "invalid int value"),
        (["-l", "1", "-r", "1,2"], "not allowed with"),
        (["-r", "1,x"], "invalid region"),
        (["-np", "0"], "-np must be >= 1"),
    ],
)
def test_cli_bad_arguments_return_2(tmp_path, capsys, extra, expected):
    ref_dir, pred_dir = _folders(tmp_path)
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnUNetv2_mmssl_evaluate: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_user_errors_return_2_without_traceback(tmp_path, capsys):
    ref_dir, pred_dir = _folders(tmp_path)
    _write(ref_dir / "case_007.nii.gz", _voxel(1, 1, 1))
    _write(pred_dir / "other.nii.gz", _voxel(1, 1, 1))
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir)]) == 2
    err = capsys.readouterr().err
    assert "nnUNetv2_mmssl_evaluate: error: " in err and "case_007" in err and "Traceback" not in err
    assert "nnUNetv2_mmssl_evaluate: warning: " in err  # the extra prediction
    assert main(["-ref", str(tmp_path / "missing"), "-pred", str(pred_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([]) == 2
    assert "required" in capsys.readouterr().err

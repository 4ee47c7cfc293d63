"""Per-modality evaluation of unregistered datasets: read_case_modality, aggregate_by_modality,
format_modality_table and ``nnUNetv2_mmssl_evaluate --modalities-from``, on tiny label files with hand-computed
Dice/sensitivity.

Cases (one label, a row of voxels along x in a 4 x 4 x 8 volume):

* ``ct_a``: reference x = 0..3, prediction x = 0..3 -> TP 4 -> Dice 1, sensitivity 1.
* ``ct_b``: reference x = 0..3, prediction x = 0..1 -> TP 2, FN 2 -> Dice 4/6 = 2/3, sensitivity 1/2.
* ``mr_a``: reference x = 0..3, prediction x = 1..4 -> TP 3, FP 1, FN 1 -> Dice 6/8 = 3/4, sensitivity 3/4.

Per modality: CT Dice (1 + 2/3) / 2 = 5/6, sensitivity 3/4; MR Dice 3/4, sensitivity 3/4. Mean over modalities
(each modality once): Dice (5/6 + 3/4) / 2 = 19/24, which differs from the mean over cases (1 + 2/3 + 3/4) / 3 = 29/36.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mmssl.cli.evaluate import main
from nnunet_mmssl.evaluation.report import (
    aggregate_by_modality,
    evaluate_folders,
    format_modality_table,
    read_case_modality,
)

SHAPE = (4, 4, 8)  # numpy (z, y, x)
CASES = {"ct_a": ((0, 4), (0, 4)), "ct_b": ((0, 4), (0, 2)), "mr_a": ((0, 4), (1, 5))}
CASE_MODALITY = {"ct_a": "CT", "ct_b": "CT", "mr_a": "MR"}
DICE = {"CT": 5 / 6, "MR": 3 / 4}
SENSITIVITY = {"CT": 3 / 4, "MR": 3 / 4}


def _row(start: int, stop: int) -> np.ndarray:
    a = np.zeros(SHAPE, np.uint8)
    a[1, 2, start:stop] = 1
    return a


def _write(path, array):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path))


@pytest.fixture
def folders(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for case, (r, p) in CASES.items():
        _write(ref / f"{case}.nii.gz", _row(*r))
        _write(pred / f"{case}.nii.gz", _row(*p))
    return ref, pred


def _dataset_json(path, case_modality, modalities=("CT", "MR")):
    content = {"channel_names": {"0": "CT+MR"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz",
               "mmssl": {"layout": "unregistered", "modalities": list(modalities), "case_modality": case_modality}}
    path.write_text(json.dumps(content))
    return path


def test_read_case_modality_from_dataset_json_and_split_file(tmp_path):
    modalities, case_modality = read_case_modality(_dataset_json(tmp_path / "dataset.json", CASE_MODALITY,
                                                                 ("MR", "CT")))
    assert modalities == ["MR", "CT"]  # the file's order, not the order of appearance
    assert case_modality == CASE_MODALITY
    split = tmp_path / "mmssl_split.json"
    split.write_text(json.dumps({"case_modality": CASE_MODALITY}))  # no modalities list: order of appearance
    assert read_case_modality(split) == (["CT", "MR"], CASE_MODALITY)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"channel_names": {"0": "CT"}}))
    with pytest.raises(ValueError, match="plain.json.*case_modality"):
        read_case_modality(plain)


def test_aggregate_by_modality_hand_computed(folders):
    ref, pred = folders
    result = evaluate_folders(ref, pred)
    by_case = {rec["case"]: rec["metrics"]["1"] for rec in result["metric_per_case"]}
    assert by_case["ct_b"]["dice"] == pytest.approx(2 / 3) and by_case["mr_a"]["dice"] == pytest.approx(3 / 4)
    by_modality = aggregate_by_modality(result, CASE_MODALITY, ["MR", "CT"])
    per = by_modality["modalities"]
    assert list(per) == ["MR", "CT"]
    assert per["CT"]["n_cases"] == 2 and per["MR"]["n_cases"] == 1
    for modality in ("CT", "MR"):
        assert per[modality]["mean"]["1"]["dice"] == pytest.approx(DICE[modality])
        assert per[modality]["mean"]["1"]["sensitivity"] == pytest.approx(SENSITIVITY[modality])
        assert per[modality]["foreground_mean"]["dice"] == pytest.approx(DICE[modality])  # one label
    over = by_modality["mean_over_modalities"]
    assert over["mean"]["1"]["dice"] == pytest.approx(19 / 24)
    assert over["foreground_mean"]["dice"] == pytest.approx(19 / 24)
    assert result["mean"]["1"]["dice"] == pytest.approx(29 / 36)  # the per-case mean is different
    # a modality listed but without evaluated case is left out; default order = first appearance
    assert list(aggregate_by_modality(result, CASE_MODALITY, ["T1", "CT", "MR"])["modalities"]) == ["CT", "MR"]
    assert list(aggregate_by_modality(result, CASE_MODALITY)["modalities"]) == ["CT", "MR"]


def test_aggregate_names_a_case_without_modality(folders):
    result = evaluate_folders(*folders)
    with pytest.raises(ValueError, match="mr_a"):
        aggregate_by_modality(result, {"ct_a": "CT", "ct_b": "CT"})


def test_format_modality_table_rows(folders):
    by_modality = aggregate_by_modality(evaluate_folders(*folders), CASE_MODALITY)
    lines = format_modality_table(by_modality).splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["CT"][1] == "2" and float(rows["CT"][2]) == pytest.approx(5 / 6, abs=1e-4)
    assert rows["MR"][1] == "1" and float(rows["MR"][2]) == pytest.approx(0.75, abs=1e-4)
    mean_row = next(line for line in lines if line.startswith("mean over modalities"))
    assert float(mean_row.split()[3]) == pytest.approx(19 / 24, abs=1e-4)
    assert format_modality_table({"modalities": {}, "mean_over_modalities": {}}) == "No case with a modality."


def test_cli_modalities_from_writes_per_modality(folders, tmp_path, capsys):
    ref, pred = folders
    output = tmp_path / "summary.json"
    dataset_json = _dataset_json(tmp_path / "dataset.json", CASE_MODALITY)
    assert main(["-ref", str(ref), "-pred", str(pred), "-o", str(output), "--modalities-from",
                 str(dataset_json)]) == 0
    printed = capsys.readouterr().out
    assert "Per modality" in printed and "mean over modalities" in printed
    summary = json.loads(output.read_text())
    per = summary["per_modality"]
    assert per["modalities"]["CT"]["mean"]["1"]["dice"] == pytest.approx(5 / 6)
    assert per["modalities"]["MR"]["mean"]["1"]["dice"] == pytest.approx(3 / 4)
    assert per["mean_over_modalities"]["mean"]["1"]["dice"] == pytest.approx(19 / 24)
    assert summary["mean"]["1"]["dice"] == pytest.approx(29 / 36)  # nnU-Net-style per-case summary kept


def test_cli_case_missing_from_modality_file_is_a_clear_error(folders, tmp_path, capsys):
    ref, pred = folders
    output = tmp_path / "summary.json"
    dataset_json = _dataset_json(tmp_path / "dataset.json", {"ct_a": "CT", "ct_b": "CT"})
    assert main(["-ref", str(ref), "-pred", str(pred), "-o", str(output), "--modalities-from",
                 str(dataset_json)]) == 2
    err = capsys.readouterr().err
    assert "mr_a" in err and "no modality" in err and "Traceback" not in err
    assert not output.exists()  # nothing that looks finished
    # a file without per-case modalities names the file
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"labels": {"background": 0, "organ": 1}}))
    assert main(["-ref", str(ref), "-pred", str(pred), "-o", str(output), "--modalities-from", str(plain)]) == 2
    assert "plain.json" in capsys.readouterr().err and not output.exists()

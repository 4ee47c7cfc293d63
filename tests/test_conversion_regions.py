"""Region datasets at conversion (issue #12 §1): --label-map V=T (BraTS 4 -> 3) and --regions in registered mode."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mmssl.cli.convert import main
from nnunet_mmssl.dataset_conversion.regions import parse_region_specs, region_labels
from nnunet_mmssl.dataset_conversion.request import ConversionError

LABELS = {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}


def _write_sources(root, num_cases=3):
    for i in range(num_cases):
        case = root / "src" / f"case_{i}"
        case.mkdir(parents=True)
        rng = np.random.default_rng(i)
        for name in ("t1", "flair"):
            sitk.WriteImage(sitk.GetImageFromArray(rng.normal(size=(4, 8, 8)).astype(np.float32)),
                            str(case / f"{name}.nii.gz"))
        seg = np.zeros((4, 8, 8), np.uint8)
        seg[1:3, 2:6, 2:6] = 2  # BraTS numbering: 1 necrosis... here 1 edema, 2 necrosis, 4 enhancing
        seg[1:3, 3:5, 3:5] = 4
        seg[0, 0, 0] = 1
        sitk.WriteImage(sitk.GetImageFromArray(seg), str(case / "seg.nii.gz"))
    return root / "src"


def test_region_dataset_with_brats_label_map(tmp_path):
    src = _write_sources(tmp_path)
    code = main(["-i", str(src), "--modality", "T1=t1.nii.gz", "--modality", "FLAIR=flair.nii.gz", "--label",
                 "seg.nii.gz", "--labels", *[f"{k}={v}" for k, v in LABELS.items()], "--label-map", "1=1", "2=2",
                 "4=3", "--regions", "WT=1,2,3", "TC=2,3", "ET=3", "-d", "7", "-n", "Regions",
                 "-o", str(tmp_path / "raw"),
                 "-q"])
    assert code == 0
    folder = tmp_path / "raw" / "Dataset007_Regions"
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}
    assert dataset_json["regions_class_order"] == [1, 2, 3]
    assert dataset_json["mmssl"]["label_map"] == {"1": 1, "2": 2, "4": 3, "0": 0}
    for label in (folder / "labelsTr").iterdir():
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label)))).tolist())
        assert values == {0, 1, 2, 3}  # 4 written as 3
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(dataset_json["labels"], dataset_json["regions_class_order"])
    assert manager.has_regions and manager.num_segmentation_heads == 3


def test_unmapped_value_and_bad_regions_are_errors(tmp_path, capsys):
    src = _write_sources(tmp_path, 1)
    base = ["-i", str(src), "--modality", "T1=t1.nii.gz", "--label", "seg.nii.gz", "--labels",
            *[f"{k}={v}" for k, v in LABELS.items()], "-d", "8", "-n", "Bad", "-o", str(tmp_path / "raw"), "-q"]
    assert main(base + ["--label-map", "2=2"]) == 2  # 1 and 4 are present but not mapped
    err = capsys.readouterr().err
    assert "value 1" in err and "--label-map 1=T" in err
    assert main(base + ["--label-map", "4=3", "1=1", "2=2", "--regions", "WT=1,2,5"]) == 2
    assert "5" in capsys.readouterr().err
    assert not (tmp_path / "raw" / "Dataset008_Bad").exists()


def test_region_order_rules():
    assert parse_region_specs(["WT=1,2,3", "TC=2,3"]) == {"WT": [1, 2, 3], "TC": [2, 3]}
    labels, order = region_labels(LABELS, {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]})
    assert order == [1, 2, 3]
    with pytest.raises(ConversionError, match="regions-class-order"):
        region_labels(LABELS, {"A": [3], "B": [3]})  # A has no value outside B
    assert region_labels(LABELS, {"A": [3], "B": [3]}, [3, 3])[1] == [3, 3]
    with pytest.raises(ConversionError, match="NAME=VALUE"):
        parse_region_specs(["WT"])
    with pytest.raises(ConversionError, match="foreground"):
        region_labels(LABELS, {"X": [0, 1]})
    with pytest.raises(ConversionError, match="background"):
        region_labels(LABELS, {"background": [1]})

"""Tests of the unregistered converter (one modality per source) and its CLI on tiny synthetic volumes.

Sources: ``ct`` (CT, class id 5, cases of different grids), ``mr`` and ``mr2`` (both MR, class id 1, another grid and
spacing). One case per source has no label.
"""

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mmssl.cli.convert import main
from nnunet_mmssl.dataset_conversion import (
    ConversionError,
    convert_unregistered,
    parse_count_specs,
    parse_label_map_specs,
)
from nnunet_mmssl.dataset_conversion import unregistered as unregistered_module

LABELS = {"background": 0, "organ": 1}
CT_SPACING = (0.9, 0.9, 2.5)  # x, y, z
MR_SPACING = (1.2, 1.1, 4.0)


def write(path: Path, array: np.ndarray, spacing, dtype=np.float32) -> Path:
    image = sitk.GetImageFromArray(np.asarray(array).astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin((1.0, -2.0, 3.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def case(folder: Path, shape, spacing, class_id: int | None, offset: float) -> None:
    """``folder/image.nii.gz`` (random, mean ``offset``) and, unless ``class_id`` is None, ``folder/label.nii.gz``
    with a box of ``class_id``."""
    rng = np.random.default_rng(zlib.crc32(str(folder).encode()))
    write(folder / "image.nii.gz", rng.normal(offset, 10, size=shape), spacing)
    if class_id is not None:
        label = np.zeros(shape)
        label[1:3, 2:5, 2:4] = class_id
        write(folder / "label.nii.gz", label, spacing, dtype=np.uint8)


def make_sources(root: Path) -> dict[str, Path]:
    """``ct``: 4 labelled (value 5, shapes alternate 4x8x8 / 4x8x9) + 1 unlabelled; ``mr``: 2 labelled (value 1,
    5x8x6) + 1 unlabelled; ``mr2``: 1 labelled + 1 unlabelled."""
    src = {name: root / name for name in ("ct", "mr", "mr2")}
    for k in range(5):
        case(src["ct"] / f"ct_{k:02d}", (4, 8, 8 + k % 2), CT_SPACING, 5 if k < 4 else None, -500.0)
    for k in range(3):
        case(src["mr"] / f"mr_{k:02d}", (5, 8, 6), MR_SPACING, 1 if k < 2 else None, 300.0)
    for k in range(2):
        case(src["mr2"] / f"scan_{k}", (5, 7, 6), MR_SPACING, 1 if k == 0 else None, 300.0)
    return src


@pytest.fixture
def sources(tmp_path):
    return make_sources(tmp_path / "src")


def convert(tmp_path, sources, names=("ct", "mr", "mr2"), modalities=("CT", "MR", "MR"), out="out", **kwargs):
    args = {"label_globs": "label*", "dataset_id": 321, "dataset_name": "Unreg", "num_labeled": None, "num_test": 0,
            "seed": 0, "labels": LABELS, "label_maps": {"CT": {5: 1}}, **kwargs}
    return convert_unregistered([sources[n] for n in names], list(modalities), "image*", args.pop("label_globs"),
                                tmp_path / out, args.pop("dataset_id"), args.pop("dataset_name"), **args)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def folder_of(record: dict) -> Path:
    return Path(record["source"]) / record["case_folder"]


# ------------------------------------------------------------------------------------------------------------------
# good input
# ------------------------------------------------------------------------------------------------------------------

def test_written_dataset(tmp_path, sources):
    target = convert(tmp_path, sources, num_labeled={"CT": 2}, num_test=1, num_processes=2)
    ds = read_json(target / "dataset.json")
    mm = ds["mmssl"]
    assert ds["channel_names"] == {"0": "CT+MR"} and ds["labels"] == LABELS and ds["file_ending"] == ".nii.gz"
    assert read_json(target / "mmssl_split.json") == mm
    assert mm["layout"] == "unregistered" and mm["modalities"] == ["CT", "MR"]
    assert mm["intensity_schemes"] == {"CT": "CTNormalization", "MR": "ZScoreNormalization"}
    assert mm["source_modality"] == ["CT", "MR", "MR"] and mm["label_maps"] == {"CT": {"5": 1}}
    assert mm["sources"] == [str(sources[n].resolve()) for n in ("ct", "mr", "mr2")]
    # CT: 4 labelled -> 1 test, 2 training, 1 + 1 unlabelled; MR: 3 labelled -> 1 test, 2 training, 2 unlabelled
    assert mm["counts_per_modality"] == {"CT": {"labeled": 2, "unlabeled": 2, "test": 1},
                                         "MR": {"labeled": 2, "unlabeled": 2, "test": 1}}
    assert (ds["numTraining"], ds["numUnlabeled"], ds["numTest"]) == (4, 4, 2)
    assert mm["num_labeled_requested"] == {"CT": 2, "MR": None} and mm["num_test_requested"] == {"CT": 1, "MR": 1}

    # case ids over all cases in (source, folder) order, independent of the split; every written file has a modality
    records = {r["case_id"]: r for g in mm["split"].values() for r in g}
    assert sorted(records) == [f"Unreg_{i:03d}" for i in range(10)]
    assert [records[f"Unreg_{i:03d}"]["case_folder"] for i in (0, 4, 5, 8, 9)] == \
        ["ct_00", "ct_04", "mr_00", "scan_0", "scan_1"]
    written = {p.name[:-len("_0000.nii.gz")] for sub in ("imagesTr", "imagesUnlabeled", "imagesTs")
               for p in (target / sub).iterdir()}
    assert all(p.name.endswith("_0000.nii.gz") for sub in ("imagesTr", "imagesUnlabeled", "imagesTs")
               for p in (target / sub).iterdir())
    assert written == set(mm["case_modality"]) == set(records)
    for case_id, record in records.items():
        expected = "CT" if record["case_folder"].startswith("ct") else "MR"
        assert mm["case_modality"][case_id] == record["modality"] == expected

    # images copied with their own grid; labels remapped (CT 5 -> 1) on the image's grid; no label for unlabelled
    for group, (image_sub, label_sub) in {"labeled": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs"),
                                          "unlabeled": ("imagesUnlabeled", None)}.items():
        for record in mm["split"][group]:
            src = folder_of(record)
            image = sitk.ReadImage(str(target / image_sub / f"{record['case_id']}_0000.nii.gz"))
            source_image = sitk.ReadImage(str(src / "image.nii.gz"))
            assert image.GetSpacing() == pytest.approx(source_image.GetSpacing())
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source_image))
            if label_sub is None:
                assert not (target / "labelsTr" / f"{record['case_id']}.nii.gz").exists()
                continue
            label = array(target / label_sub / f"{record['case_id']}.nii.gz")
            source_label = array(src / "label.nii.gz")
            assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
            np.testing.assert_array_equal(label, (source_label > 0).astype(np.uint8))
    assert len(list((target / "labelsTr").iterdir())) == 4 and len(list((target / "labelsTs").iterdir())) == 2


def test_per_modality_fractions_and_schemes(tmp_path, sources):
    target = convert(tmp_path, sources, num_labeled=0.5, num_test={"CT": 0.25},
                     intensity_schemes={"MR": "NoNormalization"})
    mm = read_json(target / "dataset.json")["mmssl"]
    # CT: 4 labelled, test round(1.0) = 1, labelled round(1.5 + 0.5) = 2; MR: 3 labelled, no test, labelled 2
    assert mm["counts_per_modality"] == {"CT": {"labeled": 2, "unlabeled": 2, "test": 1},
                                         "MR": {"labeled": 2, "unlabeled": 3, "test": 0}}
    assert mm["intensity_schemes"] == {"CT": "CTNormalization", "MR": "NoNormalization"}


def folders_by_group(target: Path, modality: str) -> dict[str, list[str]]:
    mm = read_json(target / "mmssl_split.json")
    return {g: sorted(r["case_folder"] for r in rs if r["modality"] == modality) for g, rs in mm["split"].items()}


def test_seed_reproducible_and_per_modality(tmp_path, sources):
    kwargs = {"num_labeled": 1, "num_test": 1}
    first = convert(tmp_path, sources, out="a", seed=5, **kwargs)
    again = convert(tmp_path, sources, out="b", seed=5, **kwargs)
    assert read_json(first / "mmssl_split.json")["split"] == read_json(again / "mmssl_split.json")["split"]
    ct = folders_by_group(first, "CT")
    assert len(ct["test"]) == 1 and len(ct["labeled"]) == 1
    # another seed gives another CT split for some seed
    others = [folders_by_group(convert(tmp_path, sources, out=f"s{s}", seed=s, **kwargs), "CT") for s in (6, 7, 8)]
    assert any(o != ct for o in others)
    # each modality's split does not depend on the others: MR sources first, or CT alone, give the same CT split
    reordered = convert(tmp_path, sources, names=("mr", "mr2", "ct"), modalities=("MR", "MR", "CT"), out="r",
                        seed=5, **kwargs)
    assert read_json(reordered / "dataset.json")["mmssl"]["modalities"] == ["MR", "CT"]
    assert folders_by_group(reordered, "CT") == ct
    assert folders_by_group(reordered, "MR") == folders_by_group(first, "MR")
    alone = convert(tmp_path, sources, names=("ct",), modalities=("CT",), out="c", seed=5, **kwargs)
    assert folders_by_group(alone, "CT") == ct


def test_single_modality(tmp_path, sources):
    target = convert(tmp_path, sources, names=("ct",), modalities=("CT",), label_maps=None,
                     labels={"background": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5})
    ds = read_json(target / "dataset.json")
    assert ds["channel_names"] == {"0": "CT"} and ds["mmssl"]["modalities"] == ["CT"]
    assert set(ds["mmssl"]["case_modality"].values()) == {"CT"} and ds["mmssl"]["label_maps"] == {}
    # without a map the label is kept as it is (5 is declared here)
    assert set(np.unique(array(next((target / "labelsTr").iterdir())))) == {0, 5}


# ------------------------------------------------------------------------------------------------------------------
# bad input: one message naming the value / file and the fix, nothing written
# ------------------------------------------------------------------------------------------------------------------

def put_label(path: Path, value: int, shape=None, spacing=CT_SPACING) -> None:
    label = array(path) if shape is None else np.zeros(shape)
    label[0, 0, 0] = value
    write(path, label, spacing, dtype=np.uint8)


BAD = {
    "unmapped label value": (lambda s: put_label(s["ct"] / "ct_02" / "label.nii.gz", 7), {},
                             ["ct_02", "label.nii.gz", "value 7", "--label-map CT:7=T"]),
    "undeclared value without map": (lambda s: None, {"label_maps": None},
                                     ["ct_00", "label.nii.gz", "value 5", "not declared",
                                      "--label-map CT:V=T"]),
    "map target not declared": (lambda s: None, {"label_maps": {"CT": {5: 2}}}, ["target 2", "not a declared"]),
    "image/label grid mismatch": (lambda s: put_label(s["mr"] / "mr_01" / "label.nii.gz", 1, shape=(5, 8, 7),
                                                      spacing=MR_SPACING), {},
                                  ["mr_01", "'image.nii.gz' and 'label.nii.gz'", "not on the same grid", "size"]),
    "unknown modality in label map": (lambda s: None, {"label_maps": {"CT": {5: 1}, "PET": {1: 1}}},
                                      ["--label-map", "'PET'", "['CT', 'MR']"]),
    "unknown modality in scheme": (lambda s: None, {"intensity_schemes": {"Ct": "CTNormalization"}},
                                   ["--intensity-scheme", "'Ct'", "['CT', 'MR']"]),
    "unknown modality in counts": (lambda s: None, {"num_labeled": {"T1": 1}}, ["--num-labeled", "'T1'", "['CT'"]),
    "unknown scheme": (lambda s: None, {"intensity_schemes": {"MR": "ZScore"}}, ["'ZScore'", "ZScoreNormalization"]),
    "source with no cases": (lambda s: (shutil.rmtree(s["mr2"]), s["mr2"].mkdir()), {},
                             ["mr2", "holds no case subfolder"]),
    "modality without labelled case": (lambda s: [p.unlink() for p in s["mr"].parent.rglob("label.nii.gz")
                                                  if "mr" in p.parent.parent.name], {},
                                       ["modality 'MR'", "none of the 5 cases has a label"]),
    "too many test cases": (lambda s: None, {"num_test": {"MR": 3}}, ["modality 'MR'", "num_test=3"]),
    "case without image": (lambda s: (s["ct"] / "ct_01" / "image.nii.gz").rename(s["ct"] / "ct_01" / "img.nii"),
                           {}, ["ct_01", "'CT'", "no file matches"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input(name, tmp_path, sources, monkeypatch):
    damage, kwargs, expected = BAD[name]
    damage(sources)
    written = []
    monkeypatch.setattr(unregistered_module, "_write_case", written.append)
    with pytest.raises(ConversionError) as info:
        convert(tmp_path, sources, **kwargs)
    for text in expected:
        assert text in str(info.value), (text, str(info.value))
    assert written == [], "the error was found while writing, not by the checks before"
    assert not (tmp_path / "out").exists(), "the converter left output behind"


def test_failure_while_writing_leaves_output_root_unchanged(tmp_path, sources, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    before = listing(tmp_path / "out")
    real = unregistered_module._write_case
    calls = []

    def failing(task):
        calls.append(task["case_id"])
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(task)

    monkeypatch.setattr(unregistered_module, "_write_case", failing)
    with pytest.raises(OSError, match="simulated"):
        convert(tmp_path, sources)
    assert len(calls) == 3 and listing(tmp_path / "out") == before


def test_source_modality_count_must_match(tmp_path, sources):
    with pytest.raises(ConversionError, match=r"3 source folder\(s\) but 2 source modalities"):
        convert(tmp_path, sources, modalities=("CT", "MR"))


# ------------------------------------------------------------------------------------------------------------------
# parsing and CLI
# ------------------------------------------------------------------------------------------------------------------

def test_parse_specs():
    assert parse_label_map_specs(["CT:5=1,6=2", "MR:1=1", "CT:0=0"]) == {"CT": {5: 1, 6: 2, 0: 0}, "MR": {1: 1}}
    assert parse_count_specs(["0.5", "CT:3"], "--num-labeled") == (0.5, {"CT": 3})
    for bad in (["CT:5"], ["CT:a=1"], ["CT:5=1", "CT:5=2"], ["5=1"]):
        with pytest.raises(ConversionError, match="--label-map"):
            parse_label_map_specs(bad)
    with pytest.raises(ConversionError, match="two values"):
        parse_count_specs(["1", "2"], "--num-test")


def cli_args(sources, out, *extra):
    return ["-i", str(sources["ct"]), str(sources["mr"]), str(sources["mr2"]), "--source-modality", "CT", "MR", "MR",
            "--image", "image*", "--label", "label*", "--labels", "background=0", "organ=1", "--label-map", "CT:5=1",
            "-d", "88", "-n", "CliUnreg", "-o", str(out), *extra]


def test_cli(tmp_path, sources, capsys):
    rc = main(cli_args(sources, tmp_path / "raw", "--num-labeled", "1", "CT:0.5", "--num-test", "MR:1", "-q",
                       "--intensity-scheme", "MR=RescaleTo01Normalization"))
    out = capsys.readouterr()
    assert rc == 0, out.err
    mm = read_json(tmp_path / "raw" / "Dataset088_CliUnreg" / "dataset.json")["mmssl"]
    assert mm["num_labeled_requested"] == {"CT": 0.5, "MR": 1} and mm["num_test_requested"] == {"CT": 0, "MR": 1}
    assert mm["counts_per_modality"] == {"CT": {"labeled": 2, "unlabeled": 3, "test": 0},
                                         "MR": {"labeled": 1, "unlabeled": 3, "test": 1}}
    assert mm["intensity_schemes"]["MR"] == "RescaleTo01Normalization"
    assert "CT (CTNormalization): 2 labelled, 3 unlabelled, 0 test" in out.out
    assert "MR (RescaleTo01Normalization): 1 labelled, 3 unlabelled, 1 test" in out.out


@pytest.mark.parametrize("extra, drop, message", [
    (["--modality", "CT=image*"], [], "--modality is for registered sources"),
    ([], ["--image", "image*"], "--source-modality needs --image"),
    (["--label-map", "CT:7"], [], "--label-map 'CT:7'"),
    (["--num-labeled", "CT:x"], [], "--num-labeled 'x'"),
])
def test_cli_errors(tmp_path, sources, capsys, extra, drop, message):
    args = cli_args(sources, tmp_path / "raw", *extra)
    if drop:
        at = args.index(drop[0])
        del args[at:at + len(drop)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnUNetv2_mmssl_convert: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "raw").exists()


def test_cli_unregistered_options_need_source_modality(tmp_path, sources, capsys):
    args = ["-i", str(sources["ct"]), "--image", "image*", "-d", "88", "-n", "X", "-o", str(tmp_path / "raw")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--image is for unregistered sources" in err and "--source-modality" in err

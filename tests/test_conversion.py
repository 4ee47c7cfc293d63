"""Tests of the dataset converter and its CLI on tiny synthetic volumes (plus one slow real-data test)."""

import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mmssl.cli.convert import main
from nnunet_mmssl.dataset_conversion import (
    ConversionError,
    convert_dataset,
    discover_cases,
    parse_label_specs,
    parse_modality_specs,
    split_cases,
)
from nnunet_mmssl.dataset_conversion import convert as convert_module

SHAPE = (4, 6, 5)  # z, y, x
SPACING = (2.0, 1.0, 1.0)  # x, y, z (SimpleITK order)
ORIGIN = (0.0, -5.0, 10.0)

MODALITIES = [("FLAIR", ["*flair*", "*FLAIR*"]), ("T1", ["T1.nii.gz", "*t1n*"])]
LABEL_GLOBS = ["*seg*", "GT_*"]

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_image(path: Path, array=None, dtype=np.float32, spacing=SPACING, origin=ORIGIN, direction=None,
                shape=SHAPE, value=None) -> Path:
    """Write a small image; random content unless ``array`` or ``value`` is given."""
    if array is None:
        rng = np.random.default_rng(zlib.crc32(str(path).encode()))
        array = rng.normal(100, 10, size=shape) if value is None else np.full(shape, value)
    image = sitk.GetImageFromArray(np.asarray(array).astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def label_array(k: int = 0) -> np.ndarray:
    arr = np.zeros(SHAPE)
    arr[1:3, 2:4, 1 + (k % 2):3 + (k % 2)] = 1
    return arr


def make_sources(root: Path, num_labeled_a: int = 4, num_unlabeled_b: int = 2) -> tuple[Path, Path]:
    """Source A: ``case_k/{FLAIR.nii.gz, T1.nii.gz, GT_W.nii.gz}`` (float 0/1 label) + one unlabelled case.

    Source B: nested ``BraTS-xxx/sub/xxx-{t2f_flair,t1n,t1c}.nii`` (uncompressed, int16), one labelled by ``seg``.
    """
    a, b = root / "srcA", root / "srcB"
    for k in range(num_labeled_a):
        write_image(a / f"case_{k}" / "FLAIR.nii.gz")
        write_image(a / f"case_{k}" / "T1.nii.gz")
        write_image(a / f"case_{k}" / "GT_W.nii.gz", label_array(k), dtype=np.float32)
        (a / f"case_{k}" / "subject_id.txt").write_text("x")
    write_image(a / "case_x_nolabel" / "FLAIR.nii.gz")
    write_image(a / "case_x_nolabel" / "T1.nii.gz")
    for k in range(num_unlabeled_b):
        name = f"BraTS-{k:03d}"
        write_image(b / name / "sub" / f"{name}-t2f_flair.nii", dtype=np.int16)
        write_image(b / name / "sub" / f"{name}-t1n.nii", dtype=np.int16)
        write_image(b / name / "sub" / f"{name}-t1c.nii", dtype=np.int16)
    write_image(b / "BraTS-labelled" / "x-flair.nii.gz")
    write_image(b / "BraTS-labelled" / "x-t1n.nii.gz")
    write_image(b / "BraTS-labelled" / "x_seg.nii.gz", label_array(), dtype=np.uint8)
    (b / "README.txt").write_text("not a case")
    return a, b


def convert(tmp_path, sources, out="out", **kwargs):
    args = dict(modalities=MODALITIES, label_globs=LABEL_GLOBS, output_root=tmp_path / out, dataset_id=123,
                dataset_name="Test", num_labeled=None, num_test=0, seed=0)
    args.update(kwargs)
    return convert_dataset(sources, **args)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def case_map(split: dict) -> dict:
    return {g: {(r["case_folder"], r["case_id"]) for r in recs} for g, recs in split["split"].items()}


# ------------------------------------------------------------------------------------------------------------------
# good input
# ------------------------------------------------------------------------------------------------------------------


def test_full_conversion(tmp_path):
    a, b = make_sources(tmp_path)
    target = convert(tmp_path, [a, b], num_labeled=2, num_test=1, seed=7)
    assert target == (tmp_path / "out" / "Dataset123_Test").resolve()
    ds = read_json(target / "dataset.json")
    assert ds["channel_names"] == {"0": "FLAIR", "1": "T1"}
    assert ds["labels"] == {"background": 0, "foreground": 1}
    assert ds["file_ending"] == ".nii.gz"
    # 5 labelled cases (4 in A, 1 in B), 3 without label
    assert (ds["numTraining"], ds["numTest"], ds["numUnlabeled"]) == (2, 1, 2 + 3)
    split = read_json(target / "mmssl_split.json")
    assert split == ds["mmssl"]
    assert split["seed"] == 7 and split["modalities"] == {"FLAIR": ["*flair*", "*FLAIR*"], "T1": ["T1.nii.gz", "*t1n*"]}
    assert split["sources"] == [str(a.resolve()), str(b.resolve())]
    # ids follow sorted (source index, folder name), independent of the split
    all_records = sorted((r for recs in split["split"].values() for r in recs), key=lambda r: r["case_id"])
    assert [r["case_folder"] for r in all_records] == [
        "case_0", "case_1", "case_2", "case_3", "case_x_nolabel", "BraTS-000", "BraTS-001", "BraTS-labelled"]
    assert [r["case_id"] for r in all_records] == [f"Test_{i:03d}" for i in range(8)]
    nested = next(r for r in all_records if r["case_folder"] == "BraTS-000")
    assert nested["images"] == {"FLAIR": "sub/BraTS-000-t2f_flair.nii", "T1": "sub/BraTS-000-t1n.nii"}
    assert nested["label"] is None
    # unlabelled pool = cases without label + labelled cases not chosen (label recorded, not copied)
    unl = split["split"]["unlabeled"]
    assert sum(r["label"] is None for r in unl) == 3
    assert all(not r["label_copied"] for r in unl)
    assert split["counts"]["unlabeled_with_label_not_copied"] == 2
    assert all(r["label_copied"] for g in ("labeled", "test") for r in split["split"][g])

    def ids(folder, suffix):
        return sorted(p.name[: -len(suffix)] for p in (target / folder).iterdir() if p.name.endswith(suffix))

    for group, (img, lab) in {"labeled": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs"),
                              "unlabeled": ("imagesUnlabeled", None)}.items():
        expected = sorted(r["case_id"] for r in split["split"][group])
        assert ids(img, "_0000.nii.gz") == expected and ids(img, "_0001.nii.gz") == expected
        assert len(list((target / img).iterdir())) == 2 * len(expected)
        if lab:
            assert ids(lab, ".nii.gz") == expected
    # labels: float 0/1 written as uint8 with the image geometry; images keep pixel type and geometry
    for lab_file in (target / "labelsTr").iterdir():
        lab = sitk.ReadImage(str(lab_file))
        assert lab.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayFromImage(lab))) <= {0, 1}
        assert lab.GetSpacing() == SPACING and lab.GetOrigin() == ORIGIN
    nested_out = sitk.ReadImage(str(target / "imagesUnlabeled" / f"{nested['case_id']}_0001.nii.gz"))
    assert nested_out.GetPixelID() == sitk.sitkInt16 and nested_out.GetSize() == SHAPE[::-1]
    src = sitk.ReadImage(str(b / "BraTS-000" / "sub" / "BraTS-000-t1n.nii"))
    assert np.array_equal(sitk.GetArrayFromImage(src), sitk.GetArrayFromImage(nested_out))
    # no temporary folder left behind
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["Dataset123_Test"]


def test_nnunet_accepts_dataset(tmp_path):
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    a, b = make_sources(tmp_path)
    target = convert(tmp_path, [a, b], num_labeled=3, num_test=1)
    verify.verify_dataset_integrity(str(target), 1)


def test_split_reproducible_and_seed_dependent(tmp_path):
    a, b = make_sources(tmp_path, num_labeled_a=8)
    s1 = read_json(convert(tmp_path, [a, b], out="o1", num_labeled=3, num_test=2, seed=1) / "mmssl_split.json")
    s2 = read_json(convert(tmp_path, [a, b], out="o2", num_labeled=3, num_test=2, seed=1) / "mmssl_split.json")
    assert case_map(s1) == case_map(s2)
    maps = [case_map(read_json(convert(tmp_path, [a, b], out=f"s{seed}", num_labeled=3, num_test=2, seed=seed)
                               / "mmssl_split.json")) for seed in (2, 3, 4)]
    assert any(m != case_map(s1) for m in maps)


def test_split_cases_function(tmp_path):
    a, b = make_sources(tmp_path, num_labeled_a=8)
    cases = discover_cases([a, b], MODALITIES, LABEL_GLOBS)
    split = split_cases(cases, 3, 2, seed=5)
    assert split == split_cases(cases, 3, 2, seed=5)
    labelled = {i for i, c in enumerate(cases) if c.label_file is not None}
    assert len(split["labeled"]) == 3 and len(split["test"]) == 2
    assert set(split["labeled"]) | set(split["test"]) <= labelled
    assert sorted(split["labeled"] + split["test"] + split["unlabeled"]) == list(range(len(cases)))
    # the permutation of RandomState(seed) over the labelled cases, in discovery order
    order = np.random.RandomState(5).permutation(len(labelled))
    shuffled = [sorted(labelled)[k] for k in order]
    assert split["test"] == sorted(shuffled[:2]) and split["labeled"] == sorted(shuffled[2:5])


@pytest.mark.parametrize("fraction, expected", [(0.3, 2), (0.1, 1), (1.0, 7), (0.5, 4)])
def test_fraction_num_labeled(tmp_path, fraction, expected):
    a, b = make_sources(tmp_path, num_labeled_a=7, num_unlabeled_b=1)  # 8 labelled, 1 test -> 7 remain
    ds = read_json(convert(tmp_path, [a, b], num_labeled=fraction, num_test=1) / "dataset.json")
    assert ds["numTraining"] == expected and ds["numTest"] == 1
    assert ds["numUnlabeled"] == 2 + 7 - expected


def test_custom_labels_and_prefix_and_int16(tmp_path):
    src = tmp_path / "src"
    arr = label_array()
    arr[0, 0, 0] = 300
    for k in range(2):
        write_image(src / f"c{k}" / "FLAIR.nii.gz")
        write_image(src / f"c{k}" / "T1.nii.gz")
        write_image(src / f"c{k}" / "seg.nii.gz", arr if k == 0 else label_array(), dtype=np.int32)
    labels = {"background": 0, **{f"l{v}": v for v in range(1, 301)}}
    target = convert(tmp_path, [src], labels=labels, case_prefix="PFX", num_processes=2)
    ds = read_json(target / "dataset.json")
    assert ds["labels"] == labels and ds["numTraining"] == 2
    lab = sitk.ReadImage(str(target / "labelsTr" / "PFX_000.nii.gz"))
    assert lab.GetPixelID() == sitk.sitkInt16 and sitk.GetArrayFromImage(lab).max() == 300


def test_overwrite_replaces(tmp_path):
    a, b = make_sources(tmp_path)
    convert(tmp_path, [a, b], num_labeled=1)
    target = convert(tmp_path, [a, b], num_labeled=2, overwrite=True)
    assert read_json(target / "dataset.json")["numTraining"] == 2
    assert len(list((target / "imagesTr").iterdir())) == 4
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["Dataset123_Test"]


# ------------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------------


def assert_nothing_written(tmp_path, out="out"):
    root = tmp_path / out
    assert not root.exists() or list(root.iterdir()) == []


def test_glob_matches_none(tmp_path):
    a, b = make_sources(tmp_path)
    (a / "case_1" / "T1.nii.gz").rename(a / "case_1" / "T1w.nii.gz")
    with pytest.raises(ConversionError) as err:
        convert(tmp_path, [a, b])
    msg = str(err.value)
    assert "case_1" in msg and "'T1'" in msg and "T1.nii.gz" in msg and "*t1n*" in msg and "no file" in msg
    assert "T1w.nii.gz" in msg  # lists the available files
    assert_nothing_written(tmp_path)


def test_glob_matches_several(tmp_path):
    a, b = make_sources(tmp_path)
    write_image(a / "case_2" / "extra" / "FLAIR_old.nii.gz")
    with pytest.raises(ConversionError) as err:
        convert(tmp_path, [a, b])
    msg = str(err.value)
    assert "case_2" in msg and "'FLAIR'" in msg and "FLAIR.nii.gz" in msg and "extra/FLAIR_old.nii.gz" in msg


def test_several_label_files(tmp_path):
    a, b = make_sources(tmp_path)
    write_image(b / "BraTS-labelled" / "GT_2.nii.gz", label_array(), dtype=np.uint8)
    with pytest.raises(ConversionError, match=r"BraTS-labelled.*label glob.*2 files.*GT_2\.nii\.gz"):
        convert(tmp_path, [a, b])


def test_ambiguous_file(tmp_path):
    a, b = make_sources(tmp_path)
    modalities = [("FLAIR", ["*flair*", "*FLAIR*"]), ("T1", ["*t1*", "T1.nii.gz"])]
    write_image(a / "case_0" / "FLAIR_t1.nii.gz")
    with pytest.raises(ConversionError) as err:
        convert(tmp_path, [a, b], modalities=modalities)
    msg = str(err.value)
    assert "ambiguous" in msg and "FLAIR_t1.nii.gz" in msg and "'FLAIR'" in msg and "'T1'" in msg


def test_t1_glob_catching_t1c_is_reported(tmp_path):
    a, b = make_sources(tmp_path)
    with pytest.raises(ConversionError, match=r"BraTS-000.*'T1'.*2 files match.*t1c.*t1n"):
        convert(tmp_path, [a, b], modalities=[("FLAIR", ["*flair*", "*FLAIR*"]), ("T1", ["T1.nii.gz", "*t1*"])])


@pytest.mark.parametrize("kind, kwargs, pattern", [
    ("size", {"shape": (4, 6, 6)}, r"size \(5, 6, 4\) vs \(6, 6, 4\)"),
    ("spacing", {"spacing": (2.0, 1.0, 1.5)}, r"spacing \(2, 1, 1\) vs \(2, 1, 1\.5\)"),
    ("origin", {"origin": (0.0, -5.0, 10.5)}, r"origin \(0, -5, 10\) vs \(0, -5, 10\.5\)"),
    ("direction", {"direction": (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)},
     r"direction \(1, 0, 0, 0, 1, 0, 0, 0, 1\) vs \(-1, 0, 0, 0, 1, 0, 0, 0, 1\)"),
])
@pytest.mark.parametrize("which", ["T1.nii.gz", "GT_W.nii.gz"])
def test_grid_mismatch(tmp_path, kind, kwargs, pattern, which):
    a, b = make_sources(tmp_path)
    if which == "GT_W.nii.gz" and "shape" in kwargs:
        arr = np.zeros(kwargs["shape"])
        write_image(a / "case_3" / which, arr, **kwargs)
    elif which == "GT_W.nii.gz":
        write_image(a / "case_3" / which, label_array(), **kwargs)
    else:
        write_image(a / "case_3" / which, **kwargs)
    with pytest.raises(ConversionError) as err:
        convert(tmp_path, [a, b])
    msg = str(err.value)
    assert "case_3" in msg and "FLAIR.nii.gz" in msg and which in msg and kind in msg
    assert re.search(pattern, msg), msg
    assert_nothing_written(tmp_path)


def test_small_differences_within_tolerance(tmp_path):
    a, b = make_sources(tmp_path)
    write_image(a / "case_3" / "T1.nii.gz", spacing=(2.0, 1.0, 1.0 + 1e-5), origin=(0.0, -5.0, 10.001))
    convert(tmp_path, [a, b])
    with pytest.raises(ConversionError, match="origin"):
        convert(tmp_path, [a, b], out="strict", origin_tolerance=1e-4)


def test_non_integral_label(tmp_path):
    a, b = make_sources(tmp_path)
    arr = label_array()
    arr[0, 0, 0] = 0.5
    write_image(a / "case_2" / "GT_W.nii.gz", arr)
    with pytest.raises(ConversionError, match=r"GT_W\.nii\.gz.*non-integral.*0\.5"):
        convert(tmp_path, [a, b])
    assert_nothing_written(tmp_path)


def test_negative_label(tmp_path):
    a, b = make_sources(tmp_path)
    write_image(a / "case_2" / "GT_W.nii.gz", -label_array(), dtype=np.int16)
    with pytest.raises(ConversionError, match=r"GT_W\.nii\.gz.*negative"):
        convert(tmp_path, [a, b])


def test_undeclared_label_value(tmp_path):
    a, b = make_sources(tmp_path)
    write_image(a / "case_1" / "GT_W.nii.gz", label_array() * 2)
    with pytest.raises(ConversionError) as err:
        convert(tmp_path, [a, b])
    msg = str(err.value)
    assert "case_1" in msg and "GT_W.nii.gz" in msg and "value 2" in msg
    convert(tmp_path, [a, b], labels={"background": 0, "edema": 1, "core": 2})


@pytest.mark.parametrize("num_labeled, num_test, pattern", [
    (4, 2, r"num_test=2 \+ num_labeled=4 = 6 labelled cases, but only 5"),
    (None, 5, r"num_test=5 but only 5 cases have a label"),
    (0, 1, r"num_labeled=0"),
    (1.5, 1, r"fraction in \(0, 1\]"),
    (-0.1, 0, r"fraction"),
])
def test_impossible_split(tmp_path, num_labeled, num_test, pattern):
    a, b = make_sources(tmp_path)
    with pytest.raises(ConversionError, match=pattern):
        convert(tmp_path, [a, b], num_labeled=num_labeled, num_test=num_test)
    assert_nothing_written(tmp_path)


def test_no_labels_at_all(tmp_path):
    a, b = make_sources(tmp_path)
    with pytest.raises(ConversionError, match="zero labelled training cases"):
        convert(tmp_path, [a, b], label_globs=None)


def test_existing_output_without_overwrite(tmp_path):
    a, b = make_sources(tmp_path)
    target = convert(tmp_path, [a, b])
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    with pytest.raises(ConversionError, match=r"Dataset123_Test.*exists.*overwrite"):
        convert(tmp_path, [a, b], num_labeled=1)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert read_json(target / "dataset.json")["numTraining"] == 5


def test_same_id_other_name(tmp_path):
    a, b = make_sources(tmp_path)
    (tmp_path / "out" / "Dataset123_Other").mkdir(parents=True)
    with pytest.raises(ConversionError, match=r"Dataset123_Other.*Dataset123_Test"):
        convert(tmp_path, [a, b])


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    a, b = make_sources(tmp_path)
    real = convert_module._write_case
    calls = []

    def failing(task):
        calls.append(task["case_id"])
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(task)

    monkeypatch.setattr(convert_module, "_write_case", failing)
    with pytest.raises(OSError, match="simulated"):
        convert(tmp_path, [a, b])
    assert len(calls) == 3
    assert_nothing_written(tmp_path)


def test_failure_with_overwrite_keeps_old_dataset(tmp_path, monkeypatch):
    a, b = make_sources(tmp_path)
    target = convert(tmp_path, [a, b], num_labeled=1)

    def failing(task):
        raise OSError("simulated")

    monkeypatch.setattr(convert_module, "_write_case", failing)
    with pytest.raises(OSError):
        convert(tmp_path, [a, b], overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["Dataset123_Test"]
    assert read_json(target / "dataset.json")["numTraining"] == 1


@pytest.mark.parametrize("kwargs, pattern", [
    ({"dataset_id": 0}, "dataset id"),
    ({"dataset_name": "bad name"}, "dataset name"),
    ({"labels": {"bg": 0, "fg": 1}}, "background=0"),
    ({"labels": {"background": 0, "a": 2}}, "consecutive"),
    ({"modalities": []}, "at least one modality"),
    ({"modalities": [("A", ["*flair*"]), ("A", ["*t1n*"])]}, "given twice"),
])
def test_bad_requests(tmp_path, kwargs, pattern):
    a, b = make_sources(tmp_path)
    with pytest.raises(ConversionError, match=pattern):
        convert(tmp_path, [a, b], **kwargs)


def test_missing_source(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path, [tmp_path / "nope"])


# ------------------------------------------------------------------------------------------------------------------
# parsing and CLI
# ------------------------------------------------------------------------------------------------------------------


def test_parse_modality_specs():
    specs = ["FLAIR=*flair*", "T1=T1.nii.gz,*t1n*", "FLAIR=*FLAIR*", "T1=*t1n*", "T2 = t2.nii"]
    assert parse_modality_specs(specs) == [("FLAIR", ["*flair*", "*FLAIR*"]), ("T1", ["T1.nii.gz", "*t1n*"]),
                                           ("T2", ["t2.nii"])]
    for bad in ["FLAIR", "=*x*", "FLAIR=", "FLAIR=a,,b"]:
        with pytest.raises(ConversionError, match="--modality"):
            parse_modality_specs([bad])


def test_parse_label_specs():
    assert parse_label_specs(["background=0", "tumour=1"]) == {"background": 0, "tumour": 1}
    for bad in (["background"], ["background=x"], ["background=0", "background=1"], ["background=1"]):
        with pytest.raises(ConversionError):
            parse_label_specs(bad)


def cli_args(a, b, out, *extra):
    return ["-i", str(a), str(b), "--modality", "FLAIR=*flair*", "--modality", "T1=T1.nii.gz,*t1n*",
            "--modality", "FLAIR=*FLAIR*", "--label", "*seg*", "--label", "GT_*", "-d", "77", "-n", "Cli",
            "-o", str(out), *extra]


def test_cli_success(tmp_path, capsys):
    a, b = make_sources(tmp_path)
    rc = main(cli_args(a, b, tmp_path / "raw", "--num-labeled", "0.5", "--num-test", "1", "--seed", "3",
                       "--labels", "background=0", "tumour=1", "-q"))
    out = capsys.readouterr()
    assert rc == 0, out.err
    target = tmp_path / "raw" / "Dataset077_Cli"
    ds = read_json(target / "dataset.json")
    assert ds["channel_names"] == {"0": "FLAIR", "1": "T1"} and ds["labels"] == {"background": 0, "tumour": 1}
    assert (ds["numTraining"], ds["numTest"], ds["numUnlabeled"]) == (2, 1, 5)
    assert ds["mmssl"]["seed"] == 3 and ds["mmssl"]["num_labeled_requested"] == 0.5
    assert str(target) in out.out and "labelled training (imagesTr/labelsTr): 2" in out.out


def test_cli_uses_nnunet_raw(tmp_path, monkeypatch, capsys):
    a, b = make_sources(tmp_path)
    args = cli_args(a, b, "x")[:-2] + ["--num-labeled", "2"]
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(args) == 2
    assert "nnUNet_raw" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "envraw"))
    assert main(args) == 0
    assert read_json(tmp_path / "envraw" / "Dataset077_Cli" / "dataset.json")["numTraining"] == 2


def test_cli_bad_glob(tmp_path, capsys):
    a, b = make_sources(tmp_path)
    args = cli_args(a, b, tmp_path / "raw")
    args[args.index("T1=T1.nii.gz,*t1n*")] = "T1=T1.nii.gz,*t1w*"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnUNetv2_mmssl_convert: error: ")
    assert "BraTS-000" in err and "'T1'" in err and "*t1w*" in err and "Traceback" not in err
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("bad", [["--modality", "FLAIR"], ["--num-labeled", "abc"], ["--labels", "bg=0"]])
def test_cli_malformed_arguments(tmp_path, capsys, bad):
    a, b = make_sources(tmp_path)
    assert main(cli_args(a, b, tmp_path / "raw", *bad)) == 2
    err = capsys.readouterr().err
    assert "nnUNetv2_mmssl_convert: error: " in err and "Traceback" not in err


def test_cli_argparse_error_returns_2(capsys):
    assert main(["-i", "x"]) == 2
    assert "nnUNetv2_mmssl_convert: error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# real data (slow)
# ------------------------------------------------------------------------------------------------------------------

REAL_MODALITY_ARGS = ["--modality", "FLAIR=FLAIR.nii.gz", "--modality", "FLAIR=*t2f*", "--modality",
                      "FLAIR=flair.nii.gz", "--modality", "FLAIR=*_fla_*", "--modality", "T1=T1.nii.gz",
                      "--modality", "T1=*t1n*", "--modality", "T1=t1.nii.gz", "--modality", "T1=*_t1_*"]


@pytest.mark.slow
def test_real_brats_conversion(tmp_path, capsys):
    labelled, unlabelled = REAL_DATA / "brats2018_flair_t1", REAL_DATA / "brats_4seq_unlabeled"
    if not (labelled.is_dir() and unlabelled.is_dir()):
        pytest.skip(f"real data not available at {REAL_DATA}")
    rc = main(["-i", str(labelled), str(unlabelled), *REAL_MODALITY_ARGS, "--label", "*GT_W*", "--num-labeled", "1",
               "--num-test", "1", "--seed", "1234", "-d", "501", "-n", "BraTSFlairT1", "-o", str(tmp_path), "-q",
               "-np", str(min(4, os.cpu_count() or 1))])
    out = capsys.readouterr()
    assert rc == 0, out.err
    target = tmp_path / "Dataset501_BraTSFlairT1"
    ds = read_json(target / "dataset.json")
    assert (ds["numTraining"], ds["numTest"], ds["numUnlabeled"]) == (1, 1, 12)
    unl = {r["case_folder"]: r for r in ds["mmssl"]["split"]["unlabeled"]}
    assert unl["BraTS-GLI-00001-000"]["images"] == {"FLAIR": "BraTS-GLI-00001-000-t2f.nii.gz",
                                                    "T1": "BraTS-GLI-00001-000-t1n.nii.gz"}
    assert unl["BraTS-MET-00110-000"]["images"] == {"FLAIR": "flair.nii.gz", "T1": "t1.nii.gz"}
    assert unl["TCGA-DU-7294"]["images"] == {"FLAIR": "raw_bet/TCGA-DU-7294_fla_bet.nii.gz",
                                             "T1": "raw_bet/TCGA-DU-7294_t1_bet.nii.gz"}
    assert unl["TCGA-FG-6692"]["images"]["T1"] == "raw_bet/OtherEXampleFromTCIA_t1_bet.nii.gz"
    for lab_file in list((target / "labelsTr").iterdir()) + list((target / "labelsTs").iterdir()):
        lab = sitk.ReadImage(str(lab_file))
        assert lab.GetPixelID() == sitk.sitkUInt8 and lab.GetSize() == (240, 240, 155)
        assert set(np.unique(sitk.GetArrayViewFromImage(lab))) == {0, 1}
    assert len(list((target / "imagesUnlabeled").iterdir())) == 24

"""Tests of the synthetic two-modality phantom."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_mmssl.dataset_conversion import (
    PHANTOM_LABEL_GLOB,
    PHANTOM_MODALITY_GLOBS,
    convert_dataset,
    generate_phantom_case,
    make_phantom_cases,
)
from nnunet_mmssl.dataset_conversion.phantom import NOISE_STD, TISSUE_MEAN


def read(path):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def all_arrays(folder):
    return {str(p.relative_to(folder)): sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
            for p in sorted(folder.rglob("*.nii.gz"))}


def test_layout_shapes_spacing(tmp_path):
    out = make_phantom_cases(tmp_path / "ph", num_labeled=2, num_unlabeled=3, shape=(12, 32, 40),
                             spacing=(3.0, 1.0, 0.5), seed=1)
    assert out == tmp_path / "ph"
    assert sorted(p.name for p in (out / "labeled").iterdir()) == ["phantom_000", "phantom_001"]
    assert sorted(p.name for p in (out / "unlabeled").iterdir()) == ["phantom_002", "phantom_003", "phantom_004"]
    for case in (out / "labeled").iterdir():
        assert sorted(p.name for p in case.iterdir()) == ["MRA.nii.gz", "MRB.nii.gz", "seg.nii.gz"]
    for case in (out / "unlabeled").iterdir():
        assert sorted(p.name for p in case.iterdir()) == ["MRA.nii.gz", "MRB.nii.gz"]
    for path in out.rglob("*.nii.gz"):
        image, array = read(path)
        assert array.shape == (12, 32, 40)
        assert image.GetSpacing() == (0.5, 1.0, 3.0)  # x, y, z
        assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        expected = sitk.sitkUInt8 if path.name == "seg.nii.gz" else sitk.sitkFloat32
        assert image.GetPixelID() == expected
    _, seg = read(out / "labeled" / "phantom_000" / "seg.nii.gz")
    assert set(np.unique(seg)) == {0, 1}


def test_default_geometry(tmp_path):
    out = make_phantom_cases(tmp_path, num_labeled=1, num_unlabeled=0)
    image, array = read(out / "labeled" / "phantom_000" / "MRA.nii.gz")
    assert array.shape == (20, 64, 64) and image.GetSpacing() == (1.0, 1.0, 3.0)


def test_determinism(tmp_path):
    a = all_arrays(make_phantom_cases(tmp_path / "a", 2, 2, seed=5))
    b = all_arrays(make_phantom_cases(tmp_path / "b", 2, 2, seed=5))
    c = all_arrays(make_phantom_cases(tmp_path / "c", 2, 2, seed=6))
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(not np.array_equal(a[k], c[k]) for k in a)
    # a case does not depend on how many cases are requested
    d = all_arrays(make_phantom_cases(tmp_path / "d", 3, 0, seed=5))
    assert np.array_equal(d["labeled/phantom_001/MRA.nii.gz"], a["labeled/phantom_001/MRA.nii.gz"])
    # cases differ from each other
    assert not np.array_equal(a["labeled/phantom_000/seg.nii.gz"], a["labeled/phantom_001/seg.nii.gz"])


def test_generate_is_deterministic():
    c1 = generate_phantom_case(np.random.default_rng(3))
    c2 = generate_phantom_case(np.random.default_rng(3))
    for name in ("MRA", "MRB"):
        assert np.array_equal(c1.images[name], c2.images[name])
    assert np.array_equal(c1.label, c2.label)


@pytest.mark.parametrize("seed", range(6))
def test_label_is_union_of_what_the_modalities_show(seed):
    rng = np.random.default_rng([seed, 0])
    case = generate_phantom_case(rng)
    assert 1 <= len(case.lesions) <= 2
    assert case.core.any() and case.rim.any()
    assert not (case.core & case.rim).any()
    assert np.array_equal(case.label.astype(bool), case.core | case.rim)
    assert not (case.label.astype(bool) & ~case.brain).any()  # lesions lie inside the brain

    # noise- and bias-free version (same lesions): thresholding each modality halfway between tissue and lesion
    # recovers exactly the rim (MRA) and exactly the core (MRB); their union is the label
    flat = generate_phantom_case(np.random.default_rng([seed, 0]), noise=False, bias=False)
    assert np.array_equal(flat.label, case.label)
    bright_a = flat.images["MRA"] > 1.4 * TISSUE_MEAN["MRA"]
    bright_b = flat.images["MRB"] > 1.3 * TISSUE_MEAN["MRB"]
    assert np.array_equal(bright_a, flat.rim)
    assert np.array_equal(bright_b, flat.core)
    assert np.array_equal(bright_a | bright_b, flat.label.astype(bool))

    # with noise and bias: compare region means with the surrounding tissue
    lesion = case.label.astype(bool)
    shell = ndimage.binary_dilation(lesion, iterations=3) & ~lesion & case.brain
    for name, visible, hidden in (("MRA", case.rim, case.core), ("MRB", case.core, case.rim)):
        image = case.images[name]
        tissue = image[shell].mean()
        assert abs(tissue - TISSUE_MEAN[name]) < 0.25 * TISSUE_MEAN[name]
        # hidden part iso-intense with tissue (within bias + noise), visible part clearly bright
        assert abs(image[hidden].mean() - tissue) < 0.1 * tissue + 3 * NOISE_STD[name] / np.sqrt(hidden.sum())
        assert image[visible].mean() > 1.4 * tissue
        assert image[visible].mean() - image[hidden].mean() > 4 * NOISE_STD[name]


def test_intensity_scales():
    case = generate_phantom_case(np.random.default_rng(0))
    interior = case.brain & ~case.label.astype(bool)
    interior = ndimage.binary_erosion(interior, iterations=2)
    for name in ("MRA", "MRB"):
        values = case.images[name][interior]
        assert abs(np.median(values) - TISSUE_MEAN[name]) < 0.15 * TISSUE_MEAN[name]
        # noise sd: from differences of neighbouring voxels (bias field cancels)
        diffs = np.diff(case.images[name], axis=2)[interior[:, :, 1:] & interior[:, :, :-1]]
        assert abs(diffs.std() / np.sqrt(2) - NOISE_STD[name]) < 0.2 * NOISE_STD[name]
    outside = ~ndimage.binary_dilation(case.brain, iterations=3)
    assert case.images["MRA"][outside].mean() < 0.2 * TISSUE_MEAN["MRA"]
    assert all(v.dtype == np.float32 and v.min() >= 0 for v in case.images.values())


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_phantom_cases(tmp_path, shape=(4, 64, 64))
    with pytest.raises(ValueError):
        make_phantom_cases(tmp_path, spacing=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        make_phantom_cases(tmp_path, seed=-1)


def test_convertable(tmp_path):
    src = make_phantom_cases(tmp_path / "ph", num_labeled=4, num_unlabeled=2, shape=(10, 24, 24), seed=2)
    target = convert_dataset([src / "labeled", src / "unlabeled"], PHANTOM_MODALITY_GLOBS, PHANTOM_LABEL_GLOB,
                             tmp_path / "raw", 990, "Phantom", num_labeled=2, num_test=1, seed=0)
    with open(target / "dataset.json") as f:
        ds = json.load(f)
    assert ds["channel_names"] == {"0": "MRA", "1": "MRB"}
    assert (ds["numTraining"], ds["numTest"], ds["numUnlabeled"]) == (2, 1, 3)
    assert len(list((target / "imagesUnlabeled").iterdir())) == 6
    for lab in (target / "labelsTr").iterdir():
        image, array = read(lab)
        assert image.GetSpacing() == (1.0, 1.0, 3.0) and array.shape == (10, 24, 24)

"""Per-case normalisation by modality (unregistered datasets), on synthetic intensities with hand-computed values.

Raw dataset (one channel, 4 x 6 x 6 voxels, spacing 1 mm, a 2 x 2 x 2 foreground block of label 1):

* ``ct1``: foreground 100, background 150, one voxel at 2000 (above the CT fingerprint's 99.5th percentile).
* ``ct2``: foreground 300, background 250.
* ``mr1``: left half (x < 3) 10, right half 30; foreground in the right half (value 30).
* ``mr2``: left half 100, right half 300 (same pattern, another scale).

CT fingerprint, over the CT cases' foreground only (nnU-Net samples the same number of voxels per case, with
replacement; constant foregrounds make the samples exact): half 100, half 300 -> mean 200, std 100, 0.5th
percentile 100, 99.5th 300, median 200. Were the MR cases included, the mean would fall (their foreground is 30 and
300). So CT cases become ``(clip(x, 100, 300) - 200) / 100``: ct1 foreground -1, background -0.5, the 2000 voxel +1;
ct2 foreground +1, background 0.5. MR cases are z-scored per case: both halves of each MR case -> -1 and +1.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from plans_fixtures import RESAMPLING

from nnunet_mmssl.dataset_conversion.modality_layout import ModalityLayoutError, make_layout
from nnunet_mmssl.planners.modality_normalization import (
    MODALITY_PROPERTY,
    ModalityPreprocessor,
    modality_intensity_properties,
    plans_for_modality,
    stratified_splits,
    unregistered_plans_block,
)

SHAPE = (4, 6, 6)
CASE_MODALITY = {"ct1": "CT", "ct2": "CT", "mr1": "MR", "mr2": "MR"}
DATASET_JSON = {"channel_names": {"0": "CT+MR"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}
#: what stock nnU-Net would use for the mixed channel (all labelled cases): must not be what CT cases get
GLOBAL_PROPERTIES = {"mean": 0.0, "median": 0.0, "std": 1.0, "min": -1e4, "max": 1e4, "percentile_00_5": -1e4,
                     "percentile_99_5": 1e4}


ARCH_3D = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3]] * 2, "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1],
                    "n_conv_per_stage_decoder": [1], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def _foreground() -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[1:3, 2:4, 3:5] = True
    return mask


def _images() -> dict[str, np.ndarray]:
    fg = _foreground()
    ct1 = np.where(fg, 100.0, 150.0)
    ct1[0, 0, 0] = 2000.0
    ct2 = np.where(fg, 300.0, 250.0)
    left = np.zeros(SHAPE, bool)
    left[..., :3] = True
    mr1 = np.where(left, 10.0, 30.0)
    mr2 = np.where(left, 100.0, 300.0)
    return {"ct1": ct1, "ct2": ct2, "mr1": mr1, "mr2": mr2}


def _expected() -> dict[str, np.ndarray]:
    images = _images()
    expected = {c: (np.clip(images[c], 100, 300) - 200) / 100 for c in ("ct1", "ct2")}
    left = np.zeros(SHAPE, bool)
    left[..., :3] = True
    expected["mr1"] = expected["mr2"] = np.where(left, -1.0, 1.0)
    return expected


def _write(path, array, dtype=np.float32):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=dtype))
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "Dataset990_Unreg"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case, image in _images().items():
        _write(root / "imagesTr" / f"{case}_0000.nii.gz", image)
        _write(root / "labelsTr" / f"{case}.nii.gz", _foreground(), np.uint8)
    (root / "dataset.json").write_text(json.dumps(DATASET_JSON))
    return root


@pytest.fixture(scope="module")
def layout():
    return make_layout(["CT", "MR"], CASE_MODALITY)


@pytest.fixture(scope="module")
def properties(raw, layout):
    return modality_intensity_properties(str(raw), DATASET_JSON, layout, GLOBAL_PROPERTIES, num_processes=1,
                                         num_voxels=4000)


def test_ct_fingerprint_uses_ct_foreground_only(properties, layout):
    assert layout.intensity_schemes == {"CT": "CTNormalization", "MR": "ZScoreNormalization"}
    ct = properties["CT"]
    assert ct["mean"] == pytest.approx(200.0)
    assert ct["std"] == pytest.approx(100.0)
    assert ct["median"] == pytest.approx(200.0)
    assert ct["percentile_00_5"] == pytest.approx(100.0) and ct["percentile_99_5"] == pytest.approx(300.0)
    assert ct["min"] == pytest.approx(100.0) and ct["max"] == pytest.approx(300.0)
    assert "2 labelled CT cases" in ct["source"]
    # z-score ignores the fingerprint: MR keeps the global one, complete
    assert {k: v for k, v in properties["MR"].items() if k != "source"} == GLOBAL_PROPERTIES


def test_ct_fingerprint_needs_a_labelled_ct_case(raw):
    layout = make_layout(["CT", "MR"], {"ct1": "MR", "ct2": "MR", "mr1": "MR", "mr2": "MR"})
    with pytest.raises(ModalityLayoutError, match="'CT'.*no"):
        modality_intensity_properties(str(raw), DATASET_JSON, layout, GLOBAL_PROPERTIES, num_processes=1,
                                      num_voxels=400)


def _plans(layout, properties) -> dict:
    configuration = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                     "batch_size": 2, "patch_size": [4, 6, 6], "median_image_size_in_voxels": [4, 6, 6],
                     "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
                     "use_mask_for_norm": [False], "architecture": ARCH_3D, **RESAMPLING}
    return {"dataset_name": "Dataset990_Unreg", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": list(SHAPE),
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": GLOBAL_PROPERTIES},
            "configurations": {"3d_fullres": configuration},
            "mmssl": unregistered_plans_block(layout, properties)}


def test_plans_for_modality_swaps_scheme_and_fingerprint(layout, properties):
    plans = _plans(layout, properties)
    ct = plans_for_modality(plans, "CT")
    assert ct["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    assert ct["foreground_intensity_properties_per_channel"]["0"]["mean"] == pytest.approx(200.0)
    assert "source" not in ct["foreground_intensity_properties_per_channel"]["0"]
    mr = plans_for_modality(plans, "MR")
    assert mr["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]  # not mutated
    assert plans["foreground_intensity_properties_per_channel"]["0"] == GLOBAL_PROPERTIES
    with pytest.raises(ModalityLayoutError, match="'T2'.*CT"):
        plans_for_modality(plans, "T2")


def test_preprocessor_normalises_by_modality_and_records_it(raw, layout, properties, tmp_path):
    plans_manager = PlansManager(_plans(layout, properties))
    configuration = plans_manager.get_configuration("3d_fullres")
    preprocessor = ModalityPreprocessor(CASE_MODALITY)
    for case in CASE_MODALITY:
        preprocessor.run_case_save(str(tmp_path / case), [str(raw / "imagesTr" / f"{case}_0000.nii.gz")],
                                   str(raw / "labelsTr" / f"{case}.nii.gz"), plans_manager, configuration,
                                   DATASET_JSON)
    dataset = nnUNetDatasetBlosc2(str(tmp_path), list(CASE_MODALITY))
    expected = _expected()
    for case, modality in CASE_MODALITY.items():
        data, seg, _, props = dataset.load_case(case)
        assert props[MODALITY_PROPERTY] == modality
        np.testing.assert_allclose(np.asarray(data)[0], expected[case], atol=1e-5, err_msg=case)
        assert np.array_equal(np.asarray(seg)[0] == 1, _foreground())
    # the stock plans' scheme for the mixed channel is untouched
    assert plans_manager.plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]


def test_preprocessor_refuses_a_case_without_modality(raw, layout, properties, tmp_path):
    plans_manager = PlansManager(_plans(layout, properties))
    preprocessor = ModalityPreprocessor({"ct1": "CT"})
    with pytest.raises(ModalityLayoutError, match="'mr1'.*case_modality"):
        preprocessor.run_case_save(str(tmp_path / "mr1"), [str(raw / "imagesTr" / "mr1_0000.nii.gz")],
                                   str(raw / "labelsTr" / "mr1.nii.gz"), plans_manager,
                                   plans_manager.get_configuration("3d_fullres"), DATASET_JSON)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("counts", [{"CT": 5, "MR": 5, "T1": 5}, {"CT": 11, "MR": 7}])
def test_stratified_splits_every_modality_in_every_validation_fold(counts):
    case_modality = {f"{m.lower()}_{i:02d}": m for m, n in counts.items() for i in range(n)}
    ids = sorted(case_modality)
    splits = stratified_splits(case_modality, ids, n_splits=5, seed=3)
    assert len(splits) == 5
    validated = [c for fold in splits for c in fold["val"]]
    assert sorted(validated) == ids  # each case validated exactly once
    for fold in splits:
        assert set(fold["train"]).isdisjoint(fold["val"])
        assert sorted(fold["train"] + fold["val"]) == ids
        for modality, n in counts.items():
            in_val = sum(case_modality[c] == modality for c in fold["val"])
            assert n // 5 <= in_val <= -(-n // 5), (modality, fold["val"])
    assert stratified_splits(case_modality, ids, n_splits=5, seed=3) == splits
    with pytest.raises(ValueError, match="n_splits"):
        stratified_splits(case_modality, ids, n_splits=1)

"""Uncertainty maps, head disagreement, case ranking and ``nnUNetv2_mmssl_pseudolabel`` end to end."""

import csv
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_mmssl.semisup.uncertainty import (
    head_disagreement,
    max_entropy,
    mean_binary_entropy,
    predictive_entropy,
    rank_cases,
    ranking_score,
    softmax_entropy,
    uncertain_region,
)

LN2 = math.log(2)
SPATIAL = {"2d": (2, 2), "3d": (2, 1, 2)}


def _voxels(values: list[list[float]], spatial: tuple[int, ...]) -> np.ndarray:
    """(C, *spatial) array whose 4 voxels (C-order) have the class vectors ``values``."""
    return np.asarray(values, dtype=np.float32).T.reshape((len(values[0]), *spatial))


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_softmax_entropy_hand_computed(dim):
    spatial = SPATIAL[dim]
    p = _voxels([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]], spatial)
    expected = np.array([LN2, 0.0, 1.5 * LN2, math.log(3)]).reshape(spatial)
    h = softmax_entropy(p)
    assert h.shape == spatial and h.dtype == np.float32
    np.testing.assert_allclose(h, expected, rtol=1e-6, atol=1e-7)
    assert h.max() <= max_entropy(3) + 1e-6
    np.testing.assert_allclose(predictive_entropy(p, sigmoid=False), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_mean_binary_entropy_hand_computed(dim):
    spatial = SPATIAL[dim]
    # two regions per voxel: h(0.5) = ln 2, h(1) = h(0) = 0, h(0.25) = -0.25 ln 0.25 - 0.75 ln 0.75
    h25 = -0.25 * math.log(0.25) - 0.75 * math.log(0.75)
    p = _voxels([[0.5, 1.0], [0.0, 1.0], [0.5, 0.5], [0.25, 0.5]], spatial)
    expected = np.array([LN2 / 2, 0.0, LN2, (h25 + LN2) / 2]).reshape(spatial)
    np.testing.assert_allclose(mean_binary_entropy(p), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(predictive_entropy(p, sigmoid=True), expected, rtol=1e-6, atol=1e-7)
    assert max_entropy(5, sigmoid=True) == pytest.approx(LN2)


def test_entropy_rejects_non_finite():
    p = np.full((2, 2, 2), 0.5, dtype=np.float32)
    p[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        softmax_entropy(p)


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_head_disagreement_hand_computed(dim):
    spatial = SPATIAL[dim]
    head_a = _voxels([[1.0, 0.0], [0.3, 0.7], [0.8, 0.2], [0.5, 0.5]], spatial)
    head_b = _voxels([[0.0, 1.0], [0.3, 0.7], [0.4, 0.6], [0.5, 0.5]], spatial)
    # voxel 3: mean (0.6, 0.4); KL(a||m) = 0.8 ln(0.8/0.6) + 0.2 ln(0.2/0.4), KL(b||m) = 0.4 ln(0.4/0.6) + 0.6 ln(1.5)
    kl_a = 0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.2 / 0.4)
    kl_b = 0.4 * math.log(0.4 / 0.6) + 0.6 * math.log(0.6 / 0.4)
    expected = np.array([LN2, 0.0, (kl_a + kl_b) / 2, 0.0]).reshape(spatial)
    d = head_disagreement([head_a, head_b])
    assert d.shape == spatial
    np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head_disagreement(np.stack([head_a, head_b])), expected, rtol=1e-5, atol=1e-6)


def test_head_disagreement_sigmoid_and_three_heads():
    # one region, two voxels; heads 0.9 / 0.1 -> mean 0.5: JSD = ln 2 - h(0.9)
    h09 = -0.9 * math.log(0.9) - 0.1 * math.log(0.1)
    heads = [np.array([[0.9, 0.7]]), np.array([[0.1, 0.7]])]
    np.testing.assert_allclose(head_disagreement(heads, sigmoid=True), [LN2 - h09, 0.0], atol=1e-7)
    # three one-hot heads on three classes disagree maximally: log 3
    heads = [np.eye(3)[:, [k]] for k in range(3)]
    np.testing.assert_allclose(head_disagreement(heads), [math.log(3)], atol=1e-7)
    with pytest.raises(ValueError, match="at least 2 heads"):
        head_disagreement(heads[:1])


def test_uncertain_region_margin_in_mm_and_threshold():
    foreground = np.zeros((3, 1, 9), dtype=bool)
    foreground[1, 0, 4] = True
    entropy = np.zeros(foreground.shape)
    entropy[0, 0, 0] = 0.6
    # spacing z 3 mm, x 1 mm: a 2 mm margin reaches x 2..6 in the same slice, not the next slices
    roi = uncertain_region(entropy, foreground, spacing=(3.0, 1.0, 1.0), margin_mm=2.0)
    assert roi[1, 0].tolist() == [False, False, True, True, True, True, True, False, False]
    assert not roi[0].any() and not roi[2].any()
    roi = uncertain_region(entropy, foreground, spacing=(3.0, 1.0, 1.0), margin_mm=3.0, entropy_threshold=0.5)
    assert roi[0, 0, 4] and roi[2, 0, 4] and roi[0, 0, 0] and roi.sum() == 7 + 2 + 1


def test_ranking_score_roi_mean_and_fallback():
    entropy = np.zeros((1, 4, 4))
    entropy[0, 1, 1] = 0.6
    entropy[0, 3, 3] = 0.2
    foreground = np.zeros_like(entropy, dtype=bool)
    foreground[0, 1, 1] = True
    s = ranking_score(entropy, foreground, margin_mm=0.0, entropy_threshold=None)
    assert s["score"] == pytest.approx(0.6) and s["roi_voxels"] == 1 and s["foreground_voxels"] == 1
    assert s["image_mean_entropy"] == pytest.approx(0.8 / 16)
    # 1 mm margin adds the 4 face neighbours (entropy 0): mean 0.6 / 5
    s = ranking_score(entropy, foreground, margin_mm=1.0, disagreement=entropy / 2)
    assert s["score"] == pytest.approx(0.12) and s["roi_voxels"] == 5
    assert s["roi_mean_disagreement"] == pytest.approx(0.06) and s["disagreement_score"] == pytest.approx(0.06)
    # no foreground, nothing above the threshold: whole-image mean
    s = ranking_score(entropy, np.zeros_like(foreground), entropy_threshold=0.9)
    assert s["roi_voxels"] == 0 and math.isnan(s["roi_mean_entropy"])
    assert s["score"] == pytest.approx(0.8 / 16)


def test_rank_cases_order_ties_and_nan():
    scores = {"c": {"score": 0.2}, "a": {"score": 0.5}, "b": {"score": 0.2}, "d": {"score": float("nan")},
              "e": {"score": 0.9}}
    assert rank_cases(scores) == [(1, "e"), (2, "a"), (3, "b"), (4, "c"), (5, "d")]
    with pytest.raises(KeyError, match="disagreement"):
        rank_cases(scores, key="disagreement_score")


# ---------------------------------------------------------------------------------------------- end to end
CHANNELS = {"0": "A", "1": "B"}
IMAGE_SHAPE = (3, 10, 16)  # z, y, x; 15 x 16 voxels at the plans' 1 mm: one 16 x 16 tile per slice
IMAGE_SPACING = (1.0, 1.5, 2.5)  # x, y, z (SimpleITK order)
IMAGE_ORIGIN = (10.0, -4.0, 3.0)


def _plans(architecture: dict) -> dict:
    resampling = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset998_Pseudo", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.5, 1.5, 1.0], "original_median_shape_after_transp": [3, 10, 16],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {c: {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0,
                                                            "percentile_99_5": 1.0} for c in CHANNELS},
        "configurations": {"2d": {
            "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [16, 16], "median_image_size_in_voxels": [15, 16], "spacing": [1.0, 1.0],
            "normalization_schemes": ["ZScoreNormalization"] * 2, "use_mask_for_norm": [False, False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": resampling, "resampling_fn_seg_kwargs": {**resampling, "is_seg": True},
            "resampling_fn_probabilities_kwargs": resampling, "batch_dice": True, "architecture": architecture}},
    }


def _make_model_folder(folder, trainer_name: str, architecture: dict) -> str:
    """A model folder in nnU-Net's format holding a freshly initialised network (no training)."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    os.makedirs(os.path.join(folder, "fold_0"))
    save_json(_plans(architecture), os.path.join(folder, "plans.json"))
    save_json({"channel_names": CHANNELS, "labels": {"background": 0, "lesion": 1}, "numTraining": 2,
               "file_ending": ".nii.gz"}, os.path.join(folder, "dataset.json"))
    torch.manual_seed(0)
    network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], 2, 2, allow_init=True,
                                     deep_supervision=False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": trainer_name,
                "init_args": {"configuration": "2d"}, "inference_allowed_mirroring_axes": (0, 1)},
               os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    return str(folder)


def _architectures() -> dict[str, dict]:
    from nnunet_mmssl.planners.mmssl_plans import multi_branch_architecture
    from nnunet_mmssl.trainers import MemCifSSLTrainer

    plain = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv2d",
                        "kernel_sizes": [[3, 3]] * 2, "strides": [[1, 1], [2, 2]], "n_conv_per_stage": [1, 1],
                        "n_conv_per_stage_decoder": [1], "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    memcif = multi_branch_architecture(plain, MemCifSSLTrainer.network_class_name, [[0], [1]],
                                       {"use_mem": True, "use_cif": True, "mem_type": "channel_attention"})
    return {"nnUNetTrainer": plain, "MemCifSSLTrainer": memcif}


def _write_cases(folder, cases: list[str]) -> None:
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for case in cases:
        for c in range(len(CHANNELS)):
            image = sitk.GetImageFromArray(rng.normal(100.0 * (c + 1), 20.0, IMAGE_SHAPE).astype(np.float32))
            image.SetSpacing(IMAGE_SPACING)
            image.SetOrigin(IMAGE_ORIGIN)
            sitk.WriteImage(image, os.path.join(folder, f"{case}_{c:04d}.nii.gz"))


def _read(path: str) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(image), image


@pytest.fixture
def model_folder_plain(tmp_path):
    return _make_model_folder(tmp_path / "nnUNetTrainer__nnUNetPlans__2d", "nnUNetTrainer",
                              _architectures()["nnUNetTrainer"])


def _run(argv: list[str]) -> int:
    from nnunet_mmssl.cli.pseudolabel import main

    return main(argv)


@pytest.mark.slow
def test_pseudolabel_end_to_end_stock_and_multi_head(tmp_path, monkeypatch):
    import nnunetv2.inference.predict_from_raw_data as nnunet_prediction

    from nnunet_mmssl.semisup.uncertainty import softmax_entropy as entropy_of

    # one torch thread: tiny convolutions on a shared 2-core machine are faster without thread synchronisation
    monkeypatch.setattr(nnunet_prediction, "default_num_processes", 1)

    cases = ["case_a", "case_b", "case_c"]
    _write_cases(tmp_path / "images", cases)
    for trainer, architecture in _architectures().items():
        model = _make_model_folder(tmp_path / f"{trainer}__nnUNetPlans__2d", trainer, architecture)
        out = tmp_path / f"out_{trainer}"
        code = _run(["-m", model, "-i", str(tmp_path / "images"), "-o", str(out), "-device", "cpu",
                     "-npp", "0", "--disable_tta", "--keep-probabilities"])
        assert code == 0
        multi_head = trainer != "nnUNetTrainer"
        assert sorted(os.listdir(out)) == sorted(["labels", "uncertainty", "probabilities", "ranking.csv",
                                                  "README.txt", "pseudolabel.json"])
        assert not [p for p in os.listdir(tmp_path) if p.startswith(f".out_{trainer}")]  # no temporary left
        with open(out / "ranking.csv") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["rank"]) for r in rows] == [1, 2, 3] and sorted(r["case"] for r in rows) == cases
        scores = [float(r["score"]) for r in rows]
        assert scores == sorted(scores, reverse=True)
        assert ("disagreement_map" in rows[0]) == multi_head
        for row in rows:
            case = row["case"]
            label, label_image = _read(str(out / "labels" / f"{case}.nii.gz"))
            entropy, entropy_image = _read(str(out / "uncertainty" / f"{case}_entropy.nii.gz"))
            for image, array in ((label_image, label), (entropy_image, entropy)):
                assert array.shape == IMAGE_SHAPE
                np.testing.assert_allclose(image.GetSpacing(), IMAGE_SPACING)
                np.testing.assert_allclose(image.GetOrigin(), IMAGE_ORIGIN)
            assert set(np.unique(label)) <= {0, 1}
            assert entropy.min() >= 0 and entropy.max() <= math.log(2) + 1e-6 and entropy.max() > 0
            # the map is the entropy of nnU-Net's exported probabilities, and the labels are their argmax
            probabilities = np.load(out / "probabilities" / f"{case}.npz")["probabilities"]
            np.testing.assert_allclose(entropy, entropy_of(probabilities), atol=1e-6)
            np.testing.assert_array_equal(label, probabilities.argmax(0))
            assert float(row["image_mean_entropy"]) == pytest.approx(float(entropy.mean()), rel=1e-4)
            if multi_head:
                disagreement, _ = _read(str(out / "uncertainty" / f"{case}_disagreement.nii.gz"))
                assert disagreement.shape == IMAGE_SHAPE
                assert disagreement.min() >= 0 and disagreement.max() <= math.log(2) + 1e-6
                assert disagreement.max() > 0  # two freshly initialised heads do not agree everywhere
        readme = (out / "README.txt").read_text()
        assert "labelsTr" in readme and ("disagreement" in readme) == multi_head


def test_cli_default_input_is_the_datasets_imagesunlabeled(tmp_path, model_folder_plain, monkeypatch, capsys):
    from nnunetv2 import paths

    monkeypatch.setattr(paths, "nnUNet_raw", None)
    assert _run(["-m", model_folder_plain, "-o", str(tmp_path / "o"), "-device", "cpu"]) == 2
    assert "nnUNet_raw is not set" in capsys.readouterr().err
    monkeypatch.setattr(paths, "nnUNet_raw", str(tmp_path / "raw"))
    assert _run(["-m", model_folder_plain, "-o", str(tmp_path / "o"), "-device", "cpu"]) == 2
    expected = os.path.join(str(tmp_path / "raw"), "Dataset998_Pseudo", "imagesUnlabeled")
    assert f"input folder {expected} does not exist" in capsys.readouterr().err


def test_cli_user_errors(tmp_path, model_folder_plain, capsys):
    images = tmp_path / "images"
    missing = tmp_path / "nowhere"
    assert _run(["-m", model_folder_plain, "-i", str(missing), "-o", str(tmp_path / "o"), "-device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "-i" in err and "Traceback" not in err
    os.makedirs(images)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 3), np.float32)), str(images / "x_0000.nii.gz"))
    assert _run(["-m", model_folder_plain, "-i", str(images), "-o", str(tmp_path / "o"), "-device", "cpu"]) == 2
    assert "case x" in capsys.readouterr().err
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 3), np.float32)), str(images / "x_0001.nii.gz"))
    os.makedirs(tmp_path / "o")
    assert _run(["-m", model_folder_plain, "-i", str(images), "-o", str(tmp_path / "o"), "-device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _run(["-m", str(tmp_path), "-o", str(tmp_path / "p"), "-device", "cpu"]) == 2
    assert "plans.json" in capsys.readouterr().err
    assert _run(["-m", model_folder_plain, "-i", str(images), "-o", str(tmp_path / "p"), "-f", "3",
                 "-device", "cpu"]) == 2
    assert "fold_3" in capsys.readouterr().err
    assert _run(["-m", model_folder_plain, "-i", str(images), "-o", str(tmp_path / "p"), "--rank-by",
                 "disagreement", "-device", "cpu"]) == 2
    assert "multi-head" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".p.partial")]


def test_cli_rejects_a_truncated_input_image(tmp_path, model_folder_plain, capsys):
    images = tmp_path / "images"
    os.makedirs(images)
    for c in range(len(CHANNELS)):
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 16, 16), np.float32)), str(images / f"x_{c:04d}.nii.gz"))
    bad = images / "x_0001.nii.gz"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    assert _run(["-m", model_folder_plain, "-i", str(images), "-o", str(tmp_path / "o"), "-device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_pipeline_is_importable_from_semisup(tmp_path, model_folder_plain):
    """A library user calls the pipeline without the command line: errors are exceptions, not exit codes."""
    from nnunet_mmssl.cli import pseudolabel as cli
    from nnunet_mmssl.semisup.pseudolabel import UserError, list_cases, pseudolabel

    assert cli.pseudolabel is pseudolabel  # the console script is a shell around the library's pipeline
    images = tmp_path / "images"
    _write_cases(images, ["b", "a"])
    cases = list_cases(str(images), ".nii.gz", len(CHANNELS))
    assert cases == {c: [str(images / f"{c}_{k:04d}.nii.gz") for k in range(len(CHANNELS))] for c in ("a", "b")}
    with pytest.raises(UserError, match="multi-head model"):
        pseudolabel(model_folder_plain, str(images), str(tmp_path / "o"), device="cpu", rank_by="disagreement",
                    num_processes_preprocessing=0, num_processes_export=1)
    assert not (tmp_path / "o").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".o.partial")]

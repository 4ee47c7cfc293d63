"""SMML's optional priors: convention checks, preprocessing like the image, spatial-only augmentation, SRN input."""

import math
import os
import sys
import tempfile
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

from nnunet_mmssl.dataloading.priors import (
    DatasetWithPriors,
    PriorsError,
    check_prior_grids,
    find_prior_files,
    preprocess_case_priors,
    priors_data_identifier,
    wrap_transforms_for_priors,
)

sys.path.insert(0, os.path.dirname(__file__))

DATASET_JSON = {"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz"}


def _write(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(tuple(reversed(spacing)))
    sitk.WriteImage(image, path)
    return path


def _managers(target_spacing):
    plans = SimpleNamespace(image_reader_writer_class=SimpleITKIO, transpose_forward=[0, 1, 2])
    resample = partial(resample_data_or_seg_to_shape, is_seg=False, order=3, order_z=0, force_separate_z=None)
    return plans, SimpleNamespace(spacing=list(target_spacing), resampling_fn_data=resample)


def _priors(tmp_path, arrays, spacing=(1.0, 1.0, 1.0)):
    return [_write(str(tmp_path / f"case_a_{c:04d}.nii.gz"), a, spacing) for c, a in enumerate(arrays)]


def test_priors_are_cropped_like_the_image(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.random((6, 8, 10)), rng.random((6, 8, 10))]
    files = _priors(tmp_path, arrays)
    properties = {"spacing": [1.0, 1.0, 1.0], "shape_before_cropping": (6, 8, 10),
                  "bbox_used_for_cropping": [[1, 5], [0, 8], [2, 9]]}
    out = preprocess_case_priors(files, properties, (4, 8, 7), *_managers([1.0, 1.0, 1.0]))
    assert out.shape == (2, 4, 8, 7) and out.dtype == np.float32
    for c in range(2):
        np.testing.assert_allclose(out[c], arrays[c][1:5, 0:8, 2:9], rtol=1e-6)


def test_priors_are_resampled_to_the_image_shape_and_stay_in_range(tmp_path):
    box = np.zeros((8, 12, 12))
    box[2:6, 3:9, 4:10] = 1.0
    files = _priors(tmp_path, [box, np.full((8, 12, 12), 0.25)])
    properties = {"spacing": [1.0, 1.0, 1.0], "shape_before_cropping": (8, 12, 12),
                  "bbox_used_for_cropping": [[0, 8], [0, 12], [0, 12]]}
    out = preprocess_case_priors(files, properties, (8, 6, 6), *_managers([1.0, 2.0, 2.0]))
    assert out.shape == (2, 8, 6, 6)
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[1], 0.25, atol=1e-5)  # a constant prior stays constant
    # the box lands where it is at half the resolution in y and x
    inside = out[0][2:6, 2:4, 2:5]
    assert inside.mean() > 0.9 and out[0][:, 5:, :].max() < 0.1


def test_bad_priors_are_refused_with_the_file_named(tmp_path):
    properties = {"spacing": [1.0, 1.0, 1.0], "shape_before_cropping": (4, 4, 4),
                  "bbox_used_for_cropping": [[0, 4], [0, 4], [0, 4]]}
    too_high = _priors(tmp_path, [np.full((4, 4, 4), 255.0), np.zeros((4, 4, 4))])
    with pytest.raises(PriorsError, match=r"case_a_0000.*\[0, 1\]"):
        preprocess_case_priors(too_high, properties, (4, 4, 4), *_managers([1.0, 1.0, 1.0]))
    other_grid = _priors(tmp_path, [np.zeros((4, 4, 5)), np.zeros((4, 4, 5))])
    with pytest.raises(PriorsError, match="image grid"):
        preprocess_case_priors(other_grid, properties, (4, 4, 4), *_managers([1.0, 1.0, 1.0]))


def test_prior_grids_are_checked_from_the_headers(tmp_path):
    for folder in ("imagesTr", "priorsTr"):
        (tmp_path / folder).mkdir()
    for c in (0, 1):
        _write(str(tmp_path / "imagesTr" / f"c1_{c:04d}.nii.gz"), np.zeros((4, 5, 6)), spacing=(2.0, 1.0, 1.0))
    good = [_write(str(tmp_path / "priorsTr" / f"c1_{c:04d}.nii.gz"), np.zeros((4, 5, 6)), spacing=(2.0, 1.0, 1.0))
            for c in (0, 1)]
    check_prior_grids(str(tmp_path), {"c1": good})
    _write(good[1], np.zeros((4, 5, 7)), spacing=(2.0, 1.0, 1.0))
    with pytest.raises(PriorsError, match=r"c1_0001\.nii\.gz has size \(7, 5, 4\).*\(6, 5, 4\)"):
        check_prior_grids(str(tmp_path), {"c1": good})
    _write(good[1], np.zeros((4, 5, 6)), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(PriorsError, match=r"c1_0001.*spacing \(1\.0, 1\.0, 1\.0\).*\(1\.0, 1\.0, 2\.0\)"):
        check_prior_grids(str(tmp_path), {"c1": good})


def test_prior_files_convention(tmp_path):
    folder = tmp_path / "priorsTr"
    folder.mkdir()
    for name in ("c1_0000", "c1_0001", "c2_0000"):
        _write(str(folder / f"{name}.nii.gz"), np.zeros((2, 2, 2)))
    with pytest.raises(PriorsError, match=r"c2_0001\.nii\.gz"):
        find_prior_files(str(tmp_path), DATASET_JSON, ["c1", "c2"])
    _write(str(folder / "c2_0001.nii.gz"), np.zeros((2, 2, 2)))
    files = find_prior_files(str(tmp_path), DATASET_JSON, ["c1", "c2"])
    assert [os.path.basename(f) for f in files["c2"]] == ["c2_0000.nii.gz", "c2_0001.nii.gz"]
    _write(str(folder / "c9_0000.nii.gz"), np.zeros((2, 2, 2)))
    with pytest.raises(PriorsError, match="c9_0000"):
        find_prior_files(str(tmp_path), DATASET_JSON, ["c1", "c2"])


def test_dataset_appends_the_priors_after_the_image_channels(tmp_path):
    data = np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(np.float32)
    inner = SimpleNamespace(identifiers=["c1"], load_case=lambda i: (data, np.zeros((1, 3, 4, 5)), None, {"k": i}))
    priors = np.random.default_rng(2).random((2, 3, 4, 5)).astype(np.float32)
    np.save(tmp_path / "c1.npy", priors)
    dataset = DatasetWithPriors(inner, str(tmp_path), 2)
    assert dataset.identifiers == ["c1"]
    out, _, _, properties = dataset.load_case("c1")
    joined = np.concatenate([data, priors])
    assert out.shape == joined.shape and out.ndim == 4
    np.testing.assert_array_equal(np.asarray(out), joined)
    assert properties == {"k": "c1"}
    # what nnU-Net's data loader does with it: crop (and pad) a patch; a 2d patch is a 3d one of depth 1
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    for bbox in ([[1, 2], [0, 4], [1, 5]], [[-1, 2], [2, 6], [-2, 3]]):
        np.testing.assert_array_equal(crop_and_pad_nd(out, bbox, 0), crop_and_pad_nd(joined, bbox, 0))
    np.testing.assert_array_equal(out[2:, 1], joined[2:, 1])
    np.testing.assert_array_equal(out[..., 0], joined[..., 0])
    with pytest.raises(PriorsError, match="c2.npy"):
        dataset.load_case("c2")
    np.save(tmp_path / "c1.npy", priors[:1])
    with pytest.raises(PriorsError, match="shape"):
        dataset.load_case("c1")


def _nnunet_training_transforms(patch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    dim = len(patch)
    rotation = (-math.pi, math.pi) if dim == 2 else (-math.pi / 6, math.pi / 6)
    return nnUNetTrainer.get_training_transforms(patch, rotation, [[1] * dim, [0.5] * dim], tuple(range(dim)), False,
                                                 use_mask_for_norm=[False, False], is_cascaded=False,
                                                 foreground_labels=[1], regions=None, ignore_label=None)


@pytest.mark.parametrize("patch", [(48, 48), (24, 24, 24)])
def test_priors_follow_the_spatial_augmentation_but_no_intensity_augmentation(patch):
    """The prior = the label mask: after nnU-Net's whole training pipeline it still covers the augmented label."""
    torch.manual_seed(0)
    transforms = wrap_transforms_for_priors(_nnunet_training_transforms(patch), num_channels=2)
    shape = [int(p * 1.5) for p in patch]
    seg = torch.zeros(1, *shape, dtype=torch.int16)
    seg[(0, *[slice(s // 4, s // 2 + s // 8) for s in shape])] = 1
    image = torch.randn(2, *shape)
    dice, moved = [], 0
    for _ in range(8):
        out = transforms(image=torch.cat([image, seg.float(), seg.float()]), segmentation=seg.clone())
        assert "regression_target" not in out and out["image"].shape[0] == 4
        label = (out["segmentation"][0] if isinstance(out["segmentation"], list) else out["segmentation"])[0] == 1
        for prior in out["image"][2:]:
            assert prior.min() >= 0 and prior.max() <= 1  # no intensity transform touched it
            a = prior > 0.5
            dice.append(float(2 * (a & label).sum() / (a.sum() + label.sum())))
        moved += int(not torch.equal(label, (seg[(0, *[slice(0, p) for p in patch])] == 1)))
    assert min(dice) > 0.9
    assert moved > 0  # the label was augmented, so the agreement is not trivial


def test_samples_without_priors_pass_unchanged():
    calls = []

    def base(**d):
        calls.append(sorted(d))
        return d

    transforms = wrap_transforms_for_priors(base, num_channels=2)
    image = torch.randn(2, 4, 4)
    out = transforms(image=image, segmentation=torch.zeros(1, 4, 4))
    assert calls == [["image", "segmentation"]] and out["image"] is image


# ---------------------------------------------------------------- the trainer with priors
@pytest.fixture()
def harness():
    import trainer_harness

    root = tempfile.mkdtemp(prefix="smml-priors-")
    trainer_harness.set_folders(root)
    return trainer_harness, root


def test_trainer_requires_priors_it_was_asked_for(harness):
    from nnunet_mmssl.trainers import SMMLTrainer

    h, _ = harness

    class WithPriors(SMMLTrainer):
        use_priors = True

    with pytest.raises(PriorsError, match="priorsTr"):
        h.make_trainer(WithPriors, seed=0, initialize=False)
    assert not h.make_trainer(SMMLTrainer, seed=0, initialize=False).priors_enabled  # auto: no folder, no priors


def test_srn_reads_prediction_and_priors_and_network_the_images(harness):
    from plans_fixtures import PLANS

    from nnunet_mmssl.trainers import SMMLTrainer

    h, root = harness
    data_identifier = PLANS["configurations"]["2d"]["data_identifier"]
    os.makedirs(os.path.join(root, "preprocessed", PLANS["dataset_name"], priors_data_identifier(data_identifier)))
    trainer = h.make_trainer(SMMLTrainer, seed=0)
    assert trainer.priors_enabled
    k, heads = trainer.num_input_channels, trainer.label_manager.num_segmentation_heads
    first = trainer.refiners[0].encoder.stages[0][0].convs[0].conv
    assert first.in_channels == heads + k
    seen = []
    trainer.network_module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[1]),
                                                     with_kwargs=True)
    (labelled, unlabelled), = h.batches(trainer, seed=0, count=1)
    priors = (torch.rand(labelled["data"].shape) > 0.5).float()
    labelled = {**labelled, "data": torch.cat([labelled["data"], priors], 1)}
    h.run_steps(trainer, [(labelled, unlabelled)], seed=0)
    assert seen and set(seen) == {k}
    grad = first.weight.grad
    assert grad[:, heads:].abs().sum() > 0  # the prior channels take part in the SRN's first convolution
    out = trainer.validation_step(labelled)  # validation batches carry priors too; the network sees the images
    assert np.isfinite(out["loss"]) and seen[-1] == k
    with pytest.raises(PriorsError, match="priors"):
        trainer.split_priors(labelled["data"][:, :k])

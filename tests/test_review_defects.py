"""Defects of the review (issue 13, section 1): the unlabelled stream with an ignore label, unlabelled patch sampling,
the MAE settings as trainer attributes."""

import copy

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from plans_fixtures import DATASET_JSON, PLANS

from nnunet_mmssl.dataloading.unlabeled_loader import UnlabeledDataLoader, open_unlabeled_dataset
from nnunet_mmssl.trainers import MemCifSSLTrainer, MMFMCMLTrainer, MMSSLTrainerBase

SLICES, SIZE = 10, 32
#: body radius per slice: tiny at both ends, large in the middle (a head seen slice by slice)
RADII = [2, 2, 2, 12, 12, 12, 12, 2, 2, 2]


def _phantom_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """What nnU-Net's preprocessing stores for an unlabelled case: data cropped to the nonzero region and the seg it
    derives from it (nnU-Net's own crop_to_nonzero: 0 inside the region, -1 outside)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    body = np.stack([yy ** 2 + xx ** 2 <= r ** 2 for r in RADII])
    image = np.where(body, rng.normal(1.0, 0.2, (2, SLICES, SIZE, SIZE)), 0.0).astype(np.float32)
    data, seg, _ = crop_to_nonzero(image)
    return data, seg.astype(np.int16)


def write_unlabeled_folder(folder, cases: int = 3) -> None:
    folder.mkdir(parents=True)
    for i in range(cases):
        data, seg = _phantom_case(i)
        # class_locations as our unlabelled preprocessing writes them: no labels, no locations
        blocks, chunks = comp_blosc2_params(data.shape, (16, 16), data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, (16, 16), seg.itemsize)
        nnUNetDatasetBlosc2.save_case(data, seg, {"class_locations": {}, "spacing": [1.0, 1.0, 1.0]},
                                      str(folder / f"U{i:03d}"), chunks=chunks, blocks=blocks, chunks_seg=chunks_seg,
                                      blocks_seg=blocks_seg)


DATASET_JSON_IGNORE = dict(DATASET_JSON, labels={"background": 0, "lesion": 1, "ignore": 2})


def _trainer(tmp_path, monkeypatch, cls=MemCifSSLTrainer, dataset_json=DATASET_JSON_IGNORE):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    plans = copy.deepcopy(dict(PLANS, continue_training=False))
    plans["configurations"]["2d"]["use_mask_for_norm"] = [False, False]
    trainer = cls(plans, "2d", 0, copy.deepcopy(dataset_json), device=torch.device("cpu"))
    write_unlabeled_folder(tmp_path / "preprocessed" / PLANS["dataset_name"] / "nnUNetPlans_2d_unlabeled")
    trainer._set_batch_size_and_oversample()  # what initialize() does before the loaders are built
    return trainer


@pytest.mark.parametrize("sampling", ["uniform", "foreground"])
def test_unlabeled_stream_with_an_ignore_label_yields_batches(tmp_path, monkeypatch, sampling):
    """nnU-Net's loader reads the annotated-classes locations when the labels have an ignore label; unlabelled cases
    have none (KeyError on the first batch before the fix). The trainer's own stream and transforms are used."""
    trainer = _trainer(tmp_path, monkeypatch, type("Variant", (MemCifSSLTrainer,), {"unlabeled_sampling": sampling}))
    assert trainer.label_manager.has_ignore_label
    stream = trainer.get_unlabeled_dataloader()
    assert stream.data_loader.sampling == sampling  # the trainer attribute reaches the loader
    for _ in range(4):
        batch = next(stream)
        assert tuple(batch["data"].shape) == (2, 2, 16, 16)
        assert torch.isfinite(batch["data"]).all() and batch["data"].abs().sum() > 0


def _loader(folder, sampling, batch_size=4):
    manager = LabelManager({"background": 0, "lesion": 1, "ignore": 2}, None)
    return UnlabeledDataLoader(open_unlabeled_dataset(str(folder)), batch_size, (16, 16), (16, 16), manager,
                               sampling=sampling)


def test_foreground_sampling_centres_patches_on_the_nonzero_region(tmp_path):
    folder = tmp_path / "unlabeled"
    write_unlabeled_folder(folder)
    np.random.seed(0)
    inside = {}
    for sampling in ("uniform", "foreground"):
        loader = _loader(folder, sampling)
        fractions = []
        for _ in range(40):
            batch = loader.generate_train_batch()
            assert tuple(batch["data"].shape) == (4, 2, 16, 16)
            fractions += (batch["target"] >= 0).float().mean(dim=(1, 2, 3)).tolist()
        inside[sampling] = np.array(fractions)
    # every centred patch holds body; uniform slices are mostly the tiny ends (6 of 10 slices)
    assert inside["foreground"].min() > 0
    assert inside["foreground"].mean() > 0.5 > inside["uniform"].mean()
    assert (inside["uniform"] < 0.1).mean() > 0.3


def test_foreground_locations_are_the_nonzero_region(tmp_path):
    folder = tmp_path / "unlabeled"
    write_unlabeled_folder(folder, cases=1)
    loader = _loader(folder, "foreground")
    _, seg, _, properties = loader._data.load_case("U000")
    locations = next(iter(properties["class_locations"].values()))
    seg = np.asarray(seg[:])
    assert locations.shape[1] == 4 and np.all(locations[:, 0] == 0)
    assert np.all(seg[tuple(locations.T)] == 0)  # all inside
    assert len(locations) == (seg >= 0).sum()  # all of it (fewer than the 10,000 kept at most)
    assert open_unlabeled_dataset(str(folder)).load_case("U000")[3]["class_locations"] == {}  # file untouched


def test_unknown_unlabeled_sampling_is_named(tmp_path):
    folder = tmp_path / "unlabeled"
    write_unlabeled_folder(folder, cases=1)
    with pytest.raises(ValueError, match=r"'lesion'.*unlabeled_sampling.*\['uniform', 'foreground'\]"):
        _loader(folder, "lesion")


@pytest.mark.parametrize("setting,value,built", [
    ("mae_psi2_kernel_size", 5, lambda net: (net.mae.psi2[0][0].kernel_size, net.mae.psi2[0][0].dilation)
     == ((5, 5), (1, 1))),
    ("mae_psi2_dilation", 3, lambda net: net.mae.psi2[0][0].dilation == (3, 3)),
    ("mae_descriptor", "shared", lambda net: net.mae.descriptor == "shared" and len(net.mae.psi1) == 1),
    ("mae_reduction", 1, lambda net: net.mae.hidden == 16),  # bottleneck 16 channels; default max(16 // 16, 8)
])
def test_mae_settings_are_trainer_attributes_that_reach_the_network(setting, value, built):
    def network(trainer):
        plans = MMSSLTrainerBase.plans_with_network(object.__new__(trainer), PLANS, "2d", DATASET_JSON)
        manager = PlansManager(plans)
        assert manager.get_configuration("2d").network_arch_init_kwargs[setting] == value or trainer is MMFMCMLTrainer
        return trainer.build_network_architecture(manager, manager.get_configuration("2d"), 2, 2, False)

    assert hasattr(MMFMCMLTrainer, setting)
    variant = type("Variant", (MMFMCMLTrainer,), {setting: value})
    assert built(network(variant)) and not built(network(MMFMCMLTrainer))
    default = network(MMFMCMLTrainer).mae.psi2[0][0]
    assert default.kernel_size == (3, 3) and default.dilation == (2, 2)

"""The unlabelled data stream of a semi-supervised trainer.

It reuses nnU-Net's own dataset class and data loader on the preprocessed unlabelled folder
(:class:`UnlabeledDataLoader`, a small ``nnUNetDataLoader`` subclass) with the labelled stream's training
augmentation, minus the deep-supervision target downsampling (unlabelled batches have no target). Batches are produced
in background workers like nnU-Net's own (``nnUNet_n_proc_DA``).

Where patches are taken (``sampling``, the trainer's ``unlabeled_sampling``):

* ``"uniform"`` (default): uniform random patches, as nnU-Net's loader without foreground oversampling.
* ``"foreground"``: each patch is centred on a random voxel of the case's nonzero region. nnU-Net's preprocessing
  crops every case to the bounding box of its nonzero voxels and writes the mask into the preprocessed segmentation:
  for an unlabelled case that array holds 0 inside the nonzero (body / brain) region and -1 outside. Patches (in 2d:
  slices) are then drawn in proportion to the body they contain instead of uniformly, so fewer patches show mostly
  background. It is the label-free counterpart of training on lesion-bearing slices only (Chung et al. 2025 removed
  lesion-free slices with the labels, which unlabelled cases do not have): lesion-free brain remains. For images
  without a zero background (e.g. CT in HU) the region is the whole image and this equals ``"uniform"``.
"""

import os

import numpy as np
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunet_mmssl.dataloading.unlabeled_preprocessing import UnlabeledDataError


def open_unlabeled_dataset(folder: str):
    """Open the preprocessed unlabelled folder with nnU-Net's dataset class.

    Raises:
        UnlabeledDataError: if the folder is missing or empty, with the command that creates it.
    """
    if not os.path.isdir(folder):
        raise UnlabeledDataError(f"Preprocessed unlabelled data not found: {folder}. Run "
                                 f"nnUNetv2_mmssl_plan_and_preprocess for this dataset and configuration (it "
                                 f"preprocesses imagesUnlabeled/ with the same plans), or train the supervised-only "
                                 f"variant.")
    if not any(not name.startswith(".") for name in os.listdir(folder)):  # nnU-Net's class inference asserts here
        raise UnlabeledDataError(f"The unlabelled folder {folder} holds no cases. Add cases to imagesUnlabeled/ and "
                                 f"rerun nnUNetv2_mmssl_plan_and_preprocess.")
    dataset_class = infer_dataset_class(folder)
    identifiers = dataset_class.get_identifiers(folder)
    if not identifiers:
        raise UnlabeledDataError(f"The unlabelled folder {folder} holds no cases. Add cases to imagesUnlabeled/ and "
                                 f"rerun nnUNetv2_mmssl_plan_and_preprocess.")
    return dataset_class(folder, identifiers)


UNLABELED_SAMPLING = ("uniform", "foreground")
#: key of the nonzero-region locations handed to nnU-Net's ``get_bbox`` (never a label value)
NONZERO_REGION_KEY = "nonzero_region"


class _NonzeroRegionDataset:
    """Wraps an nnU-Net dataset so that each case's ``class_locations`` are the voxels of its nonzero region.

    Locations are computed once per case (and worker process) from the preprocessed segmentation (``seg >= 0``):
    at most ``max_locations`` voxels, an even stride through the region, in nnU-Net's format (rows
    ``(0, z, y, x)``). The case's own properties are not modified.
    """

    def __init__(self, dataset, max_locations: int = 10000):
        self.dataset = dataset
        self.identifiers = dataset.identifiers
        self.max_locations = max_locations
        self._locations: dict[str, np.ndarray] = {}

    def nonzero_locations(self, identifier: str, seg) -> np.ndarray:
        if identifier not in self._locations:
            inside = np.flatnonzero(np.asarray(seg[0]) >= 0)
            step = max(1, -(-inside.size // self.max_locations))
            coords = np.unravel_index(inside[::step], seg.shape[1:])
            self._locations[identifier] = np.stack((np.zeros_like(coords[0]), *coords), axis=1)
        return self._locations[identifier]

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        properties = {**properties, "class_locations": {NONZERO_REGION_KEY: self.nonzero_locations(identifier, seg)}}
        return data, seg, seg_prev, properties

    def __len__(self) -> int:
        return len(self.identifiers)


class UnlabeledDataLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` for unlabelled cases: never reads label locations.

    Unlabelled cases have no labels, so their ``class_locations`` are empty. nnU-Net's loader reads the annotated
    classes' locations whenever the label manager has an ignore label (to sample only annotated voxels) and class
    locations when it forces foreground; neither exists here. This loader samples uniformly (``sampling="uniform"``)
    or centres every patch on the case's nonzero region (``"foreground"``, see the module docstring).

    Args:
        dataset: nnU-Net dataset of the preprocessed unlabelled folder.
        batch_size, patch_size, final_patch_size, label_manager, transforms: as ``nnUNetDataLoader``.
        sampling: ``"uniform"`` or ``"foreground"``.

    Raises:
        ValueError: on an unknown ``sampling``.
    """

    def __init__(self, dataset, batch_size: int, patch_size, final_patch_size, label_manager, transforms=None,
                 sampling: str = "uniform"):
        if sampling not in UNLABELED_SAMPLING:
            raise ValueError(f"Unknown unlabelled patch sampling {sampling!r} (trainer attribute "
                             f"unlabeled_sampling); choose one of {list(UNLABELED_SAMPLING)}.")
        if sampling == "foreground":
            dataset = _NonzeroRegionDataset(dataset)
        super().__init__(dataset, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=1.0 if sampling == "foreground" else 0.0,
                         sampling_probabilities=None, pad_sides=None, transforms=transforms,
                         probabilistic_oversampling=False)
        self.sampling = sampling
        # no annotated region to restrict patches to: an ignore label in the dataset does not apply here
        self.has_ignore = False


def build_unlabeled_augmenter(dataset, batch_size: int, initial_patch_size, patch_size, label_manager, transforms,
                              num_processes: int, pin_memory: bool, sampling: str = "uniform"):
    """Wrap an :class:`UnlabeledDataLoader` in nnU-Net's (multi-threaded) augmenter.

    Args:
        sampling: where patches are taken, ``"uniform"`` or ``"foreground"`` (see the module docstring).
    """
    loader = UnlabeledDataLoader(dataset, batch_size, initial_patch_size, patch_size, label_manager,
                                 transforms=transforms, sampling=sampling)
    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=num_processes,
                                        num_cached=max(6, num_processes // 2), seeds=None, pin_memory=pin_memory,
                                        wait_time=0.002)

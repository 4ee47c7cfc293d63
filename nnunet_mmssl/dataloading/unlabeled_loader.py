"""The unlabelled data stream of a semi-supervised trainer.

It reuses nnU-Net's own dataset class and ``nnUNetDataLoader`` on the preprocessed unlabelled folder, with uniform
random patches (no foreground oversampling: there are no labels) and the labelled stream's training augmentation,
minus the deep-supervision target downsampling (unlabelled batches have no target). Batches are produced in
background workers like nnU-Net's own (``nnUNet_n_proc_DA``).
"""

import os

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


def build_unlabeled_augmenter(dataset, batch_size: int, initial_patch_size, patch_size, label_manager, transforms,
                              num_processes: int, pin_memory: bool):
    """Wrap an ``nnUNetDataLoader`` with uniform sampling in nnU-Net's (multi-threaded) augmenter."""
    loader = nnUNetDataLoader(dataset, batch_size, initial_patch_size, patch_size, label_manager,
                              oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                              transforms=transforms, probabilistic_oversampling=False)
    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=num_processes,
                                        num_cached=max(6, num_processes // 2), seeds=None, pin_memory=pin_memory,
                                        wait_time=0.002)

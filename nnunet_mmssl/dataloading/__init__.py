"""Unlabelled data: raw discovery, preprocessing with the labelled plans, and the training stream.

The loader module imports nnU-Net's data loading; import it from ``nnunet_mmssl.dataloading.unlabeled_loader``.
"""

from nnunet_mmssl.dataloading.unlabeled_preprocessing import (
    UNLABELED_IMAGES_FOLDER,
    UnlabeledDataError,
    find_unlabeled_cases,
    preprocess_unlabeled,
)

__all__ = ["UNLABELED_IMAGES_FOLDER", "UnlabeledDataError", "find_unlabeled_cases", "preprocess_unlabeled"]

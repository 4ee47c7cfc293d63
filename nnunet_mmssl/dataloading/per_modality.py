"""One loader per modality for unregistered datasets (DBDC: every case is one image of one modality).

A trainer that draws a batch of every modality per step builds one of nnU-Net's labelled loaders per modality (its
dataset restricted to that modality's cases) and one unlabelled loader per modality, and puts them behind nnU-Net's
``next(dataloader)`` with :class:`ModalityBatches`:

- :func:`case_modality_index`: a preprocessed case's modality (recorded in its ``.pkl`` at preprocessing).
- :func:`workers_per_loader`: the augmentation workers each of K loaders gets of the allowed ones.
- :func:`augmentation_processes`: ``nnUNet_n_proc_DA`` set while nnU-Net builds the loaders.
- :func:`labelled_loaders_per_modality`: the labelled training / validation loader of each modality.
- :func:`identifiers_by_modality`, :func:`unlabeled_loaders_per_modality`: the unlabelled stream of each modality.
- :class:`ModalityBatches`: all modalities' batches per ``next`` (training) or one modality's in turn (validation).
- :func:`finish_loaders`: shut the augmenters of such loaders down.

Used by :class:`~nnunet_mmssl.trainers.dbdc.DBDCTrainer`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence

from batchgenerators.utilities.file_and_folder_operations import join, load_pickle

from nnunet_mmssl.planners.modality_normalization import MODALITY_PROPERTY


class DBDCDataError(ValueError):
    """The dataset or fold cannot be trained by DBDC as it is (message names the fix)."""


def case_modality_index(folder: str, identifier: str, modalities: Sequence[str]) -> int:
    """Index in ``modalities`` of the modality recorded in the preprocessed case's ``<identifier>.pkl``.

    Raises:
        DBDCDataError: the case records no modality, or one the plans do not have (naming the fix).
    """
    properties = load_pickle(join(folder, identifier + ".pkl"))
    name = properties.get(MODALITY_PROPERTY)
    if name is None:
        raise DBDCDataError(f"Preprocessed case {identifier!r} in {folder} has no modality ({MODALITY_PROPERTY}). "
                            f"Preprocess with nnUNetv2_mmssl_plan_and_preprocess (unregistered dataset).")
    if name not in modalities:
        raise DBDCDataError(f"Preprocessed case {identifier!r} has modality {name!r}, not one of the plans' "
                            f"{modalities}. Re-run nnUNetv2_mmssl_plan_and_preprocess.")
    return modalities.index(name)


def workers_per_loader(allowed: int, num_loaders: int) -> int:
    """Augmentation workers for each of ``num_loaders`` loaders sharing ``allowed`` workers: 0 (in-process) when none
    is allowed, else at least 1."""
    return 0 if allowed == 0 else max(1, allowed // num_loaders)


@contextlib.contextmanager
def augmentation_processes(num: int):
    """Temporarily set ``nnUNet_n_proc_DA`` (nnU-Net's loaders read it) so K loaders share the allowed workers."""
    old = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = str(num)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("nnUNet_n_proc_DA", None)
        else:
            os.environ["nnUNet_n_proc_DA"] = old


def labelled_loaders_per_modality(build: Callable[[int], tuple], modalities: Sequence[str],
                                  has_validation: Callable[[int], bool], fold, log=print) -> tuple[list, list]:
    """The labelled (training, validation) loaders of each modality.

    Args:
        build: ``k -> (training loader, validation loader)`` of modality ``k`` (nnU-Net's ``get_dataloaders`` on the
            modality's cases).
        modalities: modality names.
        has_validation: ``k -> `` whether modality ``k`` has a validation case (asked after ``build(k)``).
        fold: the fold (named in the message of a modality without validation case).
        log: message sink.

    Returns:
        (training loaders, validation loaders), one per modality; the validation loader is None (and shut down)
        where the modality has no validation case.
    """
    train, val = [], []
    for k in range(len(modalities)):
        dl_tr, dl_val = build(k)
        train.append(dl_tr)
        if has_validation(k):
            val.append(dl_val)
        else:
            val.append(None)
            if hasattr(dl_val, "_finish"):
                dl_val._finish()
            log(f"Modality {modalities[k]!r} has no validation case in fold {fold}: its validation Dice (and MAW's "
                f"error term) is NaN.")
    return train, val


def identifiers_by_modality(identifiers: Iterable[str], modality_index: Callable[[str], int],
                            num_modalities: int) -> list[list[str]]:
    """``identifiers`` grouped by ``modality_index(identifier)``: one list per modality, order kept."""
    by_modality = [[] for _ in range(num_modalities)]
    for identifier in identifiers:
        by_modality[modality_index(identifier)].append(identifier)
    return by_modality


def unlabeled_loaders_per_modality(dataset, by_modality: Sequence[Sequence[str]], modalities: Sequence[str],
                                   make_augmenter: Callable, log=print) -> list:
    """One unlabelled loader per modality (None where the modality has no unlabelled case).

    Args:
        dataset: the unlabelled nnU-Net dataset (its class and ``source_folder`` make each modality's subset).
        by_modality: the identifiers of each modality (:func:`identifiers_by_modality`).
        modalities: modality names.
        make_augmenter: ``subset dataset -> augmenter``; each augmenter is started (one ``next``) here.
        log: message sink.
    """
    loaders = []
    for k, identifiers in enumerate(by_modality):
        if not identifiers:
            log(f"WARNING: modality {modalities[k]!r} has no unlabelled case: its dual consistency term is skipped.")
            loaders.append(None)
            continue
        subset = type(dataset)(dataset.source_folder, list(identifiers))
        augmenter = make_augmenter(subset)
        next(augmenter)
        loaders.append(augmenter)
    log("Unlabelled streams: " + ", ".join(
        f"{m}: {len(ids)} cases" for m, ids in zip(modalities, by_modality, strict=True)))
    return loaders


class ModalityBatches:
    """One loader per modality behind nnU-Net's ``next(dataloader)``.

    ``mode="all"``: each ``next`` returns ``{"modality_batches": [batch of modality 0, ..., K-1]}`` (training).
    ``mode="cycle"``: each ``next`` returns the next modality's batch in turn with ``"modality": k`` (validation);
    modalities without a loader (no validation case in the fold) are skipped.
    """

    def __init__(self, loaders: list, mode: str):
        if mode not in ("all", "cycle"):
            raise ValueError(mode)
        self.loaders = loaders
        self.mode = mode
        self._next = 0
        self.available = [k for k, loader in enumerate(loaders) if loader is not None]
        if not self.available:
            raise DBDCDataError("No modality has cases for this loader.")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.mode == "all":
            return {"modality_batches": [next(loader) for loader in self.loaders]}
        k = self.available[self._next % len(self.available)]
        self._next += 1
        batch = dict(next(self.loaders[k]))
        batch["modality"] = k
        return batch

    def _finish(self) -> None:
        finish_loaders(self.loaders)


def finish_loaders(loaders: Iterable) -> None:
    """Shut down the augmenters among ``loaders`` (None and loaders without ``_finish`` skipped)."""
    for loader in loaders:
        if loader is not None and hasattr(loader, "_finish"):
            loader._finish()

"""Preprocess the unlabelled cases of a raw dataset with the labelled cases' plans.

Raw layout: ``imagesUnlabeled/`` beside ``imagesTr/``, files ``CASE_XXXX<file_ending>`` with the channels of
``dataset.json``. Each case goes through the configuration's own preprocessor (same transpose, cropping,
normalisation with the labelled fingerprint's intensity statistics, and resampling) and is written, in nnU-Net's
dataset format, to ``<nnUNet_preprocessed>/<dataset>/<data_identifier>_unlabeled/``: a sibling of the folder nnU-Net
builds its splits from, never inside it. The segmentation saved with each case is the nonzero mask nnU-Net derives
for images without labels (0 inside, -1 outside); the unlabelled stream never uses it as a target.
"""

import contextlib
import glob
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Sequence

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; unique temporary names still keep concurrent runs apart
    fcntl = None

import numpy as np

from nnunet_mmssl.dataloading.case_files import (  # noqa: F401  (public here since before the split)
    UNLABELED_IMAGES_FOLDER,
    UnlabeledDataError,
    find_cases,
    find_unlabeled_cases,
)


def _preprocess_one(output_filename_truncated: str, image_files: list[str], plans: dict, configuration: str,
                    dataset_json: dict, check_images: bool = True, modality: str | None = None) -> None:
    if check_images:
        from nnunet_mmssl.dataloading.image_checks import check_image_file

        for image_file in image_files:
            check_image_file(image_file)
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if modality is not None:  # unregistered dataset: normalise as the case's modality
        from nnunet_mmssl.planners.modality_normalization import MODALITY_PROPERTY, plans_for_modality

        plans = plans_for_modality(plans, modality)
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    data, seg, properties = preprocessor.run_case(image_files, None, plans_manager, configuration_manager,
                                                  dataset_json)
    if modality is not None:
        properties[MODALITY_PROPERTY] = modality
    # no labels, so no foreground locations: the unlabelled stream samples patches uniformly
    properties["class_locations"] = {}
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    patch_size = tuple(configuration_manager.patch_size)
    blocks, chunks = comp_blosc2_params(data.shape, patch_size, data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch_size, seg.itemsize)
    save_case_verified(data, seg, properties, output_filename_truncated, chunks=chunks, blocks=blocks,
                       chunks_seg=chunks_seg, blocks_seg=blocks_seg)


def save_case_verified(data: np.ndarray, seg: np.ndarray, properties: dict, output_filename_truncated: str,
                       **blosc2_params) -> None:
    """nnU-Net's ``nnUNetDatasetBlosc2.save_case``, then every file read back whole and compared.

    The files are written inside a temporary folder (published by :func:`build_folder_atomically`); a message names
    them by their final folder.

    Raises:
        WriteError: a file could not be written completely (disk full, file-size limit), naming it.
    """
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_mmssl.io_checks import reported_as, write_error

    first = output_filename_truncated + ".b2nd"
    with reported_as(first, first):
        nnUNetDatasetBlosc2.save_case(data, seg, properties, output_filename_truncated, **blosc2_params)
    for suffix, expected in ((".b2nd", data), ("_seg.b2nd", seg)):
        path = output_filename_truncated + suffix
        try:
            ok = np.array_equal(np.asarray(blosc2.open(path, mode="r")[:]), expected)
        except Exception as error:  # noqa: BLE001 -- an unreadable file we wrote is a failed write
            raise write_error(path, path, error) from error
        if not ok:
            raise write_error(path, path)
    path = output_filename_truncated + ".pkl"
    try:
        load_pickle(path)
    except Exception as error:  # noqa: BLE001
        raise write_error(path, path, error) from error


@contextlib.contextmanager
def folder_lock(final: str, progress=print):
    """Hold an exclusive advisory lock (``fcntl.flock`` on the hidden sibling ``.<name>.lock``) while ``final`` is
    (re)built.

    A second run on the same folder waits for the first one to finish, then rebuilds it itself; the lock is released
    by the kernel when its holder dies, so a killed run never blocks the next.
    """
    if fcntl is None:
        yield
        return
    parent, name = os.path.split(final)
    with open(os.path.join(parent, f".{name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"Waiting for another run that is building {final} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _temporary_siblings(final: str) -> list[str]:
    """Leftovers of interrupted runs: ``.<name>.partial-*`` / ``.<name>.old-*`` and the former ``<name>.partial``."""
    parent, name = os.path.split(final)
    return sorted(glob.glob(os.path.join(parent, f".{glob.escape(name)}.partial-*"))
                  + glob.glob(os.path.join(parent, f".{glob.escape(name)}.old-*"))
                  + glob.glob(glob.escape(final) + ".partial"))


def build_folder_atomically(final: str, fill, progress=print) -> str:
    """Build ``final`` by ``fill(temporary_folder)`` in a hidden sibling, then swap it in by renames.

    Under :func:`folder_lock`; leftovers of killed runs are removed first. ``final`` is never half-written: it is
    either the previous complete folder or the new complete one.

    Args:
        final: the folder to (re)build.
        fill: callable writing the folder's content into the temporary folder it is given.
        progress: callable taking a message.

    Returns:
        ``final``.
    """
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    with folder_lock(final, progress):
        for leftover in _temporary_siblings(final):
            progress(f"Removing {leftover}, left by an interrupted run")
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
        try:
            fill(tmp)
            old = None
            if os.path.exists(final):
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.replace(final, os.path.join(old, name))
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def preprocess_unlabeled(raw_dataset_folder: str, preprocessed_dataset_folder: str, plans: dict,
                         configurations: Sequence[str], num_processes: int = 2,
                         progress=print, check_images: bool = True) -> dict[str, str]:
    """Preprocess ``imagesUnlabeled/`` for each configuration with the given plans.

    Each configuration's output folder is built under a hidden temporary name and renamed when complete, under a
    lock file (:func:`build_folder_atomically`): an interrupted run leaves no half-filled folder behind (its
    leftovers are removed by the next run), and two runs started together do not mix their cases.

    Args:
        raw_dataset_folder: ``<nnUNet_raw>/DatasetXXX_NAME``.
        preprocessed_dataset_folder: ``<nnUNet_preprocessed>/DatasetXXX_NAME``.
        plans: the plans dict (with the ``mmssl`` block).
        configurations: configuration names, e.g. ``["2d", "3d_fullres"]``.
        num_processes: worker processes.
        progress: callable taking one message string.
        check_images: read every raw image whole and check it first
            (:func:`~nnunet_mmssl.dataloading.image_checks.check_image_file`; pass False if already done).

    Returns:
        configuration -> output folder.

    Raises:
        UnlabeledDataError: if there are no unlabelled cases or they are malformed.
        ImageFileError: a truncated, non-image or non-finite raw image (named in the message).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mmssl.planners import unlabeled_data_identifier

    dataset_json = load_json(os.path.join(raw_dataset_folder, "dataset.json"))
    cases = find_unlabeled_cases(raw_dataset_folder, dataset_json)
    if not cases:
        folder = os.path.join(raw_dataset_folder, UNLABELED_IMAGES_FOLDER)
        raise UnlabeledDataError(f"No unlabelled cases found in {folder}"
                                 f". Put them there as CASE_XXXX{dataset_json['file_ending']} (nnUNetv2_mmssl_convert "
                                 f"does this), or pass --no-unlabeled for supervised-only training.")
    from nnunet_mmssl.dataset_conversion.modality_layout import read_layout

    layout = read_layout(dataset_json.get("mmssl"), os.path.join(raw_dataset_folder, "dataset.json"))
    modality_of = {case: layout.modality_of(case) if layout is not None else None for case in cases}
    plans_manager = PlansManager(plans)
    outputs = {}
    for k, configuration in enumerate(configurations):
        data_identifier = plans_manager.get_configuration(configuration).data_identifier
        final = os.path.join(preprocessed_dataset_folder, unlabeled_data_identifier(data_identifier, plans))
        check = check_images and k == 0

        def fill(tmp: str, configuration=configuration, check=check, final=final) -> None:
            progress(f"Preprocessing {len(cases)} unlabelled cases for configuration {configuration} -> {final}")
            jobs = [(os.path.join(tmp, case), files, plans, configuration, dataset_json, check, modality_of[case])
                    for case, files in cases.items()]
            if num_processes <= 1:
                for job in jobs:
                    _preprocess_one(*job)
            else:
                with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
                    pool.starmap(_preprocess_one, jobs)

        outputs[configuration] = build_folder_atomically(final, fill, progress)
    return outputs

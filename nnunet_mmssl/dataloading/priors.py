"""Per-case priors (e.g. masks of a zero-shot model) for SMML's refinement network, in nnU-Net's pipeline.

Convention (raw): ``<nnUNet_raw>/DatasetXXX/priorsTr/CASE_XXXX<file_ending>`` -- one prior per modality, named like
the case's image channel it belongs to (``XXXX`` = the channel index of ``imagesTr``), on the same grid as the
images, values in [0, 1] (a binary mask or a probability map of the structure of interest). Every labelled training
case needs all of its priors (a case without them is an error naming the missing files). Nothing is downloaded:
the user runs whatever model makes the priors and puts its outputs there.

Preprocessing: each configuration's priors are put through the same transpose, crop (the image's nonzero bounding
box, as nnU-Net recorded it) and resampling (to the preprocessed image's exact shape, with the data's resampling
function) as the image, into ``<nnUNet_preprocessed>/DatasetXXX/<data_identifier>_priors/CASE.npy`` (float32,
clipped to [0, 1]); no intensity normalisation.

Training: the trainer's datasets append the priors to the image channels; the wrapper of nnU-Net's transforms
(:func:`wrap_transforms_for_priors`) moves them into batchgeneratorsv2's ``regression_target`` so that they undergo
the image's spatial transforms (rotation, scaling, elastic, mirroring: the same parameters) but none of its
intensity transforms, then appends them again after the image channels. The trainer splits them off before the
network.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np
import torch

PRIORS_FOLDER = "priorsTr"


class PriorsError(ValueError):
    """Priors missing, malformed or not matching their case."""


def priors_data_identifier(data_identifier: str) -> str:
    """Folder name (beside the configuration's data folder) of its preprocessed priors."""
    return f"{data_identifier}_priors"


def find_prior_files(raw_dataset_folder: str, dataset_json: dict, cases: Sequence[str]) -> dict[str, list[str]]:
    """case -> its K prior files (channel order); error naming every missing file of the first case lacking one."""
    folder = os.path.join(raw_dataset_folder, PRIORS_FOLDER)
    ending = dataset_json["file_ending"]
    channels = sorted(int(c) for c in dataset_json["channel_names"])
    result = {}
    for case in sorted(cases):
        files = [os.path.join(folder, f"{case}_{c:04d}{ending}") for c in channels]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise PriorsError(f"Case {case} has no prior file {', '.join(missing)}. {PRIORS_FOLDER}/ must hold one "
                              f"prior per modality for every labelled training case ({case}_XXXX{ending}, XXXX = the "
                              f"channel index), or no {PRIORS_FOLDER}/ folder at all (the SRN then reads the "
                              f"prediction alone).")
        result[case] = files
    known = {os.path.basename(f) for files in result.values() for f in files}
    stray = sorted(os.path.basename(f) for f in glob.glob(os.path.join(folder, f"*{ending}"))
                   if os.path.basename(f) not in known)
    if stray:
        raise PriorsError(f"{folder} holds files that belong to no labelled training case or channel: "
                          f"{', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''}. Expected CASE_XXXX{ending} "
                          f"for the cases of imagesTr and the channels {channels}.")
    return result


def check_prior_file(path: str) -> None:
    """One prior read whole and checked like every raw image (complete file, an image, finite voxels as stored:
    :func:`~nnunet_mmssl.dataloading.image_checks.read_image_checked`), and its values in [0, 1].

    Raises:
        PriorsError: naming the file, what is wrong and the fix.
    """
    import SimpleITK as sitk

    from nnunet_mmssl.dataloading.image_checks import ImageFileError, read_image_checked

    try:
        image = read_image_checked(path)
    except ImageFileError as error:
        raise PriorsError(str(error)) from None
    array = sitk.GetArrayViewFromImage(image)
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise PriorsError(f"{path}, has values in [{low:g}, {high:g}]; a prior must be a mask or probability map in "
                          f"[0, 1]. Rescale it (e.g. divide a 0-255 mask by 255) and save it again.")


def check_prior_grids(raw_dataset_folder: str, files: dict[str, list[str]]) -> None:
    """Every prior file on its image channel's grid (size and spacing from the file headers), then read whole and
    checked (:func:`check_prior_file`: complete, finite, values in [0, 1]), so that a wrong prior stops
    ``nnUNetv2_mmssl_plan_and_preprocess`` before anything is written (the converter's header reader; SimpleITK
    alone would read NaN/Inf as 0 and a truncated prior's missing part as zeros). Other formats than SimpleITK's are
    left to the check during preprocessing.

    Raises:
        PriorsError: naming the prior (and for a grid mismatch its image and both grids), with the fix.
    """
    from nnunet_mmssl.dataset_conversion.checking import read_header
    from nnunet_mmssl.dataset_conversion.request import IMAGE_EXTENSIONS  # the formats SimpleITK reads

    checked = [prior for case_files in files.values() for prior in case_files if prior.endswith(IMAGE_EXTENSIONS)]
    for prior in checked:  # headers first: cheap
        image = os.path.join(raw_dataset_folder, "imagesTr", os.path.basename(prior))
        if not os.path.isfile(image):
            continue
        try:
            want, got = read_header(image), read_header(prior)
        except ValueError as error:  # a truncated or non-image file (the converter's ConversionError)
            raise PriorsError(str(error)) from None
        if got.size != want.size or not np.allclose(got.spacing, want.spacing, rtol=1e-3, atol=1e-5):
            raise PriorsError(f"Prior {prior} has size {got.size} and spacing {got.spacing}, its image {image} "
                              f"size {want.size} and spacing {want.spacing}: a prior must be on its case's image "
                              f"grid (resample it onto the image, e.g. with SimpleITK's Resample and the image "
                              f"as reference).")
    for prior in checked:
        check_prior_file(prior)


def has_priors(raw_dataset_folder: str) -> bool:
    """Whether the raw dataset has a priors folder (the priors are then required for every training case)."""
    return os.path.isdir(os.path.join(raw_dataset_folder, PRIORS_FOLDER))


def preprocess_case_priors(files: Sequence[str], properties: dict, data_shape: Sequence[int], plans_manager,
                           configuration_manager) -> np.ndarray:
    """One case's priors, transposed, cropped and resampled exactly as nnU-Net did the case's image.

    Args:
        files: the K prior files.
        properties: the case's preprocessed properties (nnU-Net's ``.pkl``: spacing, shape before cropping, bbox).
        data_shape: spatial shape of the preprocessed image.
        plans_manager, configuration_manager: the plans and configuration the image was preprocessed with.

    Returns:
        (K, *data_shape) float32 in [0, 1].
    """
    from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice

    reader = plans_manager.image_reader_writer_class()
    priors, prior_properties = reader.read_images(list(files))
    priors = np.asarray(priors, dtype=np.float32)
    if not np.all(np.isfinite(priors)):
        raise PriorsError(f"Priors {', '.join(files)} contain NaN or infinite values.")
    low, high = float(priors.min()), float(priors.max())
    if low < 0 or high > 1:
        raise PriorsError(f"Priors {', '.join(files)} have values in [{low:g}, {high:g}]; priors must be masks or "
                          f"probabilities in [0, 1] (rescale them, e.g. divide a 0-255 mask by 255).")
    transpose = plans_manager.transpose_forward
    priors = priors.transpose([0, *[i + 1 for i in transpose]])
    if tuple(priors.shape[1:]) != tuple(properties["shape_before_cropping"]):
        raise PriorsError(f"Priors {', '.join(files)} have shape {tuple(priors.shape[1:])} (after nnU-Net's "
                          f"transpose) but their case's images {tuple(properties['shape_before_cropping'])}: a prior "
                          f"must be on its case's image grid.")
    if not np.allclose(prior_properties["spacing"], properties["spacing"], rtol=1e-3, atol=1e-5):
        raise PriorsError(f"Priors {', '.join(files)} have spacing {tuple(prior_properties['spacing'])}, their case's "
                          f"images {tuple(properties['spacing'])}: a prior must be on its case's image grid.")
    priors = priors[(slice(None), *bounding_box_to_slice(properties["bbox_used_for_cropping"]))]
    original_spacing = [properties["spacing"][i] for i in transpose]
    target_spacing = list(configuration_manager.spacing)
    if len(target_spacing) < priors.ndim - 1:  # 2d: the slice axis keeps its spacing
        target_spacing = [original_spacing[0]] + target_spacing
    if tuple(priors.shape[1:]) != tuple(data_shape):
        priors = configuration_manager.resampling_fn_data(priors, tuple(data_shape), original_spacing, target_spacing)
    return np.clip(priors, 0, 1).astype(np.float32)


def _preprocess_one(job: tuple) -> None:
    files, properties_file, data_shape, output, plans, configuration = job
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    priors = preprocess_case_priors(files, load_pickle(properties_file), data_shape, plans_manager,
                                    plans_manager.get_configuration(configuration))
    from nnunet_mmssl.io_checks import save_npy

    save_npy(priors, output)


def preprocess_priors(raw_dataset_folder: str, preprocessed_dataset_folder: str, plans: dict,
                      configurations: Sequence[str], progress=print) -> dict[str, str]:
    """Preprocess ``priorsTr/`` for each configuration whose labelled cases are preprocessed; configuration ->
    output folder. Each folder is built atomically (never half-written)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mmssl.dataloading.unlabeled_preprocessing import build_folder_atomically

    dataset_json = load_json(os.path.join(raw_dataset_folder, "dataset.json"))
    plans_manager = PlansManager(plans)
    outputs = {}
    for configuration in configurations:
        data_identifier = plans_manager.get_configuration(configuration).data_identifier
        data_folder = os.path.join(preprocessed_dataset_folder, data_identifier)
        dataset = infer_dataset_class(data_folder)(data_folder)
        cases = list(dataset.identifiers)
        files = find_prior_files(raw_dataset_folder, dataset_json, cases)
        final = os.path.join(preprocessed_dataset_folder, priors_data_identifier(data_identifier))

        def fill(tmp: str, dataset=dataset, files=files, configuration=configuration, data_folder=data_folder,
                 final=final) -> None:
            progress(f"Preprocessing the priors of {len(files)} cases for configuration {configuration} -> {final}")
            for case, case_files in files.items():
                shape = dataset.load_case(case)[0].shape[1:]
                _preprocess_one((case_files, os.path.join(data_folder, case + ".pkl"), shape,
                                 os.path.join(tmp, case + ".npy"), plans, configuration))

        outputs[configuration] = build_folder_atomically(final, fill, progress)
    return outputs


# ---------------------------------------------------------------------------------------------- training side
class CaseWithPriors:
    """A case's image channels followed by its priors, read lazily: indexing reads only the indexed region of both
    (nnU-Net's data loader crops each sampled patch with ``data[tuple(slices)]``; the image stays in its blosc2 /
    memory-mapped file and the priors are memory-mapped), so a 2d patch does not decompress and copy the whole 3d case.
    ``np.asarray`` gives the whole array."""

    def __init__(self, data, priors):
        self.data, self.priors = data, priors
        self.shape = (data.shape[0] + priors.shape[0], *data.shape[1:])
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis or k is None for k in key):
            return np.asarray(self)[key]
        channel, spatial = (key[0], key[1:]) if key else (slice(None), ())
        whole = (slice(None), *spatial)
        joined = np.concatenate([np.asarray(self.data[whole], dtype=np.float32),
                                 np.asarray(self.priors[whole], dtype=np.float32)])
        return joined[channel]

    def __array__(self, dtype=None, copy=None):
        joined = self[(slice(None),)]
        return joined if dtype is None else joined.astype(dtype, copy=False)


class DatasetWithPriors:
    """One of nnU-Net's datasets whose cases carry their priors after the image channels (picklable wrapper;
    :meth:`load_case` returns a :class:`CaseWithPriors`)."""

    def __init__(self, dataset, priors_folder: str, num_channels: int):
        self.dataset = dataset
        self.priors_folder = priors_folder
        self.num_channels = num_channels

    def __getattr__(self, name):
        if name in ("dataset", "__setstate__", "__getstate__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, identifier):
        return self.load_case(identifier)

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        path = os.path.join(self.priors_folder, identifier + ".npy")
        if not os.path.isfile(path):
            raise PriorsError(f"No preprocessed priors {path} for case {identifier}. Rerun "
                              f"nnUNetv2_mmssl_plan_and_preprocess (it preprocesses {PRIORS_FOLDER}/).")
        priors = np.load(path, mmap_mode="r")
        if priors.shape != (self.num_channels, *data.shape[1:]):
            raise PriorsError(f"Preprocessed priors {path} have shape {priors.shape}, expected "
                              f"{(self.num_channels, *data.shape[1:])}. Rerun nnUNetv2_mmssl_plan_and_preprocess.")
        return CaseWithPriors(data, priors), seg, seg_prev, properties


class _SplitPriors:
    """Move the image's channels beyond ``num_channels`` into ``regression_target`` (spatial transforms only)."""

    def __init__(self, num_channels: int):
        self.num_channels = num_channels

    def __call__(self, **data_dict):
        image = data_dict["image"]
        if image.shape[0] > self.num_channels:
            data_dict["regression_target"] = image[self.num_channels:].clone()
            data_dict["image"] = image[:self.num_channels]
        return data_dict


class _JoinPriors:
    """Append ``regression_target`` (clipped to [0, 1]) to the image channels again."""

    def __call__(self, **data_dict):
        priors = data_dict.pop("regression_target", None)
        if priors is not None:
            data_dict["image"] = torch.cat([data_dict["image"], priors.to(data_dict["image"].dtype).clamp(0, 1)])
        return data_dict


class PriorsTransforms:
    """nnU-Net's transform pipeline with the priors kept out of its intensity transforms (see module docstring).

    Samples with no channel beyond ``num_channels`` (e.g. unlabelled cases) pass through ``base`` unchanged."""

    def __init__(self, base, num_channels: int):
        self.base = base
        self.split = _SplitPriors(num_channels)
        self.join = _JoinPriors()

    def __call__(self, **data_dict):
        return self.join(**self.base(**self.split(**data_dict)))

    def __repr__(self):
        return f"PriorsTransforms({self.base!r})"


def wrap_transforms_for_priors(transforms, num_channels: int) -> PriorsTransforms:
    return PriorsTransforms(transforms, num_channels)

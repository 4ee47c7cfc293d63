"""Case files of an nnU-Net image folder: ``CASE_XXXX<file_ending>`` grouped by case, every channel present.

Used by the unlabelled preprocessing (``imagesUnlabeled/``) and by the prediction input check
(:func:`nnunet_mmssl.dataloading.image_checks.check_input_folder`); it imports nothing of the package, so both can
use it without importing each other.
"""

import os
import re
from collections.abc import Sequence

UNLABELED_IMAGES_FOLDER = "imagesUnlabeled"


class UnlabeledDataError(ValueError):
    """A user-fixable problem with the unlabelled cases (missing channel files, empty folder, ...)."""


def find_unlabeled_cases(raw_dataset_folder: str, dataset_json: dict) -> dict[str, list[str]]:
    """Map case id -> channel files (in channel order) for ``imagesUnlabeled/``.

    Returns an empty dict if the folder does not exist.

    Raises:
        UnlabeledDataError: a case lacks a channel, has an unknown channel index, or a file does not follow
            ``CASE_XXXX<file_ending>``.
    """
    return find_cases(os.path.join(raw_dataset_folder, UNLABELED_IMAGES_FOLDER), dataset_json, "Unlabelled case")


def find_cases(folder: str, dataset_json: dict, what: str = "Case", ignore_other_endings: bool = False,
               absent_channels: Sequence[int] = ()) -> dict[str, list[str]]:
    """Map case id -> channel files (in channel order) of an nnU-Net image folder (``CASE_XXXX<file_ending>``).

    Returns an empty dict if the folder does not exist. Hidden files are skipped, and with ``ignore_other_endings``
    also files not ending in ``file_ending``.

    Args:
        folder: the image folder.
        dataset_json: ``channel_names`` and ``file_ending``.
        what: how messages call a case.
        ignore_other_endings: skip files not ending in ``file_ending``.
        absent_channels: channel indices declared missing (prediction with ``--missing``): a case need not have
            their files, and a file of such a channel, if there, is skipped (never read). The lists then hold the
            present channels' files only, in channel order.

    Raises:
        UnlabeledDataError: a case lacks a channel that is not in ``absent_channels``, has an unknown channel
            index, or a file does not follow ``CASE_XXXX<file_ending>``.
    """
    absent = {int(c) for c in absent_channels}
    if not os.path.isdir(folder):
        return {}
    file_ending = dataset_json["file_ending"]
    num_channels = len(dataset_json["channel_names"])
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))
    cases: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or (ignore_other_endings and not name.endswith(file_ending)):
            continue
        match = pattern.fullmatch(name)
        if match is None:
            raise UnlabeledDataError(f"{os.path.join(folder, name)} does not follow nnU-Net's naming CASE_XXXX"
                                     f"{file_ending}. Rename it (e.g. with nnUNetv2_mmssl_convert) or remove it.")
        case, channel = match.group(1), int(match.group(2))
        if channel >= num_channels:
            raise UnlabeledDataError(f"{os.path.join(folder, name)} has channel index {channel}, but dataset.json "
                                     f"declares {num_channels} channels {dataset_json['channel_names']}. Remove it, or "
                                     f"renumber the case's channels 0000..{num_channels - 1:04d}.")
        cases.setdefault(case, {})[channel] = os.path.join(folder, name)
    present = [c for c in range(num_channels) if c not in absent]
    result = {}
    for case, channels in cases.items():
        missing = [c for c in present if c not in channels]
        if missing:
            expected = [f"{case}_{c:04d}{file_ending}" for c in missing]
            absent_note = (f" (channel(s) {sorted(absent)} are declared missing and may be left out)" if absent
                           else "")
            raise UnlabeledDataError(f"{what} {case!r} in {folder} lacks channel(s) {missing}: expected "
                                     f"{expected}. Every case needs all channels of dataset.json "
                                     f"{dataset_json['channel_names']}{absent_note}.")
        result[case] = [channels[c] for c in present]
    return result

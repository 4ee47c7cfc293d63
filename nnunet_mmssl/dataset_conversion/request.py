"""The conversion request: shared constants, the error type, and parsing/validation of what the user asks for.

Used by both modes of the converter (:mod:`~nnunet_mmssl.dataset_conversion.convert`, registered channels, and
:mod:`~nnunet_mmssl.dataset_conversion.unregistered`, one modality per case) and by the CLI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nnunet_mmssl.names import MAX_NAME_LENGTH, check_safe_name

IMAGE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
"""File endings considered as images inside a case folder (compared case-insensitively)."""

FILE_ENDING = ".nii.gz"
"""File ending of the written dataset."""

DEFAULT_LABELS: dict[str, int] = {"background": 0, "foreground": 1}
"""Labels of ``dataset.json`` when none are given."""

SPLIT_FILE_NAME = "mmssl_split.json"
"""Name of the split file written beside ``dataset.json``."""

GROUP_FOLDERS: dict[str, tuple[str, str | None]] = {
    "labeled": ("imagesTr", "labelsTr"),
    "unlabeled": ("imagesUnlabeled", None),
    "test": ("imagesTs", "labelsTs"),
}
"""Split group -> (image folder, label folder or None)."""

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")

ModalitySpec = Sequence[tuple[str, Sequence[str] | str]] | Mapping[str, Sequence[str] | str]


class ConversionError(ValueError):
    """A user-fixable problem with the conversion request or the input data; the message says what and where."""


def safe_name(name: str, what: str, source: str) -> str:
    """:func:`nnunet_mmssl.names.check_safe_name` raising :class:`ConversionError`: a modality, channel, region or
    dataset name becomes part of file names (``../../x`` or ``T1/pre`` would write elsewhere)."""
    try:
        return check_safe_name(name, what, source)
    except ValueError as error:
        raise ConversionError(str(error)) from None


@dataclass(frozen=True)
class Tolerances:
    """Absolute tolerances of the per-case grid check (spacing and origin in mm, direction cosines unitless)."""

    spacing: float = 1e-3
    origin: float = 1e-2
    direction: float = 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Argument parsing helpers (shared by the CLI and by callers building requests from strings)
# ----------------------------------------------------------------------------------------------------------------


def parse_modality_specs(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Parse ``NAME=GLOB`` / ``NAME=GLOB1,GLOB2`` strings into an ordered modality list.

    The order of first appearance of each name fixes the channel order; a repeated name adds globs.

    Args:
        specs: strings such as ``"FLAIR=*flair*"``, ``"T1=T1.nii.gz,*t1n*"``.

    Returns:
        ``[(name, [glob, ...]), ...]`` in channel order, globs de-duplicated in order.

    Raises:
        ConversionError: a string is not ``NAME=GLOB`` or has an empty name or glob.
    """
    order: list[str] = []
    globs: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        name = name.strip()
        if not sep or not name or not rest.strip():
            raise ConversionError(f"--modality {spec!r} is not NAME=GLOB (e.g. FLAIR='*flair*' or "
                                  f"T1='T1.nii.gz,*t1n*')")
        parts = [p.strip() for p in rest.split(",")]
        if any(not p for p in parts):
            raise ConversionError(f"--modality {spec!r} contains an empty glob")
        if name not in globs:
            order.append(name)
            globs[name] = []
        for p in parts:
            if p not in globs[name]:
                globs[name].append(p)
    return [(name, globs[name]) for name in order]


def parse_label_specs(specs: Sequence[str]) -> dict[str, int]:
    """Parse ``NAME=VALUE`` strings (e.g. ``background=0 tumour=1``) into a ``dataset.json`` labels dict.

    Args:
        specs: the strings.

    Returns:
        ``{name: value}`` in the given order (validated with :func:`validate_labels`).

    Raises:
        ConversionError: malformed string, non-integer value, repeated name, or invalid label set.
    """
    labels: dict[str, int] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ConversionError(f"--labels {spec!r} is not NAME=VALUE (e.g. background=0 tumour=1)")
        try:
            number = int(value)
        except ValueError:
            raise ConversionError(f"--labels {spec!r}: value {value!r} is not an integer") from None
        if name in labels:
            raise ConversionError(f"--labels: label name {name!r} given twice")
        labels[name] = number
    validate_labels(labels)
    return labels


def validate_labels(labels: Mapping[str, int]) -> dict[str, int]:
    """Check a labels dict against nnU-Net's rules: ``background`` = 0, integer values, unique, consecutive.

    Args:
        labels: ``{name: value}``.

    Returns:
        A plain dict copy.

    Raises:
        ConversionError: if a rule is broken.
    """
    result: dict[str, int] = {}
    for name, value in labels.items():
        if not isinstance(name, str) or not name:
            raise ConversionError(f"label names must be non-empty strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConversionError(f"label {name!r}: value {value!r} is not an integer (region-based labels are "
                                  f"not supported by the converter)")
        result[name] = int(value)
    if result.get("background") != 0:
        raise ConversionError(f"labels must contain background=0 (nnU-Net requires it), got {result}")
    values = sorted(result.values())
    if len(set(values)) != len(values):
        raise ConversionError(f"label values must be unique, got {result}")
    if values != list(range(len(values))):
        raise ConversionError(f"label values must be consecutive 0, 1, 2, ... (nnU-Net requires it), got {result}")
    return result


def _normalise_modalities(modalities: ModalitySpec) -> list[tuple[str, list[str]]]:
    items = list(modalities.items()) if isinstance(modalities, Mapping) else list(modalities)
    if not items:
        raise ConversionError("at least one modality (NAME and glob(s)) is needed")
    result: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for item in items:
        try:
            name, globs = item
        except (TypeError, ValueError):
            raise ConversionError(f"modality {item!r} is not a (name, globs) pair") from None
        if not isinstance(name, str) or not name.strip():
            raise ConversionError(f"modality name {name!r} must be a non-empty string")
        safe_name(name, "modality (channel) name", "--modality")
        if name in seen:
            raise ConversionError(f"modality {name!r} given twice; give all its globs in one entry")
        seen.add(name)
        glob_list = [globs] if isinstance(globs, str) else list(globs)
        if not glob_list or any(not isinstance(g, str) or not g for g in glob_list):
            raise ConversionError(f"modality {name!r} needs one or more non-empty globs, got {globs!r}")
        result.append((name, glob_list))
    return result


def _normalise_label_globs(label_globs: Sequence[str] | str | None) -> list[str]:
    if label_globs is None:
        return []
    glob_list = [label_globs] if isinstance(label_globs, str) else list(label_globs)
    if any(not isinstance(g, str) or not g for g in glob_list):
        raise ConversionError(f"label globs must be non-empty strings, got {label_globs!r}")
    return glob_list




def check_request(dataset_id: int, dataset_name: str, case_prefix: str | None, labels: Mapping[str, int] | None,
                  num_processes: int, spacing_tolerance: float, origin_tolerance: float,
                  direction_tolerance: float) -> tuple[str, dict[str, int], Tolerances]:
    """Validate the parts of a request common to both modes (in this order: id, name, prefix, labels, processes,
    tolerances).

    Returns:
        ``(case prefix, labels dict, tolerances)``.

    Raises:
        ConversionError: naming the bad value.
    """
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset id must be an int in 1..999, got {dataset_id!r}")
    if not isinstance(dataset_name, str) or not _NAME_PATTERN.fullmatch(dataset_name) \
            or len(dataset_name) > MAX_NAME_LENGTH:
        raise ConversionError(f"-n/--dataset-name: dataset name {dataset_name!r} must start with a letter or digit "
                              f"and contain only letters, digits, '_' and '-' (at most {MAX_NAME_LENGTH} characters): "
                              f"it becomes the folder name Dataset{int(dataset_id):03d}_NAME. Choose such a name.")
    prefix = dataset_name if case_prefix is None else case_prefix
    if not isinstance(prefix, str) or not _NAME_PATTERN.fullmatch(prefix) or len(prefix) > MAX_NAME_LENGTH:
        raise ConversionError(f"--case-prefix: case prefix {prefix!r} must start with a letter or digit and contain "
                              f"only letters, digits, '_' and '-' (at most {MAX_NAME_LENGTH} characters): it becomes "
                              f"part of every file name. Choose such a prefix.")
    label_dict = validate_labels(DEFAULT_LABELS if labels is None else labels)
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ConversionError(f"num_processes must be an int >= 1, got {num_processes!r}")
    tol = Tolerances(float(spacing_tolerance), float(origin_tolerance), float(direction_tolerance))
    if min(tol.spacing, tol.origin, tol.direction) < 0:
        raise ConversionError(f"tolerances must be >= 0, got {tol}")
    return prefix, label_dict, tol

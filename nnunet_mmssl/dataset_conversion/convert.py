"""Convert per-case folders from one or more sources into an nnU-Net v2 raw dataset with unlabelled cases.

Input: each *source* folder holds one immediate subfolder per case. Inside a case folder, files are searched
recursively and matched by their *file name* (not their path) against user-given globs, case-sensitively with
:func:`fnmatch.fnmatchcase`; only image files (``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``, ``.mhd``) are considered
and hidden files (name starting with ``.``) are ignored. Every modality (channel) has one or more globs; exactly one
file per case must match each modality. The label file is matched by the label glob(s); a case without one is
unlabelled.

Output (``<raw_root>/DatasetXXX_NAME/``)::

    imagesTr/CASE_0000.nii.gz ...      labelled training cases       labelsTr/CASE.nii.gz
    imagesUnlabeled/CASE_0000.nii.gz   cases without label + labelled cases used as unlabelled (label not copied)
    imagesTs/CASE_0000.nii.gz ...      held-out labelled test cases   labelsTs/CASE.nii.gz
    dataset.json                       nnU-Net v2 keys + numUnlabeled, numTest and an ``mmssl`` block
    mmssl_split.json                   the same ``mmssl`` block: sources, globs, seed and the full split

Case ids are ``<prefix>_<NNN>``, numbered over all cases in sorted order of (source index, case folder name), so an
id does not depend on the split. Labelled cases are shuffled with ``np.random.RandomState(seed)``: the first
``num_test`` become test cases, then ``num_labeled`` of the remaining ones become labelled training cases, and the
rest join the unlabelled pool.

Every case is checked before anything is written (channels and label on one grid, integral non-negative labels with
declared values only), and every image is read whole and checked while it is copied (complete file -- a truncated
``.nii.gz`` is an error, not zeros --, an image at all, finite voxels; see
:mod:`nnunet_mmssl.dataloading.image_checks`). The dataset is written into a hidden temporary sibling folder that is
renamed to its final name at the very end, so a failure never leaves a half-written dataset behind.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class SourceCase:
    """One case folder of a source with its matched files.

    Attributes:
        source_index: index of the source folder in the user's list.
        source: the source folder (resolved).
        folder: the case folder (an immediate subfolder of ``source``).
        channel_files: one image file per modality, in channel order.
        label_file: the label file, or None for an unlabelled case.
    """

    source_index: int
    source: Path
    folder: Path
    channel_files: tuple[Path, ...]
    label_file: Path | None

    @property
    def name(self) -> str:
        """The case folder name."""
        return self.folder.name

    def describe(self) -> str:
        """Human-readable identification used in error messages."""
        return f"case folder {str(self.folder)!r}"


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


# ----------------------------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive) and is not hidden."""
    name = path.name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_image_files(case_folder: Path) -> list[Path]:
    """All image files below ``case_folder`` (recursive, sorted, hidden files and folders skipped)."""
    files = []
    for root, dirs, names in os.walk(case_folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if is_image_file(path) and path.is_file():
                files.append(path)
    return sorted(files)


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def match_case_files(case_folder: Path, modalities: ModalitySpec,
                     label_globs: Sequence[str] | str | None) -> tuple[list[Path], Path | None]:
    """Match the image files of one case folder to the modalities and the label.

    Args:
        case_folder: the case folder (searched recursively).
        modalities: ``[(name, [glob, ...]), ...]`` in channel order (or a mapping).
        label_globs: glob(s) of the label file, or None.

    Returns:
        ``(channel_files, label_file_or_None)``.

    Raises:
        ConversionError: a file matches globs of two roles (ambiguous), a modality matches no file or several, or
            several files match the label glob(s).
    """
    mods = _normalise_modalities(modalities)
    lab_globs = _normalise_label_globs(label_globs)
    roles: list[tuple[str, list[str]]] = list(mods) + ([("label", lab_globs)] if lab_globs else [])
    files = find_image_files(case_folder)
    matches: dict[str, list[Path]] = {role: [] for role, _ in roles}
    for f in files:
        hit = [(role, [g for g in globs if fnmatch.fnmatchcase(f.name, g)]) for role, globs in roles]
        hit = [(role, gs) for role, gs in hit if gs]
        if len(hit) > 1:
            what = ", ".join(f"{'the label' if r == 'label' else 'modality ' + repr(r)} (glob(s) {gs})"
                             for r, gs in hit)
            raise ConversionError(f"case folder {str(case_folder)!r}: file {_relative(f, case_folder)!r} is "
                                  f"ambiguous: it matches {what}. Make the globs more specific.")
        if hit:
            matches[hit[0][0]].append(f)
    available = [_relative(f, case_folder) for f in files]
    channel_files = []
    for name, globs in mods:
        found = matches[name]
        if len(found) != 1:
            if not found:
                detail = f"no file matches; image files in the case folder: {available}"
            else:
                detail = f"{len(found)} files match: {[_relative(f, case_folder) for f in found]}"
            raise ConversionError(f"case folder {str(case_folder)!r}: modality {name!r} with glob(s) {globs}: "
                                  f"{detail}. Exactly one file per modality is needed.")
        channel_files.append(found[0])
    label_file = None
    if lab_globs:
        found = matches["label"]
        if len(found) > 1:
            raise ConversionError(f"case folder {str(case_folder)!r}: label glob(s) {lab_globs}: {len(found)} files "
                                  f"match: {[_relative(f, case_folder) for f in found]}. At most one label file "
                                  f"per case is allowed.")
        label_file = found[0] if found else None
    return channel_files, label_file


def discover_cases(sources: Sequence[str | os.PathLike], modalities: ModalitySpec,
                   label_globs: Sequence[str] | str | None) -> list[SourceCase]:
    """Find the cases of all sources (each immediate, non-hidden subfolder of a source is one case).

    Args:
        sources: source folders, in the user's order.
        modalities: ``[(name, [glob, ...]), ...]`` in channel order (or a mapping).
        label_globs: glob(s) of the label file, or None (all cases unlabelled).

    Returns:
        The cases sorted by (source index, case folder name).

    Raises:
        ConversionError: a source is missing, given twice or holds no case folder, or a case's files do not match
            (see :func:`match_case_files`).
    """
    if not sources:
        raise ConversionError("at least one source folder is needed")
    mods = _normalise_modalities(modalities)
    lab_globs = _normalise_label_globs(label_globs)
    resolved: list[Path] = []
    for s in sources:
        path = Path(s).expanduser().resolve()
        if not path.is_dir():
            raise ConversionError(f"source folder {str(s)!r} does not exist or is not a folder")
        if path in resolved:
            raise ConversionError(f"source folder {str(path)!r} is given twice")
        resolved.append(path)
    cases: list[SourceCase] = []
    for index, source in enumerate(resolved):
        folders = sorted((p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.name)
        if not folders:
            raise ConversionError(f"source folder {str(source)!r} holds no case subfolder (expected one subfolder "
                                  f"per case)")
        for folder in folders:
            channel_files, label_file = match_case_files(folder, mods, lab_globs)
            cases.append(SourceCase(index, source, folder, tuple(channel_files), label_file))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------------------------


def resolve_num_labeled(num_labeled: int | float | None, available: int) -> int:
    """Number of labelled training cases out of ``available`` labelled non-test cases.

    Args:
        num_labeled: an int count (>= 1), a float fraction in (0, 1] (rounded half up, at least 1), or None (all).
        available: labelled cases left after the test cases are taken.

    Returns:
        The count.

    Raises:
        ConversionError: invalid value, or more requested than available, or zero available.
    """
    if available <= 0:
        raise ConversionError("zero labelled training cases would remain: no labelled case is left after the test "
                              "cases are taken")
    if num_labeled is None:
        return available
    if isinstance(num_labeled, bool):
        raise ConversionError(f"num_labeled must be an int count or a float fraction, got {num_labeled!r}")
    if isinstance(num_labeled, (int, np.integer)):
        if num_labeled < 1:
            raise ConversionError(f"num_labeled={num_labeled}: at least one labelled training case is needed")
        if num_labeled > available:
            raise ConversionError(f"num_labeled={num_labeled} but only {available} labelled cases are left for "
                                  f"training")
        return int(num_labeled)
    if isinstance(num_labeled, (float, np.floating)):
        if not (0.0 < num_labeled <= 1.0):
            raise ConversionError(f"num_labeled={num_labeled}: a float is a fraction in (0, 1] of the labelled "
                                  f"non-test cases; use an int for a count")
        return min(available, max(1, int(math.floor(num_labeled * available + 0.5))))
    raise ConversionError(f"num_labeled must be an int, a float or None, got {num_labeled!r}")


def split_cases(cases: Sequence[SourceCase], num_labeled: int | float | None, num_test: int,
                seed: int) -> dict[str, list[int]]:
    """Split case indices into ``labeled`` / ``unlabeled`` / ``test``.

    Labelled cases are shuffled with ``np.random.RandomState(seed)``; the first ``num_test`` go to ``test``, then
    :func:`resolve_num_labeled` of the rest go to ``labeled``; the remaining labelled cases and all cases without a
    label go to ``unlabeled``. Each list is sorted.

    Args:
        cases: the cases (from :func:`discover_cases`).
        num_labeled: see :func:`resolve_num_labeled`.
        num_test: number of held-out labelled test cases (>= 0).
        seed: the shuffle seed.

    Returns:
        ``{"labeled": [...], "unlabeled": [...], "test": [...]}`` of indices into ``cases``.

    Raises:
        ConversionError: impossible request (numbers named in the message).
    """
    if isinstance(num_test, bool) or not isinstance(num_test, (int, np.integer)) or num_test < 0:
        raise ConversionError(f"num_test must be an int >= 0, got {num_test!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ConversionError(f"seed must be an int in [0, 2**32), got {seed!r}")
    labeled = [i for i, c in enumerate(cases) if c.label_file is not None]
    without_label = [i for i, c in enumerate(cases) if c.label_file is None]
    n = len(labeled)
    if n == 0:
        raise ConversionError(f"none of the {len(cases)} cases has a label file, so there would be zero labelled "
                              f"training cases (check the label glob(s))")
    if num_test >= n:
        raise ConversionError(f"num_test={num_test} but only {n} cases have a label; at least one labelled case "
                              f"must remain for training")
    requested = None
    if isinstance(num_labeled, (int, np.integer)) and not isinstance(num_labeled, bool):
        requested = int(num_labeled)
    if requested is not None and requested + num_test > n:
        raise ConversionError(f"requested num_test={num_test} + num_labeled={requested} = {num_test + requested} "
                              f"labelled cases, but only {n} cases have a label")
    order = np.random.RandomState(int(seed)).permutation(n)
    shuffled = [labeled[k] for k in order]
    test, rest = shuffled[:num_test], shuffled[num_test:]
    n_train = resolve_num_labeled(num_labeled, len(rest))
    return {"labeled": sorted(rest[:n_train]), "unlabeled": sorted(rest[n_train:] + without_label),
            "test": sorted(test)}


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int
    pixel_type: str


def _read_header(path: Path) -> _Header:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        from nnunet_mmssl.dataloading.image_checks import ImageFileError, check_file_complete

        try:  # a truncated or non-gzip file: say so rather than "cannot read"
            check_file_complete(path)
        except ImageFileError as incomplete:
            raise ConversionError(str(incomplete)) from None
        raise ConversionError(f"cannot read image {str(path)!r}: {str(error).strip().splitlines()[-1]}. Is it an "
                              f"image file (NIfTI, NRRD, MetaImage)? Re-export it, or exclude it with a more specific "
                              f"glob.") from None
    return _Header(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                   tuple(reader.GetDirection()), reader.GetNumberOfComponents(),
                   sitk.GetPixelIDValueAsString(reader.GetPixelID()))


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(f'{v:.6g}') + 0.0:g}" for v in values) + ")"


def _compare(a: _Header, b: _Header, tol: Tolerances) -> str | None:
    if a.size != b.size:
        return f"size {a.size} vs {b.size}"
    checks = (("spacing", a.spacing, b.spacing, tol.spacing), ("origin", a.origin, b.origin, tol.origin),
              ("direction", a.direction, b.direction, tol.direction))
    for what, va, vb, t in checks:
        if np.max(np.abs(np.asarray(va) - np.asarray(vb))) > t:
            return f"{what} {_fmt(va)} vs {_fmt(vb)} (tolerance {t:g})"
    return None


def check_case_geometry(case: SourceCase, tolerances: Tolerances | None = None) -> None:
    """Check that all channels and the label of a case share one grid (headers only).

    Size must match exactly; spacing, origin (mm) and direction within ``tolerances``. Images must be scalar.

    Raises:
        ConversionError: naming the case, both files and the mismatch.
    """
    tol = tolerances or Tolerances()
    files = list(case.channel_files) + ([case.label_file] if case.label_file is not None else [])
    headers = [_read_header(f) for f in files]
    for f, h in zip(files, headers, strict=True):
        if h.components != 1:
            raise ConversionError(f"{case.describe()}: {_relative(f, case.folder)!r} has {h.components} components "
                                  f"per voxel; only scalar images are supported")
    ref_file, ref = files[0], headers[0]
    for f, h in zip(files[1:], headers[1:], strict=True):
        mismatch = _compare(ref, h, tol)
        if mismatch:
            raise ConversionError(f"{case.describe()}: {_relative(ref_file, case.folder)!r} and "
                                  f"{_relative(f, case.folder)!r} are not on the same grid: {mismatch}")


def _read_checked(path: str | os.PathLike) -> sitk.Image:
    """Read a whole image, checking it is complete and finite (:func:`~nnunet_mmssl.dataloading.image_checks.
    read_image_checked`).

    Raises:
        ConversionError: naming the file, the problem and the fix.
    """
    from nnunet_mmssl.dataloading.image_checks import ImageFileError, read_image_checked

    try:
        return read_image_checked(path)
    except ImageFileError as error:
        raise ConversionError(str(error)) from None


def _label_dtype(max_value: int) -> type:
    if max_value <= 255:
        return np.uint8
    if max_value <= np.iinfo(np.int16).max:
        return np.int16
    return np.int32


def read_label_array(path: Path) -> np.ndarray:
    """Read a label file and return it as an integer array (uint8, int16 if values > 255, else int32).

    Float files whose values are all integers (e.g. 0.0/1.0 float32) are accepted.

    Raises:
        ConversionError: unreadable file, non-scalar, non-finite or non-integral values, negative values.
    """
    image = _read_checked(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"label {str(path)!r} has {image.GetNumberOfComponentsPerPixel()} components per "
                              f"voxel; a scalar label map is needed")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            example = array[bad].flat[0]
            raise ConversionError(f"label {str(path)!r} has non-integral values (e.g. {float(example)!r}) in "
                                  f"{int(bad.sum())} voxels; labels must be integers")
    elif not np.issubdtype(array.dtype, np.integer):
        raise ConversionError(f"label {str(path)!r} has unsupported pixel type {array.dtype}")
    if array.size == 0:
        raise ConversionError(f"label {str(path)!r} is empty")
    low, high = array.min(), array.max()
    if low < 0:
        raise ConversionError(f"label {str(path)!r} has negative values (e.g. {low.item()!r}); labels must be >= 0")
    if high > np.iinfo(np.int32).max:
        raise ConversionError(f"label {str(path)!r} has a value {high.item()!r} too large for a label map")
    return array.astype(_label_dtype(int(high)))


def label_values(array: np.ndarray) -> list[int]:
    """Sorted distinct values of an integer label array."""
    high = int(array.max())
    if high <= 65535:
        counts = np.bincount(array.ravel().astype(np.int64, copy=False), minlength=high + 1)
        return [int(v) for v in np.flatnonzero(counts)]
    return [int(v) for v in np.unique(array)]


def check_label(case: SourceCase, labels: Mapping[str, int]) -> list[int]:
    """Check a case's label file: integral, non-negative, only declared values.

    Returns:
        The distinct values found.

    Raises:
        ConversionError: naming the case, the file and the offending value.
    """
    assert case.label_file is not None
    values = label_values(read_label_array(case.label_file))
    declared = set(labels.values())
    undeclared = [v for v in values if v not in declared]
    if undeclared:
        raise ConversionError(f"{case.describe()}: label {_relative(case.label_file, case.folder)!r} contains value "
                              f"{undeclared[0]} (all undeclared: {undeclared}) that is not declared in labels "
                              f"{dict(labels)}; declare it (--labels NAME=VALUE ...)")
    return values


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _write_case(task: dict) -> str:
    """Write one case (top-level so that it can run in a worker process).

    ``task``: ``case_id``, ``channels`` (source files), ``image_folder``, ``label`` (source file or None),
    ``label_folder`` (or None).
    """
    first = None
    for channel, source in enumerate(task["channels"]):
        image = _read_checked(source)
        if first is None:
            first = image
        out = os.path.join(task["image_folder"], f"{task['case_id']}_{channel:04d}{FILE_ENDING}")
        sitk.WriteImage(image, out, useCompression=True)
    if task["label"] is not None:
        array = read_label_array(Path(task["label"]))
        label = sitk.GetImageFromArray(array)
        label.CopyInformation(first)
        sitk.WriteImage(label, os.path.join(task["label_folder"], f"{task['case_id']}{FILE_ENDING}"),
                        useCompression=True)
    return task["case_id"]


def _dataset_folder_name(dataset_id: int, dataset_name: str) -> str:
    return f"Dataset{dataset_id:03d}_{dataset_name}"


def _case_record(case: SourceCase, case_id: str, channel_names: Sequence[str], label_copied: bool) -> dict:
    return {
        "case_id": case_id,
        "source_index": case.source_index,
        "source": str(case.source),
        "case_folder": case.name,
        "images": {n: _relative(f, case.folder) for n, f in zip(channel_names, case.channel_files, strict=True)},
        "label": None if case.label_file is None else _relative(case.label_file, case.folder),
        "label_copied": label_copied,
    }


def convert_dataset(
    sources: Sequence[str | os.PathLike],
    modalities: ModalitySpec,
    label_globs: Sequence[str] | str | None,
    output_root: str | os.PathLike,
    dataset_id: int,
    dataset_name: str,
    num_labeled: int | float | None,
    num_test: int,
    seed: int,
    labels: Mapping[str, int] | None = None,
    case_prefix: str | None = None,
    overwrite: bool = False,
    spacing_tolerance: float = 1e-3,
    origin_tolerance: float = 1e-2,
    direction_tolerance: float = 1e-3,
    num_processes: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Convert case folders from one or more sources into ``<output_root>/DatasetXXX_NAME`` (see module docstring).

    Args:
        sources: source folders; each immediate subfolder is one case.
        modalities: ``[(channel name, [glob, ...]), ...]`` in channel order, or a mapping name -> glob(s).
            Note that nnU-Net picks the intensity normalisation from the channel name (``CT`` -> CT normalisation,
            anything else not special -> z-score).
        label_globs: glob(s) of the label file, or None (no labels; then there are no training cases -> error).
        output_root: the nnU-Net raw root (created if missing).
        dataset_id: 1..999.
        dataset_name: the NAME in ``DatasetXXX_NAME`` (letters, digits, ``_``, ``-``).
        num_labeled: labelled training cases: int count, float fraction in (0, 1] of the labelled non-test cases,
            or None (all).
        num_test: held-out labelled test cases.
        seed: seed of the labelled-case shuffle.
        labels: ``dataset.json`` labels (default :data:`DEFAULT_LABELS`).
        case_prefix: prefix of the case ids (default ``dataset_name``).
        overwrite: replace an existing ``DatasetXXX_NAME``.
        spacing_tolerance: absolute spacing tolerance (mm) between the files of one case.
        origin_tolerance: absolute origin tolerance (mm).
        direction_tolerance: absolute tolerance on the direction cosines.
        num_processes: worker processes for writing (1 = in this process).
        progress: optional callback receiving one-line progress messages (also logged at INFO).

    Returns:
        The written dataset folder.

    Raises:
        ConversionError: any user-fixable problem; nothing is left in ``output_root`` in that case.
    """

    def report(message: str) -> None:
        logger.info(message)
        if progress is not None:
            progress(message)

    # --- request checks -------------------------------------------------------------------------------------
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset id must be an int in 1..999, got {dataset_id!r}")
    if not isinstance(dataset_name, str) or not _NAME_PATTERN.fullmatch(dataset_name):
        raise ConversionError(f"dataset name {dataset_name!r} must start with a letter or digit and contain only "
                              f"letters, digits, '_' and '-'")
    prefix = dataset_name if case_prefix is None else case_prefix
    if not isinstance(prefix, str) or not _NAME_PATTERN.fullmatch(prefix):
        raise ConversionError(f"case prefix {prefix!r} must start with a letter or digit and contain only letters, "
                              f"digits, '_' and '-'")
    label_dict = validate_labels(DEFAULT_LABELS if labels is None else labels)
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ConversionError(f"num_processes must be an int >= 1, got {num_processes!r}")
    tol = Tolerances(float(spacing_tolerance), float(origin_tolerance), float(direction_tolerance))
    if min(tol.spacing, tol.origin, tol.direction) < 0:
        raise ConversionError(f"tolerances must be >= 0, got {tol}")
    mods = _normalise_modalities(modalities)
    lab_globs = _normalise_label_globs(label_globs)
    channel_names = [name for name, _ in mods]

    root = Path(output_root).expanduser().resolve()
    folder_name = _dataset_folder_name(int(dataset_id), dataset_name)
    target = root / folder_name

    def check_target() -> None:
        if root.is_dir():
            others = sorted(p.name for p in root.glob(f"Dataset{int(dataset_id):03d}_*")
                            if p.is_dir() and p.name != folder_name)
            if others:
                raise ConversionError(f"dataset id {int(dataset_id)} is already used by {others} in {str(root)!r}; "
                                      f"refusing to create {folder_name!r} with the same id. Choose another id or "
                                      f"remove the other folder.")
        if target.exists() and not overwrite:
            raise ConversionError(f"output {str(target)!r} exists; pass overwrite=True (--overwrite) to replace it")

    check_target()

    # --- discovery, split and checks (nothing written yet) --------------------------------------------------
    cases = discover_cases(sources, mods, lab_globs)
    split = split_cases(cases, num_labeled, num_test, seed)
    width = max(3, len(str(len(cases) - 1)))
    case_ids = [f"{prefix}_{i:0{width}d}" for i in range(len(cases))]
    report(f"found {len(cases)} cases ({sum(c.label_file is not None for c in cases)} with label) in "
           f"{len(sources)} source(s); split: {len(split['labeled'])} labelled, {len(split['unlabeled'])} "
           f"unlabelled, {len(split['test'])} test")
    for case in cases:
        check_case_geometry(case, tol)
        if case.label_file is not None:
            check_label(case, label_dict)
    report("all cases checked: grids consistent, labels valid")

    # --- records ----------------------------------------------------------------------------------------------
    group_of = {i: g for g, idx in split.items() for i in idx}
    records: dict[str, list[dict]] = {g: [] for g in GROUP_FOLDERS}
    for i, case in enumerate(cases):
        group = group_of[i]
        records[group].append(_case_record(case, case_ids[i], channel_names, label_copied=group != "unlabeled"))
    num_labels_dropped = sum(1 for r in records["unlabeled"] if r["label"] is not None)
    mmssl = {
        "converter": "nnunet_mmssl.dataset_conversion.convert_dataset",
        "sources": [str(c) for c in dict.fromkeys(case.source for case in cases)],
        "modalities": {name: globs for name, globs in mods},
        "label_globs": lab_globs,
        "seed": int(seed),
        "num_labeled_requested": num_labeled.item() if isinstance(num_labeled, np.generic) else num_labeled,
        "num_test": int(num_test),
        "case_prefix": prefix,
        "tolerances": {"spacing": tol.spacing, "origin_mm": tol.origin, "direction": tol.direction},
        "counts": {"labeled": len(records["labeled"]), "unlabeled": len(records["unlabeled"]),
                   "test": len(records["test"]), "unlabeled_with_label_not_copied": num_labels_dropped},
        "split": records,
    }
    dataset_json = {
        "channel_names": {str(k): name for k, name in enumerate(channel_names)},
        "labels": label_dict,
        "numTraining": len(records["labeled"]),
        "file_ending": FILE_ENDING,
        "numUnlabeled": len(records["unlabeled"]),
        "numTest": len(records["test"]),
        "name": dataset_name,
        "description": "Converted by nnUNetv2_mmssl_convert (nnunet_mmssl); imagesUnlabeled/ holds the unlabelled "
                       "cases for semi-supervised training.",
        "mmssl": mmssl,
    }

    # --- writing into a temporary sibling, then rename -----------------------------------------------------------
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.tmp-", dir=root))
    try:
        tasks = []
        for group, (image_sub, label_sub) in GROUP_FOLDERS.items():
            (tmp / image_sub).mkdir()
            if label_sub is not None:
                (tmp / label_sub).mkdir()
            for i in split[group]:
                case = cases[i]
                copy_label = label_sub is not None
                tasks.append({
                    "case_id": case_ids[i],
                    "channels": [str(f) for f in case.channel_files],
                    "image_folder": str(tmp / image_sub),
                    "label": str(case.label_file) if copy_label else None,
                    "label_folder": str(tmp / label_sub) if copy_label else None,
                })
        tasks.sort(key=lambda t: t["case_id"])
        if num_processes == 1:
            for k, task in enumerate(tasks):
                _write_case(task)
                report(f"[{k + 1}/{len(tasks)}] wrote {task['case_id']}")
        else:
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(tasks))) as pool:
                for k, case_id in enumerate(pool.imap_unordered(_write_case, tasks)):
                    report(f"[{k + 1}/{len(tasks)}] wrote {case_id}")
        for name, content in (("dataset.json", dataset_json), (SPLIT_FILE_NAME, mmssl)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)
                f.write("\n")
        check_target()
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder_name}.old-", dir=root))
            os.replace(target, old / folder_name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_root:
            with contextlib.suppress(OSError):  # only if still empty
                root.rmdir()
        raise
    report(f"done: {target}")
    return target

"""Checking cases before anything is written: one grid per case, readable complete images, valid labels.

Geometry is checked from the headers (:func:`check_case_geometry`); labels are read whole and must be integral,
non-negative and either declared values (:func:`check_label`) or, in the unregistered mode, keys of the modality's
label map (:func:`check_mapped_label`, :func:`remap_label`). Every image is read whole and checked while it is
written (:func:`read_checked`; see :mod:`nnunet_mmssl.dataloading.image_checks`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_mmssl.dataset_conversion.finding import SourceCase, _relative
from nnunet_mmssl.dataset_conversion.request import ConversionError, Tolerances


@dataclass(frozen=True)
class _Header:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int
    pixel_type: str


def read_header(path: Path | str) -> _Header:
    """Size, spacing, origin, direction, components and pixel type from the header (no voxels read).

    Raises:
        ConversionError: the file is truncated or not an image, with the fix.
    """
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
    headers = [read_header(f) for f in files]
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


def read_checked(path: str | os.PathLike) -> sitk.Image:
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
    image = read_checked(path)
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
# Label maps (unregistered mode: each modality's dataset numbers its classes its own way)
# ----------------------------------------------------------------------------------------------------------------


def _format_map(label_map: Mapping[int, int]) -> str:
    return "{" + ", ".join(f"{k}->{v}" for k, v in sorted(label_map.items())) + "}"


def validate_label_map(modality: str, label_map: Mapping[int, int], labels: Mapping[str, int]) -> dict[int, int]:
    """Check one modality's label map ``{source value: target value}`` against the declared labels.

    Args:
        modality: the modality (for messages).
        label_map: source value -> target value; both non-negative ints.
        labels: the declared ``dataset.json`` labels.

    Returns:
        A plain dict with ``0 -> 0`` added unless 0 is mapped explicitly.

    Raises:
        ConversionError: a non-integer or negative value, or a target that is not a declared label.
    """
    if not isinstance(label_map, Mapping):
        raise ConversionError(f"label map of modality {modality!r} must be a mapping {{source value: target value}}, "
                              f"got {label_map!r}")
    declared = set(labels.values())
    result: dict[int, int] = {}
    for source, target in label_map.items():
        for what, value in (("source value", source), ("target value", target)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ConversionError(f"label map of modality {modality!r}: {what} {value!r} is not an int >= 0 "
                                      f"(--label-map {modality}:V=T with integers V, T)")
        if int(target) not in declared:
            raise ConversionError(f"label map of modality {modality!r}: target {int(target)} (of source value "
                                  f"{int(source)}) is not a declared label {dict(labels)}; map it onto a declared "
                                  f"value or declare it (--labels NAME=VALUE ...)")
        result[int(source)] = int(target)
    result.setdefault(0, 0)
    return result


#: the "modality" of a registered dataset's single label map (every case)
ALL_MODALITIES = "all"


def _unmapped_error(where: str, modality: str, label_map: Mapping[int, int], unmapped: Sequence[int],
                    labels: Mapping[str, int] | None) -> ConversionError:
    targets = f" with T one of the declared labels {dict(labels)}" if labels is not None else ""
    whose = "the label map" if modality == ALL_MODALITIES else f"the label map of modality {modality!r}"
    prefix = "" if modality == ALL_MODALITIES else f"{modality}:"
    return ConversionError(f"{where} contains value {unmapped[0]} (all unmapped: {list(unmapped)}) that {whose} "
                           f"{_format_map(label_map)} does not map; add it: --label-map {prefix}{unmapped[0]}=T"
                           f"{targets}")


def check_mapped_label(case: SourceCase, modality: str, label_map: Mapping[int, int],
                       labels: Mapping[str, int]) -> list[int]:
    """Check a case's label file against its modality's label map: every value present must be mapped.

    Returns:
        The distinct values found (before mapping).

    Raises:
        ConversionError: naming the case, the file, the unmapped value and the ``--label-map`` fix.
    """
    assert case.label_file is not None
    values = label_values(read_label_array(case.label_file))
    unmapped = [v for v in values if v not in label_map]
    if unmapped:
        where = f"{case.describe()}: label {_relative(case.label_file, case.folder)!r}"
        raise _unmapped_error(where, modality, label_map, unmapped, labels)
    return values


def remap_label(array: np.ndarray, label_map: Mapping[int, int], modality: str = "?",
                path: str | os.PathLike | None = None) -> np.ndarray:
    """Map the values of an integer label array with ``label_map`` (no input mutation).

    Args:
        array: integer label array, any shape.
        label_map: source value -> target value (every value present must be a key).
        modality: the modality (for messages).
        path: the label file (for messages).

    Returns:
        The remapped array, same shape, in the smallest fitting dtype (as :func:`read_label_array`).

    Raises:
        ConversionError: a value present in ``array`` is not mapped.
    """
    values = label_values(array)
    unmapped = [v for v in values if v not in label_map]
    if unmapped:
        raise _unmapped_error(f"label {str(path)!r}", modality, label_map, unmapped, None)
    lookup = np.zeros(values[-1] + 1, dtype=np.int64)
    for source, target in label_map.items():
        if source < lookup.size:
            lookup[source] = target
    out = lookup[array]
    return out.astype(_label_dtype(int(out.max())))

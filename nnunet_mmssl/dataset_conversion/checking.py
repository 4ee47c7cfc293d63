"""Checking cases before anything is written: one grid per case, readable complete images, valid labels.

Geometry is checked from the headers (:func:`check_case_geometry`); labels are read whole and must be integral,
non-negative and either declared values (:func:`check_label`) or, in the unregistered mode, keys of the modality's
label map (:func:`check_mapped_label`, :func:`remap_label`). Every image is read whole and checked while it is
written (:func:`read_checked`; see :mod:`nnunet_mmssl.dataloading.image_checks`).
"""

from __future__ import annotations

import hashlib
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


def check_case_geometry(case: SourceCase, tolerances: Tolerances | None = None) -> _Header:
    """Check that all channels and the label of a case share one grid (headers only).

    Size must match exactly; spacing, origin (mm) and direction within ``tolerances``. Images must be scalar and 2D
    or 3D.

    Returns:
        The header of the case's first channel (its grid; see :func:`check_same_dimension`).

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
        if len(h.size) not in (2, 3):
            raise ConversionError(f"{f}, is a {len(h.size)}D image (size {h.size}); each channel must be one 3D (or "
                                  f"2D) image. Split it into one file per channel and give each its own --modality "
                                  f"glob.")
    ref_file, ref = files[0], headers[0]
    for f, h in zip(files[1:], headers[1:], strict=True):
        mismatch = _compare(ref, h, tol)
        if mismatch:
            raise ConversionError(f"{case.describe()}: {_relative(ref_file, case.folder)!r} and "
                                  f"{_relative(f, case.folder)!r} are not on the same grid: {mismatch}")
    return ref


def check_same_dimension(cases: Sequence[SourceCase], headers: Sequence[_Header]) -> int:
    """Every case 3D, or every case 2D (a 2D dataset, which nnU-Net supports: it gives the images a made-up slice
    spacing of 999). A 2D slice among 3D cases would be converted and get that spacing of 999 in the fingerprint.

    Args:
        cases: the cases.
        headers: per case, its first channel's header (:func:`check_case_geometry`).

    Returns:
        The dimension of the dataset (2 or 3).

    Raises:
        ConversionError: naming the first case of the minority dimension, an example of the other, and the fix.
    """
    dims = [len(h.size) for h in headers]
    if not dims:
        return 3
    counts = {d: dims.count(d) for d in sorted(set(dims))}
    if len(counts) == 1:
        return dims[0]
    major = max(counts, key=lambda d: (counts[d], d))  # a tie: 3D
    odd = next(k for k, d in enumerate(dims) if d != major)
    good = next(k for k, d in enumerate(dims) if d == major)
    others = [cases[k].name for k, d in enumerate(dims) if d != major]
    case = cases[odd]
    raise ConversionError(
        f"{case.describe()}: {_relative(case.channel_files[0], case.folder)!r} is a {dims[odd]}D image (size "
        f"{headers[odd].size}) but {counts[major]} case(s) are {major}D (e.g. {cases[good].describe()}, size "
        f"{headers[good].size}); nnU-Net would treat a 2D slice among 3D volumes as one slice with a made-up spacing "
        f"of 999 mm. Remove the {dims[odd]}D case(s) ({', '.join(others[:5])}{' ...' if len(others) > 5 else ''}) "
        f"or convert them to {major}D: one dataset is all 3D or all 2D.")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_duplicate_cases(cases: Sequence[SourceCase]) -> None:
    """No file of one case is a file of another case: the same file reached through a symlink or hard link (same
    device and inode), or an image with byte-identical content (compared by SHA-256 among the images of equal size).
    Otherwise the same patient would be counted twice and could land in both training and test.

    Labels are compared by file identity only (two empty masks of one grid are byte-identical and legitimate).

    Raises:
        ConversionError: naming both cases, both files and the fix.
    """

    def fail(case: SourceCase, path: Path, other: SourceCase, other_path: Path, how: str) -> ConversionError:
        return ConversionError(f"{case.describe()}: {_relative(path, case.folder)!r} is {how} {str(other_path)!r} of "
                               f"{other.describe()}: the same patient would be converted twice (and could land in "
                               f"both training and test). Remove one of the two case folders.")

    owner: dict[tuple[int, int], tuple[SourceCase, Path]] = {}
    by_size: dict[int, list[tuple[SourceCase, Path]]] = {}
    for case in cases:
        files = list(case.channel_files) + ([case.label_file] if case.label_file is not None else [])
        for path in files:
            stat = os.stat(path)
            key = (stat.st_dev, stat.st_ino)
            other = owner.setdefault(key, (case, path))
            if other[0] is not case:
                raise fail(case, path, other[0], other[1], "the same file (a symlink or hard link) as")
            if path != case.label_file:
                by_size.setdefault(stat.st_size, []).append((case, path))
    for group in by_size.values():
        if len({id(case) for case, _ in group}) < 2:
            continue
        seen: dict[str, tuple[SourceCase, Path]] = {}
        for case, path in group:
            other = seen.setdefault(_file_digest(path), (case, path))
            if other[0] is not case:
                raise fail(case, path, other[0], other[1], "byte for byte identical to")


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


def check_label(case: SourceCase, labels: Mapping[str, int], modality: str | None = None) -> list[int]:
    """Check a case's label file: integral, non-negative, only declared values.

    ``modality`` (unregistered mode) makes the suggested ``--label-map`` per modality (``M:V=T``).

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
        prefix = "" if modality is None else f"{modality}:"
        raise ConversionError(f"{case.describe()}: label {_relative(case.label_file, case.folder)!r} contains value "
                              f"{undeclared[0]} (all undeclared: {undeclared}) that is not declared in labels "
                              f"{dict(labels)}. Map it onto a declared label, e.g. "
                              f"{suggest_label_map(values, undeclared, labels, prefix)} (--label-map {prefix}V=T for "
                              f"every value V present; 0 maps to 0), or declare it (--labels NAME=VALUE ...).")
    return values


def suggest_label_map(values: Sequence[int], undeclared: Sequence[int], labels: Mapping[str, int],
                      prefix: str = "") -> str:
    """A ``--label-map`` for a label file holding ``values``: declared values onto themselves, the ``undeclared``
    ones onto the one declared foreground label (or ``T`` when there are several to choose from)."""
    foreground = sorted(int(v) for v in labels.values() if int(v) != 0)
    target = str(foreground[0]) if len(foreground) == 1 else "T"
    pairs = [f"{prefix}{v}={v}" for v in values if v not in undeclared and v != 0]
    pairs += [f"{prefix}{v}={target}" for v in undeclared]
    text = "--label-map " + " ".join(pairs)
    return text if target != "T" else f"{text} with T one of {foreground}"


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

"""Overlap and surface-distance metrics for one pair of binary masks (pure numpy / scipy).

All distances are in millimetres: the voxel ``spacing`` is given in the same axis order as the arrays (for an
array from ``SimpleITK.GetArrayFromImage`` that is ``(z, y, x)``, i.e. ``image.GetSpacing()`` reversed).
Works for 2D and 3D arrays (any ``ndim >= 1``).

Definitions (``TP``, ``FP``, ``FN`` are voxel counts):

* Dice = ``2 TP / (2 TP + FP + FN)``; sensitivity (recall) = ``TP / (TP + FN)``.
* Surface voxels of a mask = the mask minus its binary erosion with the *face-connectivity* structuring element
  (``scipy.ndimage.generate_binary_structure(ndim, 1)``: 6-neighbourhood in 3D, 4-neighbourhood in 2D), erosion
  with ``border_value=0`` so that mask voxels on the image border count as surface. This is the definition of
  MedPy's ``__surface_distances`` (its default ``connectivity=1``).
* Directed surface distances A->B: for every surface voxel of A the Euclidean distance (mm) to the nearest surface
  voxel of B, from ``scipy.ndimage.distance_transform_edt(~surface_B, sampling=spacing)``.
* HD95 = 95th percentile of the *union* (concatenation) of both directed distance sets, with numpy's default
  ``"linear"`` percentile method (Hyndman & Fan type 7), as in MedPy's ``hd95``.
* ASD = average symmetric surface distance (ASSD) = mean over the union of both directed sets, i.e.
  ``(sum d(a, B) + sum d(b, A)) / (|surface A| + |surface B|)`` (Heimann et al., IEEE TMI 2009). Note: MedPy's
  ``assd`` is the mean of the two directed means instead; the two agree when both surfaces have the same size.

Empty-mask conventions (explicit; the rule applied is returned in the ``convention`` field, ``None`` otherwise):

* ``"both_empty"`` (reference and prediction empty): dice 1.0, sensitivity NaN (undefined: no reference
  foreground; NaNs are excluded from means and the number of excluded cases is reported), hd95 0.0, asd 0.0.
* ``"ref_empty"`` (reference empty, prediction not): dice 0.0, sensitivity NaN, hd95 = asd = image diagonal in mm,
  ``sqrt(sum_i (shape_i * spacing_i) ** 2)``.
* ``"pred_empty"`` (prediction empty, reference not): dice 0.0, sensitivity 0.0, hd95 = asd = image diagonal in mm.

Distances are never silently 0 for a missed or hallucinated structure: the image diagonal is the largest possible
distance inside the image, a worst-case penalty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "BOTH_EMPTY",
    "EMPTY_MASK_CONVENTIONS",
    "METRIC_NAMES",
    "PRED_EMPTY",
    "REF_EMPTY",
    "compute_binary_metrics",
    "image_diagonal_mm",
    "surface_distances",
    "surface_voxels",
]

#: The four headline metrics, in report order.
METRIC_NAMES: tuple[str, ...] = ("dice", "sensitivity", "hd95", "asd")

BOTH_EMPTY = "both_empty"
REF_EMPTY = "ref_empty"
PRED_EMPTY = "pred_empty"

#: Human-readable statement of the empty-mask conventions (stored in the evaluation JSON).
EMPTY_MASK_CONVENTIONS = (
    "Empty-mask conventions: both_empty (reference and prediction empty): dice=1.0, sensitivity=NaN (undefined, "
    "excluded from means and counted in 'excluded'), hd95=0.0, asd=0.0. ref_empty (reference empty, prediction "
    "not): dice=0.0, sensitivity=NaN, hd95=asd=image diagonal in mm. pred_empty (prediction empty, reference "
    "not): dice=0.0, sensitivity=0.0, hd95=asd=image diagonal in mm. Surface = mask minus its face-connectivity "
    "erosion (border voxels count as surface); HD95 = 95th percentile (numpy 'linear') of the union of both "
    "directed surface-distance sets; ASD = ASSD = mean over that union. Distances in mm using the reference "
    "spacing. NaN is written as null in JSON."
)


def _validate_spacing(spacing: Sequence[float], shape: tuple[int, ...]) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in spacing)
    except TypeError as e:
        raise ValueError(
            f"spacing must be a sequence of {len(shape)} floats (one per array axis), got {spacing!r}."
        ) from e
    if len(values) != len(shape):
        raise ValueError(
            f"spacing {values} has {len(values)} entries but the masks have shape {shape} ({len(shape)} axes). "
            "Pass one spacing per array axis, in array axis order (for SimpleITK arrays: reversed GetSpacing())."
        )
    if not all(np.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must contain finite positive values (mm), got {values}.")
    return values


def _validate_pair(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]):
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(
            f"prediction shape {pred.shape} does not match reference shape {ref.shape}. Both masks must lie on the "
            "same voxel grid; resample the prediction to the reference grid first."
        )
    if ref.ndim == 0:
        raise ValueError("masks must have at least one axis, got 0-d arrays.")
    spacing_t = _validate_spacing(spacing, ref.shape)
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False), spacing_t


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image diagonal in mm, the penalty distance for a missing or spurious structure.

    Args:
        shape: array shape ``(d_0, ..., d_{n-1})``.
        spacing: voxel spacing in mm, same axis order as ``shape``.

    Returns:
        ``sqrt(sum_i (shape_i * spacing_i) ** 2)``.
    """
    shape_t = tuple(int(s) for s in shape)
    spacing_t = _validate_spacing(spacing, shape_t)
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape_t, spacing_t, strict=True))))


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Surface (boundary) voxels of a binary mask.

    Args:
        mask: boolean array of any shape ``(d_0, ..., d_{n-1})``.

    Returns:
        Boolean array of the same shape: ``mask & ~erosion(mask)`` with the face-connectivity structuring element
        and ``border_value=0`` (mask voxels on the image border are surface voxels).
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)
    return mask & ~eroded


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus a one-voxel margin (clamped to the image).

    Distances between the two surfaces are unchanged: every surface voxel lies inside the box, the margin keeps the
    erosion identical inside the box, and where the box touches the image border the erosion's ``border_value=0``
    acts exactly as before.
    """
    union = pred | ref
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(np.any(union, axis=other)) if other else np.flatnonzero(union)
        lo = max(int(idx[0]) - 1, 0)
        hi = min(int(idx[-1]) + 2, union.shape[axis])
        slices.append(slice(lo, hi))
    box = tuple(slices)
    return pred[box], ref[box]


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Both directed surface-distance sets between two non-empty masks.

    Args:
        pred: boolean prediction mask, shape ``(d_0, ..., d_{n-1})``.
        ref: boolean reference mask, same shape.
        spacing: voxel spacing in mm, one value per axis in array axis order.

    Returns:
        ``(pred_to_ref, ref_to_pred)``: 1-D float arrays of length ``|surface(pred)|`` and ``|surface(ref)|``;
        entry ``i`` is the distance (mm) from the ``i``-th surface voxel (C order) of one mask to the nearest
        surface voxel of the other.

    Raises:
        ValueError: on shape / spacing mismatch, or if either mask is empty (use :func:`compute_binary_metrics`,
            which applies the empty-mask conventions).
    """
    pred, ref, spacing_t = _validate_pair(pred, ref, spacing)
    if not pred.any() or not ref.any():
        raise ValueError(
            "surface distances are undefined for an empty mask "
            f"(prediction voxels: {int(pred.sum())}, reference voxels: {int(ref.sum())}); "
            "use compute_binary_metrics, which applies the documented empty-mask conventions."
        )
    pred, ref = _crop_to_union(pred, ref)
    surf_pred = surface_voxels(pred)
    surf_ref = surface_voxels(ref)
    dist_to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=spacing_t)
    dist_to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing_t)
    return np.asarray(dist_to_ref[surf_pred], dtype=np.float64), np.asarray(dist_to_pred[surf_ref], dtype=np.float64)


def compute_binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict:
    """Dice, sensitivity, HD95 and ASD (ASSD) of one binary prediction against its reference.

    Args:
        pred: prediction mask, shape ``(d_0, ..., d_{n-1})`` (2D or 3D); cast to bool (nonzero = foreground).
        ref: reference mask, same shape; cast to bool.
        spacing: voxel spacing in mm, one value per axis in the arrays' axis order (``(z, y, x)`` for
            SimpleITK arrays).

    Returns:
        Dict with keys ``dice``, ``sensitivity``, ``hd95`` (mm), ``asd`` (mm) as floats (sensitivity may be NaN,
        see the module docstring), ``n_ref``, ``n_pred``, ``tp``, ``fp``, ``fn`` as ints, and ``convention``:
        ``None`` or the empty-mask rule applied (``"both_empty"``, ``"ref_empty"``, ``"pred_empty"``).

    Raises:
        ValueError: if the shapes differ, or ``spacing`` does not have one positive value per axis.
    """
    pred, ref, spacing_t = _validate_pair(pred, ref, spacing)
    tp = int(np.count_nonzero(pred & ref))
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    fp = n_pred - tp
    fn = n_ref - tp
    counts = {"n_ref": n_ref, "n_pred": n_pred, "tp": tp, "fp": fp, "fn": fn}

    if n_ref == 0 and n_pred == 0:
        values = {"dice": 1.0, "sensitivity": float("nan"), "hd95": 0.0, "asd": 0.0}
        convention = BOTH_EMPTY
    elif n_ref == 0:
        diag = image_diagonal_mm(ref.shape, spacing_t)
        values = {"dice": 0.0, "sensitivity": float("nan"), "hd95": diag, "asd": diag}
        convention = REF_EMPTY
    elif n_pred == 0:
        diag = image_diagonal_mm(ref.shape, spacing_t)
        values = {"dice": 0.0, "sensitivity": 0.0, "hd95": diag, "asd": diag}
        convention = PRED_EMPTY
    else:
        d_pred_ref, d_ref_pred = surface_distances(pred, ref, spacing_t)
        both = np.concatenate([d_pred_ref, d_ref_pred])
        values = {
            "dice": 2.0 * tp / (2 * tp + fp + fn),
            "sensitivity": tp / (tp + fn),
            "hd95": float(np.percentile(both, 95)),
            "asd": float(both.mean()),
        }
        convention = None
    return {**{k: float(v) for k, v in values.items()}, **counts, "convention": convention}

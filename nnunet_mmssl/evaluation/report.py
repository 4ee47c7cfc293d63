"""Evaluate a folder of predicted segmentations against a folder of references, aggregate, and report.

Pairing follows the nnU-Net convention: reference ``CASE<file_ending>`` (e.g. ``labelsTr/CASE.nii.gz``) is compared
with prediction ``CASE<file_ending>`` (e.g. the output folder of ``nnUNetv2_predict``). Every reference needs a
prediction (otherwise an error lists the missing cases); predictions without a reference are ignored with a warning.

Images are read with SimpleITK. ``sitk.GetArrayFromImage`` returns arrays in ``(z, y, x)`` order while
``image.GetSpacing()`` is ``(x, y, z)``, so the spacing used for the metrics is the *reference* image's spacing
reversed. The prediction must have the same grid size as its reference (error otherwise); a different spacing or
origin only triggers a warning.

What is evaluated:

* ``labels=[1, 2]``: each label separately as ``mask == label``; named ``"1"``, ``"2"``. A mapping
  ``{"liver": 1}`` gives custom names.
* ``regions=[[1, 2, 3], [2, 3], [3]]``: BraTS-style regions as ``np.isin(mask, region)``; named ``"1,2,3"`` etc.
  A mapping ``{"WT": [1, 2, 3]}`` gives custom names.
* Neither: every nonzero label present in at least one reference, sorted. Labels that occur only in predictions
  are not evaluated (a warning says so; pass ``labels`` explicitly to include them).

Metric definitions and the empty-mask conventions are those of :mod:`nnunet_mmssl.evaluation.metrics`. Scores that
cannot lie (:func:`check_presence`): a label/region in no reference and no prediction has no score (mean and std
n/a, listed under ``"absent"``, a warning; an error when that holds for every requested one) -- the per-case
``both_empty`` Dice of 1 is never its mean --; labels only in the predictions, only in the references, and (with
explicit labels/regions) reference labels outside them that no prediction holds are warned about; label 0, the
background, is refused in ``labels``/``regions``.
Aggregates use ``nanmean`` / ``nanstd`` (population std, ``ddof=0``); NaN values (undefined sensitivity with an
empty reference) are excluded and counted under ``"excluded"``. The returned dict keeps NaN as ``float("nan")``;
the JSON file writes it as ``null``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import numpy as np

from nnunet_mmssl.evaluation.metrics import (
    BOTH_EMPTY,
    EMPTY_MASK_CONVENTIONS,
    METRIC_NAMES,
    PRED_EMPTY,
    REF_EMPTY,
    compute_binary_metrics,
)

__all__ = ["evaluate_folders", "format_table", "resolve_label_definitions", "write_json_atomic"]

LabelSpec = Sequence[int] | Mapping[str, int]
RegionSpec = Sequence[Sequence[int] | int] | Mapping[str, Sequence[int] | int]

_MAX_LISTED = 10


def _as_label_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{what} must be an integer label, got {value!r} ({type(value).__name__}).")
    return int(value)


def resolve_label_definitions(
    labels: LabelSpec | None = None, regions: RegionSpec | None = None
) -> dict[str, tuple[int, ...]] | None:
    """Turn ``labels`` / ``regions`` arguments into ``{name: label_values}``.

    Args:
        labels: ints (each evaluated as ``mask == label``, named ``str(label)``) or ``{name: int}``.
        regions: sequences of ints (each evaluated as ``np.isin(mask, region)``, named ``"1,2,3"``), or
            ``{name: ints}``. A bare int is a one-label region.

    Returns:
        Ordered ``{name: tuple_of_ints}`` (labels first, then regions), or ``None`` if neither is given
        (meaning: all nonzero labels found in the references).

    Raises:
        ValueError: on non-integer labels, empty regions, or duplicate names.
    """
    if labels is None and regions is None:
        return None
    definitions: dict[str, tuple[int, ...]] = {}

    def add(name: str, values: tuple[int, ...]) -> None:
        if name in definitions:
            raise ValueError(f"duplicate label/region name {name!r}; give each label or region a unique name.")
        definitions[name] = values

    if labels is not None:
        if isinstance(labels, str | bytes):
            raise ValueError(f"labels must be a list of ints, got {labels!r}.")
        items = labels.items() if isinstance(labels, Mapping) else ((None, lab) for lab in labels)
        for name, lab in items:
            value = _as_label_int(lab, "each entry of labels")
            add(str(value) if name is None else str(name), (value,))
    if regions is not None:
        if isinstance(regions, str | bytes):
            raise ValueError(f"regions must be a list of lists of ints, got {regions!r}.")
        items = regions.items() if isinstance(regions, Mapping) else ((None, reg) for reg in regions)
        for name, reg in items:
            if isinstance(reg, int | np.integer) and not isinstance(reg, bool):
                reg = (reg,)
            if isinstance(reg, str | bytes) or not isinstance(reg, Sequence | np.ndarray):
                raise ValueError(f"each region must be a list of ints, got {reg!r}.")
            values = tuple(_as_label_int(v, "each label in a region") for v in reg)
            if not values:
                raise ValueError("a region must contain at least one label, got an empty region.")
            add(",".join(str(v) for v in values) if name is None else str(name), values)
    if not definitions:
        raise ValueError("labels/regions were given but are empty; pass at least one label or region.")
    background = [name for name, values in definitions.items() if 0 in values]
    if background:
        raise ValueError(f"label/region {background[0]!r}, contains label 0, the background: its Dice would be "
                         f"reported (and averaged into the foreground mean) like a foreground score. Evaluate "
                         f"foreground labels only, e.g. -l 1 2 or -r WT=1,2,3.")
    return definitions


def _list_cases(folder: str, file_ending: str, role: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{role} folder {folder!r} does not exist or is not a directory.")
    cases = {
        name[: -len(file_ending)]: os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if name.endswith(file_ending) and len(name) > len(file_ending) and os.path.isfile(os.path.join(folder, name))
    }
    return cases


def _format_names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _read(path: str):
    """Read a whole label map (complete file, finite voxels: :func:`~nnunet_mmssl.dataloading.image_checks.
    read_image_checked`, an ``ImageFileError``/``ValueError`` naming the file otherwise)."""
    import SimpleITK as sitk

    from nnunet_mmssl.dataloading.image_checks import read_image_checked

    image = read_image_checked(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path!r} has {image.GetNumberOfComponentsPerPixel()} components per voxel; segmentations must be "
            "single-component label maps."
        )
    return image, sitk.GetArrayFromImage(image)


def _integer_labels(array: np.ndarray, path: str) -> set[int]:
    values = np.unique(array)
    if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
        raise ValueError(f"{path!r} contains non-integer values; expected an integer label map.")
    return {int(v) for v in values if v != 0}


def _evaluate_case(
    case: str, reference_file: str, prediction_file: str, definitions: dict[str, tuple[int, ...]] | None
) -> tuple[dict, set[int], set[int], list[str]]:
    """Worker: metrics of one case. Returns (record, labels in reference, labels in prediction, warning texts)."""
    ref_img, ref = _read(reference_file)
    pred_img, pred = _read(prediction_file)
    if ref_img.GetSize() != pred_img.GetSize():
        raise ValueError(
            f"case {case!r}: prediction {prediction_file!r} has grid size {pred_img.GetSize()} (x, y, z) but "
            f"reference {reference_file!r} has {ref_img.GetSize()}; the prediction must be on the reference grid."
        )
    messages = []
    if not np.allclose(ref_img.GetSpacing(), pred_img.GetSpacing(), rtol=1e-3, atol=1e-5):
        messages.append(
            f"case {case!r}: prediction spacing {pred_img.GetSpacing()} differs from reference spacing "
            f"{ref_img.GetSpacing()} (x, y, z); using the reference spacing."
        )
    if not np.allclose(ref_img.GetOrigin(), pred_img.GetOrigin(), atol=1e-3):
        messages.append(
            f"case {case!r}: prediction origin {pred_img.GetOrigin()} differs from reference origin "
            f"{ref_img.GetOrigin()}; comparing voxel-wise on the array grid."
        )
    spacing = tuple(float(s) for s in reversed(ref_img.GetSpacing()))  # (x, y, z) -> array order (z, y, x)

    ref_labels = _integer_labels(ref, reference_file)
    pred_labels = _integer_labels(pred, prediction_file)
    if definitions is None:
        # Labels absent from both masks are filled in later as "both_empty" (their metrics do not depend on the image).
        todo = {str(lab): (lab,) for lab in sorted(ref_labels | pred_labels)}
    else:
        todo = definitions
    metrics = {}
    for name, values in todo.items():
        if len(values) == 1:
            ref_mask, pred_mask = ref == values[0], pred == values[0]
        else:
            ref_mask, pred_mask = np.isin(ref, values), np.isin(pred, values)
        metrics[name] = compute_binary_metrics(pred_mask, ref_mask, spacing)
    record = {
        "case": case,
        "reference_file": os.path.abspath(reference_file),
        "prediction_file": os.path.abspath(prediction_file),
        "spacing": list(spacing),
        "shape": list(ref.shape),
        "metrics": metrics,
    }
    return record, ref_labels, pred_labels, messages


def _evaluate_case_star(args: tuple) -> tuple[dict, set[int], set[int], list[str]]:
    return _evaluate_case(*args)


def _nan_stats(values: np.ndarray) -> tuple[float, float, int]:
    finite = values[~np.isnan(values)]
    excluded = int(values.size - finite.size)
    if finite.size == 0:
        return float("nan"), float("nan"), excluded
    return float(finite.mean()), float(finite.std()), excluded


ABSENT_CONVENTION = (
    "A label/region absent from every reference and every prediction of a group of cases (all cases both_empty) has "
    "no score: its mean and std are n/a (null), not dice 1, and it is listed under 'absent'."
)


def _group_stats(records: Sequence[Mapping], name: str, metric: str) -> tuple[float, float, int]:
    """``(nanmean, nanstd, excluded)`` of one metric of one label/region over ``records``; all NaN when the
    label/region is in no reference and no prediction of these cases (every case ``both_empty``): no structure,
    no score -- never a perfect Dice for a label that exists nowhere."""
    if records and all(rec["metrics"][name]["convention"] == BOTH_EMPTY for rec in records):
        return float("nan"), float("nan"), len(records)
    return _nan_stats(np.array([rec["metrics"][name][metric] for rec in records], dtype=np.float64))


def check_presence(definitions: Mapping[str, Sequence[int]], per_case: Sequence[Mapping], labels_in_references:
                   Sequence[int], labels_in_predictions: Sequence[int], explicit: bool = True) -> list[str]:
    """Warn about what would make scores lie; return the labels/regions absent from every case.

    * a label/region in no reference and no prediction: its scores are n/a (a warning); if that holds for every
      requested label/region there is nothing to score (an error);
    * one in the predictions but in no reference (every case Dice 0: another class numbering?), or in the
      references but in no prediction (the model never predicts it?);
    * with explicit labels/regions: reference labels outside them that no prediction holds either.

    Raises:
        ValueError: every requested label/region is absent from every reference and prediction.
    """
    n = len(per_case)
    found = f"the references hold labels {list(labels_in_references)}, the predictions {list(labels_in_predictions)}"
    absent, messages = [], []
    for name, values in definitions.items():
        in_ref = sum(rec["metrics"][name]["n_ref"] > 0 for rec in per_case)
        in_pred = sum(rec["metrics"][name]["n_pred"] > 0 for rec in per_case)
        what = f"label {name}" if tuple(values) == (_int_or_none(name),) else f"label/region {name!r} ({list(values)})"
        if not in_ref and not in_pred:
            absent.append(name)
            messages.append(f"{what} occurs in no reference and no prediction of the {n} case(s) ({found}): it is "
                            f"reported as n/a, not scored. Check -l/-r.")
        elif not in_ref:
            messages.append(f"{what} occurs in {in_pred} prediction(s) but in no reference: every case scores Dice "
                            f"0 for it ({found}). Do references and model number the classes alike? "
                            f"(nnUNetv2_mmssl_convert --label-map V=T renumbers a dataset's labels)")
        elif not in_pred:
            messages.append(f"{what} occurs in {in_ref} reference(s) but in no prediction: Dice 0 in those cases "
                            f"({found}). Does the model predict it at all?")
    if explicit:
        covered = {v for values in definitions.values() for v in values}
        unscored = sorted(set(labels_in_references) - covered - set(labels_in_predictions))
        if unscored:
            messages.append(f"reference label(s) {unscored} are not evaluated (not in -l/-r) and occur in no "
                            f"prediction ({found}): does the model predict them at all, with the same numbering?")
    if explicit and definitions and len(absent) == len(definitions):
        raise ValueError(f"{'-l/-r ' + ' '.join(absent)}, occur(s) in no reference and no prediction of the {n} "
                         f"case(s) ({found}): there is nothing to score (it would read as a perfect Dice). Evaluate "
                         f"labels that exist, e.g. -l {' '.join(map(str, labels_in_references or [1]))}.")
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=3)
    return absent


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _to_json_compatible(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _to_json_compatible(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_json_compatible(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_to_json_compatible(v) for v in obj.tolist()]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_file_atomic(path: str | os.PathLike, write, suffix: str = ".tmp") -> str:
    """Call ``write(temporary_path)`` for a file next to ``path``, then rename it to ``path`` (mode 0644).

    A failure removes the temporary file, so ``path`` is either the previous complete file or the new one.
    Missing parent folders are created. Returns the absolute path written.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(text: str, path: str | os.PathLike) -> str:
    """Write ``text`` (UTF-8, flushed to disk) atomically, see :func:`write_file_atomic`."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return write_file_atomic(path, write)


def write_json_atomic(data: Mapping, output_file: str | os.PathLike) -> str:
    """Write ``data`` as JSON (NaN/inf -> ``null``) to a temporary file next to ``output_file``, then rename.

    Args:
        data: JSON-like mapping; numpy scalars and arrays are converted.
        output_file: destination path; missing parent folders are created.

    Returns:
        The absolute path written.
    """
    return write_text_atomic(json.dumps(_to_json_compatible(data), indent=2, allow_nan=False) + "\n", output_file)


def evaluate_folders(
    reference_folder: str | os.PathLike,
    prediction_folder: str | os.PathLike,
    labels: LabelSpec | None = None,
    regions: RegionSpec | None = None,
    file_ending: str = ".nii.gz",
    output_file: str | os.PathLike | None = None,
    num_processes: int = 1,
) -> dict:
    """Evaluate every reference segmentation against the prediction with the same file name.

    Args:
        reference_folder: folder of reference label maps ``CASE<file_ending>`` (e.g. ``labelsTr``).
        prediction_folder: folder of predicted label maps ``CASE<file_ending>`` (e.g. ``nnUNetv2_predict`` output).
        labels: labels evaluated one by one as ``mask == label`` (ints, or ``{name: int}``).
        regions: regions evaluated as ``np.isin(mask, region)`` (lists of ints, or ``{name: [ints]}``).
            If neither ``labels`` nor ``regions`` is given, all nonzero labels present in any reference are used.
        file_ending: file name suffix of the images, e.g. ``".nii.gz"``, ``".nrrd"``.
        output_file: if given, the result is written there as JSON (atomically; NaN as ``null``).
        num_processes: worker processes (``spawn`` context); 1 evaluates in this process.

    Returns:
        ``{"metric_per_case": [{"case", "reference_file", "prediction_file", "spacing", "shape",
        "metrics": {name: compute_binary_metrics(...)}}], "mean": {name: {metric: nanmean}},
        "std": {name: {metric: nanstd}}, "excluded": {name: {metric: number of NaN values excluded}},
        "convention_counts": {name: {convention: count}}, "foreground_mean": {metric: mean of the per-label
        means}, "n_cases": int, "label_definitions": {name: [ints]}, "conventions": str, "reference_folder",
        "prediction_folder", "file_ending"}``. ``spacing`` is in array axis order ``(z, y, x)``.

    Raises:
        FileNotFoundError: a folder is missing, or a reference has no prediction (the message names the cases).
        ValueError: no reference files, bad labels/regions, unreadable images, or a prediction whose grid size
            differs from its reference (the message names both files).
    """
    reference_folder = os.fspath(reference_folder)
    prediction_folder = os.fspath(prediction_folder)
    if not file_ending:
        raise ValueError("file_ending must be a non-empty suffix such as '.nii.gz'.")
    if int(num_processes) < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    definitions = resolve_label_definitions(labels, regions)

    references = _list_cases(reference_folder, file_ending, "reference")
    predictions = _list_cases(prediction_folder, file_ending, "prediction")
    if not references:
        raise ValueError(
            f"reference folder {reference_folder!r} contains no files ending with {file_ending!r}; "
            "check the folder and --file-ending."
        )
    if not predictions:
        raise FileNotFoundError(
            f"prediction folder {prediction_folder!r} contains no files ending with {file_ending!r}; "
            "check the folder and --file-ending."
        )
    extra = [c for c in predictions if c not in references]
    if extra:
        warnings.warn(
            f"{len(extra)} prediction(s) in {prediction_folder!r} have no reference in {reference_folder!r} and are "
            f"ignored: {_format_names(extra)}.",
            UserWarning,
            stacklevel=2,
        )

    missing = [c for c in references if c not in predictions]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} reference case(s) have no prediction (CASE{file_ending}) in {prediction_folder!r}: "
            f"{_format_names(missing)}. Predict these cases, or use a reference folder holding only the predicted "
            "cases."
        )

    explicit = definitions is not None
    jobs = [(case, ref_file, predictions[case], definitions) for case, ref_file in references.items()]
    n_workers = min(int(num_processes), len(jobs))
    if n_workers <= 1:
        outputs = [_evaluate_case(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=get_context("spawn")) as pool:
            outputs = list(pool.map(_evaluate_case_star, jobs))

    per_case = [out[0] for out in outputs]
    for out in outputs:
        for message in out[3]:
            warnings.warn(message, UserWarning, stacklevel=2)

    if definitions is None:
        ref_labels = sorted(set().union(*(out[1] for out in outputs)))
        pred_only = sorted(set().union(*(out[2] for out in outputs)) - set(ref_labels))
        if pred_only:
            warnings.warn(
                f"label(s) {pred_only} occur only in predictions, not in any reference, and are not evaluated; "
                "pass labels explicitly to include them.",
                UserWarning,
                stacklevel=2,
            )
        definitions = {str(lab): (lab,) for lab in ref_labels}
        for record in per_case:
            computed = record["metrics"]
            filled = {}
            for name in definitions:
                if name in computed:
                    filled[name] = computed[name]
                else:  # label absent from reference and prediction: both_empty (independent of shape and spacing)
                    ndim = len(record["shape"])
                    empty = np.zeros((1,) * ndim, dtype=bool)
                    filled[name] = compute_binary_metrics(empty, empty, record["spacing"])
            record["metrics"] = filled

    all_ref = sorted(set().union(*(out[1] for out in outputs)))
    all_pred = sorted(set().union(*(out[2] for out in outputs)))
    absent = check_presence(definitions, per_case, all_ref, all_pred, explicit)

    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    excluded: dict[str, dict[str, int]] = {}
    convention_counts: dict[str, dict[str, int]] = {}
    for name in definitions:
        mean[name], std[name], excluded[name] = {}, {}, {}
        for metric in METRIC_NAMES:
            mean[name][metric], std[name][metric], excluded[name][metric] = _group_stats(per_case, name, metric)
        conventions = [rec["metrics"][name]["convention"] for rec in per_case]
        convention_counts[name] = {c: conventions.count(c) for c in (BOTH_EMPTY, REF_EMPTY, PRED_EMPTY)}
    foreground_mean = {}
    for metric in METRIC_NAMES:
        values = np.array([mean[name][metric] for name in definitions], dtype=np.float64)
        foreground_mean[metric] = _nan_stats(values)[0]

    result = {
        "metric_per_case": per_case,
        "mean": mean,
        "std": std,
        "n_cases": len(per_case),
        "excluded": excluded,
        "convention_counts": convention_counts,
        "foreground_mean": foreground_mean,
        "label_definitions": {name: list(values) for name, values in definitions.items()},
        "absent": absent,
        "labels_in_references": all_ref,
        "labels_in_predictions": all_pred,
        "conventions": EMPTY_MASK_CONVENTIONS + " " + ABSENT_CONVENTION,
        "reference_folder": os.path.abspath(reference_folder),
        "prediction_folder": os.path.abspath(prediction_folder),
        "file_ending": file_ending,
    }
    if output_file is not None:
        write_json_atomic(result, output_file)
    return result


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


_COLUMNS = (("dice", "Dice", 4), ("sensitivity", "Sensitivity", 4), ("hd95", "HD95 (mm)", 2), ("asd", "ASD (mm)", 2))


def _render(header: Sequence[str], rows: Sequence[Sequence[str]], n_left: int = 1) -> list[str]:
    """Fixed-width rows: the first ``n_left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            str(c).ljust(w) if i < n_left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return [line.rstrip() for line in lines]


def format_table(result: Mapping, per_case: bool = False) -> str:
    """Readable fixed-width summary of :func:`evaluate_folders` output (also accepts the re-loaded JSON).

    Args:
        result: the dict returned by :func:`evaluate_folders` (NaN or ``None`` for undefined values).
        per_case: also list every case and label/region with its metrics and empty-mask convention.

    Returns:
        Multi-line string: one row per label/region with ``mean ± std`` of Dice, sensitivity, HD95 (mm) and
        ASD (mm) and the number of cases ``n``; a foreground-mean row; footnotes on excluded NaN values and on the
        empty-mask conventions applied.
    """
    names = list(result["mean"])
    header = ["Label/region", "n", *(title for _, title, _ in _COLUMNS)]
    rows = []
    for name in names:
        row = [name, str(result["n_cases"])]
        for metric, _, digits in _COLUMNS:
            cell = f"{_fmt(result['mean'][name][metric], digits)} ± {_fmt(result['std'][name][metric], digits)}"
            if result["excluded"][name][metric]:
                cell += "*"
            row.append(cell)
        rows.append(row)
    rows.append(["foreground mean", "", *(_fmt(result["foreground_mean"][m], d) for m, _, d in _COLUMNS)])
    lines = [f"Evaluation of {result['n_cases']} case(s); distances in mm", *_render(header, rows)]

    absent = set(result.get("absent") or [])
    notes = [
        f"  {name}: {metric} n/a in {count} of {result['n_cases']} case(s)"
        for name in names
        if name not in absent
        for metric, count in result["excluded"][name].items()
        if count
    ]
    notes += [f"  {name}: in no reference and no prediction: n/a (not scored)" for name in names if name in absent]
    if notes:
        lines += ["* undefined values (empty reference) excluded from mean ± std:", *notes]
    counts = result.get("convention_counts", {})
    used = [
        f"  {name}: " + ", ".join(f"{conv} x{n}" for conv, n in counts[name].items() if n)
        for name in names
        if any(counts.get(name, {}).values())
    ]
    if used:
        lines += [
            (
                "Empty-mask conventions applied (both_empty: dice 1, HD95/ASD 0;\n"
                "  ref_empty / pred_empty: dice 0, HD95/ASD = image diagonal):"
            ),
            *used,
        ]

    if per_case:
        case_rows = []
        for rec in result["metric_per_case"]:
            for name in names:
                m = rec["metrics"][name]
                case_rows.append(
                    [rec["case"], name, *(_fmt(m[metric], d) for metric, _, d in _COLUMNS), m["convention"] or ""]
                )
        case_header = ["Case", "Label/region", *(t for _, t, _ in _COLUMNS), "Convention"]
        lines += ["", "Per case:", *_render(case_header, case_rows, n_left=2)]
    return "\n".join(lines)


def read_case_modality(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """``(modalities, case id -> modality)`` from a dataset.json (``mmssl`` block) or an ``mmssl_split.json`` of an
    unregistered dataset.

    Raises:
        ValueError: the file records no per-case modality (naming the file and the fix).
    """
    import json

    with open(path, encoding="utf-8") as f:
        content = json.load(f)
    block = content.get("mmssl", content) if isinstance(content, dict) else {}
    if not isinstance(block, dict) or not block.get("case_modality"):
        raise ValueError(f"{os.fspath(path)} records no per-case modality (mmssl.case_modality). Pass the dataset.json "
                         f"or mmssl_split.json of a dataset converted with nnUNetv2_mmssl_convert --source-modality.")
    case_modality = {str(k): str(v) for k, v in block["case_modality"].items()}
    modalities = list(block.get("modalities") or dict.fromkeys(case_modality.values()))
    return modalities, case_modality


def aggregate_by_modality(result: Mapping, case_modality: Mapping[str, str],
                          modalities: Sequence[str] | None = None) -> dict:
    """Per-modality means of an :func:`evaluate_folders` result and their mean over modalities (the paper's
    per-modality tables: each modality counts once, whatever its number of cases).

    Args:
        result: :func:`evaluate_folders` output.
        case_modality: case id -> modality name; every evaluated case must be in it.
        modalities: output order (default: order of first appearance).

    Returns:
        ``{"modalities": {name: {"n_cases", "mean": {label: {metric}}, "foreground_mean": {metric}}},
        "mean_over_modalities": {"mean": {label: {metric}}, "foreground_mean": {metric}}}``.

    Raises:
        ValueError: an evaluated case without a modality (names it).
    """
    missing = [rec["case"] for rec in result["metric_per_case"] if rec["case"] not in case_modality]
    if missing:
        raise ValueError(f"{len(missing)} evaluated case(s) have no modality in the given file: "
                         f"{_format_names(missing)}. Pass the dataset's own dataset.json or mmssl_split.json.")
    names = list(result["mean"])
    present = list(dict.fromkeys(case_modality[rec["case"]] for rec in result["metric_per_case"]))
    order = [m for m in (modalities or present) if m in present]
    per = {}
    for modality in order:
        records = [rec for rec in result["metric_per_case"] if case_modality[rec["case"]] == modality]
        mean = {name: {metric: _group_stats(records, name, metric)[0] for metric in METRIC_NAMES}
                for name in names}
        foreground = {metric: _nan_stats(np.array([mean[n][metric] for n in names], dtype=np.float64))[0]
                      for metric in METRIC_NAMES}
        per[modality] = {"n_cases": len(records), "mean": mean, "foreground_mean": foreground}
    over = {name: {metric: _nan_stats(np.array([per[m]["mean"][name][metric] for m in per], dtype=np.float64))[0]
                   for metric in METRIC_NAMES} for name in names}
    over_fg = {metric: _nan_stats(np.array([per[m]["foreground_mean"][metric] for m in per], dtype=np.float64))[0]
               for metric in METRIC_NAMES}
    return {"modalities": per, "mean_over_modalities": {"mean": over, "foreground_mean": over_fg}}


def format_modality_table(by_modality: Mapping) -> str:
    """One row per modality (cases, Dice and HD95 per label/region) and a row of the mean over modalities."""
    per = by_modality["modalities"]
    if not per:
        return "No case with a modality."
    names = list(next(iter(per.values()))["mean"])
    header = ["Modality", "n", *(f"{name} {title}" for name in names for _, title, _ in _COLUMNS[::2])]
    rows = []
    for modality, entry in per.items():
        rows.append([modality, str(entry["n_cases"]),
                     *(_fmt(entry["mean"][name][metric], digits) for name in names
                       for metric, _, digits in _COLUMNS[::2])])
    over = by_modality["mean_over_modalities"]["mean"]
    rows.append(["mean over modalities", "", *(_fmt(over[name][metric], digits) for name in names
                                               for metric, _, digits in _COLUMNS[::2])])
    return "\n".join(["Per modality (each modality counts once in the mean):", *_render(header, rows)])

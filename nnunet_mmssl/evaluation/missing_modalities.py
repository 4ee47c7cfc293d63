"""Evaluate a model on every non-empty subset of its modalities (SMML, Liang et al. 2025, Table 1; METHODS.md §4).

For K input channels there are ``2^K - 1`` subsets of present modalities (15 for BraTS' four sequences). Each subset
is predicted with the other channels missing (:class:`~nnunet_mmssl.inference.missing.MissingModalityPredictor`),
scored with :func:`~nnunet_mmssl.evaluation.report.evaluate_folders` per label or region, and reported in the paper's
Table 1 layout: one column per subset, marked with the modalities present (``●``) and absent (``○``), one row per
label/region, a mean row (over labels/regions) and an ``Avg`` column (over subsets).

Output folder::

    OUT/subsets/<bits>_<present channels>/predictions/   the subset's predicted segmentations
    OUT/subsets/<bits>_<present channels>/scores.json    evaluate_folders' result + the subset and run settings
    OUT/missing_modalities.json                          every subset's means + the averages
    OUT/missing_modalities.txt                           the Dice and HD95 tables
    OUT/missing_modalities_dice.png                      heat map of Dice per subset and label/region

``<bits>`` has one digit per channel, 1 = present (``0110_T1ce-T1``). The run is resumable: a subset is predicted and
scored in a hidden ``.<key>.partial-*`` folder, renamed to its final name only when its scores are written, so a
subset folder under its final name is complete and is skipped on a rerun (after checking its scores and its
predictions); a half-written one is discarded and redone. ``OUT/run.json`` records the run's settings (model, folds,
inputs, labels); a rerun with other settings is refused unless ``overwrite`` discards the old results.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from nnunet_mmssl.evaluation.metrics import EMPTY_MASK_CONVENTIONS, METRIC_NAMES
from nnunet_mmssl.evaluation.report import (
    ABSENT_CONVENTION,
    LabelSpec,
    RegionSpec,
    _integer_labels,
    _read,
    evaluate_folders,
    resolve_label_definitions,
    write_file_atomic,
    write_json_atomic,
    write_text_atomic,
)

SUBSETS_FOLDER = "subsets"
PREDICTIONS_FOLDER = "predictions"
SCORES_NAME = "scores.json"
RUN_NAME = "run.json"
SUMMARY_NAME = "missing_modalities.json"
TABLE_NAME = "missing_modalities.txt"
HEATMAP_NAME = "missing_modalities_dice.png"
PRESENT, ABSENT = "\u25cf", "\u25cb"  # ● ○ as in the paper

PredictSubset = Callable[[tuple[int, ...], str], None]
"""``predict(missing_channels, output_folder)``: write the predictions of every case with those channels missing."""


def predicted_label_values(dataset_json: Mapping) -> set[int]:
    """The label values a model's segmentations can hold (``dataset.json``): its labels, or for a region dataset
    its ``regions_class_order``; background and ``ignore`` left out."""
    if dataset_json.get("regions_class_order"):
        values = {int(v) for v in dataset_json["regions_class_order"]}
    else:
        values = {int(v) for name, v in dataset_json["labels"].items()
                  if name != "ignore" and not isinstance(v, list | tuple)}
    return values - {0}


def check_scored_labels(labels_folder: str, cases: Sequence[str], file_ending: str, dataset_json: Mapping,
                        labels: LabelSpec | None = None, regions: RegionSpec | None = None) -> list[str]:
    """Before any prediction: what is scored must exist in the references or be predictable by the model.

    Reads every reference once.

    Returns:
        Warnings: reference labels the model never predicts (they score Dice 0: another class numbering?), and
        requested labels/regions that are in no reference and that the model never predicts (reported n/a).

    Raises:
        ValueError: label 0 requested, or every requested label/region in no reference and never predicted by the
            model (nothing to score; each subset would read as a perfect Dice).
    """
    definitions = resolve_label_definitions(labels, regions)
    model = predicted_label_values(dataset_json)
    in_refs: set[int] = set()
    for case in cases:
        path = os.path.join(labels_folder, case + file_ending)
        in_refs |= _integer_labels(_read(path)[1], path)
    messages = []
    never = sorted(in_refs - model)
    if never:
        messages.append(f"reference label(s) {never} in {labels_folder} are never predicted by the model (its labels "
                        f"{sorted(model)}): they score Dice 0. Do references and model number the classes alike? "
                        f"(nnUNetv2_mmssl_convert --label-map V=T renumbers a dataset's labels)")
    if definitions is None:
        return messages
    absent = [name for name, values in definitions.items() if not set(values) & (in_refs | model)]
    if absent and len(absent) == len(definitions):
        raise ValueError(f"-l/-r {' '.join(absent)}, in no reference of {labels_folder} (labels {sorted(in_refs)}) "
                         f"and never predicted by the model (labels {sorted(model)}): there is nothing to score (each "
                         f"subset would read as a perfect Dice). Score labels that exist, e.g. "
                         f"-l {' '.join(map(str, sorted(in_refs | model) or [1]))}.")
    messages += [f"label/region {name!r} is in no reference and never predicted by the model: reported as n/a"
                 for name in absent]
    return messages


def modality_subsets(num_channels: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``range(num_channels)`` (present channels): by size, then in channel order.

    Raises:
        ValueError: ``num_channels < 1``.
    """
    if num_channels < 1:
        raise ValueError(f"a model needs at least one channel, got {num_channels}")
    return [s for r in range(1, num_channels + 1) for s in itertools.combinations(range(num_channels), r)]


def _names(channel_names: Mapping[str, str]) -> list[str]:
    return [str(channel_names[str(c)]) for c in range(len(channel_names))]


def subset_key(present: Sequence[int], channel_names: Mapping[str, str]) -> str:
    """Folder name of a subset: one digit per channel (1 = present), then the present channels' names."""
    names = _names(channel_names)
    bits = "".join("1" if c in present else "0" for c in range(len(names)))
    safe = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", names[c]) for c in sorted(present))
    return f"{bits}_{safe}"


def _json_normal(data: Any) -> Any:
    return json.loads(json.dumps(data))


def _load_complete_subset(folder: str, present: Sequence[int], cases: Sequence[str],
                          file_ending: str) -> dict | None:
    """The subset's scores if ``folder`` holds them for ``present`` and every case's prediction; else None."""
    try:
        with open(os.path.join(folder, SCORES_NAME), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("present") != list(present) or "scores" not in record:
        return None
    scored = sorted(rec.get("case") for rec in record["scores"].get("metric_per_case", []))
    if scored != sorted(cases):
        return None
    predictions = os.path.join(folder, PREDICTIONS_FOLDER)
    if not all(os.path.isfile(os.path.join(predictions, case + file_ending)) for case in cases):
        return None
    return record


def _check_run_settings(output_folder: str, settings: Mapping, overwrite: bool) -> None:
    """Record ``settings`` in ``OUT/run.json``; refuse a folder holding another run's results (unless overwrite)."""
    run_file = os.path.join(output_folder, RUN_NAME)
    settings = _json_normal(settings)
    if os.path.isfile(run_file) and not overwrite:
        try:
            with open(run_file, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if old != settings:
            differ = sorted(k for k in set(settings) | set(old or {}) if (old or {}).get(k) != settings.get(k))
            raise ValueError(f"{output_folder} holds the results of another run (different {differ}: "
                             f"{run_file}). Choose a new output folder, or pass --overwrite to discard them.")
    if overwrite:
        for name in (SUBSETS_FOLDER, SUMMARY_NAME, TABLE_NAME, HEATMAP_NAME):
            path = os.path.join(output_folder, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.unlink(path)
    write_json_atomic(settings, run_file)


def evaluate_missing_modalities(predict: PredictSubset, labels_folder: str, output_folder: str,
                                channel_names: Mapping[str, str], cases: Sequence[str],
                                labels: LabelSpec | None = None, regions: RegionSpec | None = None,
                                file_ending: str = ".nii.gz", settings: Mapping | None = None,
                                overwrite: bool = False, num_processes: int = 1, progress: bool = True) -> dict:
    """Predict and score every modality subset (resumable), then write the JSON, the tables and the heat map.

    Args:
        predict: ``predict(missing_channels, output_folder)`` writes every case's prediction with those channels
            missing (the folder exists).
        labels_folder: reference segmentations ``CASE<file_ending>``.
        output_folder: see the module docstring.
        channel_names: ``dataset.json``'s ``channel_names``.
        cases: the case ids to be predicted (every one needs a reference).
        labels, regions: what to score (see :func:`~nnunet_mmssl.evaluation.report.evaluate_folders`).
        file_ending: image file suffix.
        settings: what defines the run (model, folds, inputs), recorded in ``run.json`` and compared on a rerun.
        overwrite: discard the results of an earlier run in ``output_folder``.
        num_processes: processes for scoring.
        progress: show a progress bar over the subsets.

    Returns:
        The summary written to ``missing_modalities.json`` (see :func:`summarise`), plus ``"skipped"``: the keys of
        the subsets found complete and not redone.

    Raises:
        ValueError: another run's results in ``output_folder``, fewer than 2 channels, or a scoring error.
    """
    from tqdm import tqdm

    num_channels = len(channel_names)
    if num_channels < 2:
        raise ValueError(f"the model has one channel ({_names(channel_names)}): there is no modality to leave out.")
    output_folder = os.path.abspath(output_folder)
    os.makedirs(output_folder, exist_ok=True)
    settings = dict(settings or {})
    settings.setdefault("labels_folder", os.path.abspath(labels_folder))
    settings.setdefault("labels", labels if labels is None or isinstance(labels, Mapping) else list(labels))
    settings.setdefault("regions", regions if regions is None or isinstance(regions, Mapping) else
                        [list(r) if isinstance(r, Sequence) else r for r in regions])
    _check_run_settings(output_folder, settings, overwrite)
    subsets_folder = os.path.join(output_folder, SUBSETS_FOLDER)
    os.makedirs(subsets_folder, exist_ok=True)
    for name in os.listdir(subsets_folder):  # left by a killed run: never trusted
        if name.startswith(".") and ".partial-" in name:
            shutil.rmtree(os.path.join(subsets_folder, name), ignore_errors=True)

    records, skipped = [], []
    subsets = modality_subsets(num_channels)
    with tqdm(total=len(subsets), desc="Modality subsets", unit="subset", disable=not progress) as bar:
        for present in subsets:
            key = subset_key(present, channel_names)
            bar.set_postfix_str(key)
            final = os.path.join(subsets_folder, key)
            record = _load_complete_subset(final, present, cases, file_ending)
            if record is not None:
                skipped.append(key)
            else:
                record = _run_subset(predict, present, key, subsets_folder, labels_folder, channel_names, labels,
                                     regions, file_ending, num_processes)
            records.append(record)
            bar.update()
    summary = summarise(records, channel_names)
    summary["settings"] = _json_normal(settings)
    write_json_atomic(summary, os.path.join(output_folder, SUMMARY_NAME))
    notes = "".join(f"\nwarning: {note}" for note in summary["warnings"])
    write_text_atomic(format_missing_table(summary, "dice") + "\n\n" + format_missing_table(summary, "hd95") + "\n"
                      + (notes[1:] + "\n" if notes else ""), os.path.join(output_folder, TABLE_NAME))
    plot_heatmap(summary, os.path.join(output_folder, HEATMAP_NAME))
    summary["skipped"] = skipped
    return summary


def _run_subset(predict: PredictSubset, present: tuple[int, ...], key: str, subsets_folder: str, labels_folder: str,
                channel_names: Mapping[str, str], labels, regions, file_ending: str, num_processes: int) -> dict:
    """Predict and score one subset in a hidden folder; rename it to ``key`` when complete."""
    final = os.path.join(subsets_folder, key)
    if os.path.exists(final):  # incomplete or inconsistent: redo
        shutil.rmtree(final)
    missing = tuple(c for c in range(len(channel_names)) if c not in present)
    tmp = tempfile.mkdtemp(prefix=f".{key}.partial-", dir=subsets_folder)
    try:
        predictions = os.path.join(tmp, PREDICTIONS_FOLDER)
        os.makedirs(predictions)
        predict(missing, predictions)
        with warnings.catch_warnings(record=True) as caught:  # collected in the record, reported once per run
            warnings.simplefilter("always")
            scores = evaluate_folders(labels_folder, predictions, labels=labels, regions=regions,
                                      file_ending=file_ending, num_processes=num_processes)
        scores["prediction_folder"] = os.path.join(final, PREDICTIONS_FOLDER)
        for case in scores.get("metric_per_case", []):  # where the files will be once the folder is renamed
            if case.get("prediction_file"):
                case["prediction_file"] = os.path.join(final, PREDICTIONS_FOLDER,
                                                       os.path.basename(case["prediction_file"]))
        names = _names(channel_names)
        record = {"key": key, "present": list(present), "present_names": [names[c] for c in present],
                  "missing": list(missing), "missing_names": [names[c] for c in missing], "scores": scores,
                  "warnings": list(dict.fromkeys(str(w.message) for w in caught))}
        write_json_atomic(record, os.path.join(tmp, SCORES_NAME))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 otherwise
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with open(os.path.join(final, SCORES_NAME), encoding="utf-8") as f:
        return json.load(f)  # as a rerun reads it (NaN as null)


def _nanmean(values: Sequence[float | None]) -> float:
    array = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return float(np.nanmean(array)) if np.isfinite(array).any() else float("nan")


def summarise(records: Sequence[Mapping], channel_names: Mapping[str, str]) -> dict:
    """Collect the subsets' mean metrics and average them over subsets.

    Args:
        records: per subset, ``{"key", "present", "present_names", "scores": evaluate_folders result}``.
        channel_names: ``dataset.json``'s ``channel_names``.

    Returns:
        ``{"channels": [names], "regions": [label/region names], "n_cases", "subsets": [{"key", "present",
        "present_names", "mean": {region: {metric: value}}, "foreground_mean": {metric: value}}],
        "average_over_subsets": {region: {metric}}, "average_foreground_mean": {metric}, "conventions"}``.
    """
    regions = list(records[0]["scores"]["mean"]) if records else []
    subsets = []
    for record in records:
        scores = record["scores"]
        subsets.append({"key": record["key"], "present": list(record["present"]),
                        "present_names": list(record["present_names"]),
                        "mean": {r: {m: scores["mean"][r][m] for m in METRIC_NAMES} for r in regions},
                        "foreground_mean": {m: scores["foreground_mean"][m] for m in METRIC_NAMES}})
    average = {r: {m: _nanmean([s["mean"][r][m] for s in subsets]) for m in METRIC_NAMES} for r in regions}
    average_fg = {m: _nanmean([s["foreground_mean"][m] for s in subsets]) for m in METRIC_NAMES}
    where: dict[str, list[str]] = {}
    for record in records:
        for message in record.get("warnings", []):
            where.setdefault(message, []).append(record["key"])
    notes = [f"{message} (subset{'s' if len(keys) > 1 else ''} {', '.join(keys)})" for message, keys in where.items()]
    return {"channels": _names(channel_names), "regions": regions,
            "n_cases": records[0]["scores"]["n_cases"] if records else 0, "subsets": subsets,
            "average_over_subsets": average, "average_foreground_mean": average_fg,
            "conventions": EMPTY_MASK_CONVENTIONS + " " + ABSENT_CONVENTION, "warnings": notes}


_TABLE_FORMATS = {"dice": ("Dice (%)", 100.0, 1), "sensitivity": ("Sensitivity (%)", 100.0, 1),
                  "hd95": ("HD95 (mm)", 1.0, 1), "asd": ("ASD (mm)", 1.0, 1)}


def _cell(value: float | None, scale: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * scale:.{digits}f}"


def format_missing_table(summary: Mapping, metric: str = "dice") -> str:
    """The paper's Table 1 layout for one metric.

    One column per subset (numbered), headed by one row per modality with ``●`` (present) or ``○`` (absent); one
    row per label/region and a ``mean`` row (over labels/regions); the last column ``Avg`` averages over the subsets.

    Args:
        summary: :func:`summarise`'s result (or the re-loaded ``missing_modalities.json``).
        metric: ``dice``, ``sensitivity`` (both in %), ``hd95`` or ``asd`` (mm).
    """
    title, scale, digits = _TABLE_FORMATS[metric]
    subsets = summary["subsets"]
    channels = summary["channels"]
    header = ["", *(str(i + 1) for i in range(len(subsets))), "Avg"]
    marks = [[name, *(PRESENT if c in s["present"] else ABSENT for s in subsets), ""]
             for c, name in enumerate(channels)]
    values = [[region, *(_cell(s["mean"][region][metric], scale, digits) for s in subsets),
               _cell(summary["average_over_subsets"][region][metric], scale, digits)]
              for region in summary["regions"]]
    values.append(["mean", *(_cell(s["foreground_mean"][metric], scale, digits) for s in subsets),
                   _cell(summary["average_foreground_mean"][metric], scale, digits)])
    rows = [header, *marks, *values]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                              strict=True))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [(f"{title} per modality subset ({PRESENT} present, {ABSENT} absent); {summary['n_cases']} case(s); "
              f"mean = over labels/regions, Avg = over the {len(subsets)} subsets"),
             line(header), rule, *(line(r) for r in marks), rule, *(line(r) for r in values)]
    return "\n".join(lines)


def plot_heatmap(summary: Mapping, path: str, metric: str = "dice") -> str:
    """Heat map (PNG) of ``metric`` per subset (columns) and label/region (rows, plus the mean row).

    Drawn with matplotlib's Agg canvas (no display, the global backend untouched); written under a temporary name
    and renamed.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    title, scale, digits = _TABLE_FORMATS[metric]
    subsets = summary["subsets"]
    rows = [*summary["regions"], "mean"]
    values = np.array([[np.nan if s["mean"][r][metric] is None else s["mean"][r][metric] for s in subsets]
                       for r in summary["regions"]]
                      + [[np.nan if s["foreground_mean"][metric] is None else s["foreground_mean"][metric]
                          for s in subsets]], dtype=np.float64) * scale
    ticks = ["+".join(s["present_names"]) for s in subsets]
    figure = Figure(figsize=(max(6.0, 0.55 * len(subsets) + 2.5),
                             1.5 + 0.5 * len(rows) + 0.09 * max(len(t) for t in ticks)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bounded = metric in ("dice", "sensitivity")
    image = axes.imshow(values, cmap="viridis", aspect="auto", vmin=0 if bounded else None,
                        vmax=100 if bounded else None)
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            axes.text(j, i, f"{value:.{digits}f}", ha="center", va="center", fontsize=7,
                      color="white" if not bounded or value < 60 else "black")
    axes.set_yticks(range(len(rows)), rows)
    axes.set_xticks(range(len(subsets)), ticks, rotation=90, fontsize=8)
    axes.set_title(f"{title} per modality subset ({summary['n_cases']} case(s))")
    figure.colorbar(image, ax=axes, label=title)
    figure.tight_layout()
    return write_file_atomic(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"), suffix=".png")

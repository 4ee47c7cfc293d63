"""The per-modality validation summary of an unregistered dataset (DBDC: every case one image of one modality).

:func:`write_summary_per_modality` writes ``summary_per_modality.json`` beside nnU-Net's validation ``summary.json``
(read, not changed): per modality, the number of its validation cases and, per label (region), the mean Dice and IoU
over them. Used by :class:`~nnunet_mmssl.trainers.dbdc.DBDCTrainer` and the pooled plain U-Net of
:mod:`nnunet_mmssl.trainers.dbdc_variants` after their final validation.
"""

from __future__ import annotations

import os

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, save_json


def write_summary_per_modality(validation_folder: str, modalities: list[str], modality_of, file_ending: str,
                               log=print) -> dict:
    """``summary_per_modality.json`` beside nnU-Net's validation ``summary.json``: per modality, the number of cases
    and the mean of each label's (region's) Dice and IoU over its cases.

    Args:
        validation_folder: the fold's ``validation`` folder.
        modalities: modality names (output order).
        modality_of: case id -> modality name.
        file_ending: dataset file ending.
        log: message sink.

    Returns:
        modality -> ``{"num_cases": n, "mean": {label: {"Dice": ..., "IoU": ...}}}`` (the file's content; modalities
        without a validation case left out); ``{}`` without nnU-Net's ``summary.json`` (nothing written then).
    """
    summary_file = join(validation_folder, "summary.json")
    if not isfile(summary_file):
        return {}
    summary = load_json(summary_file)
    result = {}
    for name in modalities:
        cases = [c for c in summary["metric_per_case"]
                 if modality_of(os.path.basename(c["reference_file"])[:-len(file_ending)]) == name]
        if not cases:
            continue
        labels = list(cases[0]["metrics"])
        result[name] = {"num_cases": len(cases), "mean": {
            label: {metric: float(np.nanmean([c["metrics"][label][metric] for c in cases]))
                    for metric in ("Dice", "IoU")} for label in labels}}
        dice = np.nanmean([v["Dice"] for v in result[name]["mean"].values()])
        log(f"Validation {name}: {len(cases)} cases, mean Dice {dice:.4f}")
    save_json(result, join(validation_folder, "summary_per_modality.json"), sort_keys=False)
    return result

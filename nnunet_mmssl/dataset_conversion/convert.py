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

The stages live in their own modules, shared with the unregistered mode
(:mod:`~nnunet_mmssl.dataset_conversion.unregistered`): :mod:`~nnunet_mmssl.dataset_conversion.request` (constants,
errors, argument parsing), :mod:`~nnunet_mmssl.dataset_conversion.finding` (cases and their files),
:mod:`~nnunet_mmssl.dataset_conversion.checking` (grids, labels), :mod:`~nnunet_mmssl.dataset_conversion.splitting`
and :mod:`~nnunet_mmssl.dataset_conversion.writing`; this module orchestrates them and re-exports their public names.

Every case is checked before anything is written (channels and label on one grid, every case 3D or every case 2D,
no file of one case reached again -- symlink, hard link or an identical image -- from another case, integral
non-negative labels with declared values only; the error suggests the ``--label-map`` that maps an undeclared value),
names that become file names are plain names (:func:`nnunet_mmssl.names.check_safe_name`), the output root lies
outside every source, and every image is read whole and checked while it is copied (complete file -- a truncated
``.nii.gz`` is an error, not zeros --, an image at all, finite voxels; see
:mod:`nnunet_mmssl.dataloading.image_checks`). The dataset is written into a hidden temporary sibling folder that is
renamed to its final name at the very end, so a failure never leaves a half-written dataset behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from nnunet_mmssl.dataset_conversion.checking import (
    check_case_geometry,
    check_duplicate_cases,
    check_label,
    check_mapped_label,
    check_same_dimension,
    label_values,
    read_checked,
    read_label_array,
    remap_label,
    validate_label_map,
)
from nnunet_mmssl.dataset_conversion.finding import (
    SourceCase,
    check_output_outside_sources,
    discover_cases,
    discover_source_cases,
    find_image_files,
    is_image_file,
    match_case_files,
    resolve_sources,
)
from nnunet_mmssl.dataset_conversion.regions import region_labels
from nnunet_mmssl.dataset_conversion.request import (
    DEFAULT_LABELS,
    FILE_ENDING,
    GROUP_FOLDERS,
    IMAGE_EXTENSIONS,
    SPLIT_FILE_NAME,
    ConversionError,
    ModalitySpec,
    Tolerances,
    _normalise_label_globs,
    _normalise_modalities,
    check_request,
    parse_label_specs,
    parse_modality_specs,
    validate_labels,
)
from nnunet_mmssl.dataset_conversion.splitting import (
    modality_seed,
    resolve_num_labeled,
    resolve_num_test,
    split_by_modality,
    split_cases,
)
from nnunet_mmssl.dataset_conversion.writing import (
    _write_case,
    case_record,
    make_case_ids,
    make_dataset_json,
    output_target,
    tolerance_record,
    write_dataset,
)

__all__ = [
    "DEFAULT_LABELS",
    "FILE_ENDING",
    "GROUP_FOLDERS",
    "IMAGE_EXTENSIONS",
    "SPLIT_FILE_NAME",
    "ConversionError",
    "ModalitySpec",
    "SourceCase",
    "Tolerances",
    "check_case_geometry",
    "check_duplicate_cases",
    "check_label",
    "check_mapped_label",
    "check_output_outside_sources",
    "check_same_dimension",
    "convert_dataset",
    "discover_cases",
    "discover_source_cases",
    "find_image_files",
    "is_image_file",
    "label_values",
    "match_case_files",
    "modality_seed",
    "parse_label_specs",
    "parse_modality_specs",
    "read_checked",
    "read_label_array",
    "remap_label",
    "resolve_num_labeled",
    "resolve_num_test",
    "resolve_sources",
    "split_by_modality",
    "split_cases",
    "validate_label_map",
    "validate_labels",
]

logger = logging.getLogger(__name__)


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
    label_map: Mapping[int, int] | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
    regions_class_order: Sequence[int] | None = None,
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
        label_map: source value -> declared label value, applied to every label file (e.g. BraTS ``{4: 3}``); with
            a map every value present must be mapped (0 -> 0 unless given).
        regions: nnU-Net regions, name -> label values (:mod:`~nnunet_mmssl.dataset_conversion.regions`); the
            dataset.json then declares them (sigmoid outputs) instead of the plain labels.
        regions_class_order: export value of each region (default: see the regions module).

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
    prefix, label_dict, tol = check_request(dataset_id, dataset_name, case_prefix, labels, num_processes,
                                            spacing_tolerance, origin_tolerance, direction_tolerance)
    mods = _normalise_modalities(modalities)
    lab_globs = _normalise_label_globs(label_globs)
    channel_names = [name for name, _ in mods]
    target = output_target(output_root, dataset_id, dataset_name, overwrite)
    check_output_outside_sources(target.root, target.path, resolve_sources(sources))

    # --- discovery, split and checks (nothing written yet) --------------------------------------------------
    cases = discover_cases(sources, mods, lab_globs)
    split = split_cases(cases, num_labeled, num_test, seed)
    case_ids = make_case_ids(len(cases), prefix)
    report(f"found {len(cases)} cases ({sum(c.label_file is not None for c in cases)} with label) in "
           f"{len(sources)} source(s); split: {len(split['labeled'])} labelled, {len(split['unlabeled'])} "
           f"unlabelled, {len(split['test'])} test")
    mapping = validate_label_map("all", label_map, label_dict) if label_map else None
    region_json = region_labels(label_dict, regions, regions_class_order) if regions else None
    headers = [check_case_geometry(case, tol) for case in cases]  # headers only: cheap checks first
    check_same_dimension(cases, headers)
    check_duplicate_cases(cases)
    for case in cases:
        if case.label_file is not None:
            if mapping is not None:
                check_mapped_label(case, "all", mapping, label_dict)
            else:
                check_label(case, label_dict)
    report("all cases checked: grids consistent, no case twice, labels valid")

    # --- records ----------------------------------------------------------------------------------------------
    group_of = {i: g for g, idx in split.items() for i in idx}
    records: dict[str, list[dict]] = {g: [] for g in GROUP_FOLDERS}
    for i, case in enumerate(cases):
        group = group_of[i]
        records[group].append(case_record(case, case_ids[i], channel_names, label_copied=group != "unlabeled"))
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
        "tolerances": tolerance_record(tol),
        "counts": {"labeled": len(records["labeled"]), "unlabeled": len(records["unlabeled"]),
                   "test": len(records["test"]), "unlabeled_with_label_not_copied": num_labels_dropped},
        "split": records,
    }
    if mapping is not None:
        mmssl["label_map"] = {str(k): v for k, v in mapping.items()}
    dataset_json = make_dataset_json(channel_names, label_dict, records, dataset_name, mmssl)
    if region_json is not None:
        mmssl["label_values"] = dict(label_dict)
        dataset_json["labels"], dataset_json["regions_class_order"] = region_json

    # --- writing into a temporary sibling, then rename -----------------------------------------------------------
    return write_dataset(target, cases, case_ids, split, {"dataset.json": dataset_json, SPLIT_FILE_NAME: mmssl},
                         num_processes, report, write_case=_write_case,
                         label_maps=[mapping] * len(cases) if mapping is not None else None)

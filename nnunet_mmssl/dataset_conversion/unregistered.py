"""Convert *unregistered* sources (CT of some patients, MR of others) into a one-channel nnU-Net v2 raw dataset.

Input: each source folder holds the cases of ONE modality (``source_modalities``, one name per source; a modality may
span several sources). Each immediate subfolder of a source is one case holding exactly one image matching the image
glob(s) and at most one label matching the label glob(s) (same matching rules as the registered mode:
:mod:`~nnunet_mmssl.dataset_conversion.finding`). Image and label of a case share a grid; different cases may have
any grid and spacing.

Datasets number their classes differently, so each modality may have a label map ``{source value: target value}``
onto the one declared label set (``0 -> 0`` unless given); with a map every value present in a label must be a key,
without one every value must be a declared label. The written label is the remapped one.

Each modality is split on its own (:func:`~nnunet_mmssl.dataset_conversion.splitting.split_by_modality`): its
labelled cases are shuffled with a random state seeded from ``(seed, crc32(modality name))``, so adding a modality or
reordering the sources does not change another modality's split. Counts are per modality (one value for all, or a
mapping modality -> value).

Output: the registered mode's folders (``imagesTr/labelsTr``, ``imagesUnlabeled``, ``imagesTs/labelsTs``) with
single-channel ``CASE_0000.nii.gz`` files; ``dataset.json`` has ONE channel named
:func:`~nnunet_mmssl.dataset_conversion.modality_layout.channel_name_for` the modalities and an ``mmssl`` block that
adds the modality layout (``layout``, ``modalities``, ``intensity_schemes``, ``case_modality`` of every case; see
:mod:`~nnunet_mmssl.dataset_conversion.modality_layout`), ``source_modality`` and ``label_maps`` to the converter's
record; ``mmssl_split.json`` is the same block.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from nnunet_mmssl.dataset_conversion.checking import (
    check_case_geometry,
    check_duplicate_cases,
    check_label,
    check_mapped_label,
    check_same_dimension,
    validate_label_map,
)
from nnunet_mmssl.dataset_conversion.finding import (
    SourceCase,
    check_output_outside_sources,
    discover_source_cases,
    resolve_sources,
)
from nnunet_mmssl.dataset_conversion.modality_layout import ModalityLayoutError, channel_name_for, make_layout
from nnunet_mmssl.dataset_conversion.request import (
    GROUP_FOLDERS,
    SPLIT_FILE_NAME,
    ConversionError,
    check_request,
    safe_name,
)
from nnunet_mmssl.dataset_conversion.splitting import Count, split_by_modality
from nnunet_mmssl.dataset_conversion.writing import (
    _write_case,
    case_record,
    make_case_ids,
    make_dataset_json,
    output_target,
    tolerance_record,
    write_dataset,
)

logger = logging.getLogger(__name__)

PerModality = Count | Mapping[str, Count]
"""A count for every modality, or a mapping modality -> count (modalities not named get the default)."""


# ----------------------------------------------------------------------------------------------------------------
# Parsing of the command-line strings
# ----------------------------------------------------------------------------------------------------------------


def parse_number(text: str, option: str) -> int | float:
    """``"3"`` -> 3, ``"0.3"`` -> 0.3.

    Raises:
        ConversionError: neither an int nor a float (naming ``option``).
    """
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise ConversionError(f"{option} {text!r} is neither an int count nor a fraction") from None


def parse_count_specs(specs: Sequence[str], option: str) -> tuple[int | float | None, dict[str, int | float]]:
    """Parse ``N`` / ``FRACTION`` / ``M:N`` entries of ``--num-labeled`` / ``--num-test``.

    Args:
        specs: e.g. ``["0.5"]``, ``["CT:3", "MR:0.5"]`` or ``["2", "MR:1"]`` (a bare value is the default of the
            modalities not named).
        option: the option (for messages).

    Returns:
        ``(bare value or None, {modality: value})``.

    Raises:
        ConversionError: malformed entry, two bare values, or a modality named twice.
    """
    bare: int | float | None = None
    per: dict[str, int | float] = {}
    for spec in specs:
        name, sep, value = spec.rpartition(":")
        if not sep:
            if bare is not None:
                raise ConversionError(f"{option}: two values without a modality ({bare!r} and {spec!r}); give one "
                                      f"default and M:N entries for the others")
            bare = parse_number(spec, option)
            continue
        name = name.strip()
        if not name or not value.strip():
            raise ConversionError(f"{option} {spec!r} is not N, FRACTION or MODALITY:N (e.g. CT:3 or MR:0.5)")
        if name in per:
            raise ConversionError(f"{option}: modality {name!r} given twice")
        per[name] = parse_number(value, option)
    return bare, per


def parse_label_map_specs(specs: Sequence[str]) -> dict[str, dict[int, int]]:
    """Parse ``M:V=T`` strings (``M:V=T,V2=T2`` gives several) into ``{modality: {source value: target value}}``.

    Raises:
        ConversionError: malformed string, non-integer value, or a source value mapped to two targets.
    """
    maps: dict[str, dict[int, int]] = {}
    for spec in specs:
        name, sep, rest = spec.partition(":")
        name = name.strip()
        if not sep or not name or not rest.strip():
            raise ConversionError(f"--label-map {spec!r} is not MODALITY:VALUE=TARGET (e.g. CT:5=1)")
        for pair in rest.split(","):
            source, eq, target = pair.partition("=")
            if not eq or not re.fullmatch(r"\s*\d+\s*", source) or not re.fullmatch(r"\s*\d+\s*", target):
                raise ConversionError(f"--label-map {spec!r}: {pair!r} is not VALUE=TARGET with integers >= 0 "
                                      f"(e.g. CT:5=1)")
            mapping = maps.setdefault(name, {})
            s, t = int(source), int(target)
            if mapping.get(s, t) != t:
                raise ConversionError(f"--label-map: value {s} of modality {name!r} is mapped to both "
                                      f"{mapping[s]} and {t}")
            mapping[s] = t
    return maps


def parse_intensity_scheme_specs(specs: Sequence[str]) -> dict[str, str]:
    """Parse ``M=SCHEME`` strings (e.g. ``MR=ZScoreNormalization``) into ``{modality: scheme}``.

    Raises:
        ConversionError: malformed string or a modality given twice.
    """
    schemes: dict[str, str] = {}
    for spec in specs:
        name, sep, scheme = spec.partition("=")
        name, scheme = name.strip(), scheme.strip()
        if not sep or not name or not scheme:
            raise ConversionError(f"--intensity-scheme {spec!r} is not MODALITY=SCHEME (e.g. MR=ZScoreNormalization)")
        if name in schemes:
            raise ConversionError(f"--intensity-scheme: modality {name!r} given twice")
        schemes[name] = scheme
    return schemes


# ----------------------------------------------------------------------------------------------------------------
# Request checks
# ----------------------------------------------------------------------------------------------------------------


def _unknown_names(given: Mapping | None, modalities: Sequence[str], what: str) -> None:
    unknown = [m for m in (given or {}) if m not in modalities]
    if unknown:
        raise ConversionError(f"{what} names modality {unknown[0]!r}, which no source has; the modalities are "
                              f"{list(modalities)} (from --source-modality, case-sensitive)")


def _per_modality(value: PerModality, modalities: Sequence[str], what: str, default: Count) -> dict[str, Count]:
    if isinstance(value, Mapping):
        _unknown_names(value, modalities, what)
        return {m: value.get(m, default) for m in modalities}
    return {m: value for m in modalities}


def _globs(globs: Sequence[str] | str | None, what: str, required: bool) -> list[str]:
    glob_list = [] if globs is None else [globs] if isinstance(globs, str) else list(globs)
    if any(not isinstance(g, str) or not g for g in glob_list):
        raise ConversionError(f"{what} must be non-empty strings, got {globs!r}")
    if required and not glob_list:
        raise ConversionError(f"{what}: at least one glob is needed (--image GLOB)")
    return glob_list


def _plain(value: Count) -> Count:
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------


def convert_unregistered(
    sources: Sequence[str | os.PathLike],
    source_modalities: Sequence[str],
    image_globs: Sequence[str] | str,
    label_globs: Sequence[str] | str | None,
    output_root: str | os.PathLike,
    dataset_id: int,
    dataset_name: str,
    num_labeled: PerModality,
    num_test: PerModality,
    seed: int,
    labels: Mapping[str, int] | None = None,
    label_maps: Mapping[str, Mapping[int, int]] | None = None,
    intensity_schemes: Mapping[str, str] | None = None,
    case_prefix: str | None = None,
    overwrite: bool = False,
    spacing_tolerance: float = 1e-3,
    origin_tolerance: float = 1e-2,
    direction_tolerance: float = 1e-3,
    num_processes: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Convert sources of one modality each into ``<output_root>/DatasetXXX_NAME`` (see module docstring).

    Args:
        sources: source folders; each immediate subfolder is one case.
        source_modalities: the modality of each source (same length as ``sources``); the order of first appearance
            fixes the modality order (the index in the network's banks).
        image_globs: glob(s) of the one image per case.
        label_globs: glob(s) of the label file, or None.
        output_root: the nnU-Net raw root (created if missing).
        dataset_id: 1..999.
        dataset_name: the NAME in ``DatasetXXX_NAME``.
        num_labeled: labelled training cases per modality (int count, float fraction in (0, 1] of the modality's
            labelled non-test cases, or None = all); one value for all modalities or a mapping (default None).
        num_test: held-out labelled test cases per modality (int count or float fraction in [0, 1) of the
            modality's labelled cases); one value or a mapping (default 0).
        seed: base seed of the per-modality shuffles.
        labels: ``dataset.json`` labels (default background=0, foreground=1), the shared label set.
        label_maps: ``{modality: {source value: target value}}``; targets must be declared labels.
        intensity_schemes: ``{modality: nnU-Net normalisation scheme}`` overriding the default (CT ->
            CTNormalization, else ZScoreNormalization).
        case_prefix: prefix of the case ids (default ``dataset_name``).
        overwrite: replace an existing ``DatasetXXX_NAME``.
        spacing_tolerance: absolute spacing tolerance (mm) between image and label of a case.
        origin_tolerance: absolute origin tolerance (mm).
        direction_tolerance: absolute tolerance on the direction cosines.
        num_processes: worker processes for writing (1 = in this process).
        progress: optional callback receiving one-line progress messages (also logged at INFO).

    Returns:
        The written dataset folder.

    Raises:
        ConversionError: any user-fixable problem (unknown modality name, unmapped label value, image and label on
            different grids, a source without cases, a modality without a labelled case, ...); nothing is left in
            ``output_root`` in that case.
    """

    def report(message: str) -> None:
        logger.info(message)
        if progress is not None:
            progress(message)

    # --- request checks -------------------------------------------------------------------------------------
    prefix, label_dict, tol = check_request(dataset_id, dataset_name, case_prefix, labels, num_processes,
                                            spacing_tolerance, origin_tolerance, direction_tolerance)
    if not sources:
        raise ConversionError("at least one source folder is needed")
    source_modalities = list(source_modalities)
    if len(source_modalities) != len(sources):
        raise ConversionError(f"{len(sources)} source folder(s) but {len(source_modalities)} source modalities "
                              f"{list(source_modalities)}; give one modality per source (--source-modality)")
    if any(not isinstance(m, str) for m in source_modalities):
        raise ConversionError(f"source modalities must be strings, got {list(source_modalities)}")
    modalities = list(dict.fromkeys(source_modalities))
    for modality in modalities:
        safe_name(modality, "modality name", "--source-modality")
        if "+" in modality:
            raise ConversionError(f"--source-modality: modality name {modality!r} contains '+', which joins the "
                                  f"modalities in the channel name ({channel_name_for(modalities)!r}). Use a name "
                                  f"without '+'.")
    safe_name(channel_name_for(modalities), "channel name (the modalities joined by '+')", "--source-modality")
    _unknown_names(intensity_schemes, modalities, "--intensity-scheme")
    try:
        make_layout(modalities, None, intensity_schemes)
    except ModalityLayoutError as error:
        raise ConversionError(f"{error} (--source-modality / --intensity-scheme MODALITY=SCHEME)") from None
    _unknown_names(label_maps, modalities, "--label-map")
    maps = {m: validate_label_map(m, lm, label_dict) for m, lm in (label_maps or {}).items()}
    labeled_per = _per_modality(num_labeled, modalities, "--num-labeled", None)
    test_per = _per_modality(num_test, modalities, "--num-test", 0)
    img_globs = _globs(image_globs, "image globs", required=True)
    lab_globs = _globs(label_globs, "label globs", required=False)
    target = output_target(output_root, dataset_id, dataset_name, overwrite)
    resolved = resolve_sources(sources)
    check_output_outside_sources(target.root, target.path, resolved)

    # --- discovery, split and checks (nothing written yet) --------------------------------------------------
    cases: list[SourceCase] = []
    for index, source in enumerate(resolved):
        cases.extend(discover_source_cases(index, source, [(source_modalities[index], img_globs)], lab_globs))
    case_modalities = [source_modalities[c.source_index] for c in cases]
    split, per_modality = split_by_modality(cases, case_modalities, modalities, labeled_per, test_per, seed)
    case_ids = make_case_ids(len(cases), prefix)
    counts_per_modality = {m: {g: len(per_modality[m][g]) for g in GROUP_FOLDERS} for m in modalities}
    report(f"found {len(cases)} cases ({sum(c.label_file is not None for c in cases)} with label) in "
           f"{len(sources)} source(s); split per modality: "
           + "; ".join(f"{m} {c['labeled']} labelled, {c['unlabeled']} unlabelled, {c['test']} test"
                       for m, c in counts_per_modality.items()))
    headers = [check_case_geometry(case, tol) for case in cases]  # headers only: cheap checks first
    check_same_dimension(cases, headers)
    check_duplicate_cases(cases)
    for case, modality in zip(cases, case_modalities, strict=True):
        if case.label_file is not None:
            if modality in maps:
                check_mapped_label(case, modality, maps[modality], label_dict)
            else:
                check_label(case, label_dict, modality)
    report("all cases checked: image and label on one grid, no case twice, labels valid"
           + (" and mapped" if maps else ""))

    # --- records ----------------------------------------------------------------------------------------------
    layout = make_layout(modalities, dict(zip(case_ids, case_modalities, strict=True)), intensity_schemes)
    group_of = {i: g for g, idx in split.items() for i in idx}
    records: dict[str, list[dict]] = {g: [] for g in GROUP_FOLDERS}
    for i, case in enumerate(cases):
        group = group_of[i]
        record = case_record(case, case_ids[i], [case_modalities[i]], label_copied=group != "unlabeled")
        record["modality"] = case_modalities[i]
        records[group].append(record)
    num_labels_dropped = sum(1 for r in records["unlabeled"] if r["label"] is not None)
    mmssl = {
        "converter": "nnunet_mmssl.dataset_conversion.convert_unregistered",
        "sources": [str(c) for c in dict.fromkeys(case.source for case in cases)],
        "source_modality": list(source_modalities),
        "image_globs": img_globs,
        "label_globs": lab_globs,
        "seed": int(seed),
        "num_labeled_requested": {m: _plain(v) for m, v in labeled_per.items()},
        "num_test_requested": {m: _plain(v) for m, v in test_per.items()},
        "case_prefix": prefix,
        "tolerances": tolerance_record(tol),
        "label_maps": {m: {str(k): int(v) for k, v in (label_maps or {})[m].items()} for m in maps},
        **layout.to_block(),
        "counts": {"labeled": len(records["labeled"]), "unlabeled": len(records["unlabeled"]),
                   "test": len(records["test"]), "unlabeled_with_label_not_copied": num_labels_dropped},
        "counts_per_modality": counts_per_modality,
        "split": records,
    }
    dataset_json = make_dataset_json([channel_name_for(modalities)], label_dict, records, dataset_name, mmssl)

    # --- writing into a temporary sibling, then rename -----------------------------------------------------------
    return write_dataset(target, cases, case_ids, split, {"dataset.json": dataset_json, SPLIT_FILE_NAME: mmssl},
                         num_processes, report, write_case=_write_case,
                         label_maps=[maps.get(m) for m in case_modalities], case_modalities=case_modalities)

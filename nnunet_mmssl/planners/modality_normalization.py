"""Per-case normalisation by modality for unregistered datasets (one channel, a modality per case).

nnU-Net normalises per *channel*: one scheme and one intensity fingerprint for every case. An unregistered dataset
mixes modalities in its single channel, so here

* :func:`modality_intensity_properties` computes, for every modality whose scheme needs one (nnU-Net's
  ``CTNormalization``), nnU-Net's foreground intensity fingerprint over **that modality's labelled cases only**
  (nnU-Net's own ``DatasetFingerprintExtractor.analyze_case`` and aggregation);
* :func:`plans_for_modality` returns plans in which the channel's scheme and intensity properties are those of one
  modality -- what nnU-Net's ``DefaultPreprocessor`` (training, unlabelled data) and predictor (``--modality``)
  then apply unchanged;
* :class:`ModalityPreprocessor` is nnU-Net's ``DefaultPreprocessor`` picking those plans per case and recording the
  modality in the case's properties (``mmssl_modality``);
* :func:`stratified_splits` makes cross-validation folds with every modality in every fold's validation set.

The plans' ``mmssl`` block of such a dataset gains (:func:`unregistered_plans_block`)::

    "layout": "unregistered", "modalities": ["CT", "MR"],
    "intensity_schemes": {"CT": "CTNormalization", "MR": "ZScoreNormalization"},
    "modality_intensity_properties": {"CT": {"mean": ..., "percentile_00_5": ...}, "MR": {...}}

nnU-Net's planning (spacing, patch, network) still uses its fingerprint of all labelled cases.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import shutil
from collections.abc import Mapping, Sequence

import numpy as np

from nnunet_mmssl.dataset_conversion.modality_layout import ModalityLayout, ModalityLayoutError

#: key of the preprocessed case properties (``<case>.pkl``) holding the case's modality name
MODALITY_PROPERTY = "mmssl_modality"
#: schemes whose normaliser reads the intensity fingerprint
SCHEMES_WITH_FINGERPRINT = ("CTNormalization",)


def _aggregate(intensities: np.ndarray) -> dict:
    """nnU-Net's foreground intensity statistics (fingerprint_extractor.run) of one channel's sampled voxels."""
    p005, median, p995 = np.percentile(intensities, (0.5, 50.0, 99.5))
    return {"mean": float(np.mean(intensities)), "median": float(median), "std": float(np.std(intensities)),
            "min": float(np.min(intensities)), "max": float(np.max(intensities)),
            "percentile_99_5": float(p995), "percentile_00_5": float(p005)}


def _analyze(image_files: list[str], label_file: str, reader_writer_class, num_samples: int):
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    return DatasetFingerprintExtractor.analyze_case(image_files, label_file, reader_writer_class, num_samples)[2][0]


def modality_intensity_properties(raw_folder: str, dataset_json: Mapping, layout: ModalityLayout,
                                  global_properties: Mapping, num_processes: int = 2,
                                  num_voxels: float = 10e7) -> dict[str, dict]:
    """Intensity fingerprint per modality: nnU-Net's, over the modality's labelled cases, for schemes that use it.

    Args:
        raw_folder: ``<nnUNet_raw>/DatasetXXX_NAME``.
        dataset_json: its dataset.json.
        layout: the dataset's modality layout.
        global_properties: nnU-Net's fingerprint of channel 0 over all labelled cases (kept for modalities whose
            scheme ignores it, so every modality has a complete entry).
        num_processes: worker processes.
        num_voxels: foreground voxels sampled in total per modality (nnU-Net's 10e7).

    Raises:
        ModalityLayoutError: a modality whose scheme needs a fingerprint has no labelled case.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset = get_filenames_of_train_images_and_targets(raw_folder, dict(dataset_json))
    result = {}
    for modality in layout.modalities:
        scheme = layout.intensity_schemes[modality]
        if scheme not in SCHEMES_WITH_FINGERPRINT:
            result[modality] = {**dict(global_properties), "source": "all labelled cases (unused by " + scheme + ")"}
            continue
        cases = layout.cases_of(modality, sorted(dataset))
        if not cases:
            raise ModalityLayoutError(f"Modality {modality!r} uses {scheme}, which needs the intensities of its "
                                      f"labelled cases, but imagesTr has none of that modality.")
        rw = determine_reader_writer_from_dataset_json(dict(dataset_json), dataset[cases[0]]["images"][0])
        jobs = [(dataset[c]["images"], dataset[c]["label"], rw, int(num_voxels // len(cases))) for c in cases]
        if num_processes <= 1:
            samples = [_analyze(*job) for job in jobs]
        else:
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
                samples = pool.starmap(_analyze, jobs)
        result[modality] = {**_aggregate(np.concatenate(samples)), "source": f"{len(cases)} labelled {modality} cases"}
    return result


def unregistered_plans_block(layout: ModalityLayout, intensity_properties: Mapping[str, Mapping]) -> dict:
    """The keys an unregistered dataset adds to the plans' ``mmssl`` block (no per-case entries)."""
    block = layout.to_block()
    block.pop("case_modality")
    block["modality_intensity_properties"] = {m: dict(intensity_properties[m]) for m in layout.modalities}
    return block


def plans_for_modality(plans: Mapping, modality: str) -> dict:
    """Deep copy of ``plans`` in which channel 0 is normalised as ``modality`` in every configuration.

    Raises:
        ModalityLayoutError: the plans are not of an unregistered dataset, or ``modality`` is unknown (lists them).
    """
    block = plans.get("mmssl") or {}
    modalities = list(block.get("modalities") or [])
    if block.get("layout") != "unregistered" or not modalities:
        raise ModalityLayoutError("These plans are not of an unregistered dataset (no mmssl.layout 'unregistered'); "
                                  "--modality applies only to models trained on one.")
    if modality not in modalities:
        raise ModalityLayoutError(f"Unknown modality {modality!r}: the model was trained on {modalities}.")
    new = copy.deepcopy(dict(plans))
    properties = {k: v for k, v in block["modality_intensity_properties"][modality].items() if k != "source"}
    new["foreground_intensity_properties_per_channel"] = {"0": properties}
    for configuration in new["configurations"].values():
        if "normalization_schemes" in configuration:  # configurations inheriting another have none of their own
            configuration["normalization_schemes"] = [block["intensity_schemes"][modality]]
    return new


def _default_preprocessor_class():
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    return DefaultPreprocessor


class ModalityPreprocessor(_default_preprocessor_class()):
    """nnU-Net's DefaultPreprocessor normalising each case by its modality (see module docstring).

    Args:
        case_modality: case id -> modality name.
        verbose: as nnU-Net's.
    """

    def __init__(self, case_modality: Mapping[str, str], verbose: bool = False):
        super().__init__(verbose=verbose)
        self.case_modality = dict(case_modality)
        self._modality = None

    def run_case(self, image_files, seg_file, plans_manager, configuration_manager, dataset_json):
        data, seg, properties = super().run_case(image_files, seg_file, plans_manager, configuration_manager,
                                                 dataset_json)
        if self._modality is not None:
            properties[MODALITY_PROPERTY] = self._modality
        return data, seg, properties

    def run_case_save(self, output_filename_truncated, image_files, seg_file, plans_manager, configuration_manager,
                      dataset_json):
        from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

        case = os.path.basename(output_filename_truncated)
        if case not in self.case_modality:
            raise ModalityLayoutError(f"Case {case!r} has no modality in dataset.json's mmssl.case_modality; add it "
                                      f"or reconvert with nnUNetv2_mmssl_convert --source-modality.")
        self._modality = self.case_modality[case]
        plans = plans_for_modality(plans_manager.plans, self._modality)
        configuration = copy.deepcopy(configuration_manager.configuration)
        configuration["normalization_schemes"] = [plans["mmssl"]["intensity_schemes"][self._modality]]
        try:
            super().run_case_save(output_filename_truncated, image_files, seg_file, PlansManager(plans),
                                  ConfigurationManager(configuration), dataset_json)
        finally:
            self._modality = None


def preprocess_labelled(dataset_id: int, plans_identifier: str, configurations: Sequence[str],
                        case_modality: Mapping[str, str], num_processes: int = 2) -> None:
    """nnU-Net's ``preprocess_dataset`` with :class:`ModalityPreprocessor` (per-case modality normalisation)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, maybe_mkdir_p
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_name = convert_id_to_dataset_name(dataset_id)
    for configuration in configurations:
        preprocessor = ModalityPreprocessor(case_modality)
        preprocessor.show_progress_bar = False
        preprocessor.run(dataset_id, configuration, plans_identifier, num_processes=num_processes)
    gt_folder = os.path.join(nnUNet_preprocessed, dataset_name, "gt_segmentations")
    maybe_mkdir_p(gt_folder)
    dataset_json = load_json(os.path.join(nnUNet_raw, dataset_name, "dataset.json"))
    dataset = get_filenames_of_train_images_and_targets(os.path.join(nnUNet_raw, dataset_name), dataset_json)
    for case, entry in dataset.items():
        shutil.copyfile(entry["label"], os.path.join(gt_folder, case + dataset_json["file_ending"]))


def stratified_splits(case_modality: Mapping[str, str], case_ids: Sequence[str], n_splits: int = 5,
                      seed: int = 12345) -> list[dict[str, list[str]]]:
    """Cross-validation folds stratified by modality: every fold validates on every modality it can.

    Each modality's cases are shuffled (``RandomState(seed)``) and dealt to the folds in turn, so each fold's
    validation set holds about ``1/n_splits`` of every modality (a modality with fewer cases than folds is missing
    from some folds' validation sets, never from their training sets unless it has a single case).

    Returns:
        nnU-Net's ``splits_final.json`` content: ``[{"train": [...], "val": [...]}, ...]``.
    """
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    folds: list[list[str]] = [[] for _ in range(n_splits)]
    rng = np.random.RandomState(seed)
    start = 0
    for modality in sorted(set(case_modality[c] for c in case_ids)):
        cases = sorted(c for c in case_ids if case_modality[c] == modality)
        order = rng.permutation(len(cases))
        for i, j in enumerate(order):
            folds[(start + i) % n_splits].append(cases[j])
        start += len(cases)
    return [{"train": sorted(c for c in case_ids if c not in set(val)), "val": sorted(val)} for val in folds]

"""The study's self-training arm (``nnUNetv2_mmssl_study --selftrain T``): nnU-Net's recipe inside one study run.

For a run (size, seed[, test fold]) the teacher is trainer ``T``'s from-scratch model of that run (same fold, its
``checkpoint_final.pth``). It predicts the run's unlabelled stream -- exactly the cases the SSL trainers of that run
may read (:attr:`~nnunet_mmssl.study.splits.RunSplit.unlabeled`; never a test case) -- and the student, ``T`` again,
trains from scratch on the run's labelled cases plus these pseudo-labelled cases, with the same budget as every other
run and nnU-Net's augmentation as the noise (noisy student; ``nnUNetv2_mmssl_selftrain`` is the stand-alone command).

What differs from ``nnUNetv2_mmssl_selftrain``, and why: the teacher predicts in nnU-Net's *preprocessed* space (the
study's unlabelled folder holds every unlabelled case already preprocessed with the shared plans), so no raw dataset
is derived and nothing is preprocessed again: nnU-Net's sliding window (no mirroring, as the study predicts) on the
preprocessed image gives the probabilities on the preprocessed grid, which the student reads. The pseudo-label is
nnU-Net's own label export of those probabilities (``convert_probabilities_to_segmentation``; with regions, the label
map from ``regions_class_order``) with every voxel whose normalised entropy is above the threshold set to nnU-Net's
ignore label (:func:`~nnunet_mmssl.semisup.ignore_label.mask_uncertain`, default threshold
:data:`~nnunet_mmssl.semisup.ignore_label.DEFAULT_THRESHOLD`), and ``-1`` outside the case's nonzero region as nnU-Net's
preprocessing writes there.

The run's data folder ``<study>/selftrain/<T>/fold_<fold>`` holds links to the labelled cases' preprocessed files,
the pseudo-labelled cases (image + pseudo-label, nnU-Net's file format); its manifest is the sibling file
``fold_<fold>.selftrain.json`` (:func:`manifest_path`: teacher, threshold, cases, ignored share). Every case's
``class_locations`` are recomputed as nnU-Net's preprocessor does when the dataset has an ignore label (including the
annotated-voxel key its data loader samples from). The student (:func:`selftrain_student_class`) reads that folder,
adds the ignore label to its ``dataset.json`` (so nnU-Net's losses skip those voxels) and trains on its fold's
labelled cases plus the pseudo-labelled ones (validation: the labelled cases, as every study run).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import numpy as np

#: the manifest of a self-training run's data folder ``fold_<f>`` is its sibling ``fold_<f>`` + this suffix (not inside:
#: nnU-Net infers the dataset class from the file endings in the folder and refuses a folder with two)
MANIFEST_SUFFIX = ".selftrain.json"
#: class-name suffix of the self-trained student: ``<trainer>__study_st``
SELFTRAIN_SUFFIX = "_st"
#: how results and tables name the self-trained student: ``<trainer>+st``
SELFTRAIN_LABEL = "+st"


def data_folder(root: str, fold: int | str) -> str:
    """The self-training data folder of ``fold`` under ``root`` (``<study>/selftrain/<trainer>``)."""
    return os.path.join(root, f"fold_{fold}")


def manifest_path(folder: str) -> str:
    """The manifest of the data folder ``folder`` (:data:`MANIFEST_SUFFIX`)."""
    return os.path.normpath(folder) + MANIFEST_SUFFIX


def read_manifest(folder: str) -> dict | None:
    """The manifest of a self-training data folder, or None when there is none (or no folder)."""
    path = manifest_path(folder)
    if not os.path.isfile(path) or not os.path.isdir(folder):
        return None
    with open(path) as handle:
        return json.load(handle)


def class_locations(seg: np.ndarray, label_manager) -> dict:
    """``class_locations`` of a preprocessed label map as nnU-Net's ``DefaultPreprocessor`` computes them for a
    dataset with ``label_manager`` (with an ignore label: also the annotated voxels' key ``(-1, *all_labels)`` that
    nnU-Net's data loader samples from)."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    wanted = list(label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels)
    if label_manager.has_ignore_label:
        wanted.append([-1] + label_manager.all_labels)
    return DefaultPreprocessor._sample_foreground_locations(seg, wanted)


def pseudo_label(probabilities: np.ndarray, label_manager, threshold: float, ignore_label: int,
                 outside: np.ndarray | None = None) -> np.ndarray:
    """The teacher's ignore-masked pseudo-label on the preprocessed grid.

    Args:
        probabilities: (C, *S) the teacher's softmax (or sigmoid, with regions) probabilities.
        label_manager: the teacher's nnU-Net label manager (no ignore label).
        threshold: voxels whose normalised entropy is above it get ``ignore_label``.
        ignore_label: nnU-Net's ignore label of the student's ``dataset.json``.
        outside: (*S) bool, voxels outside the case's nonzero region (``-1`` there, as nnU-Net's preprocessing).

    Returns:
        (1, *S) int16 label map.
    """
    from nnunet_mmssl.semisup.ignore_label import mask_uncertain, normalised_entropy
    from nnunet_mmssl.semisup.uncertainty import predictive_entropy

    probabilities = np.asarray(probabilities, dtype=np.float32)
    sigmoid = bool(label_manager.has_regions)
    segmentation = np.asarray(label_manager.convert_probabilities_to_segmentation(probabilities))
    entropy = normalised_entropy(predictive_entropy(probabilities, sigmoid), probabilities.shape[0], sigmoid)
    out = mask_uncertain(segmentation, entropy, threshold, ignore_label).astype(np.int16)
    if outside is not None:
        out[np.asarray(outside, dtype=bool)] = -1
    return out[None]


def build_data_folder(final: str, teacher_fold_folder: str, labelled: Sequence[str], pseudo: Sequence[str],
                      preprocessed_folder: str, unlabeled_folder: str, threshold: float, device: str = "cpu",
                      progress=print) -> dict:
    """Write the self-training data folder of one run (see the module docstring); return its manifest.

    Nothing is done when ``final`` already holds a manifest of the same teacher, cases and threshold. Built under a
    temporary name and renamed when complete.

    Args:
        final: the folder to write.
        teacher_fold_folder: the teacher's ``fold_<f>`` folder (its model folder's ``plans.json`` and
            ``dataset.json`` are read; its ``checkpoint_final.pth`` is checked by :mod:`nnunet_mmssl.safe_load`
            before nnU-Net's predictor opens it).
        labelled: the run's labelled cases (linked from ``preprocessed_folder``).
        pseudo: the run's unlabelled cases (read from ``unlabeled_folder``, pseudo-labelled).
        preprocessed_folder: nnU-Net's preprocessed data folder of the configuration.
        unlabeled_folder: the study's preprocessed unlabelled folder.
        threshold: normalised-entropy threshold in [0, 1].
        device: torch device of the teacher's prediction.

    Raises:
        ValueError: a threshold outside [0, 1], a case found in neither folder, or no teacher checkpoint.
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import write_pickle
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import (
        comp_blosc2_params,
        infer_dataset_class,
        nnUNetDatasetBlosc2,
    )

    from nnunet_mmssl.dataloading.unlabeled_loader import open_unlabeled_dataset
    from nnunet_mmssl.io_checks import publish_folder, write_json
    from nnunet_mmssl.safe_load import check_checkpoint, check_plans_networks, read_model_json
    from nnunet_mmssl.semisup.ignore_label import ignore_label_value, with_ignore_label

    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"--selftrain-threshold {threshold}: the normalised entropy is in [0, 1]; use a value in "
                         f"[0, 1] (1 ignores nothing)")
    checkpoint = os.path.join(teacher_fold_folder, "checkpoint_final.pth")
    if not os.path.isfile(checkpoint):
        raise ValueError(f"{checkpoint} not found: the self-trained student needs its teacher's final model of the "
                         f"same run; train the teacher first (the study does it before the student)")
    wanted = {"teacher": os.path.abspath(teacher_fold_folder), "threshold": float(threshold),
              "labelled_cases": sorted(labelled), "pseudo_labelled_cases": sorted(pseudo)}
    old = read_manifest(final)
    if old is not None and all(old.get(k) == v for k, v in wanted.items()):
        return old

    model_folder = os.path.dirname(os.path.abspath(teacher_fold_folder))
    dataset_json = read_model_json(model_folder, "dataset.json")
    check_plans_networks(read_model_json(model_folder, "plans.json"), os.path.join(model_folder, "plans.json"))
    check_checkpoint(checkpoint)  # nnU-Net's predictor opens it with weights_only=False
    fold = os.path.basename(os.path.normpath(teacher_fold_folder)).removeprefix("fold_")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device != "cpu", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, (int(fold) if fold.isdigit() else fold,),
                                                   "checkpoint_final.pth")
    teacher_labels = predictor.label_manager
    ignore = ignore_label_value(dataset_json["labels"])
    student_labels = predictor.plans_manager.get_label_manager(
        {**dataset_json, "labels": with_ignore_label(dataset_json["labels"])})
    patch = tuple(predictor.configuration_manager.patch_size)

    labelled_dataset = infer_dataset_class(preprocessed_folder)(preprocessed_folder, list(labelled))
    unlabelled_dataset = open_unlabeled_dataset(unlabeled_folder)
    missing = sorted(set(pseudo) - set(unlabelled_dataset.identifiers))
    if missing:
        raise ValueError(f"{unlabeled_folder} lacks the unlabelled case(s) {missing[:5]}; rerun nnUNetv2_mmssl_study "
                         f"(it rebuilds the folder)")
    writer = infer_dataset_class(unlabeled_folder)

    def fill(tmp: str) -> dict:
        rows = {}
        for case in labelled:
            _, seg, _, properties = labelled_dataset.load_case(case)
            for name in os.listdir(preprocessed_folder):
                if name.startswith(case + ".") or name.startswith(case + "_seg."):
                    if not name.endswith(".pkl"):
                        os.symlink(os.path.abspath(os.path.join(preprocessed_folder, name)), os.path.join(tmp, name))
            properties = dict(properties, class_locations=class_locations(np.asarray(seg), student_labels))
            write_pickle(properties, os.path.join(tmp, case + ".pkl"))  # as nnU-Net's save_case writes it
        for k, case in enumerate(sorted(pseudo)):
            progress(f"    self-training: teacher predicts {case} ({k + 1}/{len(pseudo)})")
            data, seg, _, properties = unlabelled_dataset.load_case(case)
            data = np.asarray(data, dtype=np.float32)
            with torch.no_grad():
                logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(data))
            probabilities = teacher_labels.apply_inference_nonlin(logits.float().cpu()).numpy()
            label = pseudo_label(probabilities, teacher_labels, threshold, ignore, np.asarray(seg)[0] < 0)
            inside = label[0] >= 0
            rows[case] = {"ignored_fraction": float((label[0] == ignore).sum() / max(1, inside.sum())),
                          "foreground_fraction": float(((label[0] > 0) & (label[0] != ignore)).sum()
                                                       / max(1, inside.sum()))}
            properties = dict(properties, class_locations=class_locations(label, student_labels))
            if writer is nnUNetDatasetBlosc2:
                blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
                blocks_seg, chunks_seg = comp_blosc2_params(label.shape, patch, label.itemsize)
                writer.save_case(data, label, properties, os.path.join(tmp, case), chunks=chunks, blocks=blocks,
                                 chunks_seg=chunks_seg, blocks_seg=blocks_seg)
            else:
                writer.save_case(data, label, properties, os.path.join(tmp, case))
        return dict(wanted, ignore_label=int(ignore), pseudo_labels=rows,
                    mean_ignored_fraction=float(np.mean([r["ignored_fraction"] for r in rows.values()]))
                    if rows else 0.0)

    parent, name = os.path.split(os.path.abspath(final))
    tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        manifest = fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(manifest_path(final)):
        os.remove(manifest_path(final))  # a folder without its manifest is rebuilt, never taken for another's
    publish_folder(tmp, final)
    write_json(manifest, manifest_path(final), indent=1)  # written under a temporary name, read back, renamed
    return manifest


def selftrain_student_class(base: type, root: str) -> type:
    """``base`` (a generated study trainer, ``<trainer>__study_st``; its name is kept) as the self-trained
    student: reads ``data_folder(root, fold)``, has nnU-Net's ignore label in its ``dataset.json`` and trains on its
    fold's labelled cases plus the folder's pseudo-labelled ones (its manifest, :func:`manifest_path`)."""
    selftrain_root = root

    class Student(base):
        study_selftrain_root = selftrain_root

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device=None):
            from nnunet_mmssl.semisup.ignore_label import with_ignore_label

            folder = data_folder(self.study_selftrain_root, fold)
            manifest = read_manifest(folder)
            if manifest is None:
                raise ValueError(f"{type(self).__name__}: {manifest_path(folder)} not found; self-trained "
                                 f"students are trained by nnUNetv2_mmssl_study --selftrain (it writes their "
                                 f"pseudo-labelled cases first)")
            dataset_json = {**dataset_json, "labels": with_ignore_label(dataset_json["labels"])}
            kwargs = {} if device is None else {"device": device}
            super().__init__(plans, configuration, fold, dataset_json, **kwargs)
            self.preprocessed_dataset_folder = folder
            self.study_pseudo_labelled = list(manifest["pseudo_labelled_cases"])

        def do_split(self):
            train, validation = super().do_split()
            self.print_to_log_file(f"self-training: {len(train)} labelled + {len(self.study_pseudo_labelled)} "
                                   f"pseudo-labelled training cases from {self.preprocessed_dataset_folder}")
            return list(train) + [c for c in self.study_pseudo_labelled if c not in train], validation

    Student.__name__ = Student.__qualname__ = base.__name__
    Student.__module__ = base.__module__
    return Student

"""Pseudo-labels: predicted labels, uncertainty maps and an annotation ranking for unlabelled cases.

For a trained model folder (any trainer of ours or nnU-Net's own) and a folder of unlabelled cases (default: the
dataset's ``imagesUnlabeled`` in ``nnUNet_raw``), nnU-Net's ``nnUNetPredictor`` predicts every case and exports its
probabilities on the case's original grid; this command writes::

    OUT/labels/CASE.nii.gz                    nnU-Net's segmentation files (review, correct, move to labelsTr)
    OUT/uncertainty/CASE_entropy.nii.gz       per-voxel entropy (float32, nats, same grid as the images)
    OUT/uncertainty/CASE_disagreement.nii.gz  multi-head models of ours: disagreement of the heads
    OUT/ranking.csv                           cases ordered by uncertainty: annotate rank 1 first
    OUT/README.txt, OUT/pseudolabel.json      the layout, the definitions, how to move a case, the settings

Definitions are in :mod:`nnunet_mmssl.semisup.uncertainty`. The entropy is that of the probabilities nnU-Net exports
(the labels are their argmax): nnU-Net averages the logits of folds and mirrorings, our multi-branch networks the
logits of their heads. Region (sigmoid) models get the mean binary entropy over regions. The disagreement needs one
extra prediction per head (the command runs nnU-Net's prediction K + 1 times; ``--no-disagreement`` skips it).

:func:`pseudolabel` is the whole pipeline for a library user; ``nnUNetv2_mmssl_pseudolabel``
(:mod:`nnunet_mmssl.cli.pseudolabel`) is a thin shell around it (arguments, the model folder from ``-d``/``-c``,
one-line errors).
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import time

from nnunet_mmssl.dataloading.image_checks import check_image_files
from nnunet_mmssl.io_checks import (
    public_path,
    publish_folder,
    short_writes_reported,
    verify_image_file,
    write_image,
    write_json,
    write_nibabel,
    write_text,
)
from nnunet_mmssl.option_checks import check_finite_number, check_output_folder, check_step_size

#: the name messages start with (the console script's)
PROG = "nnUNetv2_mmssl_pseudolabel"
ENTROPY_SUFFIX = "_entropy.nii.gz"
DISAGREEMENT_SUFFIX = "_disagreement.nii.gz"


class UserError(ValueError):
    """An error the user can fix; the message names the file or value and the fix."""


def list_cases(folder: str, file_ending: str, num_channels: int) -> dict[str, list[str]]:
    """Cases of an nnU-Net image folder: ``{case_id: [CASE_0000.ext, ...]}`` (sorted, full paths).

    Raises:
        UserError: missing folder, no cases, or a case without exactly channels ``0000 .. num_channels - 1``.
    """
    if not os.path.isdir(folder):
        raise UserError(f"input folder {folder} does not exist; give the folder of unlabelled cases with -i")
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))
    cases: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        match = pattern.fullmatch(name)
        if match:
            cases.setdefault(match.group(1), {})[int(match.group(2))] = os.path.join(folder, name)
    if not cases:
        raise UserError(f"no images named CASE_0000{file_ending} in {folder}; put the unlabelled cases there in "
                        f"nnU-Net's naming (one file per channel) or point -i at them")
    expected = list(range(num_channels))
    for case, channels in cases.items():
        if sorted(channels) != expected:
            raise UserError(f"case {case} in {folder} has channels {sorted(channels)}, the model needs "
                            f"{expected} ({file_ending}); add the missing files or remove the case")
    return {case: [channels[c] for c in expected] for case, channels in cases.items()}


def write_float_map(array, path: str, properties: dict) -> None:
    """Write a float map on the grid of the image nnU-Net read (``properties`` of its reader), as NIfTI.

    Args:
        array: (*S) map in the axis order of nnU-Net's reader (the order of its exported probabilities).
        path: output file (``.nii.gz``).
        properties: the reader's properties (saved by nnU-Net beside the probabilities as CASE.pkl).

    Raises:
        UserError: for a reader whose geometry we cannot write (not SimpleITK or nibabel based).
    """
    import numpy as np

    array = np.asarray(array, dtype=np.float32)
    if "sitk_stuff" in properties:
        import SimpleITK as sitk

        geometry = properties["sitk_stuff"]
        if len(geometry["spacing"]) == 2:
            array = array[0]
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(geometry["spacing"])
        image.SetOrigin(geometry["origin"])
        image.SetDirection(geometry["direction"])
        if "original_orientation" in geometry:
            image = sitk.DICOMOrient(image, geometry["original_orientation"])
        write_image(image, path)
    elif "nibabel_stuff" in properties:
        import nibabel

        geometry = properties["nibabel_stuff"]
        data = array.transpose((2, 1, 0))
        if "reoriented_affine" in geometry:
            from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

            image = nibabel.Nifti1Image(data, affine=geometry["reoriented_affine"])
            image = image.as_reoriented(ornt_transform(axcodes2ornt("RAS"),
                                                       io_orientation(geometry["original_affine"])))
        else:
            image = nibabel.Nifti1Image(data, affine=geometry["original_affine"])
        write_nibabel(image, path)
    else:
        raise UserError(f"cannot write {path}: the dataset's image reader gives no SimpleITK or nibabel geometry "
                        f"(properties {sorted(properties)}); use a dataset read with SimpleITKIO or NibabelIO")


def _readme(model_folder: str, input_folder: str, multi_head: bool, sigmoid: bool, rank_by: str,
            margin_mm: float, uncertain_fraction: float, file_ending: str, raw_dataset: str) -> str:
    score_of = "head disagreement" if rank_by == "disagreement" else "entropy"
    entropy_text = ("mean over regions of the binary entropy h(p) = -p log p - (1-p) log(1-p) of each\n"
                    + " " * 36 + "region's sigmoid probability (no class distribution per voxel), in [0, log 2]"
                    if sigmoid else "H(p) = -sum_c p_c log p_c of the softmax probabilities, in [0, log C]")
    lines = [
        f"Pseudo-labels written by {PROG}",
        f"model: {model_folder}",
        f"cases: {input_folder}",
        "",
        "Layout",
        f"  labels/CASE{file_ending:<23}predicted segmentation (nnU-Net's export, dataset.json labels)",
        "  uncertainty/CASE_entropy.nii.gz   per-voxel uncertainty, float32, in nats, on the grid of the images:",
        f"                                    {entropy_text}.",
        "                                    The probabilities are those nnU-Net exports for the labels (mean logits",
        "                                    over folds, mirrorings and, for our multi-branch networks, heads).",
    ]
    if multi_head:
        lines += [
            "  uncertainty/CASE_disagreement.nii.gz",
            "                                    disagreement of the network's heads: the mean over heads k of",
            "                                    KL(p_k || p_mean), p_mean = mean of the heads' probabilities",
            "                                    (= H(p_mean) - mean_k H(p_k), the Jensen-Shannon divergence of the",
            "                                    heads; per region and averaged for region models), in nats.",
        ]
    lines += [
        "  ranking.csv                       one row per case, rank 1 = annotate first",
        "  pseudolabel.json                  settings of this run",
        "",
        "Ranking",
        f"  score = mean {score_of} over the ranking region: the predicted foreground, every voxel within",
        f"  {margin_mm:g} mm of it, and every voxel whose entropy is at least {uncertain_fraction:g} x its maximum",
        "  (where the model nearly predicted foreground); the whole-image mean when that region is empty.",
        "  image_mean_entropy (the mean over the whole image) is listed but not ranked by: it mostly measures how",
        "  much confidently predicted background the field of view holds.",
        "",
        "Using the labels",
        "  Open a case's images with labels/CASE and uncertainty/CASE_entropy as overlays, correct the label where",
        "  needed, then make it a labelled training case of the raw dataset:",
    ]
    raw = raw_dataset
    lines += [
        f"    mv labels/CASE{file_ending} {raw}/labelsTr/CASE{file_ending}",
        f"    mv {raw}/imagesUnlabeled/CASE_XXXX{file_ending} {raw}/imagesTr/    (every channel of the case)",
        "  update numTraining (and numUnlabeled) in dataset.json, and plan and preprocess again",
        "  (nnUNetv2_mmssl_plan_and_preprocess). An uncorrected prediction moved into labelsTr trains the model on",
        "  its own mistakes: review first.",
    ]
    return "\n".join(lines) + "\n"


def resolve_folds(model_folder: str, folds: list[str] | None, checkpoint: str) -> list[int | str]:
    if folds is None:
        found = sorted(int(d[5:]) for d in os.listdir(model_folder)
                       if re.fullmatch(r"fold_\d+", d) and os.path.isfile(os.path.join(model_folder, d, checkpoint)))
        if not found:
            raise UserError(f"no fold_X/{checkpoint} in {model_folder}; train a fold first, or choose folds with -f "
                            f"and the checkpoint with -chk")
        return found
    resolved: list[int | str] = []
    for fold in folds:
        if fold != "all" and not fold.isdigit():
            raise UserError(f"fold {fold!r} is not a number or 'all'")
        path = os.path.join(model_folder, f"fold_{fold}", checkpoint)
        if not os.path.isfile(path):
            raise UserError(f"checkpoint {path} does not exist; choose existing folds with -f or another -chk")
        resolved.append(fold if fold == "all" else int(fold))
    return resolved


def pseudolabel(model_folder: str, input_folder: str | None, output_folder: str, folds: list[str] | None = None,
                checkpoint: str = "checkpoint_final.pth", device: str = "cuda", margin_mm: float = 3.0,
                uncertain_fraction: float = 0.5, rank_by: str = "entropy", disagreement: bool = True,
                keep_probabilities: bool = False, overwrite: bool = False, step_size: float = 0.5,
                use_mirroring: bool = True, num_processes_preprocessing: int = 2,
                num_processes_export: int = 2) -> list[dict]:
    """Predict the unlabelled cases with nnU-Net and write labels, uncertainty maps and the ranking.

    Args: see ``nnUNetv2_mmssl_pseudolabel -h`` (the module docstring has the layout).

    Returns:
        The rows of ``ranking.csv`` (dicts), rank 1 first.

    Raises:
        UserError: a problem the user can fix (missing folder or checkpoint, channel count, existing output).
    """
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mmssl.safe_load import check_model_folder, weights_only_loads
    from nnunet_mmssl.semisup.uncertainty import (
        head_disagreement,
        max_entropy,
        predictive_entropy,
        rank_cases,
        ranking_score,
    )

    if num_processes_preprocessing < 0 or num_processes_export < 1:
        raise UserError(f"-npp must be >= 0 and -nps >= 1, got {num_processes_preprocessing} and "
                        f"{num_processes_export}")
    try:  # NaN would pass "< 0" and end up in pseudolabel.json (invalid JSON)
        check_finite_number(margin_mm, "--margin-mm", 0)
        check_finite_number(uncertain_fraction, "--uncertain-fraction")
        check_step_size(step_size)
    except ValueError as error:
        raise UserError(str(error)) from None
    if uncertain_fraction <= 0:
        raise UserError(f"--uncertain-fraction must be > 0, got {uncertain_fraction}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine; pass -device cpu")
    dataset_json = load_json(os.path.join(model_folder, "dataset.json"))
    plans = load_json(os.path.join(model_folder, "plans.json"))
    file_ending = dataset_json["file_ending"]
    raw_dataset = os.path.join("$nnUNet_raw", plans["dataset_name"])
    if input_folder is None:
        from nnunetv2 import paths

        if paths.nnUNet_raw is None:
            raise UserError("nnUNet_raw is not set, so the default input ($nnUNet_raw/<dataset>/imagesUnlabeled) is "
                            "unknown; set nnUNet_raw or give the folder with -i")
        raw_dataset = os.path.join(paths.nnUNet_raw, plans["dataset_name"])
        input_folder = os.path.join(raw_dataset, "imagesUnlabeled")
    try:
        check_output_folder(output_folder, [input_folder])
    except ValueError as error:
        raise UserError(str(error)) from None
    output_folder = os.path.abspath(output_folder)
    if os.path.exists(output_folder) and not overwrite:
        raise UserError(f"output folder {output_folder} exists; choose another -o or pass --overwrite")
    cases = list_cases(input_folder, file_ending, len(dataset_json["channel_names"]))
    # every input image read whole and checked (truncated files, non-image files, NaN/Inf) before predicting
    check_image_files([f for files in cases.values() for f in files], num_processes=max(1, num_processes_preprocessing))
    folds = resolve_folds(model_folder, folds, checkpoint)
    # plans network classes by name and every checkpoint weights-only, before nnU-Net opens them
    check_model_folder(model_folder, folds, checkpoint, names=False)

    label_manager = PlansManager(plans).get_label_manager(dataset_json)
    sigmoid = bool(label_manager.has_regions)

    parent, name = os.path.split(output_folder)
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    work = os.path.join(temporary, "_work")
    try:
        predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                    perform_everything_on_device=device == "cuda", device=torch.device(device),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        try:
            with weights_only_loads():
                predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint)
        except (RuntimeError, KeyError, FileNotFoundError) as error:
            raise UserError(f"cannot load the model in {model_folder} (folds {folds}, {checkpoint}): {error}; "
                            f"check that the trainer is importable (nnUNet_extTrainer) and the checkpoint "
                            f"complete") from error
        network = getattr(predictor.network, "_orig_mod", predictor.network)
        num_heads = len(network.modality_groups) if hasattr(network, "inference_heads") else 1
        with_disagreement = disagreement and num_heads > 1
        if rank_by == "disagreement" and not with_disagreement:
            raise UserError("--rank-by disagreement needs a multi-head model of ours and no --no-disagreement")

        case_ids = sorted(cases)
        runs = [("fused", None)] + ([(f"head_{k}", (k,)) for k in range(num_heads)] if with_disagreement else [])
        for run_name, heads in runs:
            if hasattr(network, "inference_heads"):
                network.inference_heads = heads
            print(f"{PROG}: predicting {len(case_ids)} case(s) with "
                  f"{'the model' if heads is None else f'head {heads[0]} only'} -> {run_name}")
            inputs = [cases[c] for c in case_ids]
            outputs = [os.path.join(work, run_name, c) for c in case_ids]
            os.makedirs(os.path.join(work, run_name))
            with short_writes_reported(output_folder, temporary):
                if num_processes_preprocessing == 0:
                    predictor.predict_from_files_sequential(inputs, outputs, save_probabilities=True, overwrite=True)
                else:
                    predictor.predict_from_files(inputs, outputs, save_probabilities=True, overwrite=True,
                                                 num_processes_preprocessing=num_processes_preprocessing,
                                                 num_processes_segmentation_export=num_processes_export)
        if hasattr(network, "inference_heads"):
            network.inference_heads = None

        rw = predictor.plans_manager.image_reader_writer_class()
        for sub in ("labels", "uncertainty") + (("probabilities",) if keep_probabilities else ()):
            os.makedirs(os.path.join(temporary, sub), exist_ok=True)
        scores: dict[str, dict] = {}
        for case in case_ids:
            fused = os.path.join(work, "fused", case)
            probabilities = np.load(fused + ".npz")["probabilities"]
            if not np.all(np.isfinite(probabilities)):
                raise UserError(f"the prediction of case {case} is not finite; check its images {cases[case]} for "
                                f"NaN/inf values")
            properties = load_pickle(fused + ".pkl")
            entropy = predictive_entropy(probabilities, sigmoid)
            segmentation, _ = rw.read_seg(fused + file_ending)
            foreground = segmentation[0] > 0
            if foreground.shape != entropy.shape:
                raise RuntimeError(f"case {case}: segmentation {foreground.shape} and probabilities "
                                   f"{entropy.shape} differ in shape")
            disagreement_map = None
            if with_disagreement:
                disagreement_map = head_disagreement(
                    [np.load(os.path.join(work, f"head_{k}", case) + ".npz")["probabilities"]
                     for k in range(num_heads)], sigmoid)
            threshold = uncertain_fraction * max_entropy(probabilities.shape[0], sigmoid)
            scores[case] = ranking_score(entropy, foreground, properties["spacing"], margin_mm, threshold,
                                         disagreement_map)
            write_float_map(entropy, os.path.join(temporary, "uncertainty", case + ENTROPY_SUFFIX), properties)
            if disagreement_map is not None:
                write_float_map(disagreement_map, os.path.join(temporary, "uncertainty", case + DISAGREEMENT_SUFFIX),
                                properties)
            label = os.path.join(temporary, "labels", case + file_ending)
            verify_image_file(fused + file_ending, shown=public_path(label))  # nnU-Net's export does not check
            os.replace(fused + file_ending, label)
            if keep_probabilities:
                for ext in (".npz", ".pkl"):
                    os.replace(fused + ext, os.path.join(temporary, "probabilities", case + ext))

        key = "disagreement_score" if rank_by == "disagreement" else "score"
        rows = []
        for rank, case in rank_cases(scores, key):
            row = {"rank": rank, "case": case, "score": scores[case][key]}
            row.update({k: v for k, v in scores[case].items() if k not in ("score", "disagreement_score")})
            row["label"] = f"labels/{case}{file_ending}"
            row["entropy_map"] = f"uncertainty/{case}{ENTROPY_SUFFIX}"
            if with_disagreement:
                row["disagreement_map"] = f"uncertainty/{case}{DISAGREEMENT_SUFFIX}"
            rows.append(row)
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        write_text(table.getvalue(), os.path.join(temporary, "ranking.csv"))
        write_text(_readme(model_folder, input_folder, with_disagreement, sigmoid, rank_by, margin_mm,
                           uncertain_fraction, file_ending, raw_dataset), os.path.join(temporary, "README.txt"))
        write_json({"model_folder": os.path.abspath(model_folder), "input_folder": os.path.abspath(input_folder),
                   "folds": folds, "checkpoint": checkpoint, "num_heads": num_heads, "sigmoid_regions": sigmoid,
                   "rank_by": rank_by, "margin_mm": margin_mm, "uncertain_fraction": uncertain_fraction,
                   "use_mirroring": use_mirroring, "step_size": step_size,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                   os.path.join(temporary, "pseudolabel.json"))
        shutil.rmtree(work)
        publish_folder(temporary, output_folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return rows

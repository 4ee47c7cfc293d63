"""``nnUNetv2_mmssl_evaluate_missing``: predict and score every non-empty subset of a model's modalities.

Example::

    nnUNetv2_mmssl_evaluate_missing -i $nnUNet_raw/Dataset502_BraTS/imagesTs \\
        -ref $nnUNet_raw/Dataset502_BraTS/labelsTs -o eval_missing -d 502 -c 3d_fullres -tr SMMLTrainer -f 0

For K channels the ``2^K - 1`` subsets are predicted with the other channels missing (as ``nnUNetv2_mmssl_predict
--missing``: 0 after normalisation for every network, SMML also masks their encoders), scored per label or region
(default: the model's ``dataset.json`` labels, or its regions for a region dataset), and reported in the layout of
SMML's Table 1 (text table, JSON, heat map). A rerun skips the subsets already complete. See
:mod:`nnunet_mmssl.evaluation.missing_modalities` for the output folder.
"""

from __future__ import annotations

import argparse
import os
import sys

from nnunet_mmssl.cli._common import add_model_arguments, add_verbose, run_cli

PROG = "nnUNetv2_mmssl_evaluate_missing"


def _region(text: str) -> tuple[str | None, list[int]]:
    from nnunet_mmssl.cli.evaluate import _region as parse

    return parse(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", required=True, help="labelled test images (nnU-Net naming CASE_XXXX.ext, all channels)")
    parser.add_argument("-ref", required=True, help="their reference segmentations (CASE.ext)")
    parser.add_argument("-o", required=True, help="output folder (predictions, scores, table, heat map)")
    add_model_arguments(parser)
    parser.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("-l", "--labels", type=int, nargs="+", help="labels scored one by one (default: dataset.json)")
    what.add_argument("-r", "--regions", type=_region, nargs="+",
                      help="regions scored as the union of their labels, e.g. -r WT=1,2,3 TC=2,3 ET=3 (default: the "
                           "regions of a region dataset's dataset.json)")
    parser.add_argument("-step_size", type=float, default=0.5)
    parser.add_argument("--disable_tta", action="store_true")
    parser.add_argument("-npp", type=int, default=2,
                        help="preprocessing processes (0: preprocess and export in this process)")
    parser.add_argument("-nps", type=int, default=2, help="export processes")
    parser.add_argument("-np", "--num-processes", type=int, default=1, help="scoring processes (default 1)")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    parser.add_argument("--overwrite", action="store_true",
                        help="discard the results of another run in -o (default: refuse, and resume a run with the "
                             "same settings)")
    return add_verbose(parser)


def definitions_from_dataset_json(dataset_json: dict) -> tuple[dict | None, dict | None]:
    """``(labels, regions)`` to score from a model's ``dataset.json``: its regions for a region dataset, else its
    labels (background and ``ignore`` left out)."""
    labels, regions = {}, {}
    for name, value in dataset_json["labels"].items():
        if name in ("background", "ignore"):
            continue
        if isinstance(value, list | tuple):
            regions[name] = [int(v) for v in value]
        else:
            labels[name] = int(value)
    if regions:
        regions.update({name: [value] for name, value in labels.items()})
        return None, regions
    return labels or None, None


def _check_labels(images: dict[str, list[str]], labels_folder: str, file_ending: str) -> None:
    """Every image case has a reference and every reference an image case.

    Raises:
        FileNotFoundError, ValueError: naming the folder and the unmatched cases.
    """
    if not os.path.isdir(labels_folder):
        raise FileNotFoundError(f"label folder {labels_folder} does not exist. Pass the folder of reference "
                                f"segmentations CASE{file_ending} (e.g. labelsTs).")
    references = {n[:-len(file_ending)] for n in os.listdir(labels_folder)
                  if n.endswith(file_ending) and not n.startswith(".")}
    without_label = sorted(set(images) - references)
    without_image = sorted(references - set(images))
    if without_label or without_image:
        raise ValueError(f"images and labels do not match: {len(without_label)} image case(s) without a label in "
                         f"{labels_folder} {without_label[:5]}, {len(without_image)} label(s) without images "
                         f"{without_image[:5]}. Every test case needs its images and its reference segmentation.")


def _run(args: argparse.Namespace) -> int:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_mmssl.cli.predict import _model_folder
    from nnunet_mmssl.dataloading.image_checks import check_input_folder
    from nnunet_mmssl.evaluation.missing_modalities import (
        HEATMAP_NAME,
        SUMMARY_NAME,
        TABLE_NAME,
        evaluate_missing_modalities,
        format_missing_table,
    )
    from nnunet_mmssl.inference.missing import MissingModalityPredictor

    if args.npp < 0 or args.nps < 1 or args.num_processes < 1:
        raise ValueError(f"-npp must be >= 0, -nps and -np >= 1 (got {args.npp}, {args.nps}, {args.num_processes})")
    model_folder = _model_folder(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("-device cuda, but no CUDA GPU is available here; pass -device cpu")
    dataset_json = load_json(os.path.join(model_folder, "dataset.json"))
    channel_names = dataset_json["channel_names"]
    if len(channel_names) < 2:
        raise ValueError(f"{model_folder} has one input channel ({channel_names}): there is no modality to leave "
                         f"out. This command needs a multi-channel model.")
    file_ending = dataset_json["file_ending"]
    cases = check_input_folder(args.i, dataset_json, num_processes=max(1, args.npp))
    _check_labels(cases, args.ref, file_ending)
    print(f"Checked {len(cases)} test cases in {args.i} (all channels, images complete and finite) and their labels")

    labels, regions = definitions_from_dataset_json(dataset_json)
    if args.labels:
        labels, regions = list(args.labels), None
    elif args.regions:
        labels = None
        regions = {name if name is not None else ",".join(map(str, v)): v for name, v in args.regions}
    from nnunet_mmssl.evaluation.missing_modalities import check_scored_labels

    for message in check_scored_labels(args.ref, sorted(cases), file_ending, dataset_json, labels, regions):
        print(f"{PROG}: warning: {message}", file=sys.stderr)  # before any prediction

    predictor = MissingModalityPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                         use_mirroring=not args.disable_tta,
                                         perform_everything_on_device=args.device == "cuda",
                                         device=torch.device(args.device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, [f if f == "all" else int(f) for f in args.f],
                                                   args.chk)

    def predict(missing: tuple[int, ...], output_folder: str) -> None:
        predictor.set_missing_channels(missing)
        if args.npp == 0:
            predictor.predict_from_files_sequential(args.i, output_folder)
        else:
            predictor.predict_from_files(args.i, output_folder, num_processes_preprocessing=args.npp,
                                         num_processes_segmentation_export=args.nps)

    settings = {"model_folder": os.path.abspath(model_folder), "trainer": predictor.trainer_name,
                "folds": list(args.f), "checkpoint": args.chk, "images_folder": os.path.abspath(args.i),
                "step_size": args.step_size, "mirroring": not args.disable_tta}
    summary = evaluate_missing_modalities(predict, args.ref, args.o, channel_names, sorted(cases), labels=labels,
                                          regions=regions, file_ending=file_ending, settings=settings,
                                          overwrite=args.overwrite, num_processes=args.num_processes)
    for message in summary["warnings"]:
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    if summary["skipped"]:
        print(f"{len(summary['skipped'])} subset(s) already complete, kept: {', '.join(summary['skipped'])}")
    print(format_missing_table(summary, "dice"))
    out = os.path.abspath(args.o)
    print(f"\nWritten: {os.path.join(out, SUMMARY_NAME)}, {os.path.join(out, TABLE_NAME)}, "
          f"{os.path.join(out, HEATMAP_NAME)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on a user error (one line on stderr), 1 on an unexpected error."""
    return run_cli(PROG, build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())

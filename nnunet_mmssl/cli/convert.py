"""``nnUNetv2_mmssl_convert``: case folders from one or more sources -> nnU-Net v2 raw dataset with unlabelled cases.

Thin wrapper around :func:`nnunet_mmssl.dataset_conversion.convert.convert_dataset` (registered channels, one
``--modality`` per channel) and :func:`nnunet_mmssl.dataset_conversion.unregistered.convert_unregistered` (one
modality per source, ``--source-modality``). Examples::

    nnUNetv2_mmssl_convert -i /data/brats2018_flair_t1 /data/brats_4seq_unlabeled \\
        --modality FLAIR='FLAIR.nii.gz,*t2f*,flair.nii.gz,*_fla_*' \\
        --modality T1='T1.nii.gz,*t1n*,t1.nii.gz,*_t1_*' \\
        --label '*GT_W*' --num-labeled 3 --num-test 2 --seed 1234 -d 501 -n BraTSFlairT1

    nnUNetv2_mmssl_convert -i /data/ct_cases /data/mr_cases --source-modality CT MR --image 'image*' \\
        --label 'label*' --labels background=0 liver=1 --label-map CT:6=1 --num-labeled CT:4 MR:0.5 \\
        --num-test 1 -d 502 -n LiverCTMR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from nnunet_mmssl.cli._common import add_verbose

PROG = "nnUNetv2_mmssl_convert"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nnUNetv2_mmssl_convert``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert per-case folders (one subfolder per case, files matched by name globs, searched "
                    "recursively) from one or more sources into <nnUNet_raw>/DatasetXXX_NAME with imagesTr/labelsTr "
                    "(labelled training), imagesUnlabeled (unlabelled) and imagesTs/labelsTs (test), plus "
                    "dataset.json and mmssl_split.json. Cases without a label file are unlabelled. Registered sources "
                    "(every case holds every channel): --modality per channel. Unregistered sources (each source holds "
                    "one modality, each case one image): --source-modality per source and --image; dataset.json then "
                    "records every case's modality.")
    parser.add_argument("-i", "--input", nargs="+", required=True, metavar="SRC",
                        help="source folders; each immediate subfolder is one case")
    parser.add_argument("--modality", action="append", default=None, metavar="NAME=GLOB",
                        help="registered sources: channel NAME and a file-name glob (fnmatch, case-sensitive); "
                             "repeatable: the first appearance of each NAME fixes the channel order, a repeated NAME "
                             "adds globs; NAME=GLOB1,GLOB2 gives several at once")
    parser.add_argument("--source-modality", nargs="+", default=None, metavar="NAME",
                        help="unregistered sources: the modality of each -i source (one name per source, e.g. CT MR; "
                             "a modality may span several sources); each case then holds one image (--image)")
    parser.add_argument("--image", action="append", default=None, metavar="GLOB",
                        help="with --source-modality: file-name glob of each case's one image (repeatable, or "
                             "GLOB1,GLOB2)")
    parser.add_argument("--label", action="append", default=None, metavar="GLOB",
                        help="file-name glob of the label file (repeatable, or GLOB1,GLOB2); cases without a match "
                             "are unlabelled")
    parser.add_argument("--label-map", action="extend", nargs="+", default=None, metavar="[M:]V=T",
                        help="map value V of the labels onto declared label T, e.g. BraTS 4=3 (repeatable; V=T,V2=T2 "
                             "gives several); with --source-modality per modality: M:V=T. With a map every value "
                             "present must be mapped (0 maps to 0 unless given)")
    parser.add_argument("--regions", nargs="+", default=None, metavar="NAME=V1,V2",
                        help="write an nnU-Net region dataset: each region the union of label values, in output "
                             "order, e.g. WT=1,2,3 TC=2,3 ET=3 (labels of the files still declared with --labels)")
    parser.add_argument("--regions-class-order", nargs="+", type=int, default=None, metavar="V",
                        help="label value exported for each region (default: per region the smallest value no later "
                             "region contains; BraTS: 1 2 3)")
    parser.add_argument("--intensity-scheme", action="extend", nargs="+", default=None, metavar="M=SCHEME",
                        help="with --source-modality: nnU-Net normalisation of modality M (default: CTNormalization "
                             "for CT, ZScoreNormalization per case otherwise)")
    parser.add_argument("--num-labeled", nargs="+", default=None, metavar="N|FRACTION|M:N",
                        help="labelled training cases: an int count, or a fraction in (0, 1] of the labelled "
                             "non-test cases (default: all); the other labelled cases become unlabelled. With "
                             "--source-modality per modality: M:N entries, a bare value for the others")
    parser.add_argument("--num-test", nargs="+", default=None, metavar="N|M:N",
                        help="held-out labelled test cases (imagesTs/labelsTs; default 0). With --source-modality "
                             "per modality (M:N entries, a bare value for the others; a fraction in [0, 1) of the "
                             "modality's labelled cases allowed)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the split (default 1234)")
    parser.add_argument("-d", "--dataset-id", type=int, required=True, help="dataset id (1..999)")
    parser.add_argument("-n", "--dataset-name", required=True, help="dataset name (DatasetXXX_NAME)")
    parser.add_argument("-o", "--output-root", default=None,
                        help="nnU-Net raw root (default: the nnUNet_raw environment variable)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="NAME=VALUE",
                        help="dataset.json labels (default: background=0 foreground=1)")
    parser.add_argument("--case-prefix", default=None, help="prefix of the case ids (default: the dataset name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DatasetXXX_NAME")
    parser.add_argument("-np", "--num-processes", type=int, default=1, help="writer processes (default 1)")
    parser.add_argument("--spacing-tolerance", type=float, default=1e-3, help="mm (default 1e-3)")
    parser.add_argument("--origin-tolerance", type=float, default=1e-2, help="mm (default 1e-2)")
    parser.add_argument("--direction-tolerance", type=float, default=1e-3, help="(default 1e-3)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    return add_verbose(parser)


def parse_num_labeled(text: str | None) -> int | float | None:
    """``"3"`` -> 3, ``"0.3"`` -> 0.3, None -> None.

    Raises:
        ConversionError: neither an int nor a float.
    """
    from nnunet_mmssl.dataset_conversion.convert import ConversionError

    if text is None:
        return None
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise ConversionError(f"--num-labeled {text!r} is neither an int count nor a fraction") from None


def _summary(target: str) -> str:
    from nnunet_mmssl.dataset_conversion.convert import SPLIT_FILE_NAME

    with open(os.path.join(target, "dataset.json"), encoding="utf-8") as f:
        dataset_json = json.load(f)
    mmssl = dataset_json["mmssl"]
    split = mmssl["split"]
    channels = ", ".join(f"{k}={v}" for k, v in dataset_json["channel_names"].items())
    dropped = mmssl["counts"]["unlabeled_with_label_not_copied"]
    lines = [
        f"Wrote {target}",
        f"  channels: {channels}; labels: {dataset_json['labels']}",
        f"  labelled training (imagesTr/labelsTr): {dataset_json['numTraining']}",
        (f"  unlabelled (imagesUnlabeled):          {dataset_json['numUnlabeled']} "
         f"({len(split['unlabeled']) - dropped} without label, {dropped} labelled cases used as unlabelled, "
         f"labels not copied)"),
        f"  test (imagesTs/labelsTs):              {dataset_json['numTest']}",
    ]
    for modality, counts in mmssl.get("counts_per_modality", {}).items():
        lines.append(f"  {modality} ({mmssl['intensity_schemes'][modality]}): {counts['labeled']} labelled, "
                     f"{counts['unlabeled']} unlabelled, {counts['test']} test")
    lines.append(f"  split: {os.path.join(target, SPLIT_FILE_NAME)}")
    return "\n".join(lines)


def _split_globs(specs: list[str] | None, option: str) -> list[str] | None:
    from nnunet_mmssl.dataset_conversion.convert import ConversionError

    if not specs:
        return None
    globs = [g.strip() for spec in specs for g in spec.split(",")]
    if any(not g for g in globs):
        raise ConversionError(f"{option} {specs}: empty glob")
    return globs


def _refuse(args: argparse.Namespace, options: dict[str, str], why: str) -> None:
    from nnunet_mmssl.dataset_conversion.convert import ConversionError

    for option, dest in options.items():
        if getattr(args, dest):
            raise ConversionError(f"{option} {why}")


def _run_unregistered(args: argparse.Namespace, label_globs: list[str] | None, labels: dict | None,
                      output_root: str) -> Path:
    from nnunet_mmssl.dataset_conversion.convert import ConversionError
    from nnunet_mmssl.dataset_conversion.unregistered import (
        convert_unregistered,
        parse_count_specs,
        parse_intensity_scheme_specs,
        parse_label_map_specs,
    )

    _refuse(args, {"--regions": "regions"}, "is for registered sources for now (region datasets of one image per "
                                            "case are not supported)")
    _refuse(args, {"--modality": "modality"}, "is for registered sources (every case holds every channel); with "
                                              "--source-modality each case holds one image: give its glob with "
                                              "--image GLOB")
    image_globs = _split_globs(args.image, "--image")
    if not image_globs:
        raise ConversionError("--source-modality needs --image GLOB: the file-name glob of each case's one image")
    modalities = list(dict.fromkeys(args.source_modality))
    counts = {}
    for option, specs, default in (("--num-labeled", args.num_labeled, None), ("--num-test", args.num_test, 0)):
        bare, per = parse_count_specs(specs or [], option)
        base = default if bare is None else bare
        counts[option] = {**{m: base for m in modalities}, **per} if per else base
    return convert_unregistered(
        args.input, args.source_modality, image_globs, label_globs, output_root, args.dataset_id,
        args.dataset_name, num_labeled=counts["--num-labeled"], num_test=counts["--num-test"], seed=args.seed,
        labels=labels, label_maps=parse_label_map_specs(args.label_map or []),
        intensity_schemes=parse_intensity_scheme_specs(args.intensity_scheme or []), case_prefix=args.case_prefix,
        overwrite=args.overwrite, spacing_tolerance=args.spacing_tolerance, origin_tolerance=args.origin_tolerance,
        direction_tolerance=args.direction_tolerance, num_processes=args.num_processes,
        progress=None if args.quiet else print)


def _run_registered(args: argparse.Namespace, label_globs: list[str] | None, labels: dict | None,
                    output_root: str) -> Path:
    from nnunet_mmssl.dataset_conversion.convert import ConversionError, convert_dataset, parse_modality_specs
    from nnunet_mmssl.dataset_conversion.regions import parse_region_specs
    from nnunet_mmssl.dataset_conversion.unregistered import parse_label_map_specs

    _refuse(args, {"--image": "image", "--intensity-scheme": "intensity_scheme"},
            "is for unregistered sources: give the modality of each source with --source-modality NAME ...")
    label_map = None
    if args.label_map:
        label_map = parse_label_map_specs([f"all:{spec}" for spec in args.label_map])["all"]
    if args.regions_class_order and not args.regions:
        raise ConversionError("--regions-class-order needs --regions")
    if not args.modality:
        raise ConversionError("--modality NAME=GLOB is required (one per channel), or --source-modality NAME ... "
                              "when each source holds one modality")
    modalities = parse_modality_specs(args.modality)
    if args.num_labeled is not None and len(args.num_labeled) != 1:
        raise ConversionError(f"--num-labeled {' '.join(args.num_labeled)}: one value (N or FRACTION) is needed; "
                              f"per-modality counts are for --source-modality")
    num_labeled = parse_num_labeled(args.num_labeled[0] if args.num_labeled else None)
    num_test = 0
    if args.num_test is not None:
        if len(args.num_test) != 1 or not re.fullmatch(r"\s*\d+\s*", args.num_test[0]):
            raise ConversionError(f"--num-test {' '.join(args.num_test)}: one int count is needed; per-modality "
                                  f"counts and fractions are for --source-modality")
        num_test = int(args.num_test[0])
    return convert_dataset(
        args.input, modalities, label_globs, output_root, args.dataset_id, args.dataset_name,
        num_labeled=num_labeled, num_test=num_test, seed=args.seed, labels=labels,
        case_prefix=args.case_prefix, overwrite=args.overwrite, spacing_tolerance=args.spacing_tolerance,
        origin_tolerance=args.origin_tolerance, direction_tolerance=args.direction_tolerance,
        num_processes=args.num_processes, progress=None if args.quiet else print, label_map=label_map,
        regions=parse_region_specs(args.regions) if args.regions else None,
        regions_class_order=args.regions_class_order)


def _run(args: argparse.Namespace) -> int:
    from nnunet_mmssl.dataset_conversion.convert import ConversionError, parse_label_specs

    label_globs = _split_globs(args.label, "--label")
    labels = parse_label_specs(args.labels) if args.labels else None
    output_root = args.output_root or os.environ.get("nnUNet_raw")
    if not output_root:
        raise ConversionError("no output root: pass -o/--output-root or set the nnUNet_raw environment variable")
    run = _run_unregistered if args.source_modality else _run_registered
    target = run(args, label_globs, labels, output_root)
    print(_summary(str(target)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the converter; returns 0 on success, 2 on a user error (one line on stderr), 1 on an unexpected error."""
    from nnunet_mmssl.cli._common import run_cli

    return run_cli(PROG, build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())

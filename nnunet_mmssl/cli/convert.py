"""``nnUNetv2_mmssl_convert``: case folders from one or more sources -> nnU-Net v2 raw dataset with unlabelled cases.

Thin wrapper around :func:`nnunet_mmssl.dataset_conversion.convert.convert_dataset`. Example::

    nnUNetv2_mmssl_convert -i /data/brats2018_flair_t1 /data/brats_4seq_unlabeled \\
        --modality FLAIR='FLAIR.nii.gz,*t2f*,flair.nii.gz,*_fla_*' \\
        --modality T1='T1.nii.gz,*t1n*,t1.nii.gz,*_t1_*' \\
        --label '*GT_W*' --num-labeled 3 --num-test 2 --seed 1234 -d 501 -n BraTSFlairT1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from nnunet_mmssl.cli._common import add_verbose

PROG = "nnUNetv2_mmssl_convert"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nnUNetv2_mmssl_convert``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert per-case folders (one subfolder per case, files matched by name globs, searched "
                    "recursively) from one or more sources into <nnUNet_raw>/DatasetXXX_NAME with imagesTr/labelsTr "
                    "(labelled training), imagesUnlabeled (unlabelled) and imagesTs/labelsTs (test), plus "
                    "dataset.json and mmssl_split.json. Cases without a label file are unlabelled.")
    parser.add_argument("-i", "--input", nargs="+", required=True, metavar="SRC",
                        help="source folders; each immediate subfolder is one case")
    parser.add_argument("--modality", action="append", required=True, metavar="NAME=GLOB",
                        help="channel NAME and a file-name glob (fnmatch, case-sensitive); repeatable: the first "
                             "appearance of each NAME fixes the channel order, a repeated NAME adds globs; "
                             "NAME=GLOB1,GLOB2 gives several at once")
    parser.add_argument("--label", action="append", default=None, metavar="GLOB",
                        help="file-name glob of the label file (repeatable, or GLOB1,GLOB2); cases without a match "
                             "are unlabelled")
    parser.add_argument("--num-labeled", default=None, metavar="N|FRACTION",
                        help="labelled training cases: an int count, or a fraction in (0, 1] of the labelled "
                             "non-test cases (default: all); the other labelled cases become unlabelled")
    parser.add_argument("--num-test", type=int, default=0, metavar="N",
                        help="held-out labelled test cases (imagesTs/labelsTs; default 0)")
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
    split = dataset_json["mmssl"]["split"]
    channels = ", ".join(f"{k}={v}" for k, v in dataset_json["channel_names"].items())
    dropped = dataset_json["mmssl"]["counts"]["unlabeled_with_label_not_copied"]
    lines = [
        f"Wrote {target}",
        f"  channels: {channels}; labels: {dataset_json['labels']}",
        f"  labelled training (imagesTr/labelsTr): {dataset_json['numTraining']}",
        (f"  unlabelled (imagesUnlabeled):          {dataset_json['numUnlabeled']} "
         f"({len(split['unlabeled']) - dropped} without label, {dropped} labelled cases used as unlabelled, "
         f"labels not copied)"),
        f"  test (imagesTs/labelsTs):              {dataset_json['numTest']}",
        f"  split: {os.path.join(target, SPLIT_FILE_NAME)}",
    ]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from nnunet_mmssl.dataset_conversion.convert import (
        ConversionError,
        convert_dataset,
        parse_label_specs,
        parse_modality_specs,
    )

    modalities = parse_modality_specs(args.modality)
    label_globs = None
    if args.label:
        label_globs = [g.strip() for spec in args.label for g in spec.split(",")]
        if any(not g for g in label_globs):
            raise ConversionError(f"--label {args.label}: empty glob")
    labels = parse_label_specs(args.labels) if args.labels else None
    num_labeled = parse_num_labeled(args.num_labeled)
    output_root = args.output_root or os.environ.get("nnUNet_raw")
    if not output_root:
        raise ConversionError("no output root: pass -o/--output-root or set the nnUNet_raw environment variable")
    target = convert_dataset(
        args.input, modalities, label_globs, output_root, args.dataset_id, args.dataset_name,
        num_labeled=num_labeled, num_test=args.num_test, seed=args.seed, labels=labels,
        case_prefix=args.case_prefix, overwrite=args.overwrite, spacing_tolerance=args.spacing_tolerance,
        origin_tolerance=args.origin_tolerance, direction_tolerance=args.direction_tolerance,
        num_processes=args.num_processes, progress=None if args.quiet else print)
    print(_summary(str(target)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the converter; returns 0 on success, 2 on a user error (one line on stderr), 1 on an unexpected error."""
    from nnunet_mmssl.cli._common import run_cli

    return run_cli(PROG, build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())

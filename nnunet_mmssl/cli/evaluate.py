"""Console script ``nnUNetv2_mmssl_evaluate``: Dice, sensitivity, HD95 and ASD of a prediction folder.

Example::

    nnUNetv2_mmssl_evaluate -ref $nnUNet_raw/Dataset501_X/labelsTr -pred /path/to/predictions -l 1 2
    nnUNetv2_mmssl_evaluate -ref labelsTr -pred preds -r WT=1,2,3 TC=2,3 ET=3 --per-case

A thin wrapper around :func:`nnunet_mmssl.evaluation.report.evaluate_folders`; conventions are documented in
:mod:`nnunet_mmssl.evaluation.metrics`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

PROG = "nnUNetv2_mmssl_evaluate"
DEFAULT_SUMMARY_NAME = "summary_mmssl.json"


class _UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so that :func:`main` can return 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(message)


def _region(text: str) -> tuple[str | None, list[int]]:
    """Parse ``"1,2,3"`` or ``"NAME=1,2,3"`` into ``(name or None, [1, 2, 3])``."""
    name, sep, values = text.rpartition("=")
    if not sep:
        name, values = "", text
    try:
        labels = [int(v) for v in values.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid region {text!r}: expected comma-separated integer labels such as 1,2,3 or WT=1,2,3"
        ) from None
    if not labels:
        raise argparse.ArgumentTypeError(f"invalid region {text!r}: no labels given")
    return (name.strip() or None), labels


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nnUNetv2_mmssl_evaluate``."""
    parser = _Parser(
        prog=PROG,
        description="Evaluate predicted segmentations against references (files paired by name): Dice, "
        "sensitivity, HD95 (mm) and ASD/ASSD (mm) per label or region, with explicit empty-mask conventions. "
        "Writes a JSON summary and prints a table.",
    )
    parser.add_argument("-ref", "--reference-folder", required=True, help="folder with reference label maps")
    parser.add_argument("-pred", "--prediction-folder", required=True, help="folder with predicted label maps")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-l", "--labels", type=int, nargs="+", help="labels evaluated one by one, e.g. -l 1 2")
    group.add_argument(
        "-r",
        "--regions",
        type=_region,
        nargs="+",
        help="regions evaluated as the union of their labels, e.g. -r 1,2,3 2,3 3 or -r WT=1,2,3 TC=2,3 ET=3",
    )
    parser.add_argument(
        "-o",
        "--output-file",
        default=None,
        help=f"JSON summary to write (default: PRED_FOLDER/{DEFAULT_SUMMARY_NAME})",
    )
    parser.add_argument("--file-ending", default=".nii.gz", help="image file suffix (default: .nii.gz)")
    parser.add_argument("--per-case", action="store_true", help="also print per-case metrics")
    parser.add_argument("--modalities-from", default=None, metavar="JSON",
                        help="dataset.json or mmssl_split.json of an unregistered dataset: also report each "
                             "modality's cases separately and the mean over modalities (written to the summary "
                             "under 'per_modality')")
    parser.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default: 1)")
    parser.add_argument("--verbose", action="store_true",
                        help="on an error, print the Python traceback too (default: one line)")
    return parser


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns 0 on success and 2 on user errors (one-line message on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"{PROG}: error: {_one_line(e)} (see {PROG} -h)", file=sys.stderr)
        return 2
    except SystemExit as e:  # -h / --help
        return e.code if isinstance(e.code, int) else 0
    if args.num_processes < 1:
        print(f"{PROG}: error: -np must be >= 1, got {args.num_processes}", file=sys.stderr)
        return 2

    regions = None
    if args.regions is not None:
        if any(name is not None for name, _ in args.regions):
            regions = {name if name is not None else ",".join(map(str, v)): v for name, v in args.regions}
            if len(regions) != len(args.regions):
                print(f"{PROG}: error: duplicate region names in -r", file=sys.stderr)
                return 2
        else:
            regions = [v for _, v in args.regions]
    output_file = args.output_file or os.path.join(args.prediction_folder, DEFAULT_SUMMARY_NAME)
    if os.path.isdir(output_file):
        print(f"{PROG}: error: {output_file}, is a folder, not a file name for the summary JSON. Give a file name to "
              f"-o (e.g. {os.path.join(output_file, DEFAULT_SUMMARY_NAME)}).", file=sys.stderr)
        return 2
    from nnunet_mmssl.cli._common import call_interruptibly

    return call_interruptibly(PROG, lambda: _evaluate(args, regions, output_file))


def _evaluate(args: argparse.Namespace, regions, output_file: str) -> int:
    """Evaluate, print the warnings, the table or the one-line error; the exit code."""
    from nnunet_mmssl.cli._common import describe_error
    from nnunet_mmssl.evaluation.report import (
        aggregate_by_modality,
        evaluate_folders,
        format_modality_table,
        format_table,
        read_case_modality,
        write_json_atomic,
    )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            modality_info = read_case_modality(args.modalities_from) if args.modalities_from else None
            result = evaluate_folders(
                args.reference_folder,
                args.prediction_folder,
                labels=args.labels,
                regions=regions,
                file_ending=args.file_ending,
                output_file=None if modality_info else output_file,
                num_processes=args.num_processes,
            )
            if modality_info:
                result["per_modality"] = aggregate_by_modality(result, modality_info[1], modality_info[0])
                write_json_atomic(result, output_file)
        except (ValueError, OSError, RuntimeError) as e:
            error, code = e, 2
        except Exception as e:  # noqa: BLE001 -- a console script reports in one line (--verbose: traceback)
            error, code = e, 1
        else:
            error = None
    for w in caught:
        print(f"{PROG}: warning: {_one_line(w.message)}", file=sys.stderr)
    if error is not None:
        if args.verbose:
            traceback.print_exception(type(error), error, error.__traceback__)
        if code == 1:
            print(f"{PROG}: unexpected error ({type(error).__name__}): {_one_line(error)}. Rerun with --verbose for "
                  f"the traceback; if the input looks right, please report it.", file=sys.stderr)
        else:
            print(f"{PROG}: error: {describe_error(error)}", file=sys.stderr)
        return code
    print(format_table(result, per_case=args.per_case))
    if "per_modality" in result:
        print()
        print(format_modality_table(result["per_modality"]))
    print(f"\nSummary written to {os.path.abspath(output_file)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

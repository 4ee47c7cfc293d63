"""``nnUNetv2_mmssl_selftrain``: self-training in one command (teacher, pseudo-labels with an ignore label, student).

The pipeline is :mod:`nnunet_mmssl.semisup.selftrain`; this module is its command line.
"""

from __future__ import annotations

import argparse

from nnunet_mmssl.cli._common import add_verbose, run_cli
from nnunet_mmssl.semisup.selftrain import DEFAULT_THRESHOLD, PROG, read_test_cases, selftrain


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Self-training with nnU-Net: train (or take, -m) a teacher on the labelled cases, "
                               "pseudo-label the unlabelled cases (uncertain voxels get nnU-Net's ignore label), write "
                               "them with the labelled cases as a derived dataset (new id; the source is not "
                               "modified), preprocess it with the source's plans and train a student; repeat for "
                               "--rounds. Rerun the same command to continue an interrupted run.")
    parser.add_argument("-d", "--dataset", required=True, help="source dataset id or name (DatasetXXX_NAME)")
    parser.add_argument("-c", "--configuration", default="2d", help="configuration (default 2d)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-o", "--output", required=True,
                        help="work folder: state file, pseudo-labels, logs, models (nnUNet_results inside)")
    parser.add_argument("-m", "--model", default=None,
                        help="teacher model folder (TRAINER__PLANS__CONFIGURATION); default: train --teacher")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="with -m: the teacher's folds (default: every fold with checkpoint_final.pth)")
    parser.add_argument("--teacher", default="nnUNetTrainer", help="teacher trainer when no -m (default nnUNetTrainer)")
    parser.add_argument("-tr", "--student", default="nnUNetTrainer",
                        help="student trainer: nnUNetTrainer (default) or any trainer of nnunet_mmssl")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds R; round r's student labels round r+1 (default 1)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"normalised entropy (H / log C; regions: mean binary entropy / log 2) above which a "
                             f"pseudo-label voxel gets the ignore label (default {DEFAULT_THRESHOLD:g}; 1 ignores "
                             f"none)")
    parser.add_argument("--derived-id", type=int, default=None,
                        help="dataset id of round 1's derived dataset; round r uses id + r - 1 (default: the next "
                             "free ids after the highest in nnUNet_raw)")
    parser.add_argument("--test", nargs="+", default=None, metavar="CASE",
                        help="test case ids (imagesTr or imagesUnlabeled) kept out of every training and derived "
                             "dataset; imagesTs is never used")
    parser.add_argument("--test-file", default=None,
                        help="test case ids as a JSON list, {\"test\": [...]}, or one id per line")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training budget: epochs per training (default: the trainer's own, 1000 for nnU-Net)")
    parser.add_argument("--iterations", type=int, default=250, help="with --epochs: iterations per epoch (default 250)")
    parser.add_argument("--val-iterations", type=int, default=50,
                        help="with --epochs: validation iterations per epoch (default 50)")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="preprocessing processes (default 2)")
    parser.add_argument("--disable_tta", action="store_true", help="pseudo-labels without mirroring")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    return add_verbose(parser)


def main(argv: list[str] | None = None) -> int:
    """Run (or continue) self-training; 0 on success, 2 on a user error (one line), 130 on Ctrl-C."""

    def body(args: argparse.Namespace) -> int:
        selftrain(args.dataset, args.configuration, args.output, rounds=args.rounds, teacher_trainer=args.teacher,
                  student_trainer=args.student, model_folder=args.model, folds=args.folds, threshold=args.threshold,
                  derived_id=args.derived_id, plans=args.plans,
                  test_cases=read_test_cases(args.test, args.test_file), epochs=args.epochs,
                  iterations=args.iterations, val_iterations=args.val_iterations, device=args.device,
                  num_processes=args.num_processes, use_mirroring=not args.disable_tta,
                  progress=lambda m: print(m, flush=True))
        return 0

    return run_cli(PROG, build_parser(), body, argv)

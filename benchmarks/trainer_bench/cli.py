"""The benchmark's command line (``benchmarks/benchmark_trainers.py``): arguments, and :func:`main` for the parent
and for the hidden ``--worker`` child."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from trainer_bench.parent import RESULT_MARKER, exit_on_sigterm, run_parent
from trainer_bench.rows import (
    DEFAULT_CONFIGURATIONS,
    DEFAULT_PLANNER,
    DEFAULT_TRAINERS,
    PHANTOM_KINDS,
    UNREGISTERED_TRAINER_PREFIXES,
    planner_plans,
    resolve_phantom_kind,
)
from trainer_bench.worker import run_interleaved_worker, run_worker


def default_n_proc_da(device: str) -> int:
    """Augmentation workers per trainer when ``--n-proc-da`` is not given: 2 on CPU (the CPU also trains), on CUDA
    nnU-Net's own fallback of 12 limited to the machine's cores."""
    return 2 if device == "cpu" else min(12, os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time nnUNetTrainer and our trainers on the same dataset and plans (see benchmarks/README.md).")
    parser.add_argument("-d", "--dataset", default=None,
                        help="nnU-Net dataset id or name (needs nnUNet_raw/nnUNet_preprocessed); default: phantom")
    parser.add_argument("-c", "--configurations", nargs="+", default=list(DEFAULT_CONFIGURATIONS),
                        help=f"configurations (default {' '.join(DEFAULT_CONFIGURATIONS)})")
    parser.add_argument("-tr", "--trainers", nargs="+", default=list(DEFAULT_TRAINERS),
                        help=f"trainers (default {' '.join(DEFAULT_TRAINERS)})")
    parser.add_argument("-p", "--plans", default=None,
                        help="plans identifier (default: the planner's, nnUNetPlans for ExperimentPlanner)")
    parser.add_argument("-pl", "--planner", default=DEFAULT_PLANNER,
                        help="nnU-Net experiment planner of the phantom and of the default -p: ExperimentPlanner "
                             "(PlainConvUNet, nnUNetPlans; default) or a residual-encoder preset such as "
                             "nnUNetPlannerResEncM (ResidualEncoderUNet, nnUNetResEncUNetMPlans); with -d the dataset "
                             "must have been planned with it")
    parser.add_argument("--mmssl-plans", default=None, metavar="PLANS",
                        help="plans identifier for our trainers (e.g. nnUNetMMSSLPlans, the memory-budgeted plans); "
                             "nnU-Net's trainers keep -p")
    parser.add_argument("-f", "--fold", default="all", help="fold: 'all' (default) or an integer")
    parser.add_argument("--iterations", type=int, default=20, help="timed training iterations (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before (default 3)")
    parser.add_argument("--share-steps", type=int, default=2,
                        help="untimed steps after the timed ones that measure the gradient share of the "
                             "unsupervised term, |grad w*L_unsup| / |grad L_sup| at the trainer's full weight "
                             "(column u.share; 0 skips it; default 2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every trainer this many times, each time in its own process, in rotated order "
                             "(round r starts with the r-th trainer); s/iter is the median of the rounds' means, so "
                             "that one slow phase of a shared machine does not decide a row (default 1)")
    parser.add_argument("--interleaved-rounds", type=int, default=5,
                        help="rounds of the interleaved compute measurement: every trainer in one process on one "
                             "fixed batch, --interleaved-steps steps each per round, in rotated order (column "
                             "eff.ilv); 0 skips it (default 5)")
    parser.add_argument("--interleaved-steps", type=int, default=2,
                        help="timed steps per trainer and round of the interleaved measurement (default 2)")
    parser.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--predict-cases", type=int, default=2,
                        help="cases to predict (imagesTs, then imagesTr); 0 skips prediction (default 2)")
    parser.add_argument("--mirror", action="store_true", help="test-time mirroring in prediction (default off)")
    parser.add_argument("--phantom", action="store_true", help="build and use the phantom dataset (default without -d)")
    parser.add_argument("--phantom-kind", default="auto", choices=PHANTOM_KINDS,
                        help="registered: two-modality phantom, every case both channels; unregistered: CT-like cases "
                             "of some patients, MR-like of others (one channel, a modality per case: DBDC*, "
                             "PooledUNet*); auto (default): unregistered when any trainer is DBDC* or PooledUNet*")
    parser.add_argument("--phantom-shape", nargs=3, type=int, default=[24, 96, 96], metavar=("Z", "Y", "X"),
                        help="registered phantom voxels (default 24 96 96; the unregistered phantom has each "
                             "modality's own grid, see unregistered_phantom.py)")
    parser.add_argument("--phantom-spacing", nargs=3, type=float, default=[3.0, 1.0, 1.0], metavar=("Z", "Y", "X"))
    parser.add_argument("--unregistered-shape", nargs=3, type=int, default=None, metavar=("Z", "Y", "X"),
                        help="unregistered phantom: the CT-like cases' voxels at 1 mm (the MR-like cases cover the "
                             "same extent at 1.2 mm); default: unregistered_phantom.py's small grids")
    parser.add_argument("--phantom-cases", nargs=2, type=int, default=[4, 4], metavar=("LABELLED", "UNLABELLED"),
                        help="phantom training cases (default 4 labelled, 4 unlabelled)")
    parser.add_argument("--gpu-memory-target", type=float, default=None, metavar="GB",
                        help="nnU-Net's -gpu_memory_target for planning the phantom (default nnU-Net's 8); a small "
                             "target makes the phantom's plans memory-bound, to exercise nnUNetMMSSLPlans")
    parser.add_argument("--workdir", default=None, help="folder for the phantom, model folders, predictions and "
                        "logs (default: a temporary folder, removed at the end unless a trainer failed)")
    parser.add_argument("--keep-workdir", action="store_true", help="do not remove the temporary workdir")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    parser.add_argument("--n-proc-da", type=int, default=None,
                        help="nnUNet_n_proc_DA for the trainers (default 2 on cpu, min(12, cores) on cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each worker (default: all cores on cpu as nnUNetv2_train does; "
                             "torch's default on cuda)")
    parser.add_argument("--compile", action="store_true",
                        help="let nnU-Net torch.compile the network on cuda (default: nnUNet_compile=false)")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="processes for phantom preprocessing")
    parser.add_argument("--worker-timeout", type=float, default=3600.0, help="seconds per (configuration, trainer)")
    # hidden: one measurement in this process
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-configuration", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-trainer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-interleaved", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset is None:
        args.phantom = True
    if args.phantom and args.dataset is not None:
        parser.error("give either -d DATASET or --phantom, not both")
    args.phantom_kind = resolve_phantom_kind(args.phantom_kind, args.trainers)
    if args.phantom and args.phantom_kind == "registered":
        needing = [t for t in args.trainers if t.startswith(UNREGISTERED_TRAINER_PREFIXES)]
        if needing:
            parser.error(f"{', '.join(needing)} train on one modality per case: use --phantom-kind unregistered "
                         f"(or auto)")
    if args.plans is None or (args.phantom and args.planner != DEFAULT_PLANNER):  # the phantom is planned with it
        try:
            planned = planner_plans(args.planner)
        except ValueError as error:
            parser.error(str(error))
        args.plans = args.plans or planned
    if args.iterations < 1 or args.warmup < 0 or args.predict_cases < 0:
        parser.error("--iterations must be >= 1, --warmup and --predict-cases >= 0")
    if args.rounds < 1 or args.interleaved_rounds < 0 or args.interleaved_steps < 1:
        parser.error("--rounds and --interleaved-steps must be >= 1, --interleaved-rounds >= 0")
    if args.fold != "all":
        try:
            args.fold = str(int(args.fold))
        except ValueError:
            parser.error(f"-f must be 'all' or an integer, got {args.fold!r}")
    if args.n_proc_da is None:
        args.n_proc_da = default_n_proc_da(args.device)
    if args.threads is None and args.device == "cpu":
        args.threads = os.cpu_count() or 1
    if args.worker and not (args.worker_configuration and args.worker_trainer and args.dataset):
        parser.error("--worker needs -d, --worker-configuration and --worker-trainer")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        result = run_interleaved_worker(args) if args.worker_interleaved else run_worker(args)
        print("\n" + RESULT_MARKER + json.dumps(result), flush=True)  # own line, whatever nnU-Net printed last
        return 0
    exit_on_sigterm()
    summary = run_parent(args, argv)
    if summary["interrupted"]:
        return 130 if summary["interrupted"] == "SIGINT" else 143
    return 1 if all(row.get("s_per_iter") is None for rows in summary["results"].values() for row in rows) else 0

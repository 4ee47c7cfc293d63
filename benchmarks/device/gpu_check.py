"""The GPU check: every trainer's real training step at the plans' 3d_fullres patch, with AMP and torch.compile as
nnU-Net runs them, as one JSON and one table.

    python benchmarks/device/gpu_check.py [--device cuda|cpu] [--out DIR] [--budget-s 420] [--steps 4] [--warmup 2]
        [--phantom-shape 128 160 160] [--unregistered-shape 128 160 160] [--phantom-cases 2 2] [--compile auto|off]
        [-tr nnUNetTrainer SMMLTrainer ...]

Normally started by ``benchmarks/device/gpu_check.sh`` (which unpacks the packages the GPU machine lacks). Builds,
with ``benchmarks/benchmark_trainers.py``'s helpers, the registered two-modality phantom and the unregistered phantom
(CT-like and MR-like cases of different patients, for DBDC), plans and preprocesses 3d_fullres with nnU-Net's
planner (a phantom of 128 x 160 x 160 voxels at 1 mm by default, so that the patch is GPU-sized), and then, in this one
process, for each trainer: constructs it as ``nnUNetv2_train`` does, runs nnU-Net's ``on_train_start`` (on CUDA with
``nnUNet_compile=true`` this is where nnU-Net compiles ``self.network``; on the CPU nnU-Net never compiles, so the
check compiles the network itself with the ``eager`` backend, which traces exactly as on CUDA and so finds the same
graph breaks) and ``--warmup`` + ``--steps`` real ``train_step`` calls on batches from nnU-Net's loaders (nnU-Net's
own AMP: float16 autocast and GradScaler on CUDA). Per trainer it reports

- ``losses_finite``: every step's returned losses finite;
- ``scaler_skipped_steps``: steps whose GradScaler scale decreased (inf/NaN gradients: the step was skipped); None
  without a GradScaler (CPU);
- ``host_syncs``: operations of one step that synchronise host and GPU, counted at the dispatcher
  (:func:`nnunet_mmssl.diagnostics.count_host_syncs`, works on any device); on CUDA also ``cuda_sync_warnings``,
  what ``torch.cuda.set_sync_debug_mode("warn")`` reports for one compiled step;
- ``graph_breaks`` / ``graphs``: Dynamo's counters over the compiled steps (0 graph breaks = one graph per mode);
- ``peak_mem_gib`` (CUDA: ``max_memory_allocated`` over the timed steps) against ``plans_gpu_target_gib`` (the GPU
  memory the plans were made for), and ``est_over_budget``: the step's feature-map estimate over the plans' budget
  (the trainer's ``memory_check``);
- ``s_per_iter`` (timed steps, time waiting for unlabelled batches subtracted), ``flop_ratio`` / ``time_ratio``
  against ``nnUNetTrainer`` on the same phantom and ``efficiency`` = FLOP ratio / time ratio.

The JSON is written (atomically) after every trainer with ``"complete": false`` and once more at the end, so a run
stopped by its time limit still leaves the rows measured so far. Trainers not started within ``--budget-s`` seconds
are listed as skipped. Exit status 0 when every trainer ran with finite losses, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import sys
import time
import traceback
import warnings

PROG = "gpu_check.py"
BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmark_trainers.py")
REFERENCE = "nnUNetTrainer"
#: trainers on the registered phantom (two modalities, every case both)
REGISTERED_TRAINERS = ("nnUNetTrainer", "SMMLTrainer", "MemCifSSLTrainer", "MMFMCMLTrainer", "MeanTeacherTrainer",
                       "PlainSupervisedTrainer", "ModalityDropoutTrainer")
#: trainers on the unregistered phantom (one modality per case); nnUNetTrainer is their reference there
UNREGISTERED_TRAINERS = ("nnUNetTrainer", "DBDCTrainer")
#: nnU-Net's default GPU memory target (ExperimentPlanner's gpu_memory_target_in_gb)
NNUNET_DEFAULT_TARGET_GB = 8.0

#: (key, header, width, format) of the table
COLUMNS = (
    ("phantom", "phantom", 7, "{}"),
    ("batch", "batch", 5, "{}"),
    ("patch", "patch", 11, "{}"),
    ("amp", "amp", 3, "{}"),
    ("compiled", "cmp", 3, "{}"),
    ("losses_finite", "finite", 6, "{}"),
    ("scaler_skipped_steps", "skipped", 7, "{}"),
    ("host_syncs", "syncs", 5, "{}"),
    ("cuda_sync_warnings", "cuda syncs", 10, "{}"),
    ("graph_breaks", "breaks", 6, "{}"),
    ("peak_mem_gib", "peak GiB", 8, "{:.2f}"),
    ("plans_gpu_target_gib", "plan GiB", 8, "{:.0f}"),
    ("est_over_budget", "est/plan", 8, "{:.2f}"),
    ("s_per_iter", "s/iter", 7, "{:.3f}"),
    ("time_ratio", "time x", 6, "{:.2f}"),
    ("flop_ratio", "FLOP x", 6, "{:.2f}"),
    ("efficiency", "effic.", 6, "{:.2f}"),
)


def benchmark_module():
    """``benchmarks/benchmark_trainers.py`` as a module: its phantoms, environment and trainer construction."""
    spec = importlib.util.spec_from_file_location("benchmark_trainers", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{PROG}: error: {message}. See {PROG} --help.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.txt")
    parser.add_argument("--workdir", default=None, help="phantoms and model folders (default: <out>/work)")
    parser.add_argument("-tr", "--trainers", nargs="+", default=None,
                        help="trainers to check (default: all of them; DBDC* on the unregistered phantom); "
                             f"{REFERENCE} is always measured first on each phantom")
    parser.add_argument("--steps", type=int, default=4, help="timed train steps per trainer (default 4)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps before (the first step compiles; 0: it is timed; default 2)")
    parser.add_argument("--phantom-shape", nargs=3, type=int, default=[128, 160, 160], metavar=("Z", "Y", "X"),
                        help="registered phantom voxels at 1 mm (default 128 160 160: a GPU-sized patch)")
    parser.add_argument("--unregistered-shape", nargs=3, type=int, default=None, metavar=("Z", "Y", "X"),
                        help="unregistered phantom's CT-like voxels at 1 mm (default: --phantom-shape)")
    parser.add_argument("--phantom-cases", nargs=2, type=int, default=[2, 2], metavar=("LABELLED", "UNLABELLED"))
    parser.add_argument("--compile", default="auto", choices=["auto", "off"],
                        help="auto (default): nnU-Net compiles on CUDA (nnUNet_compile=true), the check compiles with "
                             "the eager backend on the CPU; off: no compilation (nnUNet_compile=false)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no trainer after this many seconds (default 420, for a 600 s device call)")
    parser.add_argument("--n-proc-da", type=int, default=None,
                        help="augmentation workers (default: benchmark_trainers.py's, 0 on the CPU)")
    parser.add_argument("-np", "--num-processes", type=int, default=min(8, os.cpu_count() or 1),
                        help="preprocessing processes (default: the cores, at most 8)")
    parser.add_argument("--width-divisor", type=int, default=1, metavar="N",
                        help="CPU tests only: divide every stage's width in the planned 3d_fullres networks by N, so "
                             "that a 2-core CI machine runs every trainer in seconds (default 1: the plans' networks)")
    parser.add_argument("--gpu-memory-target", type=float, default=None, metavar="GB",
                        help=f"nnU-Net's -gpu_memory_target for planning (default nnU-Net's "
                             f"{NNUNET_DEFAULT_TARGET_GB:.0f})")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps {args.steps} --warmup {args.warmup}: --steps must be >= 1 and --warmup >= 0")
    if min(args.phantom_shape + (args.unregistered_shape or [16])) < 16:
        parser.error(f"--phantom-shape / --unregistered-shape: every side must be >= 16 voxels, got "
                     f"{args.phantom_shape} / {args.unregistered_shape}")
    if min(args.phantom_cases) < 2:
        parser.error(f"--phantom-cases {args.phantom_cases}: at least 2 labelled and 2 unlabelled cases (batch 2)")
    if args.width_divisor < 1:
        parser.error(f"--width-divisor {args.width_divisor}: must be >= 1")
    if args.trainers is not None and not args.trainers:
        parser.error("-tr needs at least one trainer")
    return args


def plan(args) -> list[tuple[str, list[str]]]:
    """[(phantom kind, trainers in order, the reference first), ...] of the requested trainers; the unregistered
    phantom (DBDC) first, the trainers of nnU-Net's own network last, so that what a short budget leaves out is the
    least informative."""
    wanted = list(args.trainers) if args.trainers else list(REGISTERED_TRAINERS + UNREGISTERED_TRAINERS[1:])
    groups = []
    for kind in ("unregistered", "registered"):
        unregistered = kind == "unregistered"
        names = [t for t in wanted if t != REFERENCE and t.startswith(("DBDC", "PooledUNet")) == unregistered]
        if names:
            groups.append((kind, [REFERENCE] + names))
    if not groups:  # only the reference asked for
        groups.append(("registered", [REFERENCE]))
    return groups


def bench_args(bench, args, kind: str, trainers: list[str], workdir: str):
    """The benchmark script's arguments for one phantom (its ``prepare_phantom`` and ``build_trainer`` read them)."""
    argv = ["-c", "3d_fullres", "-device", args.device, "--phantom-kind", kind, "--phantom-shape",
            *map(str, args.phantom_shape), "--phantom-spacing", "1", "1", "1", "--unregistered-shape",
            *map(str, args.unregistered_shape or args.phantom_shape), "--phantom-cases",
            *map(str, args.phantom_cases), "--predict-cases", "0", "--workdir", workdir, "-tr", *trainers]
    if args.n_proc_da is not None:
        argv += ["--n-proc-da", str(args.n_proc_da)]
    argv += ["-np", str(args.num_processes)]
    if args.gpu_memory_target is not None:
        argv += ["--gpu-memory-target", str(args.gpu_memory_target)]
    if args.compile == "auto" and args.device == "cuda":
        argv.append("--compile")  # benchmark_environment sets nnUNet_compile=true: nnU-Net compiles
    parsed = bench.parse_args(argv)
    parsed.worker_configuration = "3d_fullres"
    return parsed


def narrow_plans(folder: str, divisor: int) -> None:
    """Divide the widths of every plans file's 3d_fullres network in ``folder`` by ``divisor`` (at least 4 channels),
    once (the plans record it); the CPU test's way to run real steps of every trainer in seconds."""
    import glob

    for path in glob.glob(os.path.join(folder, "*Plans*.json")):
        with open(path) as handle:
            plans = json.load(handle)
        configuration = plans.get("configurations", {}).get("3d_fullres")
        if configuration is None or plans.get("gpu_check_width_divisor") == divisor:
            continue
        kwargs = configuration["architecture"]["arch_kwargs"]
        kwargs["features_per_stage"] = [max(4, int(f) // divisor) for f in kwargs["features_per_stage"]]
        plans["gpu_check_width_divisor"] = divisor
        write_json(path, plans)


def _cuda_sync_warnings(step, device) -> tuple[object, int | None]:
    """Run ``step()``; on CUDA also the number of synchronising calls ``set_sync_debug_mode("warn")`` reports."""
    import torch

    if device.type != "cuda":
        return step(), None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message).lower() for w in caught)


def _scale(trainer) -> float | None:
    return None if trainer.grad_scaler is None else float(trainer.grad_scaler.get_scale())


def _finite_losses(outputs: dict) -> tuple[dict, bool]:
    """The step's losses as floats (the gradient share, NaN when not measured, left out) and whether all are finite."""
    import numpy as np

    losses = {k: float(np.asarray(v)) for k, v in outputs.items() if k != "grad_share"}
    return losses, all(math.isfinite(v) for v in losses.values())


@contextlib.contextmanager
def _bare(trainer, bench):
    """The trainer's network uncompiled for the duration (dispatch-mode counters see every operation eagerly)."""
    compiled = trainer.network
    trainer.network = bench._bare_network(trainer)
    try:
        yield
    finally:
        trainer.network = compiled


@contextlib.contextmanager
def _prefetched_unlabeled(trainer):
    """The trainer's unlabelled stream(s) hold one batch drawn beforehand for the duration: the step's counters then
    see the step alone, not the augmentation (on a GPU it runs in nnU-Net's worker processes)."""
    stream = getattr(trainer, "dataloader_unlabeled", None)
    if stream is not None:
        trainer.dataloader_unlabeled = [None if s is None else iter([next(s)]) for s in stream] \
            if isinstance(stream, list) else iter([next(stream)])
    try:
        yield
    finally:
        if stream is not None:
            trainer.dataloader_unlabeled = stream


def plans_target_gib(trainer, args) -> tuple[float, str]:
    """(GPU memory in GiB the trainer's plans were made for, where that number comes from)."""
    from nnunet_mmssl.planners.mmssl_plans import get_mmssl_block

    record = ((get_mmssl_block(trainer.plans_manager.plans) or {}).get("memory") or {}).get("3d_fullres")
    if record and record.get("gpu_memory_target_in_gb"):
        return float(record["gpu_memory_target_in_gb"]), f"{trainer.plans_manager.plans_name} mmssl block"
    if args.gpu_memory_target is not None:
        return float(args.gpu_memory_target), "-gpu_memory_target of the planning"
    return NNUNET_DEFAULT_TARGET_GB, "nnU-Net's default target"


def measure_trainer(bench, bargs, args, name: str, device, folder: str, dataset_json: dict) -> dict:
    """Build ``name`` as nnUNetv2_train does and run its real steps; the row of facts (see the module docstring)."""
    import torch
    from torch._dynamo import OptimizedModule
    from torch._dynamo.utils import counters
    from torch.utils.flop_counter import FlopCounterMode

    from nnunet_mmssl.diagnostics import count_host_syncs

    row: dict = {"trainer": name}
    torch._dynamo.reset()
    counters.clear()
    trainer, row["plans"] = bench.build_trainer(bargs, name, device, folder, dataset_json)
    trainer.print_to_log_file = lambda *a, **k: None
    try:
        trainer.on_train_start()  # nnU-Net's initialize: builds the network, compiles it on CUDA (nnUNet_compile)
        trainer.on_train_epoch_start()
        if args.compile == "auto" and not isinstance(trainer.network, OptimizedModule):
            # nnU-Net never compiles on the CPU: trace it here, as nnU-Net's torch.compile would (no code generation)
            trainer.network = torch.compile(trainer.network, backend="eager")
            row["compile"] = "torch.compile(backend='eager') by the check (nnU-Net compiles on CUDA only)"
        elif isinstance(trainer.network, OptimizedModule):
            row["compile"] = "nnU-Net's torch.compile (inductor)"
        row["compiled"] = isinstance(trainer.network, OptimizedModule)
        row["amp"] = trainer.grad_scaler is not None
        labelled, unlabelled = bench.effective_batch_size(trainer)
        patch = [int(p) for p in trainer.configuration_manager.patch_size]
        row.update(batch=f"{labelled}+{unlabelled}", batch_labeled=labelled, batch_unlabeled=unlabelled,
                   patch_size=patch, patch="x".join(map(str, patch)))
        check = trainer.memory_check() if hasattr(trainer, "memory_check") else None
        # nnU-Net's own trainer on nnU-Net's plans is the budget, by definition (benchmark_trainers.py's est/plan)
        row["est_over_budget"] = 1.0 if check is None else float(check["ratio"])
        row["plans_gpu_target_gib"], row["plans_gpu_target_source"] = plans_target_gib(trainer, args)
        stream = getattr(trainer, "dataloader_unlabeled", None)
        proxies = []
        if stream is not None:
            trainer.dataloader_unlabeled, proxies = bench.wrap_unlabeled(stream)

        losses, seconds, skipped, finite = [], [], 0, True
        for index in range(args.warmup + args.steps):
            timed = index >= args.warmup
            if index == args.warmup and device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            batch = next(trainer.dataloader_train)
            for proxy in proxies:
                proxy.reset()
            before = _scale(trainer)
            bench._sync(device)
            start = time.perf_counter()
            outputs = trainer.train_step(batch)
            bench._sync(device)
            elapsed = time.perf_counter() - start - sum(p.seconds for p in proxies)
            after = _scale(trainer)
            step_losses, ok = _finite_losses(outputs)
            finite = finite and ok
            losses.append(step_losses)
            skipped += int(before is not None and after < before)
            if index == 0:
                row["first_step_s"] = elapsed  # compilation included
            if timed:
                seconds.append(elapsed)
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        row.update(losses=losses, losses_finite=finite, step_seconds=seconds, s_per_iter=sum(seconds) / len(seconds),
                   scaler_skipped_steps=skipped if trainer.grad_scaler is not None else None,
                   final_scale=_scale(trainer))
        row["graph_breaks"] = sum(counters["graph_break"].values()) if row["compiled"] else None
        row["graph_break_reasons"] = sorted(counters["graph_break"])[:5] if row["compiled"] else []
        row["graphs"] = counters["stats"]["unique_graphs"] if row["compiled"] else None

        if device.type == "cuda":  # one more compiled step, its synchronisations reported by CUDA itself
            _, row["cuda_sync_warnings"] = _cuda_sync_warnings(
                lambda: trainer.train_step(next(trainer.dataloader_train)), device)
        # two more steps on the uncompiled network (dispatch-mode counters see every operation eagerly), each on a
        # batch drawn beforehand: one counting host-device synchronisations, one counting FLOPs
        with _bare(trainer, bench):
            batch = next(trainer.dataloader_train)
            with _prefetched_unlabeled(trainer), count_host_syncs() as syncs:
                outputs = trainer.train_step(batch)
            row.update(host_syncs=syncs.total, host_syncs_by_op=dict(syncs.by_op))
            row["losses_finite"] = row["losses_finite"] and _finite_losses(outputs)[1]
            batch = next(trainer.dataloader_train)
            with _prefetched_unlabeled(trainer), FlopCounterMode(display=False) as flops:
                outputs = trainer.train_step(batch)
            row["flops_per_iter"] = int(flops.get_total_flops())
            row["losses_finite"] = row["losses_finite"] and _finite_losses(outputs)[1]
    finally:
        if getattr(trainer, "dataloader_unlabeled", None) is not None:
            trainer.dataloader_unlabeled = bench.unwrap_unlabeled(trainer.dataloader_unlabeled)
        bench._finish_augmenters(trainer)
    return row


def add_ratios(bench, rows: list[dict]) -> None:
    """Time, FLOP and memory ratios to the reference of the same phantom, and the efficiency (in place)."""
    for row in rows:
        base = next((r for r in rows if r["trainer"] == REFERENCE and r["phantom"] == row["phantom"]
                     and r.get("s_per_iter")), {})
        row["time_ratio"] = bench.ratio(row.get("s_per_iter"), base.get("s_per_iter"))
        row["flop_ratio"] = bench.ratio(row.get("flops_per_iter"), base.get("flops_per_iter"))
        row["efficiency"] = bench.efficiency(row["flop_ratio"], row["time_ratio"])
        row["mem_ratio"] = bench.ratio(row.get("peak_mem_gib"), base.get("peak_mem_gib"))


def format_table(bench, rows: list[dict]) -> str:
    width = max(len("trainer"), *(len(r["trainer"]) for r in rows))
    header = f"{'trainer':<{width}}" + "".join(f" {title:>{w}}" for _, title, w, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        if row.get("error") or row.get("skipped"):
            lines.append(f"{row['trainer']:<{width}} {row.get('phantom', '')}: "
                         f"{'ERROR ' + row['error'] if row.get('error') else 'skipped: ' + row['skipped']}")
            continue
        lines.append(f"{row['trainer']:<{width}}" + "".join(" " + bench._cell(row.get(k), w, fmt)
                                                          for k, _, w, fmt in COLUMNS))
    lines.append(f"ratios: to {REFERENCE} on the same phantom; syncs: host-device synchronisations of one step "
                 f"(dispatcher count); breaks: Dynamo graph breaks over all steps; est/plan: feature-map estimate "
                 f"over the plans' budget")
    return "\n".join(lines)


def write_json(path: str, summary: dict) -> None:
    """Write ``summary`` under a temporary name and rename it (a stopped run never leaves half a file)."""
    partial = path + ".partial"
    with open(partial, "w") as handle:
        json.dump(summary, handle, indent=1)
    os.replace(partial, path)


def run(args) -> int:
    start = time.perf_counter()
    bench = benchmark_module()
    out = os.path.abspath(args.out)
    workdir = os.path.abspath(args.workdir or os.path.join(out, "work"))
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    groups = plan(args)
    first = bench_args(bench, args, groups[0][0], groups[0][1], workdir)
    os.environ.update(bench.benchmark_environment(first, workdir))  # before nnU-Net is imported: it reads its paths
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{PROG}: error: --device cuda, but torch {torch.__version__} sees no CUDA device. Use --device cpu.",
              file=sys.stderr)
        return 2
    summary = {"device": args.device, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items()},
               "nnUNet_compile": os.environ.get("nnUNet_compile"), "complete": False, "rows": []}
    json_path = os.path.join(out, "gpu_check.json")
    for kind, trainers in groups:
        bargs = bench_args(bench, args, kind, trainers, workdir)
        print(f"[{kind}] preparing the phantom ...", flush=True)
        bargs.dataset = bench.prepare_phantom(bargs, workdir)
        _, _, folder, dataset_json = bench.worker_setup(bargs)
        if args.width_divisor > 1:
            narrow_plans(folder, args.width_divisor)
        for name in trainers:
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                summary["rows"].append({"trainer": name, "phantom": kind,
                                        "skipped": f"{elapsed:.0f} s of --budget-s {args.budget_s:.0f} spent"})
                continue
            print(f"[{kind}] {name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                row = measure_trainer(bench, bargs, args, name, device, folder, dataset_json)
            except Exception as error:  # noqa: BLE001 - recorded per trainer; the others go on
                traceback.print_exc()
                row = {"trainer": name, "error": bench.format_errors(error)}
            gc.collect()  # the trainer is gone: its GPU memory back before the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row.update(phantom=kind, wall_s=time.perf_counter() - t0)
            summary["rows"].append(row)
            error = f"; {row['error']}" if "error" in row else ""
            print(f"[{kind}] {name}: {row.get('s_per_iter', float('nan')):.3f} s/iter, losses finite "
                  f"{row.get('losses_finite')}, {row['wall_s']:.0f} s{error}", flush=True)
            write_json(json_path, summary)
    add_ratios(bench, summary["rows"])
    summary.update(complete=True, wall_s=time.perf_counter() - start)
    table = format_table(bench, summary["rows"])
    device_name = summary["gpu"] or "cpu"
    text = (f"gpu_check on {device_name}, torch {torch.__version__}, nnUNet_compile {summary['nnUNet_compile']}, "
            f"{args.warmup} warm-up + {args.steps} timed steps per trainer\n{table}\n")
    with open(os.path.join(out, "gpu_check.txt"), "w") as handle:
        handle.write(text)
    write_json(json_path, summary)
    print("\n" + text + f"written: {json_path}, {os.path.join(out, 'gpu_check.txt')}", flush=True)
    ok = all(r.get("losses_finite") and not r.get("error") for r in summary["rows"] if not r.get("skipped"))
    return 0 if ok else 1


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

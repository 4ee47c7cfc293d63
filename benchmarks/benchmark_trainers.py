"""Time nnU-Net's own ``nnUNetTrainer`` and each of our trainers on the same dataset and plans; print a table.

    python benchmarks/benchmark_trainers.py [-d DATASET_ID] [-c 2d 3d_fullres] [-tr nnUNetTrainer MemCifSSLTrainer ...]
        [--iterations 20] [--warmup 3] [-device cpu|cuda] [--predict-cases 2] [--phantom] [--workdir DIR]
        [--json OUT.json]

Without ``-d`` (or with ``--phantom``) the script builds its own small two-modality phantom dataset in ``--workdir``
(default: a temporary folder) -- convert + nnU-Net planning/preprocessing of the requested configurations, labelled
and unlabelled cases -- and points nnU-Net's ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` at it.
With ``-d`` it reads your ``nnUNet_raw`` / ``nnUNet_preprocessed``; model folders always go to
``<workdir>/nnUNet_results`` so that no trained model of yours is overwritten.

Each (configuration, trainer) is measured in its own child process (this script with the hidden ``--worker`` flag,
printing one ``BENCHMARK_RESULT {json}`` line) so that peak memory is that trainer's alone. What is measured and how
is described in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence

RESULT_MARKER = "BENCHMARK_RESULT "
BASELINE_TRAINER = "nnUNetTrainer"
DEFAULT_TRAINERS = ("nnUNetTrainer", "PlainSupervisedTrainer", "MeanTeacherTrainer", "MemCifSupervisedTrainer",
                    "MemCifSSLTrainer", "MMFMCMLTrainer")
DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres")
PHANTOM_ID = 979
PHANTOM_NAME = "MMSSLBenchPhantom"
PHANTOM_MARKER = "benchmark_phantom.json"
#: the unregistered phantom (CT-like cases of some patients, MR-like of others) for DBDC and the pooled U-Net
UNREGISTERED_PHANTOM_ID = 978
UNREGISTERED_PHANTOM_NAME = "MMSSLBenchPhantomUnreg"
UNREGISTERED_PHANTOM_MARKER = "benchmark_phantom_unregistered.json"
#: trainers that need an unregistered dataset (one modality per case)
UNREGISTERED_TRAINER_PREFIXES = ("DBDC", "PooledUNet")
PHANTOM_KINDS = ("auto", "registered", "unregistered")

#: (key, header, width, format) of the table's numeric columns, in order
COLUMNS = (
    ("batch", "batch", 7, "{}"),
    ("s_per_iter", "s/iter", 8, "{:.3f}"),
    ("time_ratio", "time x", 7, "{:.2f}"),
    ("gflop_per_iter", "GFLOP/it", 9, "{:.1f}"),
    ("flop_ratio", "FLOP x", 7, "{:.2f}"),
    ("efficiency", "effic.", 7, "{:.2f}"),
    ("compute_efficiency", "eff.cmp", 7, "{:.2f}"),
    ("interleaved_efficiency", "eff.ilv", 7, "{:.2f}"),
    ("peak_mem_mib", "peak MiB", 9, "{:.0f}"),
    ("mem_ratio", "mem x", 6, "{:.2f}"),
    ("train_mem_ratio", "tmem x", 6, "{:.2f}"),
    ("estimate_ratio", "est x", 6, "{:.2f}"),
    ("budget_ratio", "est/plan", 8, "{:.2f}"),
    ("data_wait_pct", "wait %", 7, "{:.1f}"),
    ("predict_s_per_case", "pred s/case", 11, "{:.2f}"),
    ("predict_ratio", "pred x", 7, "{:.2f}"),
    ("predict_network_s_per_case", "net s/case", 10, "{:.2f}"),
    ("predict_network_ratio", "net x", 6, "{:.2f}"),
    ("inference_flop_ratio", "inf FLOP x", 10, "{:.2f}"),
    ("inference_efficiency", "inf.ilv", 7, "{:.2f}"),
    ("unsup_grad_share", "u.share", 8, "{:.3g}"),
    ("prototype_pct", "proto %", 7, "{:.1f}"),
)


# ============================================================================ pure helpers
class WaitTimer:
    """Iterator proxy that accumulates the time spent in ``next(inner)`` (waiting for a batch).

    Attribute access falls through to the wrapped iterator. nnU-Net shuts its augmenters down with an ``isinstance``
    check, so put the original back (:attr:`inner`) before ``on_train_end``.
    """

    def __init__(self, inner: Iterator, clock=time.perf_counter):
        self.inner = inner
        self.clock = clock
        self.seconds = 0.0
        self.calls = 0

    def __iter__(self):
        return self

    def __next__(self):
        start = self.clock()
        try:
            return next(self.inner)
        finally:
            self.seconds += self.clock() - start
            self.calls += 1

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def __getattr__(self, name):
        if name == "inner":  # not yet set (e.g. while unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing or the reference is not positive."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def efficiency(flop_ratio: float | None, time_ratio: float | None) -> float | None:
    """FLOP ratio / time ratio: FLOP throughput relative to the baseline (> 1: more FLOP/s than the baseline)."""
    return ratio(flop_ratio, time_ratio)


def resolve_phantom_kind(kind: str, trainers: Sequence[str]) -> str:
    """The phantom to build: ``kind`` itself, or for ``"auto"`` the unregistered phantom when any trainer needs one
    (DBDC*, PooledUNet*: they train on one modality per case), else the registered one.

    Raises:
        ValueError: an unknown kind (naming the choices).
    """
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"--phantom-kind {kind!r}: choose one of {', '.join(PHANTOM_KINDS)}")
    if kind != "auto":
        return kind
    return "unregistered" if any(t.startswith(UNREGISTERED_TRAINER_PREFIXES) for t in trainers) else "registered"


def prototype_share(prototype_seconds: float | None, step_seconds: float | None) -> float | None:
    """Share of the timed step time a DBDC trainer spent in prototype work (Sinkhorn assignment + EMA update of the
    prototypes after the optimizer step, and the MPCL loss; the trainer's ``prototype_seconds``); None for trainers
    without prototypes or without a time."""
    if prototype_seconds is None or step_seconds is None or step_seconds <= 0:
        return None
    return prototype_seconds / step_seconds


def choose_baseline(rows: Sequence[dict], preferred: str = BASELINE_TRAINER) -> dict | None:
    """The row the ratios refer to: ``preferred`` if it was measured, else the first row with a time."""
    measured = [r for r in rows if r.get("s_per_iter") is not None]
    for row in measured:
        if row["trainer"] == preferred:
            return row
    return measured[0] if measured else None


def paired_time_ratio(seconds: Sequence[float] | None, reference: Sequence[float] | None,
                      repeats: int = 1) -> float | None:
    """Median over rounds of (fastest of ``seconds`` in a round) / (fastest of ``reference`` in the same round).

    Both lists hold ``repeats`` consecutive timings per round, rounds in order (as :func:`interleave` returns them).
    Pairing by round compares two trainers measured seconds apart, in the same phase of a machine whose speed
    drifts over minutes (seen here: the same step 1.15 s in one round and 1.74 s in another); the fastest repetition
    of each over the whole run may come from different phases. Rounds present in both lists only (a trainer that
    failed is left out of the later rounds). None without a common round.
    """
    if not seconds or not reference or repeats < 1:
        return None
    rounds = min(len(seconds), len(reference)) // repeats
    pairs = [(min(seconds[r * repeats:(r + 1) * repeats]), min(reference[r * repeats:(r + 1) * repeats]))
             for r in range(rounds)]
    ratios = [value / base for value, base in pairs if base > 0]
    return statistics.median(ratios) if ratios else None


def _compute_seconds(row: dict) -> float | None:
    """Step time minus the time spent waiting for data (with ``--n-proc-da 0``: minus the augmentation itself)."""
    if row.get("s_per_iter") is None or row.get("data_wait_fraction") is None:
        return None
    return row["s_per_iter"] * (1.0 - row["data_wait_fraction"])


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """``items`` rotated left by ``shift`` (round ``r`` of ``--rounds`` starts with trainer ``r``)."""
    items = list(items)
    if not items:
        return items
    shift %= len(items)
    return items[shift:] + items[:shift]


def merge_rounds(rounds: Sequence[dict]) -> dict:
    """One row from the rows of the same (configuration, trainer) measured in several rounds (``--rounds``).

    The first round's row is the base (FLOPs, memory estimate, prediction: measured once). ``s_per_iter`` is the
    median of the rounds' mean step times (``round_s_per_iter``), so that one round in a slow phase of the machine
    does not move it (with three rounds or more); the timed steps of all rounds are pooled for
    ``s_per_iter_pooled_mean``, min, median and ``data_wait_fraction`` (total wait / total step time); peak memory is
    the largest of the rounds; errors of all rounds are joined.
    """
    if not rounds:
        raise ValueError("merge_rounds needs at least one round")
    merged = dict(rounds[0])
    if len(rounds) == 1:
        return merged
    timed = [r for r in rounds if r.get("step_seconds")]
    merged.pop("error", None)
    errors = [f"round {i + 1}: {r['error']}" for i, r in enumerate(rounds) if r.get("error")]
    if errors:
        merged["error"] = "; ".join(errors)
    merged["rounds"] = len(rounds)
    merged["round_s_per_iter"] = [r.get("s_per_iter") for r in rounds]
    if timed:
        steps = [s for r in timed for s in r["step_seconds"]]
        total = sum(steps)
        waits = {key: sum(r.get(key) or 0.0 for r in timed)
                 for key in ("data_wait_s", "data_wait_labeled_s", "data_wait_unlabeled_s")}
        proto = [r.get("prototype_s") for r in timed]
        if all(p is not None for p in proto):
            merged["prototype_s"] = sum(proto)
            merged["prototype_share"] = prototype_share(sum(proto), total)
        else:  # never a share of part of the steps
            merged.pop("prototype_s", None)
            merged.pop("prototype_share", None)
        merged.update(step_seconds=steps, s_per_iter=statistics.median(r["s_per_iter"] for r in timed),
                      s_per_iter_pooled_mean=total / len(steps), s_per_iter_min=min(steps),
                      s_per_iter_median=sorted(steps)[len(steps) // 2], **waits,
                      data_wait_fraction=waits["data_wait_s"] / total if total > 0 else None)
        for key in ("flops_per_iter", "memory_estimate", "feature_map_size", "budget_ratio", "batch_labeled",
                    "batch_unlabeled", "patch_size"):
            if merged.get(key) is None:
                merged[key] = next((r[key] for r in timed if r.get(key) is not None), None)
    for key in ("peak_mem_mib", "train_mem_mib", "ru_maxrss_mib"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            merged[key] = max(values)
    merged["wall_s"] = sum(r.get("wall_s") or 0.0 for r in rounds)
    return merged


def add_ratios(rows: Sequence[dict], preferred: str = BASELINE_TRAINER) -> str | None:
    """Fill the ratio columns of ``rows`` (in place) relative to the baseline row; return the baseline's name."""
    base = choose_baseline(rows, preferred) or {}
    for row in rows:
        row["time_ratio"] = ratio(row.get("s_per_iter"), base.get("s_per_iter"))
        row["flop_ratio"] = ratio(row.get("flops_per_iter"), base.get("flops_per_iter"))
        row["efficiency"] = efficiency(row["flop_ratio"], row["time_ratio"])
        row["compute_efficiency"] = efficiency(row["flop_ratio"], ratio(_compute_seconds(row), _compute_seconds(base)))
        repeats = row.get("interleaved_repeats") or 1
        row["interleaved_time_ratio"] = paired_time_ratio(
            row.get("interleaved_step_seconds"), base.get("interleaved_step_seconds"), repeats) \
            or ratio(row.get("interleaved_s_per_iter"), base.get("interleaved_s_per_iter"))
        row["interleaved_efficiency"] = efficiency(
            ratio(row.get("interleaved_flops_per_iter"), base.get("interleaved_flops_per_iter")),
            row["interleaved_time_ratio"])
        row["inference_flop_ratio"] = ratio(row.get("inference_flops_per_patch"), base.get("inference_flops_per_patch"))
        row["inference_time_ratio"] = paired_time_ratio(
            row.get("inference_step_seconds"), base.get("inference_step_seconds"), repeats) \
            or ratio(row.get("inference_s_per_patch"), base.get("inference_s_per_patch"))
        row["inference_efficiency"] = efficiency(row["inference_flop_ratio"], row["inference_time_ratio"])
        row["mem_ratio"] = ratio(row.get("peak_mem_mib"), base.get("peak_mem_mib"))
        row["train_mem_ratio"] = ratio(row.get("train_mem_mib"), base.get("train_mem_mib"))
        row["estimate_ratio"] = ratio(row.get("memory_estimate"), base.get("memory_estimate"))
        row["predict_ratio"] = ratio(row.get("predict_s_per_case"), base.get("predict_s_per_case"))
        row["predict_network_ratio"] = ratio(row.get("predict_network_s_per_case"),
                                             base.get("predict_network_s_per_case"))
        flops = row.get("flops_per_iter")
        row["gflop_per_iter"] = None if flops is None else flops / 1e9
        wait = row.get("data_wait_fraction")
        row["data_wait_pct"] = None if wait is None else 100.0 * wait
        share = row.get("prototype_share")
        row["prototype_pct"] = None if share is None else 100.0 * share
        if row.get("batch_labeled") is not None:
            row["batch"] = f"{row['batch_labeled']}+{row.get('batch_unlabeled') or 0}"
    return base.get("trainer")


def _cell(value, width: int, fmt: str) -> str:
    text = "-" if value is None else fmt.format(value)
    return f"{text:>{width}}"


def format_table(rows: Sequence[dict], baseline: str | None = None) -> str:
    """Fixed-width table of measured rows (run :func:`add_ratios` first). A row whose training could not be measured
    shows its error instead of numbers; errors of partly measured rows are listed below the table."""
    name_width = max([len("trainer")] + [len(r["trainer"]) + 1 for r in rows])  # + 1: the baseline's "*"
    header = f"{'trainer':<{name_width}}" + "".join(f" {title:>{width}}" for _, title, width, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    notes = []
    for row in rows:
        name = row["trainer"] + ("*" if baseline is not None and row["trainer"] == baseline else "")
        if row.get("s_per_iter") is None:
            message = f"ERROR: {row.get('error') or 'no result'}"
            lines.append(f"{name:<{name_width}} " + message[:len(header) - name_width - 1])
            continue
        lines.append(f"{name:<{name_width}}" + "".join(
            " " + _cell(row.get(key), width, fmt) for key, _, width, fmt in COLUMNS))
        if row.get("error"):
            notes.append(f"  {row['trainer']}: {row['error']}")
    if baseline is not None:
        lines.append(f"* ratios are relative to {baseline}")
    if notes:
        lines.append("errors (partly measured rows):")
        lines.extend(notes)
    return "\n".join(lines)


def parse_worker_output(text: str) -> dict | None:
    """The JSON of the last ``BENCHMARK_RESULT`` line of a worker's output, or None."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                return json.loads(line[len(RESULT_MARKER):])
            except json.JSONDecodeError:
                return None
    return None


def effective_batch_size(trainer) -> tuple[int, int]:
    """(labelled, unlabelled) patches per training step; unlabelled is 0 without an unlabelled stream.

    A trainer with one loader per modality (DBDC: ``dataloader_train.loaders``, ``dataloader_unlabeled`` a list with
    None where a modality has no unlabelled case) draws a batch from each loader per step.
    """
    batch = int(trainer.batch_size)
    loaders = getattr(getattr(trainer, "dataloader_train", None), "loaders", None)
    labelled = batch * (len(loaders) if isinstance(loaders, (list, tuple)) else 1)
    unlabelled = 0
    stream = getattr(trainer, "dataloader_unlabeled", None)
    if getattr(trainer, "use_unlabeled", False) and stream is not None:
        per_batch = int(getattr(trainer, "unlabeled_batch_size", None) or batch)
        streams = sum(s is not None for s in stream) if isinstance(stream, (list, tuple)) else 1
        unlabelled = per_batch * streams
    return labelled, unlabelled


def wrap_unlabeled(stream):
    """``stream`` behind :class:`WaitTimer` proxies: one for an iterator, one per loader for a list of loaders (None
    kept). Returns (the wrapped stream, the timers)."""
    if isinstance(stream, (list, tuple)):
        wrapped = [None if s is None else WaitTimer(s) for s in stream]
        return wrapped, [w for w in wrapped if w is not None]
    timer = WaitTimer(stream)
    return timer, [timer]


def unwrap_unlabeled(stream):
    """The original stream of :func:`wrap_unlabeled`'s result (anything else unchanged)."""
    if isinstance(stream, list):
        return [s.inner if isinstance(s, WaitTimer) else s for s in stream]
    return stream.inner if isinstance(stream, WaitTimer) else stream


def case_file_lists(file_names: Sequence[str], file_ending: str, max_cases: int) -> list[tuple[str, list[str]]]:
    """Group nnU-Net image files (``CASE_XXXX<ending>``) by case: ``[(case, [files in channel order]), ...]`` for the
    first ``max_cases`` cases in sorted order."""
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending) + "$")
    cases: dict[str, list[tuple[int, str]]] = {}
    for name in file_names:
        match = pattern.match(os.path.basename(name))
        if match:
            cases.setdefault(match.group(1), []).append((int(match.group(2)), name))
    return [(case, [f for _, f in sorted(cases[case])]) for case in sorted(cases)[:max_cases]]


def cases_by_modality(cases: Sequence[tuple[str, list[str]]],
                      case_modality: dict[str, str] | None) -> list[tuple[str | None, list[tuple[str, list[str]]]]]:
    """Group :func:`case_file_lists` output by the modality recorded per case (an unregistered dataset's
    ``mmssl.case_modality``), modalities in order of first appearance; ``[(None, cases)]`` without a record.

    Raises:
        ValueError: a case without a recorded modality (naming it).
    """
    if not case_modality:
        return [(None, list(cases))]
    groups: dict[str, list] = {}
    for case, files in cases:
        if case not in case_modality:
            raise ValueError(f"case {case} has no modality in dataset.json's mmssl.case_modality: reconvert the "
                             f"dataset with nnUNetv2_mmssl_convert --source-modality")
        groups.setdefault(case_modality[case], []).append((case, files))
    return list(groups.items())


def format_errors(error: BaseException, limit: int = 300) -> str:
    """One line: ``Type: message`` (shortened)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def default_n_proc_da(device: str) -> int:
    """Augmentation workers per trainer when ``--n-proc-da`` is not given: 2 on CPU (the CPU also trains), on CUDA
    nnU-Net's own fallback of 12 limited to the machine's cores."""
    return 2 if device == "cpu" else min(12, os.cpu_count() or 1)


# ============================================================================ arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time nnUNetTrainer and our trainers on the same dataset and plans (see benchmarks/README.md).")
    parser.add_argument("-d", "--dataset", default=None,
                        help="nnU-Net dataset id or name (needs nnUNet_raw/nnUNet_preprocessed); default: phantom")
    parser.add_argument("-c", "--configurations", nargs="+", default=list(DEFAULT_CONFIGURATIONS),
                        help=f"configurations (default {' '.join(DEFAULT_CONFIGURATIONS)})")
    parser.add_argument("-tr", "--trainers", nargs="+", default=list(DEFAULT_TRAINERS),
                        help=f"trainers (default {' '.join(DEFAULT_TRAINERS)})")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
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


def worker_argv(args: argparse.Namespace, dataset: str, configuration: str, trainer: str,
                output_folder: str, predict_cases: int | None = None, interleaved: bool = False) -> list[str]:
    """Command line of the child process measuring one (configuration, trainer); with ``interleaved``, of the child
    running the interleaved compute measurement of the comma-separated trainers ``trainer``."""
    predict_cases = args.predict_cases if predict_cases is None else predict_cases
    argv = [sys.executable, os.path.abspath(__file__), "--worker", "-d", str(dataset), "-p", args.plans,
            "-f", str(args.fold), "--iterations", str(args.iterations), "--warmup", str(args.warmup),
            "-device", args.device, "--predict-cases", str(predict_cases), "--n-proc-da", str(args.n_proc_da),
            "--interleaved-rounds", str(args.interleaved_rounds), "--interleaved-steps", str(args.interleaved_steps),
            "--worker-configuration", configuration, "--worker-trainer", trainer, "--worker-output", output_folder]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.mirror:
        argv.append("--mirror")
    if args.mmssl_plans:
        argv += ["--mmssl-plans", args.mmssl_plans]
    if interleaved:
        argv.append("--worker-interleaved")
    return argv


# ============================================================================ worker (one child process)
def _current_rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


def _ru_maxrss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _vm_hwm_mib() -> float | None:
    """Peak RSS of this process's own address space (``VmHWM`` of /proc/self/status, Linux), or None."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mib() -> tuple[float, str]:
    """(peak RSS in MiB, how it was read). Linux keeps ``ru_maxrss`` across ``execve``, so a worker started by a big
    parent reports at least the parent's RSS at fork time; ``VmHWM`` belongs to the worker's own address space and
    is preferred where it exists."""
    hwm = _vm_hwm_mib()
    if hwm is not None:
        return hwm, "peak RSS (VmHWM)"
    return _ru_maxrss_mib(), "peak RSS (ru_maxrss)"


def _bare_network(trainer):
    from torch._dynamo import OptimizedModule

    module = trainer.network.module if getattr(trainer, "is_ddp", False) else trainer.network
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def _network_for_inference(trainer):
    """The trainer's bare network as ``nnUNetv2_predict`` runs it: eval mode and no deep supervision, through the
    trainer's own hooks (ours also switch their networks to the fused output alone)."""
    trainer.on_validation_epoch_start()
    trainer.set_deep_supervision_enabled(False)
    network = _bare_network(trainer)
    if hasattr(network, "set_inference_modality"):  # unregistered models predict one modality at a time
        network.set_inference_modality(0)
    return network


def _finish_augmenters(trainer) -> None:
    for name in ("dataloader_train", "dataloader_val", "dataloader_unlabeled"):
        loader = getattr(trainer, name, None)
        for one in loader if isinstance(loader, (list, tuple)) else [loader]:
            if isinstance(one, WaitTimer):
                one = one.inner
            if hasattr(one, "_finish"):
                try:
                    one._finish()
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    pass


def measure_training(trainer, args, result: dict) -> None:
    """Timed steps with waiting proxies, one FLOP-counted step, peak memory and the memory estimate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cuda = trainer.device.type == "cuda"
    labelled, unlabelled = effective_batch_size(trainer)
    result.update(batch_labeled=labelled, batch_unlabeled=unlabelled,
                  patch_size=[int(p) for p in trainer.configuration_manager.patch_size])
    network = _bare_network(trainer)
    feature_map = int(network.compute_conv_feature_map_size(trainer.configuration_manager.patch_size))
    result.update(feature_map_size=feature_map, memory_estimate=feature_map * (labelled + unlabelled))
    # the step's estimate over what its plans budget (1 for nnU-Net's trainer on nnU-Net's plans, by definition)
    result["budget_ratio"] = trainer.memory_check()["ratio"] if hasattr(trainer, "memory_check") else 1.0

    train_proxy = WaitTimer(trainer.dataloader_train)
    trainer.dataloader_train = train_proxy
    unlabelled_proxies = []
    if getattr(trainer, "dataloader_unlabeled", None) is not None:
        trainer.dataloader_unlabeled, unlabelled_proxies = wrap_unlabeled(trainer.dataloader_unlabeled)
    proxies = [train_proxy, *unlabelled_proxies]

    for _ in range(args.warmup):
        trainer.train_step(next(trainer.dataloader_train))
    _sync(trainer.device)
    result["rss_before_steps_mib"] = _current_rss_mib()
    for proxy in proxies:
        proxy.reset()
    has_prototypes = getattr(trainer, "prototype_bank", None) is not None and hasattr(trainer, "_prototype_seconds")
    if has_prototypes:
        trainer._prototype_seconds = 0.0
    step_seconds = []
    for _ in range(args.iterations):
        _sync(trainer.device)
        start = time.perf_counter()
        trainer.train_step(next(trainer.dataloader_train))
        _sync(trainer.device)
        step_seconds.append(time.perf_counter() - start)
    total = sum(step_seconds)
    wait_labelled = train_proxy.seconds
    wait_unlabelled = sum(p.seconds for p in unlabelled_proxies)
    result.update(s_per_iter=total / len(step_seconds), s_per_iter_min=min(step_seconds),
                  s_per_iter_median=sorted(step_seconds)[len(step_seconds) // 2], step_seconds=step_seconds,
                  data_wait_s=wait_labelled + wait_unlabelled, data_wait_labeled_s=wait_labelled,
                  data_wait_unlabeled_s=wait_unlabelled, data_wait_fraction=(wait_labelled + wait_unlabelled) / total)
    if has_prototypes:  # read before the FLOP-counted and gradient-share steps add to it
        result["prototype_s"] = float(trainer._prototype_seconds)
        result["prototype_share"] = prototype_share(result["prototype_s"], total)

    # one more real step (its batch from the loaders, its optimizer step) inside the FLOP counter
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(next(trainer.dataloader_train))
    _sync(trainer.device)
    result["flops_per_iter"] = int(counter.get_total_flops())
    result["unsup_grad_share"] = measure_gradient_share(trainer, args.share_steps)

    if cuda:
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated(trainer.device) / 2 ** 20
        result["peak_mem_reserved_mib"] = torch.cuda.max_memory_reserved(trainer.device) / 2 ** 20
        result["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_mem_mib"], result["peak_mem_kind"] = peak_rss_mib()
        result["ru_maxrss_mib"] = _ru_maxrss_mib()
    baseline = result.get("rss_after_imports_mib") if not cuda else 0.0
    if result.get("peak_mem_mib") is not None and baseline is not None:
        result["train_mem_mib"] = result["peak_mem_mib"] - baseline


def measure_gradient_share(trainer, steps: int) -> float | None:
    """Median gradient share of the unsupervised term over ``steps`` real steps, at the trainer's full weight.

    ``|grad(w L_unsup)|`` is linear in ``w``, so a share measured while the weight ramps up is scaled to
    ``unsupervised_weight`` (the weight after the ramp). None for trainers without an unlabelled stream.
    """
    import numpy as np

    if steps <= 0 or not getattr(trainer, "use_unlabeled", False) or not hasattr(trainer, "gradient_share_every"):
        return None
    every, trainer.gradient_share_every = trainer.gradient_share_every, 1
    shares = []
    try:
        for _ in range(steps):
            weight = trainer.current_unsupervised_weight()
            share = float(trainer.train_step(next(trainer.dataloader_train))["grad_share"])
            if weight > 0 and np.isfinite(share):
                shares.append(share * trainer.unsupervised_weight / weight)
    finally:
        trainer.gradient_share_every = every
    return float(np.median(shares)) if shares else None


def measure_prediction(model_folder: str, fold, args, device, dataset_name: str, dataset_json: dict,
                       output_folder: str, result: dict) -> None:
    """Time nnUNetPredictor.predict_from_files on the first ``--predict-cases`` cases (imagesTs, then imagesTr)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_raw

    raw = os.path.join(nnUNet_raw.require(), dataset_name)
    ending = dataset_json["file_ending"]
    cases: list[tuple[str, list[str]]] = []
    for sub in ("imagesTs", "imagesTr"):
        folder = os.path.join(raw, sub)
        if os.path.isdir(folder) and len(cases) < args.predict_cases:
            files = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
            cases += case_file_lists(files, ending, args.predict_cases - len(cases))
    if not cases:
        raise FileNotFoundError(f"no images to predict in {raw}/imagesTs or imagesTr")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.mirror,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=(fold,),
                                                   checkpoint_name="checkpoint_final.pth")
    network_seconds = []
    predict_logits = predictor.predict_logits_from_preprocessed_data

    def timed_predict_logits(data):  # the network part of each case (weights loading + sliding window)
        start = time.perf_counter()
        logits = predict_logits(data)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        network_seconds.append(time.perf_counter() - start)
        return logits

    predictor.predict_logits_from_preprocessed_data = timed_predict_logits
    os.makedirs(output_folder, exist_ok=True)
    with open(os.path.join(raw, "dataset.json")) as handle:  # the raw one records every case's modality
        groups = cases_by_modality(cases, (json.load(handle).get("mmssl") or {}).get("case_modality"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for modality, group in groups:
        if modality is not None:  # an unregistered model: each case normalised and predicted as its modality
            from nnunet_mmssl.cli.predict import select_modality

            select_modality(predictor, modality, model_folder)
        predictor.predict_from_files([files for _, files in group], [os.path.join(output_folder, c) for c, _ in group],
                                     save_probabilities=False, overwrite=True, num_processes_preprocessing=1,
                                     num_processes_segmentation_export=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["predict_peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    seconds = time.perf_counter() - start
    result.update(predict_cases=len(cases), predict_s=seconds, predict_s_per_case=seconds / len(cases),
                  predict_network_s_per_case=sum(network_seconds) / len(network_seconds) if network_seconds else None)


def _sync(device) -> None:
    """Wait for the GPU (timings of CUDA work); nothing on CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def worker_setup(args: argparse.Namespace):
    """What every worker process does first: torch threads, device and cuDNN as ``nnUNetv2_train``, the dataset.

    Returns:
        (device, dataset name, preprocessed dataset folder, dataset.json).
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # as nnUNetv2_train
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    dataset_name = maybe_convert_to_dataset_name(args.dataset)
    folder = os.path.join(nnUNet_preprocessed.require(), dataset_name)
    return device, dataset_name, folder, load_json(os.path.join(folder, "dataset.json"))


def interleave(calls: dict, rounds: int, repeats: int, device, errors: dict) -> dict[str, list[float]]:
    """Time ``calls[name]()`` ``repeats`` times per name and round, the order rotated each round.

    A call that raises is recorded in ``errors`` (name -> message) and left out of later rounds.

    Returns:
        name -> the seconds of each timed call.
    """
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds):
        for name in rotated(list(calls), round_index):
            if name in errors:
                continue
            try:
                for _ in range(repeats):
                    _sync(device)
                    start = time.perf_counter()
                    calls[name]()
                    _sync(device)
                    seconds[name].append(time.perf_counter() - start)
            except Exception as error:  # noqa: BLE001 - reported per name, the others go on
                errors[name] = format_errors(error)
                traceback.print_exc()
    return seconds


def build_trainer(args: argparse.Namespace, name: str, device, folder: str, dataset_json: dict):
    """Construct trainer ``name`` as nnU-Net's ``get_trainer_from_args`` does; return ``(trainer, plans name)``.

    Our trainers (``SSLTrainerBase`` subclasses) use ``--mmssl-plans`` when given, every other trainer ``-p``.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_mmssl.trainers import SSLTrainerBase

    trainer_class = recursive_find_trainer_class_by_name(name)
    if trainer_class is None:
        raise RuntimeError(f"trainer class {name!r} not found (nnunetv2 or nnUNet_extTrainer)")
    plans_name = args.mmssl_plans if args.mmssl_plans and issubclass(trainer_class, SSLTrainerBase) else args.plans
    plans = load_json(os.path.join(folder, plans_name + ".json"))
    plans["continue_training"] = False
    fold = "all" if args.fold == "all" else int(args.fold)
    trainer = trainer_class(plans=plans, configuration=args.worker_configuration, fold=fold,
                            dataset_json=dataset_json, device=device)
    return trainer, plans_name


def run_interleaved_worker(args: argparse.Namespace) -> dict:
    """Interleaved compute measurement of the comma-separated ``--worker-trainer`` list in this one process.

    Every trainer is built and started, draws one labelled batch and (if it has a stream) one unlabelled batch, and
    its augmenters are shut down; its unlabelled stream becomes an endless repeat of that batch. After ``--warmup``
    steps and one FLOP-counted step each, ``--interleaved-rounds`` rounds of ``--interleaved-steps`` timed
    ``train_step`` calls per trainer follow, the order rotated each round; then the same for one inference forward
    of one patch. So every trainer repeats the same work as in its own row minus data loading, sampled in every
    round; :func:`paired_time_ratio` compares trainers within each round (the fastest repetition and the median
    over the run are kept too). Run with ``nnUNet_n_proc_DA=0`` (no worker processes compete).
    """
    import functools
    import itertools

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nnunet_mmssl.trainers.cpu_allocator import keep_freed_memory_in_process

    names = [n for n in args.worker_trainer.split(",") if n]
    result: dict = {"configuration": args.worker_configuration, "trainers": {}, "errors": {},
                    "repeats": args.interleaved_steps}
    # one process for all trainers: the allocator setting our trainers make on CPU would otherwise reach the trainers
    # built before them in some rounds and not in others; set it for all, so that eff.ilv compares compute alone
    result["keep_freed_memory"] = keep_freed_memory_in_process() if args.device == "cpu" else False
    device, _, folder, dataset_json = worker_setup(args)
    ready = {}
    for name in names:
        try:
            trainer, _ = build_trainer(args, name, device, folder, dataset_json)
            trainer.on_train_start()
            trainer.on_train_epoch_start()
            batch = next(trainer.dataloader_train)
            stream = getattr(trainer, "dataloader_unlabeled", None)
            if isinstance(stream, (list, tuple)):  # one loader per modality (DBDC)
                unlabelled = [None if s is None else next(s) for s in stream]
            else:
                unlabelled = None if stream is None else next(stream)
            _finish_augmenters(trainer)
            if isinstance(unlabelled, list):
                trainer.dataloader_unlabeled = [None if u is None else itertools.repeat(u) for u in unlabelled]
            elif unlabelled is not None:
                trainer.dataloader_unlabeled = itertools.repeat(unlabelled)
            for _ in range(args.warmup):
                trainer.train_step(batch)
            with FlopCounterMode(display=False) as counter:
                trainer.train_step(batch)
            _sync(device)
            ready[name] = (trainer, batch)
            result["trainers"][name] = {"flops_per_iter": int(counter.get_total_flops())}
        except Exception as error:  # noqa: BLE001 - reported per trainer
            result["errors"][name] = format_errors(error)
            traceback.print_exc()
    order = [n for n in names if n in ready]
    steps = interleave({name: functools.partial(ready[name][0].train_step, ready[name][1]) for name in order},
                       args.interleaved_rounds, args.interleaved_steps, device, result["errors"])
    for name in order:
        result["trainers"][name]["step_seconds"] = steps[name]
    # inference: the network as nnUNetv2_predict runs it (eval, no deep supervision, mean of the heads) on one patch
    patches = {}
    for name in order:
        if name in result["errors"]:
            continue
        trainer, _ = ready[name]
        try:
            network = _network_for_inference(trainer)
            patch = torch.randn((1, trainer.num_input_channels, *trainer.configuration_manager.patch_size),
                                device=device)
            with torch.no_grad(), _inference_autocast(device):
                network(patch)
                with FlopCounterMode(display=False) as counter:
                    network(patch)
            result["trainers"][name]["inference_flops_per_patch"] = int(counter.get_total_flops())
            patches[name] = (network, patch)
        except Exception as error:  # noqa: BLE001 - reported per trainer
            result["errors"][name] = f"inference: {format_errors(error)}"
            traceback.print_exc()
    with torch.no_grad(), _inference_autocast(device):
        forwards = interleave({name: functools.partial(network, patch) for name, (network, patch) in patches.items()},
                              args.interleaved_rounds, args.interleaved_steps, device, result["errors"])
    for name, seconds in forwards.items():
        result["trainers"][name]["inference_seconds"] = seconds
    for name in order:
        entry = result["trainers"][name]
        if entry.get("step_seconds"):
            entry["s_per_iter_min"] = min(entry["step_seconds"])
            entry["s_per_iter_median"] = statistics.median(entry["step_seconds"])
        if entry.get("inference_seconds"):
            entry["inference_s_min"] = min(entry["inference_seconds"])
            entry["inference_s_median"] = statistics.median(entry["inference_seconds"])
    return result


def _inference_autocast(device):
    """Autocast as nnU-Net's predictor uses it: on CUDA only."""
    import contextlib

    import torch

    return torch.autocast(device.type, enabled=True) if device.type == "cuda" else contextlib.nullcontext()


def run_worker(args: argparse.Namespace) -> dict:
    """Measure one (configuration, trainer) in this process; return the result dict (``error`` on failure)."""
    result: dict = {"trainer": args.worker_trainer, "configuration": args.worker_configuration}
    errors: list[str] = []
    trainer = None
    try:
        import torch

        device, dataset_name, folder, dataset_json = worker_setup(args)
        result["env"] = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                         "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                         "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
                         "nnUNet_compile": os.environ.get("nnUNet_compile")}
        fold = "all" if args.fold == "all" else int(args.fold)
        result["rss_after_imports_mib"] = _current_rss_mib()  # the process's baseline, before any trainer exists
        trainer, result["plans"] = build_trainer(args, args.worker_trainer, device, folder, dataset_json)
        trainer.on_train_start()
        trainer.on_train_epoch_start()
        try:
            measure_training(trainer, args, result)
        except Exception as error:  # noqa: BLE001 - reported in the row
            errors.append(f"training: {format_errors(error)}")
            traceback.print_exc()
        finally:
            trainer.dataloader_train = unwrap_unlabeled(trainer.dataloader_train)
            if getattr(trainer, "dataloader_unlabeled", None) is not None:
                trainer.dataloader_unlabeled = unwrap_unlabeled(trainer.dataloader_unlabeled)
            try:
                trainer.on_train_end()  # writes checkpoint_final.pth and shuts the augmenters down
            except Exception as error:  # noqa: BLE001
                errors.append(f"on_train_end: {format_errors(error)}")
                traceback.print_exc()
                _finish_augmenters(trainer)
        checkpoint = os.path.join(trainer.output_folder, "checkpoint_final.pth")
        trainer.save_checkpoint(checkpoint)
        model_folder = trainer.output_folder_base
        del trainer.network, trainer.optimizer
        trainer = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.predict_cases > 0:
            try:
                measure_prediction(model_folder, fold, args, device, dataset_name, dataset_json,
                                   args.worker_output, result)
            except Exception as error:  # noqa: BLE001
                errors.append(f"prediction: {format_errors(error)}")
                traceback.print_exc()
    except Exception as error:  # noqa: BLE001
        errors.append(format_errors(error))
        traceback.print_exc()
        if trainer is not None:
            _finish_augmenters(trainer)
    if errors:
        result["error"] = "; ".join(errors)
    return result


# ============================================================================ parent
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(args: argparse.Namespace, worker_env: dict | None = None) -> dict:
    """Machine and software of this run (the worker's torch threads and GPU name when known)."""
    from importlib.metadata import PackageNotFoundError, version

    def package_version(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    worker_env = worker_env or {}
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "gpu": worker_env.get("device_name"),
            "device": args.device, "python": platform.python_version(), "platform": platform.platform(),
            "torch": package_version("torch"), "nnunetv2": package_version("nnunetv2"),
            "torch_threads": worker_env.get("torch_threads"), "nnUNet_n_proc_DA": args.n_proc_da,
            "nnUNet_compile": bool(args.compile)}


def format_header(info: dict, command: str, date: str, dataset: str) -> str:
    device = f"cuda ({info['gpu']})" if info["device"] == "cuda" else "cpu"
    return "\n".join([
        f"date:     {date}",
        f"command:  {command}",
        f"machine:  {info['cpu']} ({info['cores']} cores), device {device}",
        (f"software: python {info['python']}, torch {info['torch']}, nnunetv2 {info['nnunetv2']}, torch threads "
         f"{info['torch_threads']}, nnUNet_n_proc_DA {info['nnUNet_n_proc_DA']}, compile {info['nnUNet_compile']}"),
        f"dataset:  {dataset}",
    ])


def benchmark_environment(args: argparse.Namespace, workdir: str) -> dict:
    """Environment of the children (and of this process's phantom build)."""
    from nnunet_mmssl._ext_trainer_hook import EXT_TRAINER_FOLDER, EXT_TRAINER_VARIABLE

    env = dict(os.environ)
    if args.phantom:
        env.update(nnUNet_raw=os.path.join(workdir, "nnUNet_raw"),
                   nnUNet_preprocessed=os.path.join(workdir, "nnUNet_preprocessed"))
    else:
        for key in ("nnUNet_raw", "nnUNet_preprocessed"):
            if not env.get(key):
                raise SystemExit(f"-d needs {key} to be set (or use --phantom).")
    env.update(nnUNet_results=os.path.join(workdir, "nnUNet_results"), nnUNet_n_proc_DA=str(args.n_proc_da),
               nnUNet_compile="true" if args.compile else "false",
               nnUNet_def_n_proc=env.get("nnUNet_def_n_proc", str(max(1, args.num_processes))))
    paths = [p for p in env.get(EXT_TRAINER_VARIABLE, "").split(os.pathsep) if p]
    if EXT_TRAINER_FOLDER not in paths:
        env[EXT_TRAINER_VARIABLE] = os.pathsep.join(paths + [EXT_TRAINER_FOLDER])
    env.pop("NNUNET_MMSSL_NO_EXT_TRAINER", None)
    return env


def plan_in_child(dataset_id: int, configurations: Sequence[str], num_processes: int, log_file: str,
                  gpu_memory_target: float | None = None, timeout: float = 3600.0) -> None:
    """``nnUNetv2_mmssl_plan_and_preprocess`` in a child process (environment: this process's), output in
    ``log_file``. Planning the unregistered phantom in the benchmark's own process was seen to hang on a futex (a
    lock held by a thread of an earlier import); a fresh process does not inherit it.

    Raises:
        RuntimeError: the child failed or timed out (with the log's tail).
    """
    script = "import sys; from nnunet_mmssl.cli.plan_and_preprocess import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", script, "-d", str(dataset_id), "-c", *configurations, "-np", str(num_processes)]
    if gpu_memory_target is not None:
        argv += ["-gpu_memory_target", str(gpu_memory_target)]
    with open(log_file, "w") as log:
        try:
            code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        with open(log_file) as log:
            tail = "".join(log.readlines()[-20:])
        reason = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
        raise RuntimeError(f"planning the phantom failed ({reason}; log {log_file}):\n{tail}")


def prepare_unregistered_phantom(args: argparse.Namespace, workdir: str) -> str:
    """Build (or reuse) the unregistered phantom (CT-like and MR-like cases of different "patients", each
    modality its own grid and label numbering; :mod:`~nnunet_mmssl.dataset_conversion.unregistered_phantom`),
    converted with the unregistered converter and planned in a child process; return its name."""
    from nnunet_mmssl.dataset_conversion.unregistered import convert_unregistered
    from nnunet_mmssl.dataset_conversion.unregistered_phantom import make_unregistered_phantom_sources

    labelled, unlabelled = args.phantom_cases
    num_test = max(1, args.predict_cases)
    geometry = unregistered_geometry(args.unregistered_shape)
    recipe = {"kind": "unregistered", "labelled": labelled, "unlabelled": unlabelled, "test": num_test,
              "configurations": sorted(args.configurations), "gpu_memory_target": args.gpu_memory_target,
              "shape": args.unregistered_shape}
    name = f"Dataset{UNREGISTERED_PHANTOM_ID:03d}_{UNREGISTERED_PHANTOM_NAME}"
    marker = os.path.join(workdir, UNREGISTERED_PHANTOM_MARKER)
    if _reuse_phantom(marker, recipe):
        print(f"reusing the unregistered phantom dataset in {workdir}", flush=True)
        return name
    print(f"building the unregistered phantom dataset in {workdir}: per modality (CT-like, MR-like; different "
          f"cases) {labelled} labelled + {unlabelled} unlabelled + {num_test} test; planning "
          f"{' '.join(args.configurations)} in a child process", flush=True)
    sources = make_unregistered_phantom_sources(os.path.join(workdir, "phantom_unregistered"),
                                                num_labeled=labelled + num_test, num_unlabeled=unlabelled, seed=0,
                                                geometry=geometry)
    convert_unregistered([os.path.join(sources, "CT"), os.path.join(sources, "MR")], ["CT", "MR"], "image.nii.gz",
                         "label.nii.gz", os.environ["nnUNet_raw"], UNREGISTERED_PHANTOM_ID, UNREGISTERED_PHANTOM_NAME,
                         num_labeled=labelled, num_test=num_test, seed=0, labels={"background": 0, "lesion": 1},
                         label_maps={"CT": {5: 1}}, overwrite=True)
    plan_in_child(UNREGISTERED_PHANTOM_ID, list(args.configurations), max(1, args.num_processes),
                  os.path.join(workdir, "logs", "plan_and_preprocess_unregistered.log"), args.gpu_memory_target)
    with open(marker, "w") as handle:
        json.dump(recipe, handle)
    return name


def unregistered_geometry(shape: Sequence[int] | None) -> dict | None:
    """The unregistered phantom's per-modality ``(shape, spacing, label value)`` for CT-like cases of ``shape`` voxels
    at 1 mm and MR-like cases of the same extent at 1.2 mm; None (the phantom module's grids) without a shape."""
    if shape is None:
        return None
    from nnunet_mmssl.dataset_conversion.unregistered_phantom import UNREGISTERED_PHANTOM_GEOMETRY as table

    mr = tuple(max(8, round(s / 1.2)) for s in shape)
    return {"CT": (tuple(int(s) for s in shape), (1.0, 1.0, 1.0), table["CT"][2]),
            "MR": (mr, (1.2, 1.2, 1.2), table["MR"][2])}


def _reuse_phantom(marker: str, recipe: dict) -> bool:
    """True when ``marker`` records the same recipe with at least the requested configurations; else the marker is
    removed (the phantom will be rebuilt)."""
    if not os.path.isfile(marker):
        return False
    with open(marker) as handle:
        old = json.load(handle)
    if {**old, "configurations": []} == {**recipe, "configurations": []} and \
            set(recipe["configurations"]) <= set(old["configurations"]):
        return True
    os.remove(marker)
    return False


def prepare_phantom(args: argparse.Namespace, workdir: str) -> str:
    """Build (or reuse) the phantom dataset with the requested configurations preprocessed; return its name."""
    if args.phantom_kind == "unregistered":
        return prepare_unregistered_phantom(args, workdir)
    from nnunet_mmssl.dataset_conversion import PHANTOM_LABEL_GLOB, PHANTOM_MODALITY_GLOBS, convert_dataset
    from nnunet_mmssl.dataset_conversion.phantom import make_phantom_cases
    from nnunet_mmssl.planners.plan_and_preprocess import plan_and_preprocess

    labelled, unlabelled = args.phantom_cases
    num_test = max(1, args.predict_cases)
    recipe = {"shape": list(args.phantom_shape), "spacing": list(args.phantom_spacing), "labelled": labelled,
              "unlabelled": unlabelled, "test": num_test, "configurations": sorted(args.configurations),
              "gpu_memory_target": args.gpu_memory_target}
    name = f"Dataset{PHANTOM_ID:03d}_{PHANTOM_NAME}"
    marker = os.path.join(workdir, PHANTOM_MARKER)
    if _reuse_phantom(marker, recipe):
        print(f"reusing the phantom dataset in {workdir}", flush=True)
        return name
    print(f"building the phantom dataset in {workdir}: {labelled} labelled + {unlabelled} unlabelled + {num_test} "
          f"test cases of {tuple(args.phantom_shape)} voxels; planning {' '.join(args.configurations)}", flush=True)
    sources = make_phantom_cases(os.path.join(workdir, "phantom"), num_labeled=labelled + num_test,
                                 num_unlabeled=unlabelled, shape=tuple(args.phantom_shape),
                                 spacing=tuple(args.phantom_spacing), seed=0)
    convert_dataset([os.path.join(sources, "labeled"), os.path.join(sources, "unlabeled")], PHANTOM_MODALITY_GLOBS,
                    PHANTOM_LABEL_GLOB, os.environ["nnUNet_raw"], PHANTOM_ID, PHANTOM_NAME, num_labeled=labelled,
                    num_test=num_test, seed=0, labels={"background": 0, "lesion": 1}, overwrite=True)
    log = os.path.join(workdir, "logs", "plan_and_preprocess.log")
    with open(log, "w") as handle:
        plan_and_preprocess(PHANTOM_ID, list(args.configurations), num_processes=max(1, args.num_processes),
                            gpu_memory_target_in_gb=args.gpu_memory_target,
                            progress=lambda message: handle.write(message + "\n"))
    with open(marker, "w") as handle:
        json.dump(recipe, handle)
    return name


def exit_on_sigterm() -> None:
    """Let SIGTERM (kill, timeout) end this process through SystemExit, so that :func:`_run_child` stops the
    running worker's session too instead of leaving it running (it is in a session of its own).

    Processes forked from this one (nnU-Net's multiprocessing pools during the phantom's preprocessing) get the
    default SIGTERM back: a pool worker that turned SIGTERM into SystemExit while blocked on the pool's queue lock
    could stay alive when ``Pool.terminate`` signalled it, and the pool's join then waited forever (seen once in CI).
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))


def _run_child(argv: list[str], env: dict, log_file: str, timeout: float) -> tuple[dict | None, str | None]:
    """Run one child process in its own session; return (parsed result or None, error text or None)."""
    # own session, so that on a timeout the worker and its augmentation / prediction processes end together
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    def kill_group() -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            process.kill()

    try:
        stdout, stderr = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        kill_group()
        stdout, stderr = process.communicate()
        code = None
    except BaseException:  # Ctrl-C or a kill of the benchmark: its worker's session would outlive it
        kill_group()
        process.wait()
        raise
    with open(log_file, "w") as handle:
        handle.write(f"$ {shlex.join(argv)}\n\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    result = parse_worker_output(stdout)
    if result is not None:
        return result, None
    last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
    reason = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
    return None, f"worker {reason}: {last[0]}"


def run_interleaved(args: argparse.Namespace, env: dict, dataset: str, configuration: str,
                    workdir: str) -> dict:
    """The interleaved compute measurement of every trainer of one configuration in one child process.

    The child gets ``nnUNet_n_proc_DA=0`` (its batches are fixed, no worker process may compete) and its own
    ``nnUNet_results`` (``<workdir>/interleaved_results``), so the model folders of the rows stay untouched.
    """
    log_file = os.path.join(workdir, "logs", f"{configuration}__interleaved.log")
    child_env = dict(env, nnUNet_n_proc_DA="0", nnUNet_results=os.path.join(workdir, "interleaved_results"))
    argv = worker_argv(args, dataset, configuration, ",".join(args.trainers), os.path.join(workdir, "unused"),
                       predict_cases=0, interleaved=True)
    timeout = args.worker_timeout * max(1, len(args.trainers))
    result, error = _run_child(argv, child_env, log_file, timeout)
    if result is None:
        return {"trainers": {}, "errors": {name: error for name in args.trainers}, "log": log_file}
    result["log"] = log_file
    return result


def merge_interleaved(rows: Sequence[dict], interleaved: dict) -> None:
    """Copy the interleaved timings (every repetition, the fastest, the median) and FLOPs into the rows (in place);
    note its errors in the rows' JSON. :func:`add_ratios` pairs the repetitions by round."""
    for row in rows:
        entry = interleaved.get("trainers", {}).get(row["trainer"]) or {}
        # identical work repeated: noise only adds time; the fastest repetition over the run (the ratios pair rounds)
        row["interleaved_s_per_iter"] = entry.get("s_per_iter_min")
        row["interleaved_s_per_iter_median"] = entry.get("s_per_iter_median")
        row["interleaved_flops_per_iter"] = entry.get("flops_per_iter")
        row["interleaved_step_seconds"] = entry.get("step_seconds")
        row["inference_flops_per_patch"] = entry.get("inference_flops_per_patch")
        row["inference_s_per_patch"] = entry.get("inference_s_min")
        row["inference_s_per_patch_median"] = entry.get("inference_s_median")
        row["inference_step_seconds"] = entry.get("inference_seconds")
        row["interleaved_repeats"] = interleaved.get("repeats", 1)
        if row["trainer"] in interleaved.get("errors", {}):
            row["interleaved_error"] = interleaved["errors"][row["trainer"]]


def run_one(args: argparse.Namespace, env: dict, dataset: str, configuration: str, trainer: str,
            workdir: str, round_index: int = 0) -> dict:
    """Run the worker for one (configuration, trainer) in a child process; return its result. Prediction is timed
    in the first round only."""
    suffix = "" if round_index == 0 else f"__round{round_index + 1}"
    log_file = os.path.join(workdir, "logs", f"{configuration}__{trainer}{suffix}.log")
    output = os.path.join(workdir, "predictions", configuration, trainer)
    argv = worker_argv(args, dataset, configuration, trainer, output,
                       predict_cases=None if round_index == 0 else 0)
    start = time.perf_counter()
    result, error = _run_child(argv, env, log_file, args.worker_timeout)
    if result is None:
        result = {"trainer": trainer, "configuration": configuration, "error": error}
    result["wall_s"] = time.perf_counter() - start
    if result.get("error"):
        result["log"] = log_file
    return result


def run_parent(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__)), *argv])
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    temporary = args.workdir is None
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="mmssl_benchmark_"))
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    env = benchmark_environment(args, workdir)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                           "nnUNet_n_proc_DA", "nnUNet_compile")})
    if args.phantom:
        dataset = prepare_phantom(args, workdir)
    else:
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        dataset = maybe_convert_to_dataset_name(args.dataset)
    measured: dict[str, dict[str, list[dict]]] = {}  # configuration -> trainer -> its rows, one per round
    interleaved_runs: dict[str, dict] = {}
    worker_env = None
    interrupted = None
    try:
        for configuration in args.configurations:
            measured[configuration] = {trainer: [] for trainer in args.trainers}
            for round_index in range(args.rounds):
                for trainer in rotated(args.trainers, round_index):
                    tag = f"[{configuration}]" + (f" round {round_index + 1}/{args.rounds}" if args.rounds > 1 else "")
                    print(f"{tag} {trainer}: measuring ...", flush=True)
                    row = run_one(args, env, dataset, configuration, trainer, workdir, round_index)
                    worker_env = worker_env or row.get("env")
                    summary = f"{row['s_per_iter']:.3f} s/iter" if row.get("s_per_iter") is not None else "no timing"
                    error = f"; error: {row['error']} (log {row['log']})" if row.get("error") else ""
                    print(f"{tag} {trainer}: {summary} ({row['wall_s']:.0f} s){error}", flush=True)
                    measured[configuration][trainer].append(row)
            if args.interleaved_rounds > 0:
                print(f"[{configuration}] interleaved compute measurement of all trainers ...", flush=True)
                interleaved = run_interleaved(args, env, dataset, configuration, workdir)
                interleaved_runs[configuration] = interleaved
                for name, error in interleaved.get("errors", {}).items():
                    print(f"[{configuration}] interleaved {name}: error: {error} (log {interleaved['log']})",
                          flush=True)
    except (KeyboardInterrupt, SystemExit) as stop:  # Ctrl-C, kill, timeout: report what was measured
        interrupted = "SIGINT" if isinstance(stop, KeyboardInterrupt) else f"exit {stop.code}"
        print(f"\ninterrupted ({interrupted}): the tables below hold the rows measured so far", flush=True)
    # the rows of every configuration measured so far, whole or (stopped) in part
    results: dict[str, list[dict]] = {}
    baselines: dict[str, str | None] = {}
    for configuration, by_trainer in measured.items():
        rows = [merge_rounds(by_trainer[t]) for t in args.trainers if by_trainer[t]]
        if not rows:
            continue
        if configuration in interleaved_runs:
            merge_interleaved(rows, interleaved_runs[configuration])
        baselines[configuration] = add_ratios(rows)
        results[configuration] = rows
    info = machine_info(args, worker_env)
    report = [format_header(info, command, date, dataset)]
    for configuration, rows in results.items():
        rounds = f" x {args.rounds} rounds" if args.rounds > 1 else ""
        interleaved = (f"; eff.ilv: {args.interleaved_rounds} x {args.interleaved_steps} interleaved steps on fixed "
                       f"batches" if args.interleaved_rounds > 0 else "")
        title = (f"configuration {configuration} ({args.iterations} timed iterations{rounds} after {args.warmup} "
                 f"warm-up{interleaved}; prediction of {args.predict_cases} case(s), mirroring "
                 f"{'on' if args.mirror else 'off'})")
        report += ["", title, format_table(rows, baselines[configuration])]
        plans_used = sorted({row.get("plans") for row in rows if row.get("plans")})
        if len(plans_used) > 1:
            report.append("plans: " + "; ".join(f"{row['trainer']} {row['plans']}" for row in rows if row.get("plans")))
    print("\n" + "\n".join(report), flush=True)
    failed = any(row.get("error") for rows in results.values() for row in rows)
    summary = {"date": date, "command": command, "machine": info, "dataset": dataset, "workdir": workdir,
               "settings": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
               "baselines": baselines, "results": results, "interrupted": interrupted}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
        print(f"\nresults written to {args.json}")
    if temporary and not args.keep_workdir and not failed and not interrupted:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"workdir (model folders, predictions, logs): {workdir}")
    return summary


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


if __name__ == "__main__":
    sys.exit(main())

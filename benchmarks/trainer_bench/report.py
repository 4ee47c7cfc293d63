"""The benchmark's report: ratios to the baseline row, rounds merged into one row, the table and its header."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Sequence

from trainer_bench.rows import BASELINE_TRAINER, choose_baseline

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


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing or the reference is not positive."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def efficiency(flop_ratio: float | None, time_ratio: float | None) -> float | None:
    """FLOP ratio / time ratio: FLOP throughput relative to the baseline (> 1: more FLOP/s than the baseline)."""
    return ratio(flop_ratio, time_ratio)


def prototype_share(prototype_seconds: float | None, step_seconds: float | None) -> float | None:
    """Share of the timed step time a DBDC trainer spent in prototype work (Sinkhorn assignment + EMA update of the
    prototypes after the optimizer step, and the MPCL loss; the trainer's ``prototype_seconds``); None for trainers
    without prototypes or without a time."""
    if prototype_seconds is None or step_seconds is None or step_seconds <= 0:
        return None
    return prototype_seconds / step_seconds


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

#!/usr/bin/env python
"""The gradient share of finished runs, epoch by epoch: does the share-target controller hold its target, and how
noisy is one measurement?

    python benchmarks/share_trajectories.py FOLDER_OR_CHECKPOINT [...] [--last 10] [--png shares.png]

Every ``checkpoint_final.pth`` under the given folders (e.g. a study's ``WORKDIR/work/nnUNet_results``) whose
nnU-Net logging holds our trainers' ``unsup_grad_shares`` is read with :mod:`nnunet_mmssl.safe_load` (no code from
the file runs). Per run, over its last ``--last`` epochs with a finite share: the geometric and the arithmetic mean
of the logged share, their ratio, the scatter (standard deviation of ``log share``, so 0.69 is a factor 2), the slope
of ``log share`` per epoch (a trend the controller lags behind), the target (share-target runs) and the last
applied weight. The controller steers ``log share``, i.e. the geometric mean; with a scatter ``s`` the arithmetic
mean of log-normal measurements is ``exp(s² / 2)`` times larger, which is what a study's "gradient share" column (the
arithmetic mean of the last epochs) shows. ``--png`` draws every run's share per epoch (log scale) with its target.
"""

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence

SHARE_KEY, WEIGHT_KEY, TARGET_KEY = "unsup_grad_shares", "unsup_weights", "unsup_share_targets"


def share_summary(logging: Mapping, last: int = 10) -> dict | None:
    """The statistics of the module docstring for one run's nnU-Net ``logging`` dict (None without shares).

    Raises:
        ValueError: for ``last`` < 2.
    """
    if last < 2:
        raise ValueError(f"--last {last}: needs at least 2 epochs to measure a scatter and a slope; use e.g. 10")
    shares = logging.get(SHARE_KEY)
    if not shares:
        return None
    epochs = [(i, float(v)) for i, v in enumerate(shares) if v is not None and math.isfinite(v) and v > 0]
    if len(epochs) < 2:
        return None
    epochs = epochs[-last:]
    logs = [math.log(v) for _, v in epochs]
    n = len(logs)
    mean_log = sum(logs) / n
    scatter = math.sqrt(sum((x - mean_log) ** 2 for x in logs) / (n - 1))
    xs = [i for i, _ in epochs]
    mean_x = sum(xs) / n
    slope = sum((x - mean_x) * (y - mean_log) for x, y in zip(xs, logs)) / sum((x - mean_x) ** 2 for x in xs)
    geometric, arithmetic = math.exp(mean_log), sum(v for _, v in epochs) / n
    targets = [float(t) for t in logging.get(TARGET_KEY, []) if t is not None]
    weights = [float(w) for w in logging.get(WEIGHT_KEY, []) if w is not None and math.isfinite(w)]
    return {"epochs": n, "geometric": geometric, "arithmetic": arithmetic, "ratio": arithmetic / geometric,
            "scatter": scatter, "slope": slope, "target": targets[-1] if targets else None,
            "weight": weights[-1] if weights else None, "shares": [v for _, v in epochs]}


def find_checkpoints(paths: Sequence[str]) -> list[str]:
    """The checkpoint files given, and every ``checkpoint_final.pth`` under the folders given (sorted).

    Raises:
        FileNotFoundError: for a path that does not exist.
    """
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            for root, _, files in os.walk(path):
                if "checkpoint_final.pth" in files:
                    found.append(os.path.join(root, "checkpoint_final.pth"))
        else:
            raise FileNotFoundError(f"{path} does not exist: give a checkpoint file or a folder holding model "
                                    f"folders (e.g. WORKDIR/work/nnUNet_results)")
    return sorted(found)


def run_name(checkpoint: str) -> str:
    """``trainer__plans__configuration/fold_X`` from a model folder's layout (the path's last three parts)."""
    parts = os.path.normpath(checkpoint).split(os.sep)
    return "/".join(parts[-3:-1]) if len(parts) >= 3 else checkpoint


def legend_label(name: str) -> str:
    """``trainer fold_X`` from :func:`run_name`'s ``trainer__plans__configuration/fold_X`` (any fold: 3, 10, all)."""
    folder, _, fold = name.rpartition("/")
    return f"{folder.split('__')[0]} {fold}" if folder else name


def plot(rows: Sequence[tuple[str, Mapping]], logs: Sequence[Mapping], output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for (name, summary), logging in zip(rows, logs):
        shares = [v if v is not None and math.isfinite(v) and v > 0 else float("nan") for v in logging[SHARE_KEY]]
        line, = ax.plot(range(len(shares)), shares, marker=".", label=legend_label(name))
        if summary["target"] is not None:
            ax.axhline(summary["target"], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("|grad w·L_unsup| / |grad L_sup|")
    ax.legend(fontsize=6)
    from nnunet_mmssl.study.report import save_png

    save_png(fig, output, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="checkpoint files or folders searched for checkpoint_final.pth")
    parser.add_argument("--last", type=int, default=10, help="epochs at the end of each run to summarise (10)")
    parser.add_argument("--png", default=None, help="also draw the shares per epoch into this PNG")
    args = parser.parse_args(argv)
    from nnunet_mmssl.safe_load import load_checkpoint_safely

    try:
        checkpoints = find_checkpoints(args.paths)
        rows, logs = [], []
        for checkpoint in checkpoints:
            logging = load_checkpoint_safely(checkpoint, mmap=True).get("logging", {})
            summary = share_summary(logging, args.last)
            if summary is not None:
                rows.append((run_name(checkpoint), summary))
                logs.append(logging)
    except (FileNotFoundError, ValueError) as error:
        print(f"share_trajectories: {error}", file=sys.stderr)
        return 2
    if not rows:
        print(f"share_trajectories: none of the {len(checkpoints)} checkpoints logs a gradient share "
              f"({SHARE_KEY}); our SSL trainers do, nnU-Net's own do not", file=sys.stderr)
        return 1
    print(f"{'run':60s} {'target':>6s} {'geo':>7s} {'arith':>7s} {'ratio':>5s} {'scatter':>7s} {'slope':>7s} "
          f"{'weight':>7s}  (last {args.last} epochs)")
    for name, s in rows:
        target = "-" if s["target"] is None else f"{s['target']:g}"
        weight = "-" if s["weight"] is None else f"{s['weight']:.3g}"
        print(f"{name:60s} {target:>6s} {s['geometric']:7.4f} {s['arithmetic']:7.4f} {s['ratio']:5.2f} "
              f"{s['scatter']:7.2f} {s['slope']:+7.3f} {weight:>7s}")
    if args.png:
        plot(rows, logs, args.png)
        print(f"written {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The study's outputs: table (mean ± std over seeds), paired SSL − supervised differences, Dice plot, JSON."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from nnunet_mmssl.study.bootstrap import crossed_bootstrap

METRICS = ("dice", "hd95", "sensitivity")
#: each SSL trainer's supervised-only twin (same network, no unlabelled stream)
SUPERVISED_TWINS = {"MemCifSSLTrainer": "MemCifSupervisedTrainer", "MeanTeacherTrainer": "PlainSupervisedTrainer",
                    "MMFMCMLTrainer": "MMFMCMLSupervisedTrainer", "SMMLSSLTrainer": "SMMLTrainer",
                    "DBDCTrainer": "DBDCSupervisedTrainer"}
# the weight set by the gradient share (nnunet_mmssl.trainers.share_variants): the parent's twin
SUPERVISED_TWINS.update({f"{ssl}_share{target}": SUPERVISED_TWINS[ssl]
                         for ssl in ("MeanTeacherTrainer", "MemCifSSLTrainer") for target in ("0p05", "0p1", "0p2")})


def summary_table(results: Sequence[Mapping]) -> list[dict]:
    """One row per (trainer, size): each metric's mean and std (``ddof=0``) over seeds of the seeds' test means.

    A seed's test mean is its run's mean over the test cases; with ``--cv`` (several runs per seed, one per test fold)
    the mean over the test cases of all its runs (:func:`seed_cases`). A seed whose mean of a metric is undefined
    (None) is left out of that metric's row and counted in ``n_missing``. ``n_test_cases`` counts the distinct test
    cases of the row's runs.
    """
    rows = []
    for (trainer, size), runs in _by_trainer_and_size(results).items():
        by_seed: dict[int, list[Mapping]] = {}
        for run in runs:
            by_seed.setdefault(int(run["seed"]), []).append(run)
        row = {"trainer": trainer, "size": size, "seeds": sorted(by_seed), "n_runs": len(runs),
               "n_test_cases": len({case for r in runs for case in r.get("per_case", {})})}
        for metric in METRICS:
            values = [v for v in (_seed_mean(mine, metric) for mine in by_seed.values()) if v is not None]
            row[metric] = {"mean": float(np.mean(values)) if values else None,
                           "std": float(np.std(values)) if values else None, "n": len(values),
                           "n_missing": len(by_seed) - len(values)}
        rows.append(row)
    return rows


def _seed_mean(runs: Sequence[Mapping], metric: str) -> float | None:
    """One seed's test mean of ``metric``: its run's mean, or over the test cases of its runs (``--cv``)."""
    if len(runs) == 1:
        return runs[0]["mean"].get(metric)
    values = [v[metric] for v in seed_cases(runs).values() if v.get(metric) is not None]
    return float(np.mean(values)) if values else None


def seed_cases(runs: Sequence[Mapping]) -> dict[str, Mapping]:
    """Test case -> its metrics, over the runs of one (trainer, size, seed): with ``--cv`` one run per test fold.

    Raises:
        ValueError: a case tested by two of the runs (test folds must be disjoint).
    """
    cases: dict[str, Mapping] = {}
    for run in runs:
        for case, values in run.get("per_case", {}).items():
            if case in cases:
                raise ValueError(f"{run['trainer']}, {run['size']} labelled, seed {run['seed']}: test case {case} is "
                                 f"in two runs; the test folds of a seed must be disjoint")
            cases[case] = values
    return cases


def _by_trainer_and_size(results: Sequence[Mapping], keep=lambda result: True) -> dict[tuple[str, int], list]:
    """The kept results grouped by (trainer, size): trainers in their first-appearance order, sizes ascending."""
    order = {t: k for k, t in enumerate(dict.fromkeys(r["trainer"] for r in results))}
    groups: dict[tuple[str, int], list[Mapping]] = {}
    for result in sorted(results, key=lambda r: (order[r["trainer"]], int(r["size"]))):
        if keep(result):
            groups.setdefault((result["trainer"], int(result["size"])), []).append(result)
    return groups


def paired_differences(results: Sequence[Mapping], pairs: Mapping[str, str] | Sequence[tuple[str, str]],
                       n_resamples: int = 10000, seed: int = 0) -> list[dict]:
    """For each (SSL, supervised) pair with results and each size: SSL − supervised over common (seed, case) pairs.

    The interval resamples seeds and test cases independently (:func:`~.bootstrap.crossed_bootstrap`): every seed is
    scored on the same test cases, so the (seed, case) pairs are not independent of each other. With ``--cv`` a
    seed's cases are those of all its test folds (:func:`seed_cases`): a pair is the same case and seed, each trainer
    tested by its model of the fold holding the case. ``pairs`` is a mapping SSL -> supervised or a sequence of
    (SSL, reference) pairs (e.g. ``("X+ft", "X")``).

    Returns:
        one dict per (pair, size, metric) with :func:`~.bootstrap.crossed_bootstrap`'s fields, ``ssl``,
        ``supervised``, ``size``, ``metric`` and ``seeds``.
    """
    grouped: dict[tuple[str, int, int], list[Mapping]] = {}
    for r in results:
        grouped.setdefault((r["trainer"], int(r["size"]), int(r["seed"])), []).append(r)
    index = {key: seed_cases(runs) for key, runs in grouped.items()}
    out = []
    for ssl, sup in (pairs.items() if isinstance(pairs, Mapping) else pairs):
        sizes = sorted({s for (t, s, _) in index if t == ssl} & {s for (t, s, _) in index if t == sup})
        for size in sizes:
            seeds = sorted({d for (t, s, d) in index if t == ssl and s == size}
                           & {d for (t, s, d) in index if t == sup and s == size})
            for metric in METRICS:
                a, b, rows, cols = [], [], [], []
                for seed_ in seeds:
                    x, y = index[(ssl, size, seed_)], index[(sup, size, seed_)]
                    for case in sorted(set(x) & set(y)):
                        a.append(np.nan if x[case][metric] is None else x[case][metric])
                        b.append(np.nan if y[case][metric] is None else y[case][metric])
                        rows.append(seed_)
                        cols.append(case)
                out.append({"ssl": ssl, "supervised": sup, "size": size, "metric": metric, "seeds": seeds,
                            **crossed_bootstrap(a, b, rows, cols, n_resamples=n_resamples, seed=seed)})
    return out


def signal_table(results: Sequence[Mapping]) -> list[dict]:
    """One row per (trainer, size) of the runs that logged an unsupervised term: the mean over seeds of each
    :func:`~nnunet_mmssl.study.runner.training_signals` value (None where no seed measured it)."""
    rows = []
    for (trainer, size), runs in _by_trainer_and_size(results, keep=lambda r: bool(r.get("training"))).items():
        signals = [r["training"] for r in runs]
        row = {"trainer": trainer, "size": size, "n": len(signals)}
        for key in dict.fromkeys(k for s in signals for k in s):
            values = [s[key] for s in signals if s.get(key) is not None]
            row[key] = float(np.mean(values)) if values else None
        rows.append(row)
    return rows


def _cell(entry: Mapping | None, digits: int = 3) -> str:
    if entry is None or entry.get("mean") is None:
        return "n/a"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def format_table(rows: Sequence[Mapping], differences: Sequence[Mapping] = (),
                 signals: Sequence[Mapping] = ()) -> str:
    """The table as text: one line per (trainer, size), the Dice differences with their intervals, then what the
    unsupervised terms did at the end of training (``signals``, :func:`signal_table`)."""
    header = (f"{'trainer':<28} {'labelled':>8} {'seeds':>5} {'test cases':>10} {'Dice':>15} {'HD95 mm':>17} "
              f"{'sensitivity':>15}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['trainer']:<28} {row['size']:>8} {len(row['seeds']):>5} {row['n_test_cases']:>10} "
                     f"{_cell(row['dice']):>15} {_cell(row['hd95'], 2):>17} {_cell(row['sensitivity']):>15}")
    dice = [d for d in differences if d["metric"] == "dice"]
    if dice:
        lines += ["", ("Paired difference SSL − supervised (Dice, mean over (seed, test case) pairs, "
                       f"{100 * dice[0]['confidence']:.0f} % bootstrap interval resampling seeds and test cases):")]
        for d in dice:
            value = "n/a" if d["mean_difference"] is None else \
                f"{d['mean_difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            lines.append(f"  {d['ssl'] + ' − ' + d['supervised']:<52} {d['size']:>4} labelled: {value} "
                         f"({d['n_pairs']} pairs: {d['n_rows']} seeds × {d['n_cols']} cases)")
    active = [r for r in signals if r.get("unsup_weight")]
    if active:
        def number(value, spec):
            return "n/a" if value is None else format(value, spec)

        lines += ["", ("Unsupervised term at the end of training (mean of the last epochs, then over seeds): "
                       "gradient share |grad w·L_unsup| / |grad L_sup|, weight w, L_unsup, L_sup:")]
        for r in active:
            lines.append(f"  {r['trainer']:<28} {r['size']:>4} labelled: share "
                         f"{number(r.get('unsup_grad_share'), '.3f')}, w {number(r.get('unsup_weight'), '.3g')}, "
                         f"L_unsup {number(r.get('unsup_loss'), '.4f')}, L_sup {number(r.get('sup_loss'), '.4f')}")
    return "\n".join(lines)


def plot_dice(rows: Sequence[Mapping], path: str) -> dict:
    """Dice vs number of labelled cases, one line per trainer, error bars = std over seeds (PNG via Agg).

    Returns:
        trainer -> {"sizes", "dice_mean", "dice_std"}: the plotted points.
    """
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = {}
    for trainer in dict.fromkeys(r["trainer"] for r in rows):
        mine = [r for r in rows if r["trainer"] == trainer and r["dice"]["mean"] is not None]
        series[trainer] = {"sizes": [r["size"] for r in mine], "dice_mean": [r["dice"]["mean"] for r in mine],
                           "dice_std": [r["dice"]["std"] for r in mine]}
        ax.errorbar(series[trainer]["sizes"], series[trainer]["dice_mean"], yerr=series[trainer]["dice_std"],
                    marker="o", capsize=3, label=trainer)
    sizes = sorted({r["size"] for r in rows})
    ax.set_xticks(sizes)
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("test Dice (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path, dpi=120)
    return series


def save_png(fig, path: str, dpi: int = 120) -> None:
    """Lay out, write ``fig`` to ``path`` through a temporary name (a failed write publishes nothing and leaves
    nothing behind: :func:`~nnunet_mmssl.evaluation.report.write_file_atomic`), close it."""
    import matplotlib.pyplot as plt

    from nnunet_mmssl.evaluation.report import write_file_atomic

    fig.tight_layout()
    try:
        write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"), suffix=".png")
    finally:
        plt.close(fig)


def write_report(output: str, results: Sequence[Mapping], pairs: Mapping[str, str] | Sequence[tuple[str, str]],
                 settings: Mapping, n_resamples: int = 10000, seed: int = 0) -> dict:
    """Write ``study_table.txt``, ``dice_vs_labeled.png`` and ``study_results.json`` into ``output``; return the
    JSON's content (``table`` rows, ``differences``, ``runs``, ``settings``, ``plot_series``, the file names)."""
    from nnunet_mmssl.study.runner import atomic_write_json, atomic_write_text

    rows = summary_table(results)
    differences = paired_differences(results, pairs, n_resamples=n_resamples, seed=seed)
    signals = signal_table(results)
    text = format_table(rows, differences, signals)
    os.makedirs(output, exist_ok=True)
    atomic_write_text(os.path.join(output, "study_table.txt"), text + "\n")
    series = plot_dice(rows, os.path.join(output, "dice_vs_labeled.png"))
    report = {"settings": dict(settings), "table": rows, "differences": differences, "signals": signals,
              "table_text": text,
              "plot": "dice_vs_labeled.png", "plot_series": series, "table_file": "study_table.txt",
              "runs": list(results)}
    atomic_write_json(os.path.join(output, "study_results.json"), _finite(report))
    return report


def _finite(value):
    """NaN / inf -> None, recursively (strict JSON)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

"""Score trained models of one real-data run on every modality subset, side by side (issue #12's comparison).

Takes the work folder of ``benchmarks/real_data_run.py`` (models trained there on the same split and plans), runs
``nnUNetv2_mmssl_evaluate_missing`` on each trainer's model with the run's held-out test cases, and prints one table:
a row per trainer, a column per modality subset (mean Dice ± std over the test cases, and HD95), plus the mean over
subsets; also written as JSON. Absent channels are handled the way each method defines (SMML: its encoder mask;
every other network: the channel is 0 after normalisation).

    python benchmarks/real_data_run.py --data ../shared/data --workdir /tmp/smml_real -c 2d --spacing 2 2 2 \\
        --batch-size 4 --epochs 15 --iterations 10 --num-labeled 6 --num-test 4 \\
        -tr nnUNetTrainer ModalityDropoutTrainer SMMLTrainer SMMLSSLTrainer MemCifSSLTrainer
    python benchmarks/missing_subsets_run.py --workdir /tmp/smml_real \\
        -tr nnUNetTrainer ModalityDropoutTrainer SMMLTrainer SMMLSSLTrainer MemCifSSLTrainer
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from real_data_run import PRESETS, workdir_environment  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the work folder of benchmarks/real_data_run.py")
    parser.add_argument("--dataset", default="brats_flair_t1", choices=sorted(PRESETS),
                        help="the real_data_run.py --dataset the models were trained on")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True)
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("-p", "--plans", default="nnUNetPlans_bs4", help="plans name real_data_run.py trained with")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None, help="default <workdir>/missing_subsets.json")
    return parser


def model_folder(results_root: str, trainer: str, plans: str, configuration: str,
                 dataset: str = "brats_flair_t1") -> str:
    """The trainer's model folder as real_data_run.py trains it (short-schedule ``__budget`` subclass)."""
    preset = PRESETS[dataset]
    return os.path.join(results_root, f"Dataset{preset['id']}_{preset['name']}",
                        f"{trainer}__budget__{plans}__{configuration}")


def _fmt(subset: dict, metric: str, std: dict | None) -> str:
    value = subset["foreground_mean"][metric]
    if value is None:
        return "n/a"
    scale = 100.0 if metric == "dice" else 1.0
    text = f"{value * scale:.1f}"
    if std is not None and std.get(metric) is not None:
        text += f"±{std[metric] * scale:.1f}"
    return text


def comparison_table(summaries: dict[str, dict], stds: dict[str, dict[str, dict]], metric: str = "dice") -> str:
    """Rows = trainers, columns = subsets (present modalities joined by '+'), last column = mean over subsets."""
    first = next(iter(summaries.values()))
    names = ["+".join(s["present_names"]) for s in first["subsets"]]
    width = max(14, *(len(n) + 2 for n in names))
    header = f"{'trainer':<26}" + "".join(f"{n:>{width}}" for n in names) + f"{'mean':>{width}}"
    lines = [header, "-" * len(header)]
    for trainer, summary in summaries.items():
        by_key = {s["key"]: s for s in summary["subsets"]}
        cells = [_fmt(by_key[s["key"]], metric, stds.get(trainer, {}).get(s["key"])) for s in first["subsets"]]
        mean = summary["average_foreground_mean"][metric]
        scale = 100.0 if metric == "dice" else 1.0
        cells.append("n/a" if mean is None else f"{mean * scale:.1f}")
        lines.append(f"{trainer:<26}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def _case_std(subset_folder: str) -> dict:
    """Std over the test cases of the foreground-mean metrics of one subset (from its scores.json)."""
    import numpy as np

    with open(os.path.join(subset_folder, "scores.json")) as f:
        scores = json.load(f)
    result = {}
    for metric in ("dice", "hd95"):
        values = []
        for case in scores["scores"]["metric_per_case"]:  # the case's mean over labels/regions
            per_region = [m[metric] for m in case["metrics"].values() if m.get(metric) is not None]
            if per_region:
                values.append(float(np.mean(per_region)))
        result[metric] = float(np.std(values)) if values else None
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = os.path.abspath(args.workdir)
    env, logs, _ = workdir_environment(root)
    preset = PRESETS[args.dataset]
    raw = os.path.join(env["nnUNet_raw"], f"Dataset{preset['id']}_{preset['name']}")
    summaries, stds, commands = {}, {}, []
    for trainer in args.trainers:
        model = model_folder(env["nnUNet_results"], trainer, args.plans, args.configuration, args.dataset)
        out = os.path.join(root, "missing_subsets", trainer)
        cmd = ["nnUNetv2_mmssl_evaluate_missing", "-i", os.path.join(raw, "imagesTs"), "-ref",
               os.path.join(raw, "labelsTs"), "-o", out, "-m", model, "-f", "all", "-device", args.device,
               "--disable_tta", "-npp", "0"]
        commands.append(cmd)
        with open(os.path.join(logs, f"missing_{trainer}.log"), "w") as log:
            code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            raise RuntimeError(f"failed ({code}): {' '.join(cmd)} (log: {log.name})")
        with open(os.path.join(out, "missing_modalities.json")) as f:
            summaries[trainer] = json.load(f)
        stds[trainer] = {s["key"]: _case_std(os.path.join(out, "subsets", s["key"]))
                         for s in summaries[trainer]["subsets"]}
        print(f"{trainer}: done", flush=True)
    dice = comparison_table(summaries, stds, "dice")
    hd95 = comparison_table(summaries, stds, "hd95")
    n_cases = next(iter(summaries.values()))["n_cases"]
    print(f"\nDice (%) per modality subset, mean ± std over {n_cases} test cases\n{dice}\n\nHD95 (mm)\n{hd95}")
    with open(args.json or os.path.join(root, "missing_subsets.json"), "w") as f:
        json.dump({"commands": commands, "summaries": summaries, "case_std": stds, "dice_table": dice,
                   "hd95_table": hd95}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

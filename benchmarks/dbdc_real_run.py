"""DBDC on real, UNREGISTERED BraTS modalities: the FLAIR of some patients and the T1 of OTHER patients.

The real-data counterpart of the DBDC paper's setting (each case one modality, never the same patient twice), built
from the data beside the project, with nnU-Net's own commands and one split / one plans file for every trainer:

1. a staging folder (symlinks, under ``--workdir``): ``FLAIR/<case>`` = the FLAIR and whole-tumour label of
   ``brats2018_flair_t1/case_<i>`` for ``--flair-cases``, ``T1/<case>`` = the T1 and label of ``--t1-cases`` (must be
   other cases: other patients), plus the FLAIR and the T1 of every ``brats_4seq_unlabeled`` case, without labels;
2. ``nnUNetv2_mmssl_convert --source-modality FLAIR T1`` (unregistered mode): per modality ``--num-test`` held-out
   test cases, the other labelled cases labelled training, the staged unlabelled images unlabelled;
3. ``nnUNetv2_mmssl_plan_and_preprocess`` and the batch-size plans copy of ``benchmarks/real_data_run.py``;
4. ``nnUNetv2_train <id> <c> all -tr <trainer>__budget -device cpu`` (real_data_run's short-schedule subclasses, here
   with ``torch.set_num_threads(--threads)``) for ``nnUNetTrainer`` (a timing reference: nnU-Net's trainer on the
   pooled channel), ``PooledUNetTrainer`` (the paper's "UNet" baseline), ``DBDCSupervisedTrainer``, ``DBDCTrainer``;
5. ``nnUNetv2_mmssl_predict --modalities-from dataset.json`` on the test cases (each case as its modality) and
   ``nnUNetv2_mmssl_evaluate``'s :func:`~nnunet_mmssl.evaluation.evaluate_folders`;
6. a table per trainer and modality: Dice and HD95 (mean +- sd over that modality's test cases), the mean over
   modalities (each counts once), seconds per epoch and their ratios to nnUNetTrainer and PooledUNetTrainer, the
   share of DBDC's epoch spent in prototype updates + MPCL; also written as JSON.

    python benchmarks/dbdc_real_run.py --data ../shared/data --workdir /work/runs/dbdc-real -c 2d \\
        --spacing 2 2 2 --batch-size 4 --epochs 15 --iterations 10 --threads 1

Skips with a message (exit 0) when the data folder is absent.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import real_data_run as rdr  # noqa: E402  (the shared real-data steps, as benchmarks/missing_subsets_run.py uses them)

DATASET_ID = 503
DATASET_NAME = "BraTSFlairT1Unregistered"
MODALITIES = ("FLAIR", "T1")
DEFAULT_TRAINERS = ("nnUNetTrainer", "PooledUNetTrainer", "DBDCSupervisedTrainer", "DBDCTrainer")
LABELLED_SET, UNLABELLED_SET = "brats2018_flair_t1", "brats_4seq_unlabeled"
LABELLED_FILES = {"FLAIR": "FLAIR.nii.gz", "T1": "T1.nii.gz"}
LABEL_FILE = "GT_W.nii.gz"
UNLABELLED_GLOBS = {"FLAIR": ("*t2f*", "flair.nii.gz", "*_fla_*"), "T1": ("*t1n*", "t1.nii.gz", "*_t1_*")}
STAGED_IMAGE, STAGED_LABEL = "image.nii.gz", "label.nii.gz"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data"),
                        help=f"folder holding {LABELLED_SET}/ and {UNLABELLED_SET}/")
    parser.add_argument("--workdir", default="mmssl_dbdc_real_run", help="everything is written here")
    parser.add_argument("--flair-cases", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help=f"{LABELLED_SET} cases whose FLAIR (and label) is used")
    parser.add_argument("--t1-cases", type=int, nargs="+", default=[5, 6, 7, 8, 9],
                        help=f"{LABELLED_SET} cases whose T1 (and label) is used; disjoint from --flair-cases")
    parser.add_argument("-c", "--configuration", default="2d", choices=["2d", "3d_fullres"])
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar="MM",
                        help="target spacing (nnU-Net's -overwrite_target_spacing); default: the images' 1 mm")
    parser.add_argument("--batch-size", type=int, default=4, help="labelled batch size of every trainer")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=10, help="training iterations per epoch")
    parser.add_argument("--val-iterations", type=int, default=2, help="nnU-Net's per-epoch validation iterations")
    parser.add_argument("--num-test", type=int, default=2, help="held-out test cases per modality")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each training (0: nnU-Net's all)")
    parser.add_argument("-tr", "--trainers", nargs="+", default=list(DEFAULT_TRAINERS))
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None, help="write the results here (default <workdir>/results.json)")
    return parser


def _find_one(case_folder: str, patterns: tuple[str, ...]) -> str:
    """The one file under ``case_folder`` (recursively) whose name matches one of ``patterns``."""
    hits = sorted(os.path.join(d, f) for d, _, files in os.walk(case_folder) for f in files
                  if any(fnmatch.fnmatchcase(f, p) for p in patterns))
    if len(hits) != 1:
        raise FileNotFoundError(f"{case_folder}: expected exactly one file matching {' or '.join(patterns)}, found "
                                f"{len(hits)} ({', '.join(os.path.basename(h) for h in hits) or 'none'})")
    return hits[0]


def select_cases(data: str, flair_cases: list[int], t1_cases: list[int]) -> dict[str, list[dict]]:
    """The staged cases of each modality: ``{modality: [{"case", "image", "label" or None}]}``.

    Labelled: ``brats2018_flair_t1/case_<i>``'s FLAIR for ``flair_cases``, its T1 for ``t1_cases`` (other patients);
    unlabelled: the FLAIR and the T1 of every ``brats_4seq_unlabeled`` case (its four naming schemes).

    Raises:
        ValueError: a case in both lists, or a list empty / with repeats.
        FileNotFoundError: a case folder or file missing (naming it).
    """
    for name, cases in (("--flair-cases", flair_cases), ("--t1-cases", t1_cases)):
        if not cases or len(set(cases)) != len(cases):
            raise ValueError(f"{name} {cases}: give at least one case, each once")
    shared = sorted(set(flair_cases) & set(t1_cases))
    if shared:
        raise ValueError(f"cases {shared} are in both --flair-cases and --t1-cases: the modalities must come from "
                         f"different patients (unregistered); give disjoint lists")
    staged = {m: [] for m in MODALITIES}
    for modality, cases in zip(MODALITIES, (flair_cases, t1_cases)):
        for i in cases:
            folder = os.path.join(data, LABELLED_SET, f"case_{i}")
            paths = [os.path.join(folder, LABELLED_FILES[modality]), os.path.join(folder, LABEL_FILE)]
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"missing {', '.join(missing)}: choose cases present in {LABELLED_SET}/")
            staged[modality].append({"case": f"case_{i}", "image": paths[0], "label": paths[1]})
    unlabelled = os.path.join(data, UNLABELLED_SET)
    for case in sorted(d for d in os.listdir(unlabelled) if os.path.isdir(os.path.join(unlabelled, d))):
        for modality in MODALITIES:
            staged[modality].append({"case": case, "label": None,
                                     "image": _find_one(os.path.join(unlabelled, case), UNLABELLED_GLOBS[modality])})
    return staged


def stage_sources(staged: dict[str, list[dict]], stage_root: str) -> list[str]:
    """Symlink each case's image (and label) as ``<stage_root>/<modality>/<case>/image|label.nii.gz``.

    Returns the source folders in :data:`MODALITIES` order (one per modality, for ``--source-modality``).
    """
    sources = []
    for modality in MODALITIES:
        source = os.path.join(stage_root, modality)
        for entry in staged[modality]:
            case_folder = os.path.join(source, entry["case"])
            os.makedirs(case_folder, exist_ok=True)
            for target, name in ((entry["image"], STAGED_IMAGE), (entry["label"], STAGED_LABEL)):
                link = os.path.join(case_folder, name)
                if target is None:
                    continue
                if os.path.islink(link) and os.readlink(link) != os.path.abspath(target):
                    os.remove(link)
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(target), link)
        sources.append(source)
    return sources


def convert_command(sources: list[str], num_test: int, seed: int, raw_root: str) -> list[str]:
    """``nnUNetv2_mmssl_convert`` in unregistered mode: one modality per source, every labelled non-test case
    labelled, ``num_test`` test cases per modality."""
    return ["nnUNetv2_mmssl_convert", "-i", *sources, "--source-modality", *MODALITIES, "--image", STAGED_IMAGE,
            "--label", STAGED_LABEL, "--num-test", str(num_test), "--seed", str(seed), "-d", str(DATASET_ID),
            "-n", DATASET_NAME, "-o", raw_root]


def train_command(trainer: str, configuration: str, plans_name: str, device: str) -> list[str]:
    return ["nnUNetv2_train", str(DATASET_ID), configuration, "all", "-tr", trainer + "__budget", "-p", plans_name,
            "-device", device]


def predict_command(trainer: str, raw: str, out: str, configuration: str, plans_name: str, device: str) -> list[str]:
    """Every trainer predicts through ``nnUNetv2_mmssl_predict --modalities-from``: each test case normalised (and,
    for DBDC, its norm bank chosen) as its recorded modality."""
    return ["nnUNetv2_mmssl_predict", "-i", os.path.join(raw, "imagesTs"), "-o", out, "-d", str(DATASET_ID),
            "-c", configuration, "-f", "all", "-tr", trainer + "__budget", "-p", plans_name, "-device", device,
            "--modalities-from", os.path.join(raw, "dataset.json"), "-npp", "1", "-nps", "1", "--disable_tta"]


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    array = array[np.isfinite(array)]
    return (None, None) if array.size == 0 else (float(array.mean()), float(array.std()))


def modality_scores(evaluation: dict, case_modality: dict[str, str]) -> dict:
    """Dice and HD95 (mean, sd over the cases) per modality and their mean over modalities (each counts once).

    Args:
        evaluation: :func:`~nnunet_mmssl.evaluation.evaluate_folders` output (one label: the whole tumour).
        case_modality: case id -> modality.

    Returns:
        ``{"modalities": {m: {"n_cases", "dice": [mean, sd], "hd95": [mean, sd]}}, "mean_over_modalities":
        {"dice", "hd95"}}``.
    """
    label = next(iter(evaluation["mean"]))
    records = {}
    for rec in evaluation["metric_per_case"]:
        if rec["case"] not in case_modality:
            raise ValueError(f"test case {rec['case']} has no modality in the dataset's mmssl.case_modality")
        records.setdefault(case_modality[rec["case"]], []).append(rec["metrics"][label])
    per = {m: {"n_cases": len(recs), **{k: list(_stats([r[k] for r in recs])) for k in ("dice", "hd95")}}
           for m, recs in sorted(records.items(), key=lambda kv: MODALITIES.index(kv[0])
                                 if kv[0] in MODALITIES else len(MODALITIES))}
    over = {k: _stats([per[m][k][0] for m in per])[0] for k in ("dice", "hd95")}
    return {"modalities": per, "mean_over_modalities": over}


def _fmt(pair: list, digits: int) -> str:
    mean, sd = pair
    return "n/a" if mean is None else f"{mean:.{digits}f}±{sd:.{digits}f}"


def result_table(results: dict) -> str:
    """Rows per trainer and modality (Dice, HD95 mean±sd), a row of the mean over modalities, and timing: s/epoch,
    ratio to nnUNetTrainer and to PooledUNetTrainer (``-`` when that trainer was not run), prototype share."""
    bases = {name: results[name]["seconds_per_epoch"] if name in results else None
             for name in ("nnUNetTrainer", "PooledUNetTrainer")}
    header = (f"{'trainer':<24} {'modality':<22} {'n':>2} {'Dice':>12} {'HD95 mm':>14} {'s/epoch':>8} "
              f"{'x nnU':>6} {'x Pooled':>8} {'proto %':>7}")
    lines = [header, "-" * len(header)]
    for trainer, result in results.items():
        scores = result["scores"]
        spe = result["seconds_per_epoch"]
        ratios = [f"{spe / b:.2f}" if b else "-" for b in bases.values()]
        share = result.get("prototype_share")
        timing = (f"{spe:>8.1f} {ratios[0]:>6} {ratios[1]:>8} "
                  f"{'-' if share is None else f'{100 * share:.1f}':>7}")
        rows = [(m, str(s["n_cases"]), _fmt(s["dice"], 3), _fmt(s["hd95"], 1)) for m, s in scores["modalities"].items()]
        over = scores["mean_over_modalities"]
        rows.append(("mean over modalities", "",
                     "n/a" if over["dice"] is None else f"{over['dice']:.3f}",
                     "n/a" if over["hd95"] is None else f"{over['hd95']:.1f}"))
        for k, (modality, n, dice, hd95) in enumerate(rows):
            lines.append(f"{trainer if k == 0 else '':<24} {modality:<22} {n:>2} {dice:>12} {hd95:>14} "
                         f"{timing if k == 0 else ''}")
    return "\n".join(lines)


def _training_log(model_folder: str) -> dict:
    import torch

    checkpoint = torch.load(os.path.join(model_folder, "checkpoint_final.pth"), map_location="cpu",
                            weights_only=False)
    return checkpoint["logging"]


def prototype_share(logging: dict) -> float | None:
    """Median over the epochs (the first excluded, as for s/epoch) of prototype seconds / epoch seconds; None for a
    trainer that does not log ``prototype_seconds``."""
    proto = logging.get("prototype_seconds")
    if not proto:
        return None
    epochs = [e - s for s, e in zip(logging["epoch_start_timestamps"], logging["epoch_end_timestamps"])]
    shares = [p / t for p, t in zip(proto, epochs) if t > 0]
    return float(np.median(shares[1:] if len(shares) > 1 else shares))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = os.path.abspath(args.data)
    if not all(os.path.isdir(os.path.join(data, s)) for s in (LABELLED_SET, UNLABELLED_SET)):
        print(f"real data not found under {data} (needs {LABELLED_SET}/ and {UNLABELLED_SET}/): skipped")
        return 0
    from batchgenerators.utilities.file_and_folder_operations import save_json

    from nnunet_mmssl.evaluation import evaluate_folders
    from nnunet_mmssl.evaluation.report import read_case_modality

    root = os.path.abspath(args.workdir)
    env, logs, ext_folder = rdr.workdir_environment(root)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    staged = select_cases(data, args.flair_cases, args.t1_cases)
    sources = stage_sources(staged, os.path.join(root, "sources"))
    commands = []
    raw, _, plans_name, configuration = rdr.prepare_dataset(
        args, sources, env, logs, commands, convert_cmd=convert_command(sources, args.num_test, args.seed,
                                                                        env["nnUNet_raw"]),
        dataset_id=DATASET_ID, dataset_name=DATASET_NAME)
    _, case_modality = read_case_modality(os.path.join(raw, "dataset.json"))
    rdr.write_budget_trainers(ext_folder, args.trainers, args.epochs, args.iterations, args.val_iterations,
                              threads=args.threads)

    results = {}
    for trainer in args.trainers:
        model = os.path.join(env["nnUNet_results"], f"Dataset{DATASET_ID}_{DATASET_NAME}",
                             f"{trainer}__budget__{plans_name}__{args.configuration}", "fold_all")
        if not os.path.isfile(os.path.join(model, "checkpoint_final.pth")):
            cmd = train_command(trainer, args.configuration, plans_name, args.device)
            commands.append(cmd)
            print(f"train {trainer}: {rdr._run(cmd, env, os.path.join(logs, f'train_{trainer}.log')):.0f} s",
                  flush=True)
        logging = _training_log(model)
        epochs = [e - s for s, e in zip(logging["epoch_start_timestamps"], logging["epoch_end_timestamps"])]
        out = os.path.join(root, "predictions", trainer)
        cmd = predict_command(trainer, raw, out, args.configuration, plans_name, args.device)
        commands.append(cmd)
        predict_seconds = rdr._run(cmd, env, os.path.join(logs, f"predict_{trainer}.log"))
        evaluation = evaluate_folders(os.path.join(raw, "labelsTs"), out,
                                      output_file=os.path.join(out, "summary_mmssl.json"))
        results[trainer] = {"seconds_per_epoch": rdr.seconds_per_epoch(epochs), "epoch_seconds": epochs,
                            "prototype_share": prototype_share(logging), "predict_seconds": predict_seconds,
                            "scores": modality_scores(evaluation, case_modality)}
        over = results[trainer]["scores"]["mean_over_modalities"]
        print(f"  {trainer}: Dice over modalities {over['dice']:.3f}, "
              f"{results[trainer]['seconds_per_epoch']:.1f} s/epoch", flush=True)

    for reference in ("nnUNetTrainer", "PooledUNetTrainer"):
        for result in results.values():
            base = results.get(reference, {}).get("seconds_per_epoch")
            result[f"time_ratio_vs_{reference}"] = result["seconds_per_epoch"] / base if base else None
    table = result_table(results)
    print(f"\nunregistered FLAIR ({LABELLED_SET} cases {args.flair_cases}) / T1 (cases {args.t1_cases}) + "
          f"{UNLABELLED_SET} FLAIR and T1 unlabelled; {args.num_test} test cases per modality, whole tumour, "
          f"{args.configuration}, plans {plans_name} (patch {configuration['patch_size']}, spacing "
          f"{configuration['spacing']}), {args.epochs} epochs x {args.iterations} iterations, batch "
          f"{args.batch_size}, {args.threads or 'all'} thread(s), device {args.device}\n{table}")
    save_json({"args": vars(args), "commands": commands, "plans": plans_name, "patch_size": configuration["patch_size"],
               "spacing": configuration["spacing"], "staged": staged, "results": results, "table": table},
              args.json or os.path.join(root, "results.json"), sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

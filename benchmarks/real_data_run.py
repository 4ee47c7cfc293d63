"""Train and score every trainer on the real BraTS data beside the project, with nnU-Net's own commands.

One run, one split, one plans file for every trainer (nnU-Net's ``nnUNetTrainer`` included), so the numbers are
comparable:

1. ``nnUNetv2_mmssl_convert`` of ``brats2018_flair_t1`` (10 labelled FLAIR+T1 cases) together with the FLAIR and T1
   of ``brats_4seq_unlabeled`` (4 unlabelled cases, four naming schemes) -- the README's command: ``--num-labeled``
   labelled training cases, ``--num-test`` held-out test cases, every other case unlabelled;
2. ``nnUNetv2_mmssl_plan_and_preprocess`` (optionally at a coarser ``--spacing``, nnU-Net's
   ``-overwrite_target_spacing``, so that a CPU can train in minutes);
3. a copy of the plans, ``nnUNetPlans_bs<N>``, whose configuration has batch size ``--batch-size`` (nnU-Net's 2d
   plan for BraTS asks for dozens of slices per step, hours per epoch on a CPU); the preprocessed data is shared;
4. for each trainer a short-schedule subclass ``<trainer>__budget`` (``--epochs`` x ``--iterations``, no final
   validation), written into ``<workdir>/ext_trainers`` and found by nnU-Net through ``nnUNet_extTrainer``;
   ``nnUNetv2_train 501 <c> all -tr <trainer>__budget -p nnUNetPlans_bs<N>``;
5. ``nnUNetv2_predict`` on the test cases (multi-branch trainers: ``nnUNetv2_mmssl_predict --each-head``, which also
   writes each head's own prediction) and ``nnUNetv2_mmssl_evaluate`` against ``labelsTs`` at the original 1 mm grid;
6. a table: Dice, HD95, sensitivity, ASD (mean +- std over the test cases), seconds per epoch (median of the logged
   epochs but the first, from nnU-Net's own timestamps: robust to a few epochs slowed by other work on the machine)
   and its ratio to nnUNetTrainer; also written as JSON (every epoch's time included).

    python benchmarks/real_data_run.py --data ../shared/data --workdir /tmp/mmssl_real -c 2d --spacing 2 2 2 \\
        --batch-size 4 --epochs 10 --iterations 25

Skips with a message (exit 0) when the data folder is absent.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np

DATASET_ID = 501
DATASET_NAME = "BraTSFlairT1"
DEFAULT_TRAINERS = ("nnUNetTrainer", "PlainSupervisedTrainer", "MeanTeacherTrainer", "MemCifSupervisedTrainer",
                    "MemCifSSLTrainer", "MMFMCMLSupervisedTrainer", "MMFMCMLTrainer")
MULTI_BRANCH_PREFIXES = ("MemCif", "MMFMCML")
CONVERT_ARGS = ["--modality", "FLAIR=FLAIR.nii.gz,*t2f*,flair.nii.gz,*_fla_*",
                "--modality", "T1=T1.nii.gz,*t1n*,t1.nii.gz,*_t1_*", "--label", "*GT_W*"]
#: the real data sets this script can run: the folders it reads (labelled, unlabelled), the converter's channel and
#: label globs, the dataset id and name. ms_lesion_4mod (3 MS patients, 4 sequences) takes the four sequences of the
#: brats_4seq_unlabeled cases as its unlabelled pool.
PRESETS = {
    "brats_flair_t1": {"sources": ["brats2018_flair_t1", "brats_4seq_unlabeled"], "convert": CONVERT_ARGS,
                       "id": DATASET_ID, "name": DATASET_NAME},
    "ms_lesion_4mod": {"sources": ["ms_lesion_4mod", "brats_4seq_unlabeled"],
                       "convert": ["--modality", "T1=T1_N4*,*t1n*,t1.nii.gz,*_t1_*",
                                   "--modality", "T1ce=T1POST_*,*t1c*,t1c.nii.gz,*_t1c_*",
                                   "--modality", "T2=T2_N4*,*t2w*,t2.nii.gz,*_t2_*",
                                   "--modality", "FLAIR=FLAIR_N4*,*t2f*,flair.nii.gz,*_fla_*",
                                   "--label", "GOLD_STANDARD*"],
                       "id": 504, "name": "MSLesion4Mod"},
}
_BUDGET_MODULE = '''"""Short-schedule variants written by benchmarks/real_data_run.py (nnUNet_extTrainer finds them)."""
import torch
{imports}


def _budget(cls):
    class Budget(cls):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            if {threads}:
                torch.set_num_threads({threads})
            self.num_epochs = {epochs}
            self.num_iterations_per_epoch = {iterations}
            self.num_val_iterations_per_epoch = {val_iterations}

        def perform_actual_validation(self, save_probabilities=False):
            self.print_to_log_file("budget run: final validation skipped (test cases are scored instead)")

    Budget.__name__ = Budget.__qualname__ = cls.__name__ + "__budget"
    return Budget


{classes}
'''


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
                        help="folder holding brats2018_flair_t1/ and brats_4seq_unlabeled/")
    parser.add_argument("--workdir", default="mmssl_real_run", help="everything is written here")
    parser.add_argument("--dataset", default="brats_flair_t1", choices=sorted(PRESETS),
                        help="which real data set (see PRESETS)")
    parser.add_argument("-c", "--configuration", default="2d", choices=["2d", "3d_fullres"])
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar="MM",
                        help="target spacing (nnU-Net's -overwrite_target_spacing); default: the images' 1 mm")
    parser.add_argument("--batch-size", type=int, default=4, help="labelled batch size of every trainer")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--val-iterations", type=int, default=2, help="nnU-Net's per-epoch validation iterations")
    parser.add_argument("--num-labeled", type=int, default=3)
    parser.add_argument("--num-test", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("-tr", "--trainers", nargs="+", default=list(DEFAULT_TRAINERS))
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tta", action="store_true", help="predict with mirroring (default off, for speed)")
    parser.add_argument("--json", default=None, help="write the results here (default <workdir>/results.json)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="stop after conversion, planning, preprocessing and the batch-size plans (e.g. to run "
                             "nnUNetv2_mmssl_study on the dataset)")
    return parser


def _run(cmd: list[str], env: dict, log_file: str) -> float:
    """Run ``cmd`` with its output in ``log_file``; return the wall time; raise with the log's tail on failure."""
    start = time.perf_counter()
    with open(log_file, "w") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        with open(log_file) as log:
            tail = "".join(log.readlines()[-25:])
        raise RuntimeError(f"failed ({code}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - start


def _epoch_seconds(model_folder: str) -> list[float]:
    import torch

    checkpoint = torch.load(os.path.join(model_folder, "checkpoint_final.pth"), map_location="cpu",
                            weights_only=False)
    logging = checkpoint["logging"]
    return [end - start for start, end in zip(logging["epoch_start_timestamps"], logging["epoch_end_timestamps"])]


def _cell(result: dict, metric: str) -> str:
    label = next(iter(result["mean"]))
    mean, std = result["mean"][label][metric], result["std"][label][metric]
    return "n/a" if mean is None else f"{mean:.3f}±{std:.3f}"


def workdir_environment(root: str) -> tuple[dict, str, str]:
    """nnU-Net's three folders under ``root``, our trainers (and ``root/ext_trainers``) on ``nnUNet_extTrainer``.

    Returns:
        (environment for the child commands, the logs folder, the folder for generated trainer modules)
    """
    from nnunet_mmssl._ext_trainer_hook import EXT_TRAINER_FOLDER, EXT_TRAINER_VARIABLE

    logs = os.path.join(root, "logs")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, nnUNet_raw=os.path.join(root, "nnUNet_raw"),
               nnUNet_preprocessed=os.path.join(root, "nnUNet_preprocessed"),
               nnUNet_results=os.path.join(root, "nnUNet_results"), nnUNet_compile="false")
    env.setdefault("nnUNet_def_n_proc", "2")
    env.setdefault("nnUNet_n_proc_DA", "2")
    ext_folder = os.path.join(root, "ext_trainers")
    env[EXT_TRAINER_VARIABLE] = os.pathsep.join([ext_folder, EXT_TRAINER_FOLDER])
    return env, logs, ext_folder


def write_budget_trainers(ext_folder: str, trainers: list[str], epochs: int, iterations: int, val_iterations: int,
                          threads: int = 0) -> str:
    """Write ``<trainer>__budget`` subclasses (short schedule, no final validation) into ``ext_folder``.

    ``threads`` > 0 makes each budget trainer call ``torch.set_num_threads(threads)`` (``nnUNetv2_train -device cpu``
    otherwise takes every core). Returns the module's path.
    """
    os.makedirs(ext_folder, exist_ok=True)
    imports = "\n".join(["from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer",
                         "from nnunet_mmssl.trainers import *  # noqa: F403"])
    classes = "\n".join(f"{t}__budget = _budget({t})" for t in trainers)
    path = os.path.join(ext_folder, "mmssl_budget_trainers.py")
    with open(path, "w") as f:
        f.write(_BUDGET_MODULE.format(imports=imports, epochs=epochs, iterations=iterations,
                                      val_iterations=val_iterations, classes=classes, threads=int(threads)))
    return path


def seconds_per_epoch(epoch_seconds: list[float]) -> float:
    """Median epoch time without the first epoch (warm-up), or the only epoch's time."""
    return float(np.median(epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds))


def prepare_dataset(args, sources: list[str], env: dict, logs: str, commands: list, *,
                    convert_cmd: list[str] | None = None, dataset_id: int = DATASET_ID,
                    dataset_name: str = DATASET_NAME, convert_args: list[str] | None = None
                    ) -> tuple[str, str, str, dict]:
    """Convert (README command), plan and preprocess, and write the batch-size plans copy, unless done before.

    ``args`` needs ``num_labeled``, ``num_test``, ``seed``, ``configuration``, ``spacing`` and ``batch_size``; the
    commands run are appended to ``commands``. ``convert_cmd`` replaces the registered conversion of ``sources``
    (e.g. an unregistered one) for dataset ``dataset_id``/``dataset_name``.

    Returns:
        (raw dataset folder, preprocessed dataset folder, plans name, the plans' configuration entry)
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    raw = os.path.join(env["nnUNet_raw"], f"Dataset{dataset_id}_{dataset_name}")
    if not os.path.isdir(raw):
        cmd = convert_cmd or ["nnUNetv2_mmssl_convert", "-i", *sources, *(convert_args or CONVERT_ARGS),
                              "--num-labeled", str(args.num_labeled), "--num-test", str(args.num_test), "--seed",
                              str(args.seed), "-d", str(dataset_id), "-n", dataset_name, "-o", env["nnUNet_raw"]]
        commands.append(cmd)
        print(f"convert: {_run(cmd, env, os.path.join(logs, 'convert.log')):.0f} s", flush=True)
    preprocessed = os.path.join(env["nnUNet_preprocessed"], f"Dataset{dataset_id}_{dataset_name}")
    plans_name = f"nnUNetPlans_bs{args.batch_size}"
    if not os.path.isfile(os.path.join(preprocessed, plans_name + ".json")):
        cmd = ["nnUNetv2_mmssl_plan_and_preprocess", "-d", str(dataset_id), "-c", args.configuration,
               "-np", env["nnUNet_def_n_proc"]]
        if args.spacing:
            cmd += ["-overwrite_target_spacing", *map(str, args.spacing)]
        commands.append(cmd)
        print(f"plan and preprocess: {_run(cmd, env, os.path.join(logs, 'plan_and_preprocess.log')):.0f} s",
              flush=True)
        plans = load_json(os.path.join(preprocessed, "nnUNetPlans.json"))
        plans["plans_name"] = plans_name
        plans["configurations"][args.configuration]["batch_size"] = args.batch_size
        save_json(plans, os.path.join(preprocessed, plans_name + ".json"), sort_keys=False)
    configuration = load_json(os.path.join(preprocessed, plans_name + ".json"))["configurations"][args.configuration]
    print(f"plans {plans_name}: {args.configuration} patch {configuration['patch_size']}, spacing "
          f"{configuration['spacing']}, batch {configuration['batch_size']}", flush=True)
    return raw, preprocessed, plans_name, configuration


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = os.path.abspath(args.data)
    preset = PRESETS[args.dataset]
    sources = [os.path.join(data, name) for name in preset["sources"]]
    if not all(os.path.isdir(s) for s in sources):
        print(f"real data not found under {data} (needs {' and '.join(preset['sources'])}): skipped")
        return 0
    dataset_id, dataset_name = preset["id"], preset["name"]
    from batchgenerators.utilities.file_and_folder_operations import save_json

    from nnunet_mmssl.evaluation import evaluate_folders

    root = os.path.abspath(args.workdir)
    env, logs, ext_folder = workdir_environment(root)
    commands = []
    raw, preprocessed, plans_name, configuration = prepare_dataset(args, sources, env, logs, commands,
                                                                   dataset_id=dataset_id, dataset_name=dataset_name,
                                                                   convert_args=preset["convert"])
    if args.prepare_only:
        print(f"prepared {raw} and {preprocessed} (plans {plans_name}); set nnUNet_raw={env['nnUNet_raw']} "
              f"nnUNet_preprocessed={env['nnUNet_preprocessed']} to use them", flush=True)
        return 0

    write_budget_trainers(ext_folder, args.trainers, args.epochs, args.iterations, args.val_iterations)

    results = {}
    for trainer in args.trainers:
        name = trainer + "__budget"
        model = os.path.join(env["nnUNet_results"], f"Dataset{dataset_id}_{dataset_name}",
                             f"{name}__{plans_name}__{args.configuration}", "fold_all")
        if not os.path.isfile(os.path.join(model, "checkpoint_final.pth")):
            cmd = ["nnUNetv2_train", str(dataset_id), args.configuration, "all",
                   "-tr", name, "-p", plans_name, "-device", args.device]
            commands.append(cmd)
            print(f"train {trainer}: {_run(cmd, env, os.path.join(logs, f'train_{trainer}.log')):.0f} s", flush=True)
        epochs = _epoch_seconds(model)
        out = os.path.join(root, "predictions", trainer)
        multi = trainer.startswith(MULTI_BRANCH_PREFIXES)
        predict = ["nnUNetv2_mmssl_predict", "--each-head"] if multi else ["nnUNetv2_predict"]
        cmd = predict + ["-i", os.path.join(raw, "imagesTs"), "-o", out, "-d", str(dataset_id), "-c",
                         args.configuration, "-f", "all", "-tr", name, "-p", plans_name, "-device", args.device,
                         "-npp", "1", "-nps", "1"] + ([] if args.tta else ["--disable_tta"])
        commands.append(cmd)
        predict_seconds = _run(cmd, env, os.path.join(logs, f"predict_{trainer}.log"))
        folders = {"fused": os.path.join(out, "fused") if multi else out}
        if multi:
            folders.update({d: os.path.join(out, d) for d in sorted(os.listdir(out)) if d.startswith("head_")})
        results[trainer] = {
            "seconds_per_epoch": seconds_per_epoch(epochs),
            "epoch_seconds": epochs, "epochs": len(epochs), "predict_seconds": predict_seconds,
            "evaluation": {k: evaluate_folders(os.path.join(raw, "labelsTs"), v,
                                               output_file=os.path.join(v, "summary_mmssl.json"))
                           for k, v in folders.items()}}
        print(f"  {trainer}: Dice {_cell(results[trainer]['evaluation']['fused'], 'dice')}, "
              f"{results[trainer]['seconds_per_epoch']:.1f} s/epoch", flush=True)

    base = results.get("nnUNetTrainer", next(iter(results.values())))["seconds_per_epoch"]
    header = (f"{'trainer':<26} {'prediction':<14} {'Dice':>12} {'HD95 mm':>14} {'sensitivity':>12} "
              f"{'ASD mm':>13} {'s/epoch':>8} {'x nnU':>6}")
    lines = [header, "-" * len(header)]
    for trainer, result in results.items():
        for k, (head, evaluation) in enumerate(result["evaluation"].items()):
            timing = f"{result['seconds_per_epoch']:>8.1f} {result['seconds_per_epoch'] / base:>6.2f}" if k == 0 else ""
            lines.append(f"{trainer if k == 0 else '':<26} {head:<14} {_cell(evaluation, 'dice'):>12} "
                         f"{_cell(evaluation, 'hd95'):>14} {_cell(evaluation, 'sensitivity'):>12} "
                         f"{_cell(evaluation, 'asd'):>13} {timing}")
    table = "\n".join(lines)
    print(f"\n{args.num_test} test cases, whole tumour, {args.configuration}, plans {plans_name} (patch "
          f"{configuration['patch_size']}, spacing {configuration['spacing']}), {args.epochs} epochs x "
          f"{args.iterations} iterations, device {args.device}\n{table}")
    save_json({"args": vars(args), "commands": commands, "plans": plans_name, "patch_size": configuration["patch_size"],
               "spacing": configuration["spacing"], "results": results, "table": table},
              args.json or os.path.join(root, "results.json"), sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``nnUNetv2_mmssl_demo``: the whole pipeline on a built-in synthetic two-modality phantom, in minutes on a CPU.

phantom cases -> ``nnUNetv2_mmssl_convert`` (labelled / unlabelled / test split) ->
``nnUNetv2_mmssl_plan_and_preprocess`` -> ``nnUNetv2_train`` (MemCifSSLTrainer_demo and its supervised-only twin,
short schedules) -> ``nnUNetv2_predict`` on the held-out test cases (without mirroring, for speed) ->
``nnUNetv2_mmssl_evaluate`` -> a table.
Everything is written under one folder (nnU-Net's raw / preprocessed / results folders included); the full output of
nnU-Net's commands goes to ``<folder>/logs``.
"""

import argparse
import os
import subprocess
import sys
import time

from nnunet_mmssl.cli._common import add_verbose, run_cli, tracked

PROG = "nnUNetv2_mmssl_demo"
DATASET_ID = 990
DATASET_NAME = "MMSSLPhantom"
TRAINERS = ("MemCifSSLTrainer_demo", "MemCifSupervisedTrainer_demo")
_PROGRESS_MARKERS = ("Epoch ", "train_loss", "val_loss", "Pseudo dice", "Epoch time", "sup_loss", "Training done",
                     "Traceback", "Error", "error:")
_TRAIN = ("import sys; from nnunetv2.run.run_training import run_training_entry as m; "
          "sys.argv[0] = 'nnUNetv2_train'; sys.exit(m())")
_PREDICT = ("import sys; from nnunetv2.inference.predict_from_raw_data import predict_entry_point as m; "
            "sys.argv[0] = 'nnUNetv2_predict'; sys.exit(m())")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", default=os.path.join(os.getcwd(), "mmssl_demo"),
                        help="folder for everything the demo writes (default: ./mmssl_demo)")
    parser.add_argument("-c", "--configuration", default="2d", choices=["2d", "3d_fullres"])
    parser.add_argument("--seed", type=int, default=0, help="phantom and split seed")
    parser.add_argument("--num-labeled", type=int, default=4, help="labelled training cases (default 4)")
    parser.add_argument("--num-unlabeled", type=int, default=12, help="unlabelled cases (default 12)")
    parser.add_argument("--num-test", type=int, default=4, help="held-out test cases (default 4)")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), help=f"trainers (default {TRAINERS})")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--overwrite", action="store_true", help="start again if the folder exists")
    return add_verbose(parser)


def check_request(num_labeled: int, num_unlabeled: int, num_test: int, trainers, device: str) -> None:
    """Reject a demo request that would fail after minutes of work.

    Raises:
        ValueError: naming the value and the fix.
    """
    for name, value in (("--num-labeled", num_labeled), ("--num-unlabeled", num_unlabeled),
                        ("--num-test", num_test)):
        if value < 1:
            raise ValueError(f"{name} {value}: the demo needs at least 1 (labelled training, unlabelled and test "
                             f"cases are all used)")
    import nnunet_mmssl.trainers as ours

    unknown = [t for t in trainers if not isinstance(getattr(ours, t, None), type)]
    if unknown:
        known = sorted(n for n in dir(ours) if n.endswith(("Trainer", "_demo")) and not n.endswith("Base"))
        raise ValueError(f"--trainers: unknown trainer(s) {unknown}; the demo runs trainers of nnunet_mmssl, e.g. "
                         f"{known}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("-device cuda, but no CUDA GPU is available here; pass -device cpu")


class _Stage:
    def __init__(self, title: str):
        self.title = title

    def __enter__(self):
        self.start = time.perf_counter()
        print(f"\n==> {self.title}", flush=True)
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        if exc[0] is None:
            print(f"    done in {self.seconds:.0f} s", flush=True)


def _run_logged(cmd: list[str], env: dict, log_file: str, prefix: str = "    ") -> None:
    """Run an nnU-Net command, echo its progress lines (after ``prefix``), keep the full output in ``log_file``."""
    with open(log_file, "w") as log, tracked(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                              stderr=subprocess.STDOUT, text=True,
                                                              bufsize=1)) as process:
        for line in process.stdout:
            log.write(line)
            if any(marker in line for marker in _PROGRESS_MARKERS):
                print(prefix + line.rstrip(), flush=True)
        code = process.wait()
    if code != 0:
        with open(log_file) as log:
            lines = [line.strip() for line in log if line.strip()]
        last = lines[-1] if lines else "(no output)"
        raise RuntimeError(f"command failed with exit code {code}: {' '.join(cmd)}. Its last line: {last!r}; the "
                           f"whole output is in {log_file}.")


def _environment(root: str) -> dict:
    from nnunet_mmssl._ext_trainer_hook import EXT_TRAINER_FOLDER, EXT_TRAINER_VARIABLE

    env = dict(os.environ)
    env.update(nnUNet_raw=os.path.join(root, "nnUNet_raw"),
               nnUNet_preprocessed=os.path.join(root, "nnUNet_preprocessed"),
               nnUNet_results=os.path.join(root, "nnUNet_results"), nnUNet_def_n_proc="2",
               nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "1"), nnUNet_compile="false")
    paths = [p for p in env.get(EXT_TRAINER_VARIABLE, "").split(os.pathsep) if p]
    if EXT_TRAINER_FOLDER not in paths:
        env[EXT_TRAINER_VARIABLE] = os.pathsep.join(paths + [EXT_TRAINER_FOLDER])
    return env


def _summary_row(name: str, result: dict, train_seconds: float) -> str:
    label = next(iter(result["mean"]))
    mean, std = result["mean"][label], result["std"][label]
    cells = [f"{mean[m]:.3f} ± {std[m]:.3f}" if mean[m] is not None else "n/a"
             for m in ("dice", "sensitivity", "hd95", "asd")]
    return f"{name:<32} {cells[0]:>15} {cells[1]:>15} {cells[2]:>16} {cells[3]:>16} {train_seconds:>9.0f}"


def run_demo(output: str, configuration: str = "2d", seed: int = 0, num_labeled: int = 4, num_unlabeled: int = 12,
             num_test: int = 4, trainers=TRAINERS, device: str = "cpu", overwrite: bool = False) -> dict:
    """Run the demo; return trainer -> evaluation result (see :func:`nnunet_mmssl.evaluation.evaluate_folders`)."""
    import shutil

    from nnunet_mmssl.dataset_conversion import PHANTOM_LABEL_GLOB, PHANTOM_MODALITY_GLOBS, convert_dataset
    from nnunet_mmssl.dataset_conversion.phantom import make_phantom_cases
    from nnunet_mmssl.evaluation import evaluate_folders, format_table

    check_request(num_labeled, num_unlabeled, num_test, trainers, device)
    root = os.path.abspath(output)
    if os.path.exists(root) and not os.path.isdir(root):
        raise FileExistsError(f"{root} exists and is not a folder. Choose another folder with -o.")
    if os.path.exists(root) and os.listdir(root):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not empty. Pass --overwrite to start again, or choose "
                                  f"another folder with -o.")
        shutil.rmtree(root)
    os.makedirs(os.path.join(root, "logs"))
    env = _environment(root)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    start = time.perf_counter()

    with _Stage(f"1/5 Phantom: {num_labeled + num_test} labelled + {num_unlabeled} unlabelled cases, two modalities "
                f"(MRA shows the lesion rim, MRB its core)"):
        sources = make_phantom_cases(os.path.join(root, "phantom"), num_labeled=num_labeled + num_test,
                                     num_unlabeled=num_unlabeled, seed=seed)
    with _Stage("2/5 nnUNetv2_mmssl_convert"):
        dataset_folder = convert_dataset(
            [os.path.join(sources, "labeled"), os.path.join(sources, "unlabeled")], PHANTOM_MODALITY_GLOBS,
            PHANTOM_LABEL_GLOB, env["nnUNet_raw"], DATASET_ID, DATASET_NAME, num_labeled=num_labeled,
            num_test=num_test, seed=seed, labels={"background": 0, "lesion": 1})
        print(f"    {dataset_folder}: {num_labeled} labelled, {num_unlabeled} unlabelled, {num_test} test cases")
    with _Stage(f"3/5 nnUNetv2_mmssl_plan_and_preprocess -d {DATASET_ID} -c {configuration}"):
        from nnunet_mmssl.planners.plan_and_preprocess import plan_and_preprocess

        log = os.path.join(root, "logs", "plan_and_preprocess.log")
        with open(log, "w") as handle:
            plan_and_preprocess(DATASET_ID, [configuration], num_processes=2,
                                progress=lambda message: print("    " + message, flush=True) or
                                handle.write(message + "\n"))
    train_seconds = {}
    for trainer in trainers:
        with _Stage(f"4/5 nnUNetv2_train {DATASET_ID} {configuration} all -tr {trainer} -device {device}") as stage:
            _run_logged([sys.executable, "-c", _TRAIN, str(DATASET_ID), configuration, "all", "-tr", trainer,
                         "-device", device], env, os.path.join(root, "logs", f"train_{trainer}.log"))
        train_seconds[trainer] = stage.seconds
    results = {}
    with _Stage("5/5 nnUNetv2_predict on the test cases + nnUNetv2_mmssl_evaluate"):
        for trainer in trainers:
            prediction_folder = os.path.join(root, "predictions", trainer)
            _run_logged([sys.executable, "-c", _PREDICT, "-i", os.path.join(dataset_folder, "imagesTs"), "-o",
                         prediction_folder, "-d", str(DATASET_ID), "-c", configuration, "-f", "all", "-tr", trainer,
                         "-device", device, "-npp", "1", "-nps", "1", "--disable_tta"],
                        env, os.path.join(root, "logs", f"predict_{trainer}.log"))
            results[trainer] = evaluate_folders(os.path.join(dataset_folder, "labelsTs"), prediction_folder,
                                                output_file=os.path.join(prediction_folder, "summary_mmssl.json"))
            print(format_table(results[trainer]))
    header = f"{'trainer':<32} {'Dice':>15} {'Sensitivity':>15} {'HD95 [mm]':>16} {'ASD [mm]':>16} {'train [s]':>9}"
    print(f"\nResults on {num_test} held-out phantom test cases (mean ± std, lesion):")
    print(header)
    print("-" * len(header))
    for trainer in trainers:
        print(_summary_row(trainer, results[trainer], train_seconds[trainer]))
    print(f"\nTotal time {time.perf_counter() - start:.0f} s. Everything is in {root} "
          f"(predictions/, nnUNet_results/ with progress.png, logs/).")
    return results


def _run(args: argparse.Namespace) -> int:
    run_demo(args.output, args.configuration, args.seed, args.num_labeled, args.num_unlabeled, args.num_test,
             args.trainers, args.device, args.overwrite)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 on success, 2 on a user error (one line on stderr), 1 on an unexpected error."""
    return run_cli(PROG, build_parser(), _run, argv)

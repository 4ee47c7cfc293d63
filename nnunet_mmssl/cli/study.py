"""``nnUNetv2_mmssl_study``: Dice at N labelled cases, SSL vs supervised, in one command.

On a dataset converted by ``nnUNetv2_mmssl_convert`` and preprocessed by ``nnUNetv2_mmssl_plan_and_preprocess``
(imagesTr/labelsTr = the labelled pool, imagesTs/labelsTs = the test set, imagesUnlabeled = unlabelled cases), every
(trainer, labelled count, seed) is trained with ``nnUNetv2_train`` on its own fold of ``splits_final.json``,
predicted with ``nnUNetv2_predict`` on the test set and scored with ``nnunet_mmssl.evaluation.evaluate_folders``.
Writes a table (mean ± std over seeds), the paired difference of each SSL trainer against its supervised twin with a
bootstrap interval, a plot of Dice vs labelled cases, and all of it as JSON. A killed study continues where it
stopped. With ``--cv K`` the test set rotates over the labelled pool instead (every pool case tested once per seed,
never seen by the model testing it); with ``--init supervised`` each SSL trainer is (also) fine-tuned from its
supervised twin's model of the same run. See :mod:`nnunet_mmssl.study` for the design.
"""

from __future__ import annotations

import argparse
import json
import os

from nnunet_mmssl.cli._common import add_verbose, run_cli

PROG = "nnUNetv2_mmssl_study"
#: what every run shares, recorded in the JSON and the README
SHARED = ("All runs share the plans and the preprocessed data of nnUNetv2_mmssl_plan_and_preprocess, computed from "
          "every labelled case of imagesTr (the whole pool): the planning geometry (spacing, patch size) and, for "
          "CT-normalised channels, the intensity fingerprint (percentiles, mean, std of the foreground voxels, which "
          "uses the labels of all pool cases). Z-score normalisation is per case, so for MR data no label "
          "information reaches a run except through the planning geometry. Everything else is per run: the labelled "
          "cases, the unlabelled stream (the dataset's unlabelled cases plus the pool cases not labelled in the run, "
          "their labels never read) and the training. The test set is the same for every run.")
#: what every run shares with --cv, where the test cases are pool cases (replaces SHARED's last sentence)
SHARED_CV = ("With --cv the test set rotates over the labelled pool: in fold f of a seed the fold's cases are the test "
             "set, in neither the run's labelled cases nor its unlabelled stream (test images are not used as "
             "unlabelled data); the labelled cases are drawn from the other folds. The shared plans and "
             "preprocessing above were computed with every pool case, test folds included (for CT-normalised "
             "channels their labels entered the intensity fingerprint).")
SETTINGS_KEYS = ("dataset", "configuration", "plans", "epochs", "iterations", "val_iterations")


MIN_BOOTSTRAP = 100
"""Fewest bootstrap resamples accepted (the 2.5 % and 97.5 % quantiles need some)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (DatasetXXX_NAME)")
    parser.add_argument("--labeled", nargs="+", required=True, metavar="N|P%",
                        help="labelled counts (1 2 4) or fractions of the pool (5%% 10%%)")
    parser.add_argument("-tr", "--trainers", nargs="+", default=["PlainSupervisedTrainer", "MeanTeacherTrainer"],
                        help="trainers (default PlainSupervisedTrainer MeanTeacherTrainer)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="split seeds (default 0)")
    parser.add_argument("-c", "--configuration", default="2d", help="configuration (default 2d)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs per run (default 100)")
    parser.add_argument("--iterations", type=int, default=250, help="training iterations per epoch (default 250)")
    parser.add_argument("--val-iterations", type=int, default=5,
                        help="nnU-Net's per-epoch validation iterations, on the run's labelled cases (default 5)")
    parser.add_argument("--pair", action="append", default=[], metavar="SSL=SUP",
                        help="compare SSL with SUP (added to the built-in twins, e.g. MeanTeacherTrainer="
                             "PlainSupervisedTrainer)")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--cv", type=int, default=None, metavar="K",
                        help="rotate the test set over the labelled pool: K folds per seed, each fold the test set of "
                             "runs labelling cases of the other folds, so every pool case is tested once per seed "
                             "(imagesTs is not used). Default: the fixed test set imagesTs")
    parser.add_argument("--init", nargs="+", default=["scratch"], metavar="scratch|supervised",
                        help="how the SSL trainers (those with a supervised twin) start: scratch (default), "
                             "supervised (fine-tuned from the twin's model of the same run: nnUNetv2_train "
                             "-pretrained_weights; shown as <trainer>+ft), or both")
    parser.add_argument("--finetune", nargs="+", default=None, metavar="TRAINER",
                        help="with --init supervised: fine-tune only these SSL trainers (default: every SSL trainer "
                             "with a twin)")
    parser.add_argument("--selftrain", nargs="+", default=[], metavar="TRAINER",
                        help="also run these trainers (of -tr) self-trained: in each run the trainer's own model "
                             "pseudo-labels the run's unlabelled stream (uncertain voxels get nnU-Net's ignore "
                             "label) and the trainer trains again from scratch on labelled + pseudo-labelled cases; "
                             "shown as <trainer>+st")
    parser.add_argument("--selftrain-threshold", type=float, default=None, metavar="H",
                        help="normalised entropy above which a pseudo-label voxel is ignored (default: "
                             "nnUNetv2_mmssl_selftrain's, 0.5)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs already finished in -o (same options as the study); "
                             "train, predict and write nothing else (e.g. while the study runs elsewhere)")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("-np", "--num-processes", type=int, default=2,
                        help="processes for preprocessing the pool images as unlabelled cases (default 2)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs at once (default 1). With -device cpu the available cores are dealt to the workers "
                             "and each run is pinned to its own (e.g. 2 on a 2-core machine: two runs of one core "
                             "each); with cuda the runs share the device")
    parser.add_argument("-o", "--output", required=True, help="study folder (models, predictions, logs, report)")
    return add_verbose(parser)


def parse_pairs(specs, trainers) -> dict[str, str]:
    """The built-in twins among ``trainers`` plus ``--pair SSL=SUP`` (both must be in ``trainers``)."""
    from nnunet_mmssl.study.report import SUPERVISED_TWINS

    pairs = {s: t for s, t in SUPERVISED_TWINS.items() if s in trainers and t in trainers}
    for spec in specs:
        ssl, sep, sup = spec.partition("=")
        if not sep or not ssl or not sup:
            raise ValueError(f"--pair {spec!r}: write SSL=SUP, e.g. --pair MeanTeacherTrainer=PlainSupervisedTrainer")
        for name in (ssl, sup):
            if name not in trainers:
                raise ValueError(f"--pair {spec}: {name} is not among the trainers -tr {' '.join(trainers)}; add it")
        pairs[ssl] = sup
    return pairs


def find_dataset(root_variable: str, dataset: str) -> str:
    """``$root_variable/DatasetXXX_NAME`` for an id or a name.

    Raises:
        ValueError: the variable is unset or no (or several) folders match.
    """
    root = os.environ.get(root_variable)
    if not root or not os.path.isdir(root):
        raise ValueError(f"{root_variable} is {'unset' if not root else root + ' (not a folder)'}; set it to nnU-Net's "
                         f"folder as for nnUNetv2_train")
    if dataset.isdigit():
        prefix = f"Dataset{int(dataset):03d}_"
        found = sorted(n for n in os.listdir(root) if n.startswith(prefix))
    else:
        found = [dataset] if os.path.isdir(os.path.join(root, dataset)) else []
    if len(found) != 1:
        raise ValueError(f"-d {dataset}: {'no' if not found else 'several'} matching dataset folder(s) in {root} "
                         f"({found}); convert and preprocess the dataset first")
    return os.path.join(root, found[0])


def _check_settings(output: str, settings: dict) -> None:
    from nnunet_mmssl.study.runner import atomic_write_json

    path = os.path.join(output, "study_settings.json")
    if os.path.isfile(path):
        with open(path) as handle:
            old = json.load(handle)
        changed = [k for k in SETTINGS_KEYS if old.get(k) != settings[k]]
        if changed:
            what = ", ".join(f"{k}: {old.get(k)}" for k in changed)
            raise ValueError(f"{output} holds a study with other settings ({what}); continue it with the same "
                             f"settings, or choose another folder with -o")
    atomic_write_json(path, {k: settings[k] for k in SETTINGS_KEYS})


def _check_selftrain_threshold(output: str, threshold: float) -> None:
    """Refuse a threshold other than the one the study's self-trained runs already used."""
    from nnunet_mmssl.study.selftrain_arm import read_manifest

    root = os.path.join(output, "selftrain")
    for trainer in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for fold in sorted(os.listdir(os.path.join(root, trainer))):
            manifest = read_manifest(os.path.join(root, trainer, fold))
            if manifest is not None and manifest.get("threshold") != threshold:
                raise ValueError(f"{os.path.join(root, trainer, fold)} was pseudo-labelled with --selftrain-threshold "
                                 f"{manifest.get('threshold')}; continue with that threshold, or choose another "
                                 f"folder with -o")


def _splits_file_content(path: str, pool: list[str]) -> list[dict]:
    """The existing ``splits_final.json``, or nnU-Net's own default folds (so that later ``nnUNetv2_train`` folds
    0-4 stay nnU-Net's), or [] for a pool too small for them."""
    if os.path.isfile(path):
        with open(path) as handle:
            return json.load(handle)
    if len(pool) >= 5:
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        return generate_crossval_split(sorted(pool), seed=12345, n_splits=5)
    return []


def run_study(args: argparse.Namespace) -> dict:
    """Run (or continue) the study; return the report (see :func:`nnunet_mmssl.study.report.write_report`)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_mmssl._ext_trainer_hook import EXT_TRAINER_FOLDER, EXT_TRAINER_VARIABLE
    from nnunet_mmssl.dataloading.unlabeled_loader import open_unlabeled_dataset
    from nnunet_mmssl.dataloading.unlabeled_preprocessing import UNLABELED_IMAGES_FOLDER, find_cases
    from nnunet_mmssl.dataset_conversion.modality_layout import read_layout
    from nnunet_mmssl.planners import unlabeled_data_identifier
    from nnunet_mmssl.study.report import write_report
    from nnunet_mmssl.study.runner import (
        FINE_TUNED_LABEL,
        STUDY_UNLABELED_SUFFIX,
        StudyContext,
        StudyRunner,
        atomic_write_json,
        build_cv_test_folder,
        build_study_unlabeled_folder,
        finished_results,
        plan_jobs,
        resolve_trainer,
        worker_cores,
        write_study_trainers,
    )
    from nnunet_mmssl.study.selftrain_arm import SELFTRAIN_LABEL
    from nnunet_mmssl.study.splits import assign_folds, check_cv, parse_labeled, plan_cv_runs, plan_runs

    for value, name in ((args.epochs, "--epochs"), (args.iterations, "--iterations")):
        if value < 1:
            raise ValueError(f"{name} {value}: must be at least 1")
    if args.bootstrap < MIN_BOOTSTRAP:  # checked before any run trains: the report needs it only at the very end
        raise ValueError(f"--bootstrap {args.bootstrap}, too few resamples for a 95% interval. Use at least "
                         f"{MIN_BOOTSTRAP} (default 10000).")
    worker_cores(args.workers, args.device)
    if args.cv is not None and args.cv < 2:
        check_cv(args.cv, 2)
    classes = {t: resolve_trainer(t) for t in args.trainers}
    pairs = parse_pairs(args.pair, args.trainers)
    plan_jobs([], args.trainers, {}, pairs, args.init, args.selftrain, args.finetune)  # checks the options
    from nnunet_mmssl.semisup.ignore_label import DEFAULT_THRESHOLD

    threshold = DEFAULT_THRESHOLD if args.selftrain_threshold is None else float(args.selftrain_threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--selftrain-threshold {threshold}: the normalised entropy is in [0, 1]; use a value in "
                         f"[0, 1] (1 ignores nothing)")
    if "supervised" in args.init and args.finetune is None:
        orphans = [t for t, c in classes.items() if getattr(c, "use_unlabeled", False) and t not in pairs]
        if orphans:
            raise ValueError(f"--init supervised: {orphans[0]} has no supervised twin among -tr "
                             f"{' '.join(args.trainers)}; add its twin to -tr (or --pair {orphans[0]}=SUP)")
    raw = find_dataset("nnUNet_raw", str(args.dataset))
    dataset_name = os.path.basename(raw)
    preprocessed = find_dataset("nnUNet_preprocessed", dataset_name)
    with open(os.path.join(raw, "dataset.json")) as handle:
        dataset_json = json.load(handle)
    if read_layout(dataset_json.get("mmssl"), os.path.join(raw, "dataset.json")) is not None:
        raise ValueError(f"{raw} is an unregistered dataset (a modality per case); the study predicts with "
                         f"nnUNetv2_predict, which needs --modality for such models: not supported yet")
    plans_file = os.path.join(preprocessed, args.plans + ".json")
    if not os.path.isfile(plans_file):
        raise ValueError(f"plans {plans_file} not found; run nnUNetv2_mmssl_plan_and_preprocess -d {args.dataset} "
                         f"-c {args.configuration} (or pass the plans with -p)")
    with open(plans_file) as handle:
        plans = json.load(handle)
    if args.configuration not in plans["configurations"]:
        raise ValueError(f"-c {args.configuration}: not in {plans_file} (has {sorted(plans['configurations'])})")
    data_identifier = PlansManager(plans).get_configuration(args.configuration).data_identifier
    if not os.path.isdir(os.path.join(preprocessed, data_identifier)):
        raise ValueError(f"{os.path.join(preprocessed, data_identifier)} not found; preprocess configuration "
                         f"{args.configuration} with nnUNetv2_mmssl_plan_and_preprocess -c {args.configuration}")

    pool_images = find_cases(os.path.join(raw, "imagesTr"), dataset_json, "Labelled case")
    test_images = find_cases(os.path.join(raw, "imagesTs"), dataset_json, "Test case") if args.cv is None else {}
    if args.cv is None and not test_images:
        raise ValueError(f"{os.path.join(raw, 'imagesTs')} holds no test cases; convert with --num-test N, or test "
                         f"on the labelled pool with --cv K")
    labels_ts = os.path.join(raw, "labelsTs")
    if args.cv is None and not os.path.isdir(labels_ts):
        raise ValueError(f"{labels_ts} not found: the test cases need labels (nnUNetv2_mmssl_convert writes them)")
    unlabeled_folder = os.path.join(preprocessed, unlabeled_data_identifier(data_identifier, plans))
    real_unlabeled: list[str] = []
    if find_cases(os.path.join(raw, UNLABELED_IMAGES_FOLDER), dataset_json, "Unlabelled case"):
        real_unlabeled = sorted(open_unlabeled_dataset(unlabeled_folder).identifiers)
    if args.cv is None:
        sizes = parse_labeled(args.labeled, len(pool_images))
        runs = plan_runs(pool_images, real_unlabeled, test_images, sizes, args.seeds)
    else:
        most = check_cv(args.cv, len(pool_images))
        sizes = parse_labeled(args.labeled, most, f"the pool outside the largest of the --cv {args.cv} test folds")
        runs = plan_cv_runs(pool_images, real_unlabeled, sizes, args.seeds, args.cv)

    output = os.path.abspath(args.output)
    settings = {"dataset": dataset_name, "configuration": args.configuration, "plans": args.plans,
                "epochs": args.epochs, "iterations": args.iterations, "val_iterations": args.val_iterations}
    if args.report_only:
        if not os.path.isfile(os.path.join(output, "study_settings.json")):
            raise ValueError(f"--report-only: {output} holds no study; run the study first (without --report-only)")
    _check_settings(output, settings)
    if args.selftrain:
        _check_selftrain_threshold(output, threshold)

    splits_file = os.path.join(preprocessed, "splits_final.json")
    old_splits = _splits_file_content(splits_file, list(pool_images))
    new_splits, folds = assign_folds(old_splits, runs)
    if args.report_only:
        pass
    elif new_splits != old_splits or not os.path.isfile(splits_file):
        atomic_write_json(splits_file, new_splits)
        print(f"{splits_file}: folds {sorted(set(folds.values()))} are the study's runs", flush=True)

    study_folder_name = unlabeled_data_identifier(data_identifier, plans) + STUDY_UNLABELED_SUFFIX
    if not args.report_only and (args.selftrain or any(getattr(c, "use_unlabeled", False) for c in classes.values())):
        build_study_unlabeled_folder(os.path.join(preprocessed, study_folder_name), pool_images,
                                     unlabeled_folder if real_unlabeled else None, plans, args.configuration,
                                     dataset_json, num_processes=args.num_processes,
                                     progress=lambda m: print(m, flush=True))
    by_fold = {str(folds[r.name]): r.unlabeled for r in runs}
    ext_folder = os.path.join(output, "ext_trainers")
    jobs = plan_jobs(runs, args.trainers, folds, pairs, args.init, args.selftrain, args.finetune)
    fine_tuned = sorted({j.trainer for j in jobs if j.init == "supervised"})
    if not args.report_only:
        write_study_trainers(ext_folder, args.trainers, args.epochs, args.iterations, args.val_iterations,
                             study_folder_name, by_fold, fine_tuned, list(args.selftrain),
                             os.path.join(output, "selftrain"))
    env = dict(os.environ, nnUNet_results=os.path.join(output, "nnUNet_results"), nnUNet_compile="false",
               PYTHONUNBUFFERED="1")  # the runs' progress lines are echoed as they come, not in 8 KB blocks
    others = [p for p in env.get(EXT_TRAINER_VARIABLE, "").split(os.pathsep) if p and p != ext_folder]
    env[EXT_TRAINER_VARIABLE] = os.pathsep.join([ext_folder] + others +
                                                ([EXT_TRAINER_FOLDER] if EXT_TRAINER_FOLDER not in others else []))
    context = StudyContext(dataset_name=dataset_name, raw_folder=raw, configuration=args.configuration,
                           plans=args.plans, device=args.device, output=output, env=env,
                           test_images=os.path.join(raw, "imagesTs"), test_labels=labels_ts,
                           preprocessed_data_folder=os.path.join(preprocessed, data_identifier),
                           unlabeled_study_folder=os.path.join(preprocessed, study_folder_name),
                           selftrain_threshold=threshold)
    if args.report_only:
        results = finished_results(context, jobs)
        print(f"--report-only: {len(results)} of the {len(jobs)} runs are finished; the report holds those",
              flush=True)
    else:
        for run in {(r.seed, r.cv_fold): r for r in runs if r.cv_fold is not None}.values():
            build_cv_test_folder(context.cv_test_folder(run), run.test, pool_images, os.path.join(raw, "labelsTr"),
                                 dataset_json["file_ending"])
        results = StudyRunner(context, progress=lambda m: print(m, flush=True), workers=args.workers).run_all(jobs)
    comparisons = list(pairs.items())
    if fine_tuned:
        comparisons += [(t + FINE_TUNED_LABEL, pairs[t]) for t in fine_tuned]
        comparisons += [(t + FINE_TUNED_LABEL, t) for t in fine_tuned if "scratch" in args.init]
    comparisons += [(t + SELFTRAIN_LABEL, t) for t in args.selftrain]
    extra = {} if list(args.init) == ["scratch"] else {"init": list(args.init)}
    if args.finetune is not None:
        extra["finetune"] = list(args.finetune)
    if args.selftrain:
        extra |= {"selftrain": list(args.selftrain), "selftrain_threshold": threshold}
    if args.cv is not None:
        extra |= {"cv": args.cv, "cv_test_folds": {f"seed{r.seed}_{r.test_name}": list(r.test) for r in runs}}
    report = write_report(output, results, comparisons, {
        **settings, "trainers": list(args.trainers), "labeled": list(args.labeled), "sizes": sizes,
        "seeds": list(args.seeds), "pool_size": len(pool_images),
        "test_cases": sorted(pool_images if args.cv is not None else test_images),
        "n_dataset_unlabeled": len(real_unlabeled), "pairs": pairs,
        "shared_between_runs": SHARED if args.cv is None else SHARED.rsplit(". ", 1)[0] + ". " + SHARED_CV,
        "folds": folds, "device": args.device, "workers": args.workers, **extra},
        n_resamples=args.bootstrap)
    print("\n" + report["table_text"] + f"\n\nWritten to {output}: study_table.txt, study_results.json, "
          f"dice_vs_labeled.png", flush=True)
    return report


def _run(args: argparse.Namespace) -> int:
    run_study(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the study; 0 on success, 2 on a user error (one line on stderr), 1 on an unexpected error."""
    return run_cli(PROG, build_parser(), _run, argv)

"""Run every (trainer, labelled count, seed) of a study through nnU-Net's own training and prediction, resumably.

* **One preprocessing for all runs.** The dataset's plans and preprocessed data (``nnUNetv2_mmssl_plan_and_preprocess``)
  are shared. The labelled pool's *images* are preprocessed once more as unlabelled data (no label read) into
  ``<data_identifier>_unlabeled_study`` beside nnU-Net's data, together with links to the dataset's own unlabelled
  cases; each run reads from there only the cases allowed to it (:attr:`~.splits.RunSplit.unlabeled`).
* **One fold per run.** Each (size, seed) is an entry of ``splits_final.json`` (:func:`~.splits.assign_folds`).
* **One generated trainer per trainer.** ``<trainer>__study`` (:func:`study_trainer_class`, written into
  ``<output>/ext_trainers`` and found through ``nnUNet_extTrainer``) has the study's budget, skips nnU-Net's final
  validation, and picks its fold's unlabelled cases. Models go to ``<output>/nnUNet_results``, so two studies with
  different budgets never share a model folder.
* **Resumable.** A run is done when its ``checkpoint_final.pth`` and its result file exist; a run with a final
  checkpoint but no result is predicted and scored again; an unfinished training continues (``--c``).
* **Cross-validated test set** (``--cv``). A run's test images and labels are links to its fold's pool cases in
  ``<output>/cv_test/seed<seed>_cv<fold>of<K>`` (:func:`build_cv_test_folder`).
* **Warm start** (``--init supervised``). A fine-tuned SSL run (:attr:`StudyJob.init` ``"supervised"``) is the
  generated trainer ``<trainer>__study_ft`` (its own model folder) started by ``nnUNetv2_train ...
  -pretrained_weights`` from its supervised twin's ``checkpoint_final.pth`` of the same fold; it starts only once
  the twin has trained (:meth:`StudyRunner.run_all`).
* **Self-training** (``--selftrain T``). A self-trained run (:attr:`StudyJob.init` ``"selftrain"``) is
  ``<T>__study_st``: trainer ``T``'s from-scratch model of the same fold pseudo-labels the run's unlabelled stream
  (:mod:`nnunet_mmssl.study.selftrain_arm`), then ``T`` trains from scratch on the labelled plus pseudo-labelled cases;
  it starts only once the teacher has trained.
* **Parallel runs** (``workers`` > 1). Runs are independent (own fold, model folder, prediction folder, result file),
  so several run at once. On the CPU the cores this process may use are dealt to the workers (:func:`worker_cores`):
  each run's nnU-Net processes are pinned to their worker's cores and see only those (nnU-Net sets its torch threads
  to the core count), so two runs do not fight over the same cores. On CUDA the workers share the device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from nnunet_mmssl.study.selftrain_arm import SELFTRAIN_LABEL, SELFTRAIN_SUFFIX
from nnunet_mmssl.study.splits import RunSplit

STUDY_SUFFIX = "__study"
#: how a run starts: nnU-Net's initialisation, fine-tuned from the twin, or self-trained with the twin as teacher
INITS = ("scratch", "supervised", "selftrain")
#: class-name suffix of an SSL trainer's fine-tuned runs (``--init supervised``): ``<trainer>__study_ft``
FINE_TUNED_SUFFIX = "_ft"
#: how results and tables name a fine-tuned SSL trainer: ``<trainer>+ft``
FINE_TUNED_LABEL = "+ft"
#: nnU-Net's checkpoints of an interrupted training (``--c`` continues from them)
RESUMABLE_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
#: folder (beside nnU-Net's data folder) with the study's unlabelled cases: the pool's images + the unlabelled ones
STUDY_UNLABELED_SUFFIX = "_study"
TRAINER_MODULE = "mmssl_study_trainers"
#: suffix of the hidden sibling file ``.<folder><suffix>`` of the study's unlabelled folder: the plans it was
#: preprocessed with (the folder is rebuilt when they change; nnU-Net allows one file type inside the folder)
STUDY_RECIPE_SUFFIX = ".plans.json"
METRICS = ("dice", "hd95", "sensitivity")
_TRAIN = ("import sys; from nnunetv2.run.run_training import run_training_entry as m; "
          "sys.argv[0] = 'nnUNetv2_train'; sys.exit(m())")
_SELFTRAIN = ("import sys, json; from nnunet_mmssl.study.selftrain_arm import build_data_folder as b; "
              "b(**json.loads(sys.argv[1]))")
_PREDICT = ("import sys; from nnunetv2.inference.predict_from_raw_data import predict_entry_point as m; "
            "sys.argv[0] = 'nnUNetv2_predict'; sys.exit(m())")


# ---------------------------------------------------------------------------------------------- generated trainers
def resolve_trainer(name: str) -> type:
    """A trainer class of nnunet_mmssl by name, or nnU-Net's ``nnUNetTrainer``.

    Raises:
        ValueError: an unknown name, with the known ones.
    """
    import nnunet_mmssl.trainers as ours

    found = getattr(ours, name, None)
    if isinstance(found, type):
        return found
    if name == "nnUNetTrainer":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    known = sorted(n for n in dir(ours) if isinstance(getattr(ours, n), type) and "Trainer" in n)
    raise ValueError(f"-tr: unknown trainer {name!r}; the study runs nnUNetTrainer or a trainer of nnunet_mmssl, "
                     f"e.g. {known}")


def study_trainer_class(base: type, epochs: int, iterations: int, val_iterations: int, unlabeled_folder: str,
                        unlabeled_by_fold: Mapping[str, Sequence[str]], module: str | None = None,
                        suffix: str = STUDY_SUFFIX) -> type:
    """``<base>__study``: ``base`` with the study's budget, no final validation, and its fold's unlabelled cases.

    Args:
        base: the trainer class.
        epochs, iterations, val_iterations: nnU-Net's ``num_epochs``, ``num_iterations_per_epoch``,
            ``num_val_iterations_per_epoch``.
        unlabeled_folder: name of the study's unlabelled folder beside nnU-Net's data folder.
        unlabeled_by_fold: fold (as a string) -> identifiers of the unlabelled cases that fold may read.
        module: ``__module__`` of the class (the generated module), so that it pickles.
        suffix: the class name's suffix (``__study``; ``__study_ft`` for the fine-tuned runs of ``--init
            supervised``, the same class under a name of its own, so that its models have their own folder).
    """
    allowed = {str(k): tuple(v) for k, v in unlabeled_by_fold.items()}
    folder_name = unlabeled_folder  # the class body defines a method of that name

    class Study(base):
        study_unlabeled_folder_name = folder_name
        study_unlabeled_by_fold = allowed

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = val_iterations

        def perform_actual_validation(self, save_probabilities: bool = False):
            self.print_to_log_file("study run: final validation skipped (the study scores the test set)")

        def unlabeled_folder(self) -> str:
            return os.path.join(self.preprocessed_dataset_folder_base, self.study_unlabeled_folder_name)

        def unlabeled_dataset(self):
            key = str(self.fold)
            if key not in self.study_unlabeled_by_fold:
                raise ValueError(f"{type(self).__name__} has no unlabelled cases for fold {key}: train study runs "
                                 f"with nnUNetv2_mmssl_study (its folds are {sorted(self.study_unlabeled_by_fold)})")
            wanted = set(self.study_unlabeled_by_fold[key])
            dataset = super().unlabeled_dataset()
            if not self.is_ddp:
                missing = sorted(wanted - set(dataset.identifiers))
                if missing:
                    raise ValueError(f"{self.unlabeled_folder()} lacks the unlabelled case(s) {missing[:5]} of fold "
                                     f"{key}; rerun nnUNetv2_mmssl_study (it rebuilds the folder)")
            chosen = [i for i in dataset.identifiers if i in wanted]
            self.print_to_log_file(f"study fold {key}: {len(chosen)} unlabelled cases allowed (the pool cases not "
                                   f"labelled in this run and the dataset's unlabelled cases)")
            return type(dataset)(dataset.source_folder, chosen)

    Study.__name__ = Study.__qualname__ = base.__name__ + suffix
    if module is not None:
        Study.__module__ = module
    return Study


_MODULE_TEMPLATE = '''"""Generated by nnUNetv2_mmssl_study for nnUNet_extTrainer; rewritten by each study run."""
import os

from nnunet_mmssl.study.runner import resolve_trainer, study_trainer_class

EPOCHS = {epochs}
ITERATIONS = {iterations}
VAL_ITERATIONS = {val_iterations}
UNLABELED_FOLDER = {folder!r}
UNLABELED_BY_FOLD = {by_fold!r}

'''


def write_study_trainers(folder: str, trainers: Sequence[str], epochs: int, iterations: int, val_iterations: int,
                         unlabeled_folder: str, unlabeled_by_fold: Mapping[str, Sequence[str]],
                         fine_tuned: Sequence[str] = (), self_trained: Sequence[str] = (),
                         selftrain_root: str | None = None) -> str:
    """Write the module defining ``<trainer>__study`` for each trainer (``<trainer>__study_ft`` for each of
    ``fine_tuned``, ``<trainer>__study_st`` reading ``selftrain_root/<trainer>`` for each of ``self_trained``) into
    ``folder``; return its path."""
    os.makedirs(folder, exist_ok=True)
    text = _MODULE_TEMPLATE.format(epochs=int(epochs), iterations=int(iterations), val_iterations=int(val_iterations),
                                   folder=unlabeled_folder,
                                   by_fold={str(k): list(v) for k, v in sorted(unlabeled_by_fold.items())})
    for trainer in trainers:
        resolve_trainer(trainer)
        text += (f"{trainer}{STUDY_SUFFIX} = study_trainer_class(resolve_trainer({trainer!r}), EPOCHS, ITERATIONS, "
                 f"VAL_ITERATIONS, UNLABELED_FOLDER, UNLABELED_BY_FOLD, __name__)\n")
    for trainer in fine_tuned:
        resolve_trainer(trainer)
        suffix = STUDY_SUFFIX + FINE_TUNED_SUFFIX
        text += (f"{trainer}{suffix} = study_trainer_class(resolve_trainer({trainer!r}), EPOCHS, ITERATIONS, "
                 f"VAL_ITERATIONS, UNLABELED_FOLDER, UNLABELED_BY_FOLD, __name__, {suffix!r})\n")
    if self_trained:
        text += (f"\nfrom nnunet_mmssl.study.selftrain_arm import selftrain_student_class\n\n"
                 f"SELFTRAIN_ROOT = {os.path.abspath(selftrain_root)!r}\n")
    for trainer in self_trained:
        resolve_trainer(trainer)
        suffix = STUDY_SUFFIX + SELFTRAIN_SUFFIX
        text += (f"{trainer}{suffix} = selftrain_student_class(study_trainer_class(resolve_trainer({trainer!r}), "
                 f"EPOCHS, ITERATIONS, VAL_ITERATIONS, UNLABELED_FOLDER, UNLABELED_BY_FOLD, __name__, {suffix!r}), "
                 f"os.path.join(SELFTRAIN_ROOT, {trainer!r}))\n")
    path = os.path.join(folder, TRAINER_MODULE + ".py")
    atomic_write_text(path, text)
    return path


# ---------------------------------------------------------------------------------------------- files
def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` under a temporary name, then rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def atomic_write_json(path: str, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False))


# ---------------------------------------------------------------------------------------------- unlabelled folder
def build_study_unlabeled_folder(final: str, pool_images: Mapping[str, Sequence[str]], unlabeled_folder: str | None,
                                 plans: dict, configuration: str, dataset_json: dict, case_modality=None,
                                 num_processes: int = 1, progress=print) -> str:
    """The study's unlabelled folder: the pool's images preprocessed as unlabelled data + the unlabelled cases.

    Nothing is done when ``final`` already holds every pool case and every case of ``unlabeled_folder``, preprocessed
    with the same plans (recorded beside it, :data:`STUDY_RECIPE_SUFFIX`); otherwise it is rebuilt atomically
    (:func:`~nnunet_mmssl.dataloading.unlabeled_preprocessing.build_folder_atomically`). The dataset's preprocessed
    unlabelled cases are linked (symbolic links), not copied; no label is read.

    Args:
        final: the folder to build.
        pool_images: pool case -> its channel files (imagesTr).
        unlabeled_folder: nnU-Net-preprocessed unlabelled cases (``<data_identifier>_unlabeled``), or None.
        plans, configuration, dataset_json: as for the dataset's own unlabelled preprocessing.
        case_modality: case -> modality name of an unregistered dataset (None: registered).
        num_processes: worker processes.
        progress: callable taking a message.
    """
    import multiprocessing

    from nnunet_mmssl.dataloading.unlabeled_preprocessing import _preprocess_one, build_folder_atomically

    linked = sorted(os.listdir(unlabeled_folder)) if unlabeled_folder and os.path.isdir(unlabeled_folder) else []
    linked = [f for f in linked if not f.startswith(".")]
    recipe = json.dumps({"configuration": configuration, "plans": plans["configurations"][configuration],
                         "foreground_intensity_properties_per_channel":
                             plans.get("foreground_intensity_properties_per_channel")}, sort_keys=True)
    parent, name = os.path.split(final)
    recipe_file = os.path.join(parent, f".{name}{STUDY_RECIPE_SUFFIX}")
    if os.path.isdir(final) and os.path.isfile(recipe_file):
        present = set(os.listdir(final))
        with open(recipe_file) as handle:
            same_plans = handle.read() == recipe
        if same_plans and set(linked) <= present and all(f"{case}.b2nd" in present for case in pool_images):
            return final

    def fill(tmp: str) -> None:
        for name in linked:
            os.symlink(os.path.abspath(os.path.join(unlabeled_folder, name)), os.path.join(tmp, name))
        progress(f"Preprocessing the {len(pool_images)} pool images as unlabelled cases (labels not read) -> {final}")
        jobs = [(os.path.join(tmp, case), list(files), plans, configuration, dataset_json, True,
                 (case_modality or {}).get(case)) for case, files in sorted(pool_images.items())]
        if num_processes <= 1 or len(jobs) <= 1:
            for job in jobs:
                _preprocess_one(*job)
        else:
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
                pool.starmap(_preprocess_one, jobs)

    build_folder_atomically(final, fill, progress)
    atomic_write_text(recipe_file, recipe)
    return final


# ---------------------------------------------------------------------------------------------- runs
@dataclasses.dataclass(frozen=True)
class StudyJob:
    """One (trainer, size, seed[, test fold]) run.

    Attributes:
        trainer: the trainer's name.
        split: the run's cases.
        fold: its fold of ``splits_final.json``.
        init: ``"scratch"`` (nnU-Net's initialisation), ``"supervised"`` (fine-tuned from ``twin``'s model of the
            same fold: ``nnUNetv2_train -pretrained_weights``) or ``"selftrain"`` (trained from scratch on the
            labelled cases plus those ``twin``'s model of the same fold pseudo-labelled; ``twin`` is the teacher).
        twin: with ``init="supervised"``, the supervised twin's trainer name; with ``"selftrain"`` the teacher's.
    """

    trainer: str
    split: RunSplit
    fold: int
    init: str = "scratch"
    twin: str | None = None

    def __post_init__(self):
        if self.init not in INITS or (self.init != "scratch") != (self.twin is not None):
            raise ValueError(f"StudyJob {self.trainer}: init {self.init!r} with twin {self.twin!r}; use init "
                             f"'scratch' without a twin, 'supervised' or 'selftrain' with one")

    @property
    def label(self) -> str:
        """How results and tables name the trainer: its name, ``+ft`` appended when fine-tuned, ``+st`` when
        self-trained."""
        return self.trainer + {"scratch": "", "supervised": FINE_TUNED_LABEL, "selftrain": SELFTRAIN_LABEL}[self.init]

    @property
    def trainer_class(self) -> str:
        """The generated trainer nnU-Net runs: ``<trainer>__study`` (``__study_ft`` when fine-tuned,
        ``__study_st`` when self-trained)."""
        return self.trainer + STUDY_SUFFIX + {"scratch": "", "supervised": FINE_TUNED_SUFFIX,
                                              "selftrain": SELFTRAIN_SUFFIX}[self.init]

    @property
    def name(self) -> str:
        return f"{self.label}/{self.split.name}"

    @property
    def twin_job(self) -> StudyJob | None:
        """The supervised twin's run of the same split and fold, which a fine-tuned run starts from (the
        teacher's, for a self-trained run)."""
        return None if self.twin is None else StudyJob(self.twin, self.split, self.fold)


def plan_jobs(runs: Sequence[RunSplit], trainers: Sequence[str], folds: Mapping[str, int],
              pairs: Mapping[str, str], init: Sequence[str] = ("scratch",), selftrain: Sequence[str] = (),
              finetune: Sequence[str] | None = None) -> list[StudyJob]:
    """The study's jobs: per run (sizes, then seeds, then test folds ascending) the trainers in their order, then
    with ``"supervised"`` in ``init`` each SSL trainer (a key of ``pairs``; only those in ``finetune`` when given)
    fine-tuned from its twin -- after the twin, whose from-scratch run is always a job -- then each trainer of
    ``selftrain`` self-trained with its own from-scratch run of the same fold as teacher. Without ``"scratch"`` in
    ``init`` the fine-tuned SSL trainers run only fine-tuned (the others, twins included, from scratch).

    Raises:
        ValueError: an ``init`` value other than ``scratch`` and ``supervised``, or none; a ``selftrain`` or
            ``finetune`` trainer not among ``trainers``; ``finetune`` naming a trainer without a twin, or given
            without ``"supervised"`` in ``init``.
    """
    bad = [v for v in init if v not in ("scratch", "supervised")]
    if bad or not init:
        raise ValueError(f"--init {' '.join(map(str, bad or init))}: not an initialisation; use --init scratch "
                         f"(default), --init supervised, or both")
    for option, names in (("--selftrain", selftrain), ("--finetune", finetune or ())):
        outside = [t for t in names if t not in trainers]
        if outside:
            raise ValueError(f"{option} {outside[0]}: not among the trainers -tr {' '.join(trainers)}; add it to -tr")
    if finetune is not None:
        if "supervised" not in init:
            raise ValueError("--finetune: chooses which SSL trainers are fine-tuned; add --init supervised (or "
                             "--init scratch supervised)")
        orphans = [t for t in finetune if t not in pairs]
        if orphans:
            raise ValueError(f"--finetune {orphans[0]}: has no supervised twin to start from; add --pair "
                             f"{orphans[0]}=SUP (or the built-in twin) to -tr")
    chosen = pairs if finetune is None else {t: pairs[t] for t in finetune}
    scratch = [t for t in trainers if "scratch" in init or t not in chosen or t in pairs.values() or t in selftrain]
    fine_tuned = [t for t in trainers if t in chosen] if "supervised" in init else []
    jobs = []
    for run in sorted(runs, key=lambda r: (r.size, r.seed, -1 if r.cv_fold is None else r.cv_fold)):
        jobs += [StudyJob(t, run, folds[run.name]) for t in scratch]
        jobs += [StudyJob(t, run, folds[run.name], "supervised", pairs[t]) for t in fine_tuned]
        jobs += [StudyJob(t, run, folds[run.name], "selftrain", t) for t in trainers if t in selftrain]
    return jobs


@dataclasses.dataclass
class StudyContext:
    """What every run of a study needs: dataset, plans, configuration, folders, environment."""

    dataset_name: str
    raw_folder: str
    configuration: str
    plans: str
    device: str
    output: str
    env: dict
    test_images: str
    test_labels: str
    #: nnU-Net's preprocessed data folder and the study's unlabelled folder (read by the self-training arm)
    preprocessed_data_folder: str | None = None
    unlabeled_study_folder: str | None = None
    #: normalised-entropy threshold of the self-training arm's pseudo-labels
    selftrain_threshold: float = 0.5

    def selftrain_root(self) -> str:
        return os.path.join(self.output, "selftrain")

    def selftrain_folder(self, job: StudyJob) -> str:
        """A self-trained run's data folder (:func:`~nnunet_mmssl.study.selftrain_arm.data_folder`)."""
        from nnunet_mmssl.study.selftrain_arm import data_folder

        return data_folder(os.path.join(self.selftrain_root(), job.trainer), job.fold)

    def model_folder(self, job: StudyJob) -> str:
        return os.path.join(self.env["nnUNet_results"], self.dataset_name,
                            f"{job.trainer_class}__{self.plans}__{self.configuration}", f"fold_{job.fold}")

    def prediction_folder(self, job: StudyJob) -> str:
        return os.path.join(self.output, "predictions", job.label, job.split.name)

    def result_file(self, job: StudyJob) -> str:
        return os.path.join(self.output, "runs", job.label, job.split.name + ".json")

    def log_file(self, job: StudyJob, what: str) -> str:
        return os.path.join(self.output, "logs", f"{what}_{job.label}_{job.split.name}.log")

    def cv_test_folder(self, split: RunSplit) -> str:
        """With ``--cv``: the folder of the split's test fold (``imagesTs``, ``labelsTs``: links into the pool)."""
        return os.path.join(self.output, "cv_test", f"seed{split.seed}_{split.test_name}")

    def test_folders(self, job: StudyJob) -> tuple[str, str]:
        """(images, labels) the job is tested on: imagesTs/labelsTs, or with ``--cv`` its fold's."""
        if job.split.cv_fold is None:
            return self.test_images, self.test_labels
        folder = self.cv_test_folder(job.split)
        return os.path.join(folder, "imagesTs"), os.path.join(folder, "labelsTs")


def build_cv_test_folder(folder: str, cases: Sequence[str], images: Mapping[str, Sequence[str]], labels_folder: str,
                         file_ending: str) -> str:
    """``folder/imagesTs`` and ``folder/labelsTs``: symbolic links to the images and labels of ``cases`` of the
    labelled pool (written under a temporary name, then renamed; kept when they already hold exactly these cases).

    Raises:
        ValueError: a case without its label file.
    """
    wanted_images = {os.path.basename(f): f for case in cases for f in images[case]}
    wanted_labels = {case + file_ending: os.path.join(labels_folder, case + file_ending) for case in cases}
    missing = [f for f in wanted_labels.values() if not os.path.isfile(f)]
    if missing:
        raise ValueError(f"{missing[0]}: label of a pool case not found; every imagesTr case needs its label in "
                         f"labelsTr. Reconvert the dataset.")
    present = [sorted(os.listdir(os.path.join(folder, sub))) if os.path.isdir(os.path.join(folder, sub)) else None
               for sub in ("imagesTs", "labelsTs")]
    if present == [sorted(wanted_images), sorted(wanted_labels)]:
        return folder
    tmp = f"{folder}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub, wanted in (("imagesTs", wanted_images), ("labelsTs", wanted_labels)):
        os.makedirs(os.path.join(tmp, sub))
        for name, target in wanted.items():
            os.symlink(os.path.abspath(target), os.path.join(tmp, sub, name))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def run_state(context: StudyContext, job: StudyJob) -> str:
    """``"done"`` (final checkpoint and result), ``"trained"`` (final checkpoint only) or ``"todo"``."""
    if not os.path.isfile(os.path.join(context.model_folder(job), "checkpoint_final.pth")):
        return "todo"
    return "done" if os.path.isfile(context.result_file(job)) else "trained"


def finished_results(context: StudyContext, jobs: Sequence[StudyJob]) -> list[dict]:
    """The result files of the ``jobs`` that have one, in the order of ``jobs``; nothing is trained, predicted or
    written. A result file is written only once its run is trained, predicted and scored, so it is the run's record:
    it counts without the model folder (a study archived without its checkpoints still reports; resuming such a
    study trains those runs again, :func:`run_state`)."""
    results = []
    for job in jobs:
        if os.path.isfile(context.result_file(job)):
            with open(context.result_file(job)) as handle:
                results.append(json.load(handle))
    return results


def per_case_metrics(evaluation: dict) -> dict[str, dict[str, float | None]]:
    """Case -> {metric: mean over the evaluated labels (None where undefined)} from :func:`evaluate_folders`."""
    import numpy as np

    cases = {}
    for entry in evaluation["metric_per_case"]:
        values = {}
        for metric in METRICS:
            numbers = [v.get(metric) for v in entry["metrics"].values()]
            numbers = [float(x) for x in numbers if x is not None and np.isfinite(x)]
            values[metric] = float(np.mean(numbers)) if numbers else None
        cases[entry["case"]] = values
    return cases


def worker_cores(workers: int, device: str) -> list[tuple[int, ...] | None]:
    """The CPU cores of each of ``workers`` parallel runs (None: not pinned).

    One worker, or a device other than the CPU: nothing is pinned (nnU-Net takes every core, as it does alone).
    Several workers on the CPU: the cores this process may use (``os.sched_getaffinity``) are dealt round robin.

    Raises:
        ValueError: ``workers`` < 1, more CPU workers than cores, or CPU workers on a system without CPU affinity.
    """
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    if workers == 1 or device != "cpu":
        return [None] * workers
    if not hasattr(os, "sched_getaffinity"):
        raise ValueError(f"--workers {workers} with -device cpu needs CPU affinity (Linux) to give each run its own "
                         f"cores; use --workers 1 here")
    cores = sorted(os.sched_getaffinity(0))
    if workers > len(cores):
        raise ValueError(f"--workers {workers}: only {len(cores)} CPU core(s) are available to this process; use "
                         f"--workers {len(cores)} or fewer")
    return [tuple(cores[k::workers]) for k in range(workers)]


def pinned_command(code: str, args: Sequence[str], cores: Sequence[int] | None) -> list[str]:
    """``python -c code args``; with ``cores``, the process first pins itself (and so its children) to them and
    reports their number as the CPU count (nnU-Net sets ``torch.set_num_threads(multiprocessing.cpu_count())``)."""
    if cores is not None:
        code = (f"import os, multiprocessing; os.sched_setaffinity(0, {sorted(cores)!r}); "
                f"os.cpu_count = multiprocessing.cpu_count = lambda: {len(cores)}; " + code)
    return [sys.executable, "-c", code, *args]


#: per-epoch keys of our trainers' log (:class:`~nnunet_mmssl.trainers.base.SSLTrainerBase`) summarised per run
SIGNAL_KEYS = {"unsup_grad_share": "unsup_grad_shares", "unsup_weight": "unsup_weights",
               "unsup_loss": "train_unsup_losses", "sup_loss": "train_sup_losses"}
#: the signals are averaged over this many last epochs
SIGNAL_EPOCHS = 5


def training_signals(checkpoint_file: str, last: int = SIGNAL_EPOCHS) -> dict[str, float | None] | None:
    """What the unsupervised term did at the end of a run: the mean over its ``last`` epochs of our trainers' logged
    gradient share ``|grad(w L_unsup)| / |grad(L_sup)|``, unsupervised weight and both losses (NaN epochs skipped;
    None where never measured). None for a trainer that logs none of them (nnU-Net's own, or a missing file)."""
    import numpy as np

    if not os.path.isfile(checkpoint_file):
        return None
    from nnunet_mmssl.safe_load import load_checkpoint_safely

    logging = load_checkpoint_safely(checkpoint_file, mmap=True).get("logging", {})
    if not any(key in logging for key in SIGNAL_KEYS.values()):
        return None
    out = {}
    for name, key in SIGNAL_KEYS.items():
        values = np.asarray([v for v in logging.get(key, [])[-last:] if v is not None], dtype=float)
        values = values[np.isfinite(values)]
        out[name] = float(values.mean()) if values.size else None
    return out


def check_study_checkpoints(fold_folder: str, plans: bool = False) -> list[str]:
    """The checkpoints of a run's fold folder (and with ``plans`` its model folder's plans networks), checked with
    :mod:`nnunet_mmssl.safe_load` before nnU-Net's training (``--c``) or ``nnUNetv2_predict`` opens them unchecked.

    Raises:
        UnsafeModelError: naming the refused file and type or class.
    """
    from nnunet_mmssl.safe_load import check_checkpoint, check_plans_networks, read_model_json

    model_folder = os.path.dirname(fold_folder)
    if plans and os.path.isfile(os.path.join(model_folder, "plans.json")):
        check_plans_networks(read_model_json(model_folder, "plans.json"), os.path.join(model_folder, "plans.json"))
    files = sorted(os.path.join(fold_folder, n) for n in os.listdir(fold_folder) if n.endswith(".pth")) \
        if os.path.isdir(fold_folder) else []
    for file in files:
        check_checkpoint(file)
    return files


class StudyRunner:
    """Trains, predicts and scores the jobs of a study, skipping what is done; the three steps are methods so that a
    test (or another backend) can replace them. ``workers`` > 1 runs that many jobs at once (:func:`worker_cores`)."""

    def __init__(self, context: StudyContext, progress: Callable[[str], None] = print, workers: int = 1):
        self.context = context
        self.progress = progress
        self.slots = worker_cores(workers, context.device)
        self._local = threading.local()

    @property
    def cores(self) -> tuple[int, ...] | None:
        """The cores of the worker running the calling thread's job (None: not pinned)."""
        return getattr(self._local, "cores", None)

    def _env(self) -> dict:
        if self.cores is None:
            return self.context.env
        n = str(len(self.cores))
        return dict(self.context.env, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)

    def _echo_prefix(self, job: StudyJob) -> str:
        return "    " if len(self.slots) == 1 else f"    [{job.name}] "

    # the three steps
    def train(self, job: StudyJob) -> None:
        c = self.context
        check_study_checkpoints(c.model_folder(job))  # what --c resumes from, before nnU-Net unpickles it
        if job.init == "selftrain":
            self.pseudo_label(job)
        cmd = pinned_command(_TRAIN, [c.dataset_name, c.configuration, str(job.fold), "-tr", job.trainer_class,
                                      "-p", c.plans, "-device", c.device, *self.start_arguments(job)], self.cores)
        _run(cmd, self._env(), c.log_file(job, "train"), self._echo_prefix(job))

    def pseudo_label(self, job: StudyJob) -> None:
        """A self-trained run's data folder: its teacher (the twin job's model) pseudo-labels the run's unlabelled
        stream (:func:`~nnunet_mmssl.study.selftrain_arm.build_data_folder`, in a subprocess on the worker's cores;
        nothing is done when the folder is complete)."""
        c = self.context
        spec = {"final": c.selftrain_folder(job), "teacher_fold_folder": c.model_folder(job.twin_job),
                "labelled": list(job.split.labeled), "pseudo": list(job.split.unlabeled),
                "preprocessed_folder": c.preprocessed_data_folder, "unlabeled_folder": c.unlabeled_study_folder,
                "threshold": c.selftrain_threshold, "device": c.device}
        if not os.path.isfile(os.path.join(spec["teacher_fold_folder"], "checkpoint_final.pth")):
            raise RuntimeError(f"{job.name} is self-trained with {job.twin_job.name} as teacher, but "
                               f"{spec['teacher_fold_folder']}/checkpoint_final.pth does not exist; the teacher's run "
                               f"must train first")
        cmd = pinned_command(_SELFTRAIN, [json.dumps(spec)], self.cores)
        _run(cmd, self._env(), c.log_file(job, "pseudolabel"), self._echo_prefix(job))

    def start_arguments(self, job: StudyJob) -> list[str]:
        """``--c`` (continue an interrupted training; nnU-Net starts afresh where there is no checkpoint), or for a
        fine-tuned run not started yet ``-pretrained_weights`` with its twin's final checkpoint (nnU-Net refuses
        both at once).

        Raises:
            RuntimeError: the twin has no final checkpoint (its run failed or was not part of the study).
            UnsafeModelError: the twin's checkpoint holds anything but tensors and plain data.
        """
        folder = self.context.model_folder(job)
        if job.init != "supervised" or any(os.path.isfile(os.path.join(folder, n)) for n in RESUMABLE_CHECKPOINTS):
            return ["--c"]
        weights = os.path.join(self.context.model_folder(job.twin_job), "checkpoint_final.pth")
        if not os.path.isfile(weights):
            raise RuntimeError(f"{job.name} starts from its supervised twin's model, but {weights} does not exist; "
                               f"the twin's run {job.twin_job.name} must train first")
        from nnunet_mmssl.safe_load import check_checkpoint

        check_checkpoint(weights)  # nnU-Net's load_pretrained_weights opens it with weights_only=False
        return ["-pretrained_weights", weights]

    def predict(self, job: StudyJob) -> str:
        c = self.context
        check_study_checkpoints(c.model_folder(job), plans=True)  # nnUNetv2_predict reads weights_only=False
        out = c.prediction_folder(job)
        shutil.rmtree(out, ignore_errors=True)
        images = c.test_folders(job)[0]
        cmd = pinned_command(_PREDICT, ["-i", images, "-o", out, "-d", c.dataset_name, "-c", c.configuration,
                                        "-f", str(job.fold), "-tr", job.trainer_class, "-p", c.plans,
                                        "-device", c.device, "-npp", "1", "-nps", "1", "--disable_tta"], self.cores)
        _run(cmd, self._env(), c.log_file(job, "predict"), self._echo_prefix(job))
        return out

    def evaluate(self, job: StudyJob, prediction_folder: str) -> dict:
        from nnunet_mmssl.evaluation import evaluate_folders

        return evaluate_folders(self.context.test_folders(job)[1], prediction_folder,
                                output_file=os.path.join(prediction_folder, "summary_mmssl.json"))

    def signals(self, job: StudyJob) -> dict | None:
        """:func:`training_signals` of the run's final checkpoint."""
        return training_signals(os.path.join(self.context.model_folder(job), "checkpoint_final.pth"))

    # the loop
    def run_job(self, job: StudyJob) -> dict:
        """Train (unless trained), predict, evaluate, write the result file; return the result."""
        start = time.perf_counter()
        if run_state(self.context, job) == "todo":
            self.train(job)
            if not os.path.isfile(os.path.join(self.context.model_folder(job), "checkpoint_final.pth")):
                raise RuntimeError(f"training {job.name} ended without {self.context.model_folder(job)}/"
                                   f"checkpoint_final.pth; see {self.context.log_file(job, 'train')}")
        evaluation = self.evaluate(job, self.predict(job))
        cases = per_case_metrics(evaluation)
        import numpy as np

        mean = {m: (float(np.mean(v)) if (v := [x[m] for x in cases.values() if x[m] is not None]) else None)
                for m in METRICS}
        result = {"trainer": job.label, "size": job.split.size, "seed": job.split.seed, "fold": job.fold,
                  "labeled": list(job.split.labeled), "n_hidden_pool_cases": len(job.split.hidden),
                  "n_unlabeled": len(job.split.unlabeled), "seconds": time.perf_counter() - start,
                  "mean": mean, "per_case": cases, "training": self.signals(job)}
        if job.split.cv_fold is not None:
            result.update(cv_fold=job.split.cv_fold, cv_folds=job.split.cv_folds, test_cases=list(job.split.test))
        if job.init == "supervised":
            result.update(init="supervised", base_trainer=job.trainer, pretrained_from=job.twin)
        if job.init == "selftrain":
            from nnunet_mmssl.study.selftrain_arm import read_manifest

            manifest = read_manifest(self.context.selftrain_folder(job)) or {}
            result.update(init="selftrain", base_trainer=job.trainer, teacher=job.twin,
                          n_pseudo_labelled=len(manifest.get("pseudo_labelled_cases", [])),
                          mean_ignored_fraction=manifest.get("mean_ignored_fraction"),
                          selftrain_threshold=manifest.get("threshold"))
        atomic_write_json(self.context.result_file(job), result)
        return result

    def run_all(self, jobs: Sequence[StudyJob]) -> list[dict]:
        """Every job (``workers`` at a time, started in order); finished ones are read back, not repeated. Prints
        progress with the time left. Returns the results in the order of ``jobs``.

        A fine-tuned job whose twin trains in this call starts only after the twin's run has ended (a worker with
        nothing else to start waits), so it never reads a checkpoint being written.

        Raises:
            RuntimeError (or the step's own error): a run failed; the runs already going are finished first and no
                new run starts.
        """
        results: dict[int, dict] = {}
        durations = []
        for index, job in enumerate(jobs):
            if run_state(self.context, job) == "done":
                with open(self.context.result_file(job)) as handle:
                    results[index] = json.load(handle)
                durations.append(results[index]["seconds"])
                if "training" not in results[index]:  # written before the signals were recorded
                    results[index]["training"] = self.signals(job)
                    atomic_write_json(self.context.result_file(job), results[index])
        todo = [(index, job) for index, job in enumerate(jobs) if index not in results]
        workers = len(self.slots)
        self.progress(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done, {len(todo)} to do"
                      + (f", {workers} at a time" if workers > 1 and todo else ""))
        lock = threading.Condition()
        pending = list(todo)
        training = {job.name for _, job in todo if run_state(self.context, job) == "todo"}
        counter = {"started": 0, "finished": 0, "running": 0}
        errors: list[BaseException] = []

        def ready(job: StudyJob) -> bool:
            return job.twin_job is None or job.twin_job.name not in training

        def worker(cores: tuple[int, ...] | None) -> None:
            self._local.cores = cores
            while True:
                with lock:
                    while True:
                        if errors or not pending:
                            return
                        item = next((p for p in pending if ready(p[1])), None)
                        if item is not None or counter["running"] == 0:
                            break  # nothing ready and nothing running: the first job reports its missing twin
                        lock.wait()
                    item = item or pending[0]
                    pending.remove(item)
                    index, job = item
                    counter["started"] += 1
                    counter["running"] += 1
                    state = run_state(self.context, job)
                    where = "" if cores is None else f", cores {','.join(map(str, cores))}"
                    self.progress(f"[{counter['started']}/{len(todo)}] {job.name} (fold {job.fold}{where}"
                                  f"{', trained: predicting again' if state == 'trained' else ''}) ...")
                try:
                    result = self.run_job(job)
                except BaseException as error:  # noqa: BLE001 (re-raised by run_all once the other runs end)
                    with lock:
                        errors.append(error)
                        counter["running"] -= 1
                        lock.notify_all()
                    return
                with lock:
                    training.discard(job.name)
                    counter["running"] -= 1
                    lock.notify_all()
                    results[index] = result
                    durations.append(result["seconds"])
                    counter["finished"] += 1
                    left = (len(todo) - counter["finished"]) * sum(durations) / len(durations) / workers
                    dice = result["mean"]["dice"]
                    self.progress(f"[{counter['finished']}/{len(todo)} done] {job.name}: Dice "
                                  f"{'n/a' if dice is None else f'{dice:.3f}'}, {result['seconds']:.0f} s; about "
                                  f"{format_seconds(left)} left")

        if workers == 1:
            worker(self.slots[0])
        else:
            threads = [threading.Thread(target=worker, args=(cores,), name=f"study-worker-{k}")
                       for k, cores in enumerate(self.slots)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        if errors:
            raise errors[0]
        return [results[index] for index in range(len(jobs))]


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _run(cmd: list[str], env: dict, log_file: str, prefix: str = "    ") -> None:
    from nnunet_mmssl.cli.demo import _run_logged

    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    _run_logged(cmd, env, log_file, prefix)

"""Self-training (noisy student) with nnU-Net: teacher, pseudo-labels with an ignore label, student, R rounds.

The recipe nnU-Net's maintainers give for unlabelled data (nnU-Net issues #2338, #2233), in one resumable pipeline:

1. **Teacher.** A trained model folder (``-m``), or ``nnUNetv2_train`` of a trainer on the source dataset's labelled
   cases (``imagesTr``; fold ``all``, or an appended fold of ``splits_final.json`` without the test cases).
2. **Pseudo-labels.** :func:`nnunet_mmssl.semisup.pseudolabel.pseudolabel` predicts the unlabelled pool (the
   source's ``imagesUnlabeled`` minus the test cases): nnU-Net's label export (region models: the label map nnU-Net
   makes from the regions with ``regions_class_order``, so it is consistent with the regions) and the per-voxel
   entropy of the exported probabilities.
3. **Derived dataset.** A new dataset id in ``nnUNet_raw``: the labelled cases copied unchanged, each pseudo-labelled
   case as a training case whose uncertain voxels (normalised entropy ``H / H_max`` above the threshold;
   ``H_max = log C``, or ``log 2`` for the mean binary entropy of region models) carry nnU-Net's ignore label
   (``"ignore": max label + 1`` in ``dataset.json``; they add no loss). A manifest (:data:`MANIFEST`) records the
   source, the teacher, the round, the threshold and which cases are pseudo-labelled. The source's raw folder is
   only read.
4. **Preprocessing.** The source's plans are copied to the derived dataset (same network, patch and spacing, so the
   student is comparable with its teacher) and ``nnUNetv2_preprocess`` runs with them.
5. **Student.** ``nnUNetv2_train`` of the student trainer on the derived dataset, fold ``all`` (it holds no test
   case). Round ``r``'s student is round ``r + 1``'s teacher.

Test cases: the source's ``imagesTs`` is never read, and the cases named as test cases (:func:`selftrain`
``test_cases``) are left out of the teacher's training, the unlabelled pool and every derived dataset.

Resumable: each finished stage is recorded in :data:`STATE_FILE` of the work folder, with the settings; a rerun
skips finished stages (an unfinished training continues with ``--c``), and refuses a work folder holding other
settings. Models go to ``<work>/nnUNet_results``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

# the arithmetic of the pseudo-labels (shared with the study's self-training arm), re-exported here
from nnunet_mmssl.semisup.ignore_label import DEFAULT_THRESHOLD as DEFAULT_THRESHOLD
from nnunet_mmssl.semisup.ignore_label import ignore_label_value as ignore_label_value
from nnunet_mmssl.semisup.ignore_label import mask_uncertain as mask_uncertain
from nnunet_mmssl.semisup.ignore_label import normalised_entropy as normalised_entropy
from nnunet_mmssl.semisup.ignore_label import with_ignore_label as with_ignore_label

PROG = "nnUNetv2_mmssl_selftrain"
#: the manifest written into each derived raw dataset
MANIFEST = "selftrain.json"
#: the state file of the work folder
STATE_FILE = "selftrain_state.json"
BUDGET_SUFFIX = "__selftrain"
TRAINER_MODULE = "mmssl_selftrain_trainers"
#: settings a continued run must share with the run that started the work folder
SETTINGS_KEYS = ("source", "configuration", "plans", "teacher_trainer", "student_trainer", "model_folder",
                 "threshold", "derived_id", "test_cases", "epochs", "iterations", "val_iterations")


class SelfTrainError(ValueError):
    """An error the user can fix; the message names the file or value and the fix."""


def derived_dataset_json(source: Mapping, num_training: int, ignore_label: int, name: str) -> dict:
    """The derived dataset's ``dataset.json``: the source's, with the ignore label, the training count and its name;
    no unlabelled or test cases of its own."""
    out = copy.deepcopy(dict(source))
    out["labels"] = dict(out["labels"])
    out["labels"]["ignore"] = int(ignore_label)
    out["numTraining"] = int(num_training)
    out["name"] = name
    for key in ("numUnlabeled", "numTest"):
        out.pop(key, None)
    return out


# ---------------------------------------------------------------------------------------------- files
def _cases(folder: str, file_ending: str, channels: int, what: str) -> dict[str, list[str]]:
    from nnunet_mmssl.semisup.pseudolabel import UserError, list_cases

    if not os.path.isdir(folder):
        return {}
    try:
        return list_cases(folder, file_ending, channels)
    except UserError as error:
        if "no images named" in str(error):
            return {}
        raise SelfTrainError(f"{what}: {error}") from None


def _copy_verified(source: str, target: str) -> None:
    """Copy a file under a temporary name, compare sizes, rename (a short copy is an error, not a file)."""
    from nnunet_mmssl.io_checks import temporary_name

    tmp = temporary_name(target)
    try:
        shutil.copyfile(source, tmp)
        if os.path.getsize(tmp) != os.path.getsize(source):
            raise OSError(f"{target}, the copy of {source} is incomplete. Free disk space and run the command again")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_pseudo_label(label_file: str, entropy_file: str, target: str, num_outputs: int, sigmoid: bool,
                       threshold: float, ignore_label: int) -> dict:
    """Write the ignore-masked pseudo-label of one case (on the label's grid, verified); return its voxel counts."""
    import SimpleITK as sitk

    from nnunet_mmssl.io_checks import write_image

    label_image = sitk.ReadImage(label_file)
    segmentation = sitk.GetArrayFromImage(label_image)
    entropy = sitk.GetArrayFromImage(sitk.ReadImage(entropy_file))
    if entropy.shape != segmentation.shape:
        raise SelfTrainError(f"{entropy_file}, its grid {entropy.shape} differs from the label {label_file} "
                             f"{segmentation.shape}. Run the pseudo-labels again (delete the round's folder)")
    masked = mask_uncertain(segmentation, normalised_entropy(entropy, num_outputs, sigmoid), threshold, ignore_label)
    image = sitk.GetImageFromArray(masked)
    image.CopyInformation(label_image)
    write_image(image, target)
    ignored = int((masked == ignore_label).sum())
    return {"voxels": int(masked.size), "ignored_voxels": ignored,
            "ignored_fraction": ignored / masked.size if masked.size else 0.0}


def build_derived_dataset(final: str, source_raw: str, source_json: dict, labelled: Mapping[str, Sequence[str]],
                          pseudo_folder: str, pool: Mapping[str, Sequence[str]], num_outputs: int, sigmoid: bool,
                          threshold: float, manifest: dict, unlabeled_images: bool = False) -> dict:
    """Write the derived raw dataset ``final`` atomically (a hidden sibling renamed when complete).

    Args:
        final: ``$nnUNet_raw/DatasetXXX_NAME`` of the derived dataset.
        source_raw: the source raw dataset (read only).
        source_json: its ``dataset.json``.
        labelled: labelled case -> its channel files (``imagesTr`` of the source, test cases left out).
        pseudo_folder: the pseudo-label output (``labels/``, ``uncertainty/``).
        pool: pseudo-labelled case -> its channel files.
        num_outputs, sigmoid: the teacher's output channels and whether they are regions.
        threshold: normalised-entropy threshold.
        manifest: what the manifest records besides the cases (source, model, round ...).
        unlabeled_images: also copy the pool's images to ``imagesUnlabeled`` (for an SSL student).

    Returns:
        The manifest written.
    """
    from nnunet_mmssl.io_checks import publish_folder, write_json
    from nnunet_mmssl.semisup.pseudolabel import ENTROPY_SUFFIX

    ending = source_json["file_ending"]
    clash = sorted(set(labelled) & set(pool))
    if clash:
        raise SelfTrainError(f"case id(s) {clash[:5]} are both labelled (imagesTr) and unlabelled; rename the "
                             f"unlabelled ones in {os.path.join(source_raw, 'imagesUnlabeled')}")
    ignore = ignore_label_value(source_json["labels"])
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for sub in ("imagesTr", "labelsTr") + (("imagesUnlabeled",) if unlabeled_images else ()):
            os.makedirs(os.path.join(tmp, sub))
        for case, files in sorted(labelled.items()):
            for file in files:
                _copy_verified(file, os.path.join(tmp, "imagesTr", os.path.basename(file)))
            _copy_verified(os.path.join(source_raw, "labelsTr", case + ending),
                           os.path.join(tmp, "labelsTr", case + ending))
        per_case = {}
        for case, files in sorted(pool.items()):
            for file in files:
                _copy_verified(os.path.realpath(file), os.path.join(tmp, "imagesTr", os.path.basename(file)))
                if unlabeled_images:
                    _copy_verified(os.path.realpath(file), os.path.join(tmp, "imagesUnlabeled", os.path.basename(file)))
            per_case[case] = write_pseudo_label(
                os.path.join(pseudo_folder, "labels", case + ending),
                os.path.join(pseudo_folder, "uncertainty", case + ENTROPY_SUFFIX),
                os.path.join(tmp, "labelsTr", case + ending), num_outputs, sigmoid, threshold, ignore)
        dataset_json = derived_dataset_json(source_json, len(labelled) + len(pool), ignore, name.split("_", 1)[1])
        write_json(dataset_json, os.path.join(tmp, "dataset.json"))
        full = dict(manifest, threshold=threshold, ignore_label=ignore, labelled_cases=sorted(labelled),
                    pseudo_labelled_cases=sorted(pool), pseudo_labels=per_case,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json(full, os.path.join(tmp, MANIFEST))
        publish_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return full


# ---------------------------------------------------------------------------------------------- trainers
def budget_trainer_class(base: type, epochs: int, iterations: int, val_iterations: int,
                         module: str | None = None) -> type:
    """``<base>__selftrain``: ``base`` with a training budget and no final validation (fold ``all`` validates on
    its own training cases, which measures nothing)."""
    import torch

    class Budget(base):
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = val_iterations

        def perform_actual_validation(self, save_probabilities: bool = False):
            self.print_to_log_file("self-training run: final validation skipped")

    Budget.__name__ = Budget.__qualname__ = base.__name__ + BUDGET_SUFFIX
    if module is not None:
        Budget.__module__ = module
    return Budget


_MODULE_TEMPLATE = '''"""Generated by nnUNetv2_mmssl_selftrain for nnUNet_extTrainer; rewritten by each run."""
from nnunet_mmssl.semisup.selftrain import budget_trainer_class
from nnunet_mmssl.study.runner import resolve_trainer

'''


def write_budget_trainers(folder: str, trainers: Sequence[str], epochs: int, iterations: int,
                          val_iterations: int) -> str:
    """Write the module defining ``<trainer>__selftrain`` for each trainer into ``folder``; return its path."""
    from nnunet_mmssl.study.runner import atomic_write_text, resolve_trainer

    text = _MODULE_TEMPLATE
    for trainer in dict.fromkeys(trainers):
        resolve_trainer(trainer)
        text += (f"{trainer}{BUDGET_SUFFIX} = budget_trainer_class(resolve_trainer({trainer!r}), {int(epochs)}, "
                 f"{int(iterations)}, {int(val_iterations)}, __name__)\n")
    path = os.path.join(folder, TRAINER_MODULE + ".py")
    atomic_write_text(path, text)
    return path


# ---------------------------------------------------------------------------------------------- pipeline
def read_test_cases(cases: Sequence[str] | None, file: str | None) -> list[str]:
    """Test case ids from the command line and/or a file (a JSON list, a splits-like ``{"test": [...]}``, or one id
    per line)."""
    found = list(cases or [])
    if file is not None:
        if not os.path.isfile(file):
            raise SelfTrainError(f"{file}, the test-case file does not exist. Give a JSON list or one case id per line")
        with open(file) as handle:
            text = handle.read()
        try:
            content = json.loads(text)
        except json.JSONDecodeError:
            content = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if isinstance(content, dict):
            content = content.get("test")
        if not isinstance(content, list) or not all(isinstance(c, str) for c in content):
            raise SelfTrainError(f"{file}, is not a list of case ids. Write a JSON list, {{\"test\": [...]}}, or "
                                 f"one id per line")
        found += content
    return sorted(set(found))


class SelfTraining:
    """The stages of a self-training run; each heavy step (train, pseudo-label, preprocess) is a method that a test
    can replace. :meth:`run` does every stage not yet recorded in the state file."""

    def __init__(self, source: str, configuration: str, output: str, rounds: int = 1,
                 teacher_trainer: str = "nnUNetTrainer", student_trainer: str = "nnUNetTrainer",
                 model_folder: str | None = None, folds: Sequence[str] | None = None,
                 threshold: float = DEFAULT_THRESHOLD, derived_id: int | None = None, plans: str = "nnUNetPlans",
                 test_cases: Sequence[str] = (), epochs: int | None = None, iterations: int = 250,
                 val_iterations: int = 50, device: str = "cuda", num_processes: int = 2, use_mirroring: bool = True,
                 progress: Callable[[str], None] = print):
        from nnunet_mmssl.option_checks import check_finite_number

        if rounds < 1:
            raise SelfTrainError(f"--rounds {rounds}: must be at least 1")
        try:
            check_finite_number(threshold, "--threshold", 0)
        except ValueError as error:
            raise SelfTrainError(str(error)) from None
        if threshold > 1:
            raise SelfTrainError(f"--threshold {threshold}: the normalised entropy lies in [0, 1]; give a value in "
                                 f"[0, 1] (1 ignores nothing)")
        if epochs is not None and (epochs < 1 or iterations < 1 or val_iterations < 1):
            raise SelfTrainError(f"--epochs {epochs}, --iterations {iterations}, --val-iterations {val_iterations}: "
                                 f"each must be at least 1")
        if num_processes < 1:
            raise SelfTrainError(f"-np {num_processes}: must be at least 1")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise SelfTrainError("-device cuda: CUDA is not available on this machine; pass -device cpu")
        self.configuration, self.rounds, self.threshold, self.plans = configuration, rounds, threshold, plans
        self.teacher_trainer, self.student_trainer = teacher_trainer, student_trainer
        self.model_folder = os.path.abspath(model_folder) if model_folder else None
        self.folds = list(folds) if folds else None
        self.test_cases = sorted(set(test_cases))
        self.epochs, self.iterations, self.val_iterations = epochs, iterations, val_iterations
        self.device, self.num_processes, self.use_mirroring = device, num_processes, use_mirroring
        self.progress = progress
        self.output = os.path.abspath(output)
        self._find_source(source)
        self.derived_id = self._choose_derived_id(derived_id)

    # ------------------------------------------------------------------ setup
    def _find_source(self, source: str) -> None:
        from nnunet_mmssl.cli.study import find_dataset
        from nnunet_mmssl.dataset_conversion.modality_layout import read_layout

        self.raw_root = os.environ.get("nnUNet_raw")
        self.source_raw = find_dataset("nnUNet_raw", str(source))
        self.source_name = os.path.basename(self.source_raw)
        self.source_id = int(self.source_name[len("Dataset"):len("Dataset") + 3])
        json_file = os.path.join(self.source_raw, "dataset.json")
        if not os.path.isfile(json_file):
            raise SelfTrainError(f"{json_file}, not found. Convert the dataset first (nnUNetv2_mmssl_convert)")
        with open(json_file) as handle:
            self.source_json = json.load(handle)
        if "dataset" in self.source_json:
            raise SelfTrainError(f"{json_file}, lists its files explicitly (a 'dataset' entry); self-training "
                                 f"needs the imagesTr/labelsTr/imagesUnlabeled layout. Convert it with "
                                 f"nnUNetv2_mmssl_convert")
        if read_layout(self.source_json.get("mmssl"), json_file) is not None:
            raise SelfTrainError(f"{json_file}, is an unregistered dataset (a modality per case): not supported by "
                                 f"self-training yet. Use a registered multi-channel dataset")
        ending, channels = self.source_json["file_ending"], len(self.source_json["channel_names"])
        labelled = _cases(os.path.join(self.source_raw, "imagesTr"), ending, channels, "imagesTr")
        pool = _cases(os.path.join(self.source_raw, "imagesUnlabeled"), ending, channels, "imagesUnlabeled")
        tests = _cases(os.path.join(self.source_raw, "imagesTs"), ending, channels, "imagesTs")
        unknown = sorted(set(self.test_cases) - set(labelled) - set(pool) - set(tests))
        if unknown:
            raise SelfTrainError(f"--test {' '.join(unknown[:5])}: no such case in imagesTr, imagesUnlabeled or "
                                 f"imagesTs of {self.source_raw}. Check the case ids")
        self.labelled = {c: f for c, f in labelled.items() if c not in self.test_cases}
        self.pool = {c: f for c, f in pool.items() if c not in self.test_cases}
        if not self.labelled:
            raise SelfTrainError(f"{os.path.join(self.source_raw, 'imagesTr')}, holds no labelled case outside the "
                                 f"test cases. Label some cases first")
        if not self.pool:
            raise SelfTrainError(f"{os.path.join(self.source_raw, 'imagesUnlabeled')}, holds no unlabelled case "
                                 f"outside the test cases. Put the unlabelled cases there (nnUNetv2_mmssl_convert)")
        for case in self.labelled:
            label = os.path.join(self.source_raw, "labelsTr", case + ending)
            if not os.path.isfile(label):
                raise SelfTrainError(f"{label}, the label of labelled case {case} is missing. Add it or move the "
                                     f"case's images to imagesUnlabeled")

    def _choose_derived_id(self, derived_id: int | None) -> int:
        taken = {int(n[7:10]) for n in os.listdir(self.raw_root)
                 if n.startswith("Dataset") and n[7:10].isdigit()}
        state = self._read_state()
        if derived_id is None:
            if state is not None:
                return int(state["settings"]["derived_id"])
            derived_id = next(k for k in range(max(taken) + 1, 1000) if all(k + r not in taken
                                                                               for r in range(self.rounds)))
        if derived_id < 1 or derived_id + self.rounds - 1 > 999:
            raise SelfTrainError(f"--derived-id {derived_id}: dataset ids are 1..999 and round r uses id + r - 1")
        for r in range(self.rounds):
            k = derived_id + r
            if k == self.source_id:
                raise SelfTrainError(f"--derived-id {derived_id}: round {r + 1} would use the source's id {k}. Choose "
                                     f"another id")
            for name in os.listdir(self.raw_root):
                if name.startswith(f"Dataset{k:03d}_") and name != self.derived_name(r + 1, k - r):
                    raise SelfTrainError(f"--derived-id {derived_id}: id {k} is taken by {name} in {self.raw_root}. "
                                         f"Choose a free id (the derived datasets use {derived_id}.."
                                         f"{derived_id + self.rounds - 1})")
                manifest = os.path.join(self.raw_root, name, MANIFEST)
                if not name.startswith(f"Dataset{k:03d}_"):
                    continue
                if not os.path.isfile(manifest):
                    raise SelfTrainError(f"{os.path.join(self.raw_root, name)}, exists and is not a self-training "
                                         f"dataset (no {MANIFEST}). Choose another --derived-id")
                with open(manifest) as handle:
                    owner = json.load(handle).get("work_folder")
                if owner != self.output:
                    raise SelfTrainError(f"{os.path.join(self.raw_root, name)}, belongs to the self-training run in "
                                         f"{owner}. Continue that run (-o {owner}) or choose another --derived-id")
        return derived_id

    def derived_name(self, round_: int, base: int | None = None) -> str:
        base = self.derived_id if base is None else base
        return f"Dataset{base + round_ - 1:03d}_{self.source_name.split('_', 1)[1]}SelfTrainR{round_}"

    @property
    def settings(self) -> dict:
        return {"source": self.source_name, "configuration": self.configuration, "plans": self.plans,
                "teacher_trainer": None if self.model_folder else self.teacher_trainer,
                "student_trainer": self.student_trainer, "model_folder": self.model_folder,
                "threshold": self.threshold, "derived_id": self.derived_id, "test_cases": self.test_cases,
                "epochs": self.epochs, "iterations": self.iterations if self.epochs else None,
                "val_iterations": self.val_iterations if self.epochs else None}

    @property
    def state_file(self) -> str:
        return os.path.join(self.output, STATE_FILE)

    def _read_state(self) -> dict | None:
        if not os.path.isfile(self.state_file):
            return None
        with open(self.state_file) as handle:
            return json.load(handle)

    def _write_state(self, state: dict) -> None:
        from nnunet_mmssl.io_checks import write_json

        write_json(state, self.state_file)

    def _environment(self) -> dict:
        from nnunet_mmssl._ext_trainer_hook import EXT_TRAINER_FOLDER, EXT_TRAINER_VARIABLE

        ext = os.path.join(self.output, "ext_trainers")
        env = dict(os.environ, nnUNet_results=os.path.join(self.output, "nnUNet_results"), PYTHONUNBUFFERED="1")
        others = [p for p in env.get(EXT_TRAINER_VARIABLE, "").split(os.pathsep) if p and p != ext]
        env[EXT_TRAINER_VARIABLE] = os.pathsep.join([ext] + others +
                                                    ([EXT_TRAINER_FOLDER] if EXT_TRAINER_FOLDER not in others else []))
        return env

    def trainer_name(self, trainer: str) -> str:
        return trainer + BUDGET_SUFFIX if self.epochs else trainer

    def model_folder_of(self, dataset_name: str, trainer: str) -> str:
        return os.path.join(self.output, "nnUNet_results", dataset_name,
                            f"{self.trainer_name(trainer)}__{self.plans}__{self.configuration}")

    # ------------------------------------------------------------------ heavy steps (replaceable)
    def train(self, dataset_name: str, trainer: str, fold: str, log: str) -> None:
        """``nnUNetv2_train dataset configuration fold -tr trainer -p plans --c`` (resumes an unfinished run)."""
        from nnunet_mmssl.study.runner import _TRAIN, _run, check_study_checkpoints, pinned_command

        check_study_checkpoints(os.path.join(self.model_folder_of(dataset_name, trainer), f"fold_{fold}"))
        cmd = pinned_command(_TRAIN, [dataset_name, self.configuration, fold, "-tr", self.trainer_name(trainer),
                                      "-p", self.plans, "-device", self.device, "--c"], None)
        _run(cmd, self._environment(), log)

    def pseudolabel(self, model_folder: str, folds: Sequence[str], input_folder: str, output: str) -> None:
        """:func:`~nnunet_mmssl.semisup.pseudolabel.pseudolabel` of the unlabelled pool (no head disagreement)."""
        from nnunet_mmssl._ext_trainer_hook import EXT_TRAINER_VARIABLE
        from nnunet_mmssl.semisup.pseudolabel import pseudolabel

        # nnU-Net's predictor looks the trainer up by name (ours with --epochs live in <work>/ext_trainers)
        previous = os.environ.get(EXT_TRAINER_VARIABLE)
        os.environ[EXT_TRAINER_VARIABLE] = self._environment()[EXT_TRAINER_VARIABLE]
        try:
            pseudolabel(model_folder, input_folder, output, folds=list(folds), device=self.device,
                        disagreement=False, overwrite=True, use_mirroring=self.use_mirroring,
                        num_processes_preprocessing=0, num_processes_export=1)
        finally:
            if previous is None:
                os.environ.pop(EXT_TRAINER_VARIABLE, None)
            else:
                os.environ[EXT_TRAINER_VARIABLE] = previous

    def preprocess(self, dataset_name: str, log: str, unlabeled: bool) -> None:
        """Copy the source's plans to the derived dataset and run ``nnUNetv2_preprocess`` with them (and our
        unlabelled preprocessing for an SSL student)."""
        from nnunet_mmssl.io_checks import write_json
        from nnunet_mmssl.study.runner import _run, pinned_command

        preprocessed_root = os.environ["nnUNet_preprocessed"]
        target = os.path.join(preprocessed_root, dataset_name)
        os.makedirs(target, exist_ok=True)
        plans = copy.deepcopy(self.source_plans())
        plans["dataset_name"] = dataset_name
        write_json(plans, os.path.join(target, self.plans + ".json"))
        raw = os.path.join(self.raw_root, dataset_name)
        with open(os.path.join(raw, "dataset.json")) as handle:
            write_json(json.load(handle), os.path.join(target, "dataset.json"))
        fingerprint = os.path.join(preprocessed_root, self.source_name, "dataset_fingerprint.json")
        if os.path.isfile(fingerprint):
            _copy_verified(fingerprint, os.path.join(target, "dataset_fingerprint.json"))
        code = ("import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
                "preprocess_entry as m; sys.argv[0] = 'nnUNetv2_preprocess'; sys.exit(m())")
        _run(pinned_command(code, ["-d", dataset_name[7:10], "-plans_name", self.plans, "-c", self.configuration,
                                   "-np", str(self.num_processes)], None), self._environment(), log)
        if unlabeled:
            from nnunet_mmssl.dataloading.unlabeled_preprocessing import preprocess_unlabeled

            preprocess_unlabeled(raw, target, plans, [self.configuration], self.num_processes, self.progress,
                                 check_images=False)

    # ------------------------------------------------------------------ helpers
    def source_plans(self) -> dict:
        path = os.path.join(os.environ.get("nnUNet_preprocessed", ""), self.source_name, self.plans + ".json")
        if not os.path.isfile(path):
            raise SelfTrainError(f"{path}, the source's plans are missing. Run nnUNetv2_mmssl_plan_and_preprocess -d "
                                 f"{self.source_id} -c {self.configuration} first")
        with open(path) as handle:
            plans = json.load(handle)
        if self.configuration not in plans["configurations"]:
            raise SelfTrainError(f"-c {self.configuration}: not in {path} (has {sorted(plans['configurations'])}). "
                                 f"Choose one of those")
        return plans

    def teacher_fold(self) -> str:
        """``all`` when no test case is in ``imagesTr``; else a fold of the source's ``splits_final.json`` (appended
        if needed) training on the labelled cases without the test cases."""
        tests_in_tr = [c for c in self.test_cases if os.path.isfile(os.path.join(
            self.source_raw, "labelsTr", c + self.source_json["file_ending"]))]
        if not tests_in_tr:
            return "all"
        from nnunet_mmssl.study.runner import atomic_write_json

        path = os.path.join(os.environ["nnUNet_preprocessed"], self.source_name, "splits_final.json")
        splits = []
        if os.path.isfile(path):
            with open(path) as handle:
                splits = json.load(handle)
        entry = {"train": sorted(self.labelled), "val": sorted(self.labelled)}
        for index, old in enumerate(splits):
            if sorted(old.get("train", [])) == entry["train"] and sorted(old.get("val", [])) == entry["val"]:
                return str(index)
        if not splits and len(self.labelled) + len(tests_in_tr) >= 5:
            from nnunetv2.utilities.crossval_split import generate_crossval_split

            splits = generate_crossval_split(sorted(set(self.labelled) | set(tests_in_tr)), seed=12345, n_splits=5)
        splits.append(entry)
        atomic_write_json(path, splits)
        self.progress(f"{path}: fold {len(splits) - 1} trains the teacher without the test cases")
        return str(len(splits) - 1)

    def pool_folder(self) -> str:
        """A folder of links to the unlabelled pool's images (the test cases left out)."""
        folder = os.path.join(self.output, "unlabeled_pool")
        tmp = folder + f".partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for files in self.pool.values():
            for file in files:
                os.symlink(os.path.abspath(file), os.path.join(tmp, os.path.basename(file)))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return folder

    def _outputs_of(self, model_folder: str) -> tuple[int, bool]:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        with open(os.path.join(model_folder, "plans.json")) as handle:
            plans = json.load(handle)
        with open(os.path.join(model_folder, "dataset.json")) as handle:
            dataset_json = json.load(handle)
        manager = PlansManager(plans).get_label_manager(dataset_json)
        return manager.num_segmentation_heads, bool(manager.has_regions)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Do every stage not yet done; return the state (``done``: stage -> what it recorded)."""
        from nnunet_mmssl.study.runner import resolve_trainer

        os.makedirs(self.output, exist_ok=True)
        state = self._read_state()
        if state is not None:
            changed = [k for k in SETTINGS_KEYS if state["settings"].get(k) != self.settings[k]]
            if changed:
                what = ", ".join(f"{k}: {state['settings'].get(k)!r}" for k in changed)
                raise SelfTrainError(f"{self.output}, holds a self-training run with other settings ({what}). Continue "
                                     f"it with the same settings, or choose another -o")
        else:
            state = {"settings": self.settings, "done": {}}
        state.setdefault("done", {})
        self._write_state(state)
        done = state["done"]
        try:
            classes = {t: resolve_trainer(t) for t in [self.student_trainer] + ([] if self.model_folder else
                                                                               [self.teacher_trainer])}
        except ValueError as error:
            raise SelfTrainError(str(error)) from None
        student_unlabeled = bool(getattr(classes[self.student_trainer], "use_unlabeled", False))
        if self.epochs:
            write_budget_trainers(os.path.join(self.output, "ext_trainers"),
                                  [self.student_trainer] + ([] if self.model_folder else [self.teacher_trainer]),
                                  self.epochs, self.iterations, self.val_iterations)
        self.source_plans()  # the plans must exist before anything trains
        logs = os.path.join(self.output, "logs")
        os.makedirs(logs, exist_ok=True)

        def finish(stage: str, record: dict) -> None:
            done[stage] = dict(record, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            self._write_state(state)

        if "teacher" not in done:
            if self.model_folder:
                for name in ("plans.json", "dataset.json"):
                    if not os.path.isfile(os.path.join(self.model_folder, name)):
                        raise SelfTrainError(f"{self.model_folder}, is not a trained model folder (no {name}). Give "
                                             f"TRAINER__PLANS__CONFIGURATION holding fold_X/ with -m")
                from nnunet_mmssl.semisup.pseudolabel import UserError, resolve_folds

                try:
                    folds = [str(f) for f in resolve_folds(self.model_folder, self.folds, "checkpoint_final.pth")]
                except UserError as error:
                    raise SelfTrainError(str(error)) from None
                finish("teacher", {"model_folder": self.model_folder, "folds": folds, "trained": False})
            else:
                fold = self.teacher_fold()
                model = self.model_folder_of(self.source_name, self.teacher_trainer)
                self.progress(f"Teacher: nnUNetv2_train {self.source_name} {self.configuration} {fold} -tr "
                              f"{self.trainer_name(self.teacher_trainer)}")
                self.train(self.source_name, self.teacher_trainer, fold, os.path.join(logs, "train_teacher.log"))
                self._check_trained(model, fold)
                finish("teacher", {"model_folder": model, "folds": [fold], "trained": True})
        else:
            self.progress(f"Teacher: done ({done['teacher']['model_folder']})")
        teacher, folds = done["teacher"]["model_folder"], done["teacher"]["folds"]
        for round_ in range(1, self.rounds + 1):
            name = self.derived_name(round_)
            key = f"round_{round_}"
            pseudo = os.path.join(self.output, key, "pseudolabels")
            if f"{key}/pseudolabel" not in done:
                self.progress(f"Round {round_}: pseudo-labels of {len(self.pool)} unlabelled case(s) by {teacher}")
                self.pseudolabel(teacher, folds, self.pool_folder(), pseudo)
                finish(f"{key}/pseudolabel", {"folder": pseudo, "teacher": teacher, "folds": list(folds)})
            if f"{key}/dataset" not in done:
                outputs, sigmoid = self._outputs_of(teacher)
                final = os.path.join(self.raw_root, name)
                self.progress(f"Round {round_}: derived dataset {final} ({len(self.labelled)} labelled + "
                              f"{len(self.pool)} pseudo-labelled, ignore label where normalised entropy > "
                              f"{self.threshold:g})")
                manifest = build_derived_dataset(
                    final, self.source_raw, self.source_json, self.labelled, pseudo, self.pool, outputs, sigmoid,
                    self.threshold, {"source_dataset": self.source_name, "source_id": self.source_id,
                                     "work_folder": self.output, "model_folder": teacher, "folds": list(folds),
                                     "round": round_, "test_cases_excluded": self.test_cases,
                                     "sigmoid_regions": sigmoid},
                    unlabeled_images=student_unlabeled)
                fraction = float(np.mean([c["ignored_fraction"] for c in manifest["pseudo_labels"].values()]))
                finish(f"{key}/dataset", {"dataset": name, "mean_ignored_fraction": fraction})
            if f"{key}/preprocess" not in done:
                self.progress(f"Round {round_}: preprocessing {name} with the plans of {self.source_name}")
                self.preprocess(name, os.path.join(logs, f"preprocess_{key}.log"), student_unlabeled)
                finish(f"{key}/preprocess", {"dataset": name})
            student = self.model_folder_of(name, self.student_trainer)
            if f"{key}/train" not in done:
                self.progress(f"Round {round_}: student nnUNetv2_train {name} {self.configuration} all -tr "
                              f"{self.trainer_name(self.student_trainer)}")
                self.train(name, self.student_trainer, "all", os.path.join(logs, f"train_{key}.log"))
                self._check_trained(student, "all")
                finish(f"{key}/train", {"model_folder": student})
            teacher, folds = student, ["all"]
        self.progress(f"Done: the last student is {teacher} (fold all)")
        return state

    @staticmethod
    def _check_trained(model_folder: str, fold: str) -> None:
        if not os.path.isfile(os.path.join(model_folder, f"fold_{fold}", "checkpoint_final.pth")):
            raise RuntimeError(f"training ended without {model_folder}/fold_{fold}/checkpoint_final.pth; see the "
                               f"training log")


def selftrain(source: str, configuration: str, output: str, **kwargs) -> dict:
    """Run (or continue) self-training; see :class:`SelfTraining` for the arguments. Returns the state."""
    return SelfTraining(source, configuration, output, **kwargs).run()

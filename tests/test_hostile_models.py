"""Hostile model folders: a checkpoint that runs code, plans that import anything, names that are paths.

Every entry point that opens a checkpoint (nnUNetv2_mmssl_predict, _evaluate_missing, _pseudolabel, _check_model, the
study runner, ``nnUNetv2_train --c`` and ``-pretrained_weights`` with our trainers) is given a checkpoint whose pickle
calls ``os.system("touch MARKER")``: each refuses it with one line naming the file and ``posix.system`` (exit 2 for
our commands), and the marker file is never created. A real checkpoint (ours, and nnU-Net's own with numpy logs) still
loads. Plans naming ``collections.OrderedDict`` as the network or ``this.s`` as the non-linearity are refused before
anything is imported; a channel named ``../../../ESCAPED`` never becomes a path; ``--modalities-from`` must belong to
the model's dataset.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from console_harness import assert_user_error, run_consoles

from nnunet_mmssl.safe_load import (
    UnsafeModelError,
    check_checkpoint,
    check_model_folder,
    check_network_classes,
    check_plans_networks,
    load_checkpoint_safely,
)

CHANNELS = {"0": "A", "1": "B"}


class _RunsCode:
    """Pickles as ``os.system("touch <marker>")``: unpickling it runs the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


assert_refused = assert_user_error  # exit 2, one PROG: error: line with every substring, no traceback


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    """A MemCifSSLTrainer model folder (fixture plans, 2 channels, 2d) with a checkpoint from ``save_checkpoint``."""
    import trainer_harness
    from plans_fixtures import DATASET_JSON, RESAMPLING

    from nnunet_mmssl.trainers import MemCifSSLTrainer

    root = tmp_path_factory.mktemp("hostile")
    trainer_harness.set_folders(str(root / "nnunet"))
    plans = trainer_harness.plans()
    plans["foreground_intensity_properties_per_channel"] = {
        c: {"mean": 0.0, "std": 1.0, "percentile_00_5": -3.0, "percentile_99_5": 3.0} for c in ("0", "1")}
    plans["configurations"]["2d"].update(RESAMPLING, median_image_size_in_voxels=[16, 16])
    torch.manual_seed(0)
    trainer = MemCifSSLTrainer(plans, "2d", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.initialize()
    folder = root / "MemCifSSLTrainer__nnUNetPlans__2d"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(trainer.plans_manager.plans))
    (folder / "dataset.json").write_text(json.dumps({**DATASET_JSON, "channel_names": CHANNELS}))
    trainer.save_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """One test case (2 channels) and its reference label."""
    root = tmp_path_factory.mktemp("inputs")
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for c in range(2):
        sitk.WriteImage(sitk.GetImageFromArray(rng.normal(0, 1, (4, 16, 16)).astype(np.float32)),
                        str(images / f"c1_{c:04d}.nii.gz"))
    label = np.zeros((4, 16, 16), np.uint8)
    label[:, 4:8, 4:8] = 1
    sitk.WriteImage(sitk.GetImageFromArray(label), str(labels / "c1.nii.gz"))
    return images, labels


def hostile_copy(good_model: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the model folder whose fold_0 checkpoint runs ``touch MARKER`` when unpickled; (folder, marker)."""
    folder = tmp_path / good_model.name
    shutil.copytree(good_model, folder)
    marker = tmp_path / "MARKER"
    checkpoint = torch.load(good_model / "fold_0" / "checkpoint_final.pth", weights_only=True)
    checkpoint["payload"] = _RunsCode(marker)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder, marker


def edited_plans(good_model: Path, tmp_path: Path, **architecture) -> Path:
    """A copy of the model folder whose 2d architecture has ``architecture``'s keys replaced (arch_kwargs merged)."""
    folder = tmp_path / good_model.name
    shutil.copytree(good_model, folder)
    plans = json.loads((folder / "plans.json").read_text())
    entry = plans["configurations"]["2d"]["architecture"]
    entry["arch_kwargs"].update(architecture.pop("arch_kwargs", {}))
    entry.update(architecture)
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


# ------------------------------------------------------------------------------------------------------------------
# checkpoints: no code runs, at every entry point
# ------------------------------------------------------------------------------------------------------------------


def test_the_payload_really_runs_when_unpickled_unchecked(good_model, tmp_path):
    """The test's checkpoint is a real attack: torch.load(weights_only=False) creates the marker."""
    folder, marker = hostile_copy(good_model, tmp_path)
    torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert marker.exists()


def test_safe_load_refuses_naming_file_and_type(good_model, tmp_path):
    folder, marker = hostile_copy(good_model, tmp_path)
    file = folder / "fold_0" / "checkpoint_final.pth"
    for load in (check_checkpoint, load_checkpoint_safely):
        with pytest.raises(UnsafeModelError, match=r"checkpoint_final.pth: refused to open, it holds posix.system"):
            load(file)
    assert not marker.exists()


@pytest.mark.parametrize("prog", ["predict", "evaluate_missing", "pseudolabel", "check_model"])
def test_our_commands_refuse_a_checkpoint_that_runs_code(prog, good_model, inputs, tmp_path, capsys):
    import importlib

    folder, marker = hostile_copy(good_model, tmp_path)
    images, labels = inputs
    out = tmp_path / "out"
    argv = {"predict": ["-i", str(images), "-o", str(out), "-m", str(folder), "-f", "0", "-device", "cpu"],
            "evaluate_missing": ["-i", str(images), "-ref", str(labels), "-o", str(out), "-m", str(folder), "-f",
                                 "0", "-device", "cpu"],
            "pseudolabel": ["-i", str(images), "-o", str(out), "-m", str(folder), "-f", "0", "-device", "cpu"],
            "check_model": ["-m", str(folder)]}[prog]
    code = importlib.import_module(f"nnunet_mmssl.cli.{prog}").main(argv)
    assert_refused(code, capsys.readouterr().err, f"nnUNetv2_mmssl_{prog}",
                   str(folder / "fold_0" / "checkpoint_final.pth"), "posix.system")
    assert not marker.exists()
    assert not out.exists()


def test_study_runner_refuses_before_nnunet_opens_the_checkpoint(good_model, tmp_path):
    from types import SimpleNamespace

    from nnunet_mmssl.study.runner import StudyRunner, training_signals

    folder, marker = hostile_copy(good_model, tmp_path)
    fold = str(folder / "fold_0")
    launched = []
    context = SimpleNamespace(model_folder=lambda job: fold, prediction_folder=lambda job: str(tmp_path / "p"),
                              device="cpu")
    runner = StudyRunner.__new__(StudyRunner)
    runner.context = context
    import nnunet_mmssl.study.runner as runner_module

    original = runner_module._run
    runner_module._run = lambda *args, **kwargs: launched.append(args)
    try:
        for step in (runner.train, runner.predict):  # --c resume and nnUNetv2_predict (weights_only=False)
            with pytest.raises(UnsafeModelError, match="checkpoint_final.pth: refused to open, it holds posix.system"):
                step(SimpleNamespace(fold=0, trainer="MemCifSSLTrainer", name="j"))
        with pytest.raises(UnsafeModelError, match="posix.system"):
            training_signals(os.path.join(fold, "checkpoint_final.pth"))
    finally:
        runner_module._run = original
    assert launched == [] and not marker.exists()


def test_nnunet_train_resume_and_pretrained_weights_refuse_with_our_trainers(good_model, tmp_path, capsys):
    """nnU-Net's own ``maybe_load_checkpoint`` (what ``nnUNetv2_train --c`` / ``-pretrained_weights`` run) with one
    of our trainers: refused, no code ran; the user-error hook prints one line."""
    import nnunetv2.run.run_training as run_training
    import trainer_harness

    from nnunet_mmssl.trainers import MeanTeacherTrainer
    from nnunet_mmssl.trainers.user_errors import report_user_errors

    folder, marker = hostile_copy(good_model, tmp_path)
    evil = folder / "fold_0" / "checkpoint_final.pth"
    original = run_training.load_pretrained_weights
    try:
        trainer = trainer_harness.make_trainer(MeanTeacherTrainer, seed=0, initialize=False)
        os.makedirs(trainer.output_folder, exist_ok=True)
        shutil.copy(evil, os.path.join(trainer.output_folder, "checkpoint_final.pth"))
        with pytest.raises(UnsafeModelError, match="posix.system") as resume:
            run_training.maybe_load_checkpoint(trainer, True, False, None)  # --c
        with pytest.raises(UnsafeModelError, match="posix.system") as pretrained:
            run_training.maybe_load_checkpoint(trainer, False, False, str(evil))  # -pretrained_weights
    finally:
        run_training.load_pretrained_weights = original
    assert not marker.exists()
    for error in (resume, pretrained):
        report_user_errors()(error.type, error.value, error.tb)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and ": error: " in lines[0] and "posix.system" in lines[0]


def test_every_exported_trainer_checks_checkpoints_and_plans():
    """Each trainer nnU-Net can find by name loads checkpoints through SafeLoadingMixin and refuses a plans network
    class outside the allowlist in build_network_architecture (also what nnUNetv2_predict calls)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from plans_fixtures import PLANS

    import nnunet_mmssl.trainers as trainers
    from nnunet_mmssl.trainers.checkpoint_io import SafeLoadingMixin

    plans = copy.deepcopy(PLANS)
    plans["configurations"]["2d"]["architecture"]["network_class_name"] = "collections.OrderedDict"
    manager = PlansManager(plans)
    for name in trainers.__all__:
        cls = getattr(trainers, name)
        assert issubclass(cls, SafeLoadingMixin), name
        with pytest.raises(UnsafeModelError, match="network class 'collections.OrderedDict' is refused"):
            cls.build_network_architecture(manager, manager.get_configuration("2d"), 2, 2, False)


# ------------------------------------------------------------------------------------------------------------------
# real checkpoints still load
# ------------------------------------------------------------------------------------------------------------------


def test_our_checkpoint_loads_and_predicts_the_saved_weights(good_model, capsys):
    from nnunet_mmssl.cli.check_model import main
    from nnunet_mmssl.inference.missing import MissingModalityPredictor

    predictor = MissingModalityPredictor(use_mirroring=False, perform_everything_on_device=False,
                                         device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(good_model), [0], "checkpoint_final.pth")
    saved = torch.load(good_model / "fold_0" / "checkpoint_final.pth", weights_only=True)["network_weights"]
    assert predictor.list_of_parameters[0].keys() == saved.keys()
    assert all(torch.equal(predictor.list_of_parameters[0][k], saved[k]) for k in saved)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored after nnU-Net's read
    assert main(["-m", str(good_model)]) == 0
    out = capsys.readouterr().out
    assert f"OK {good_model / 'fold_0' / 'checkpoint_final.pth'}: weights only" in out
    assert "1 checkpoint(s), plans.json and dataset.json passed" in out


def test_nnunets_own_checkpoint_with_numpy_logs_loads(tmp_path):
    """nnU-Net's save_checkpoint writes numpy scalars (np.float64/np.float32 logs, _best_ema): allowed, kept."""
    import trainer_harness
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = trainer_harness.make_trainer(nnUNetTrainer, seed=0)
    for key, value in (("train_losses", np.float64(0.5)), ("val_losses", np.float32(0.25)),
                       ("mean_fg_dice", np.float64(0.75)), ("ema_fg_dice", np.float64(0.75)),
                       ("dice_per_class_or_region", [np.float64(0.75)]), ("lrs", 0.01),
                       ("epoch_start_timestamps", 1.0), ("epoch_end_timestamps", 2.0)):
        trainer.logger.log(key, value, 0)
    trainer._best_ema = np.float64(0.75)
    path = tmp_path / "nnunet.pth"
    nnUNetTrainer.save_checkpoint(trainer, str(path))
    loaded = load_checkpoint_safely(path)
    assert loaded["logging"]["val_losses"] == [np.float32(0.25)] and loaded["_best_ema"] == 0.75
    assert loaded["trainer_name"] == "nnUNetTrainer"
    assert all(torch.equal(loaded["network_weights"][k], v) for k, v in trainer.network.state_dict().items())


# ------------------------------------------------------------------------------------------------------------------
# network classes from plans: checked by name before import
# ------------------------------------------------------------------------------------------------------------------


def test_plans_network_class_and_layers_refused_before_import(good_model, tmp_path, capsys):
    from nnunet_mmssl.cli.check_model import main

    sys.modules.pop("this", None)
    plain = json.loads((good_model / "plans.json").read_text())["configurations"]["2d"]["architecture"]
    check_network_classes(plain["network_class_name"], plain["arch_kwargs"], plain["_kw_requires_import"], "ok")
    with pytest.raises(UnsafeModelError, match="nonlin 'this.s' is refused"):
        check_network_classes(plain["network_class_name"], {**plain["arch_kwargs"], "nonlin": "this.s"},
                              plain["_kw_requires_import"], "plans")
    assert "this" not in sys.modules
    with pytest.raises(UnsafeModelError, match="'nnunet_mmssl.cli.predict.main' is a function, not a torch.nn"):
        check_network_classes("nnunet_mmssl.cli.predict.main", plain["arch_kwargs"], (), "plans")
    check_plans_networks({"configurations": {"3d_cascade": {"inherits_from": "3d"}}}, "plans")  # no network: fine

    folder = edited_plans(good_model, tmp_path, network_class_name="collections.OrderedDict")
    assert main(["-m", str(folder)]) == 2
    assert_refused(2, capsys.readouterr().err, "nnUNetv2_mmssl_check_model", str(folder / "plans.json"),
                   "'collections.OrderedDict' is refused")
    shutil.rmtree(folder)
    folder = edited_plans(good_model, tmp_path, arch_kwargs={"nonlin": "this.s"})
    from nnunet_mmssl.inference.missing import MissingModalityPredictor

    predictor = MissingModalityPredictor(perform_everything_on_device=False, device=torch.device("cpu"))
    with pytest.raises(UnsafeModelError, match="nonlin 'this.s' is refused"):
        predictor.initialize_from_trained_model_folder(str(folder), [0], "checkpoint_final.pth")
    assert "this" not in sys.modules


# ------------------------------------------------------------------------------------------------------------------
# names are never paths
# ------------------------------------------------------------------------------------------------------------------


def test_each_head_refuses_a_channel_name_that_is_a_path(good_model, inputs, tmp_path, capsys):
    from nnunet_mmssl.cli.predict import main

    folder = tmp_path / "deep" / "er" / good_model.name
    shutil.copytree(good_model, folder)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["channel_names"]["1"] = "../../../ESCAPED"
    (folder / "dataset.json").write_text(json.dumps(dataset))
    out = tmp_path / "deep" / "er" / "out"
    code = main(["-i", str(inputs[0]), "-o", str(out), "-m", str(folder), "-f", "0", "-device", "cpu",
                 "--each-head"])
    assert_refused(code, capsys.readouterr().err, "nnUNetv2_mmssl_predict", str(folder / "dataset.json"),
                   "'../../../ESCAPED'", "channel name")
    assert not out.exists()
    assert not any("ESCAPED" in str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(UnsafeModelError, match="channel name '../../../ESCAPED'"):
        check_model_folder(str(folder))


def test_output_sub_folders_stay_inside(tmp_path):
    from nnunet_mmssl.cli.predict import head_folder_names, inside

    assert inside(str(tmp_path), "head_0_A") == str(tmp_path.resolve() / "head_0_A")
    for sub in ("../x", "a/../../x", "/etc"):
        with pytest.raises(ValueError, match="outside the output folder"):
            inside(str(tmp_path), sub)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError, match="outside the output folder"):
        inside(str(tmp_path), "link/x")
    assert head_folder_names([[0], [1]], {"0": "T1", "1": "FLAIR"}, "m") == ["head_0_T1", "head_1_FLAIR"]
    with pytest.raises(ValueError, match="T1/pre"):
        head_folder_names([[0], [1]], {"0": "T1/pre", "1": "FLAIR"}, "m")


# ------------------------------------------------------------------------------------------------------------------
# --modalities-from belongs to the model's dataset
# ------------------------------------------------------------------------------------------------------------------


def _unregistered_json(name: str, case_modality: dict) -> dict:
    return {"name": name, "channel_names": {"0": "CT+MR"},
            "mmssl": {"layout": "unregistered", "modalities": ["CT", "MR"], "case_modality": case_modality}}


def test_modalities_from_must_belong_to_the_models_dataset(tmp_path):
    from nnunet_mmssl.cli.predict import case_modalities

    model = _unregistered_json("RO", {"RO_000": "CT", "RO_001": "MR"})
    cases = {"RO_000": ["x_0000.nii.gz"], "RO_001": ["y_0000.nii.gz"]}
    own, split = tmp_path / "own.json", tmp_path / "mmssl_split.json"
    own.write_text(json.dumps(model))
    split.write_text(json.dumps(model["mmssl"]))
    for file in (own, split):
        assert case_modalities(cases, str(file), model, "M") == (["CT", "MR"], {"RO_000": "CT", "RO_001": "MR"})
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_unregistered_json("XY", {"RO_000": "CT", "RO_001": "MR"})))
    with pytest.raises(ValueError, match="belongs to dataset 'XY', but M was trained on 'RO'"):
        case_modalities(cases, str(other), model, "M")
    swapped = tmp_path / "swapped.json"  # same case ids, no name (an mmssl_split.json): modalities swapped
    swapped.write_text(json.dumps({"modalities": ["CT", "MR"], "case_modality": {"RO_000": "MR", "RO_001": "CT"}}))
    with pytest.raises(ValueError, match="records RO_000 as MR, but the model's dataset.json records it as CT"):
        case_modalities(cases, str(swapped), model, "M")
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps({"modalities": ["CT", "MR"], "case_modality": {"RO_000": "CT"}}))
    with pytest.raises(ValueError, match="does not record RO_001"):
        case_modalities({"RO_000": cases["RO_000"]}, str(fewer), model, "M")
    unsafe = tmp_path / "unsafe.json"
    unsafe.write_text(json.dumps({"modalities": ["../x"], "case_modality": {"RO_000": "../x"}}))
    with pytest.raises(ValueError, match="modality name '../x'"):
        case_modalities(cases, str(unsafe), model, "M")


@pytest.mark.slow
def test_nnunet_train_console_refuses_a_checkpoint_that_runs_code(good_model, tmp_path):
    """End to end: ``nnUNetv2_train 999 2d 0 -tr MemCifSSLTrainer --c`` and ``... -pretrained_weights FILE`` in child
    processes (both at once: CI's time budget): each gives one ``nnUNetv2_train: error:`` line naming the file and
    ``posix.system``, no traceback, no marker."""
    import trainer_harness
    from plans_fixtures import DATASET_JSON, PLANS

    folder, marker = hostile_copy(good_model, tmp_path)
    evil = folder / "fold_0" / "checkpoint_final.pth"
    root = tmp_path / "nnunet"
    trainer_harness.set_folders(str(root))
    pre = root / "preprocessed" / PLANS["dataset_name"]
    (pre / "nnUNetPlans.json").write_text(json.dumps(trainer_harness.plans()))
    (pre / "dataset.json").write_text(json.dumps(DATASET_JSON))
    results = root / "results" / PLANS["dataset_name"] / "MemCifSSLTrainer__nnUNetPlans__2d" / "fold_0"
    results.mkdir(parents=True)
    shutil.copy(evil, results / "checkpoint_final.pth")
    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_compile="false", nnUNet_n_proc_DA="0")
    env.pop("NNUNET_MMSSL_NO_EXT_TRAINER", None)
    train = ("import sys; from nnunetv2.run.run_training import run_training_entry as m; "
             "sys.argv[0] = 'nnUNetv2_train'; sys.exit(m())")
    command = [sys.executable, "-c", train, "999", "2d", "0", "-tr", "MemCifSSLTrainer", "-device", "cpu"]
    for result in run_consoles([command + ["--c"], command + ["-pretrained_weights", str(evil)]], env, ok=False):
        assert result.returncode != 0, result.args
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("nnUNetv2_train: error: ") and "posix.system" in last, result.stderr[-3000:]
        assert "checkpoint_final.pth: refused to open" in last
    assert not marker.exists()

"""Checkpoint resume of every trainer of ours: real save_checkpoint -> fresh trainer -> load_checkpoint.

Each trainer is built and initialised by nnU-Net's own code (tests/trainer_harness.py) and trained a few steps on
fixed batches with fixed seeds. The checkpoint is written and read by the trainers' own methods (nothing patched);
the resumed trainer must hold exactly the saved state (network, optimizer, teacher and its step, epoch, logs) and
its next steps must equal those of the run that was never interrupted.
"""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import phantom_workspace
import pytest
import torch
import trainer_harness as harness
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_mmssl.trainers import MeanTeacherTrainer, SMMLSSLTrainer, SMMLTrainer
from nnunet_mmssl.trainers.checkpoint_io import (
    CHECKPOINT_KEY,
    atomic_torch_save,
    check_plain_state,
    read_extra_state,
)


@pytest.fixture
def folders(tmp_path, monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(key, raising=False)  # restored after the test; set_folders sets them
    harness.set_folders(str(tmp_path))
    return tmp_path


def assert_same_tensors(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{what}: {key} differs"


def assert_same_optimizer(actual: dict, expected: dict) -> None:
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for key, value in expected["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(actual["state"][key][name]), torch.as_tensor(tensor)), (key, name)


def assert_same_training_state(actual: dict, expected: dict) -> None:
    assert_same_tensors(actual["network"], expected["network"], "network")
    assert_same_optimizer(actual["optimizer"], expected["optimizer"])
    assert actual["current_epoch"] == expected["current_epoch"]
    assert ("refiners" in actual) == ("refiners" in expected)
    if "refiners" in expected:
        assert_same_tensors(actual["refiners"], expected["refiners"], "refiners")
    assert ("teacher" in actual) == ("teacher" in expected)
    if "teacher" in expected:
        assert_same_tensors(actual["teacher"], expected["teacher"], "teacher")
        assert actual["ema_step"] == expected["ema_step"]


@pytest.mark.parametrize("trainer_class", harness.TRAINERS + [SMMLTrainer, SMMLSSLTrainer], ids=lambda c: c.__name__)
def test_save_load_round_trip_and_resumed_steps_equal_uninterrupted_run(folders, trainer_class):
    steps = harness.batches(harness.make_trainer(trainer_class, seed=9), seed=1, count=4)
    first = harness.make_trainer(trainer_class, seed=0)
    harness.run_steps(first, steps[:2], seed=100)
    first.logger.log("train_sup_losses", 0.5, 0)  # a logged value travels with nnU-Net's logging entry
    checkpoint_file = str(folders / "checkpoint_latest.pth")
    first.save_checkpoint(checkpoint_file)
    first.current_epoch += 1  # as nnU-Net's on_epoch_end after saving checkpoint_latest
    saved = harness.training_state(first)
    if trainer_class is MeanTeacherTrainer:
        assert saved["ema_step"] == 2
    harness.run_steps(first, steps[2:], seed=200)  # the run that is never interrupted: epoch 1
    uninterrupted = harness.training_state(first)

    resumed = harness.make_trainer(trainer_class, seed=1, initialize=False)  # another initialisation
    resumed.load_checkpoint(checkpoint_file)  # nnU-Net initialises, loads, and we restore our state
    assert_same_training_state(harness.training_state(resumed), saved)
    assert resumed.logger.get_value("train_sup_losses", step=None) == [0.5]
    harness.run_steps(resumed, steps[2:], seed=200)
    assert_same_training_state(harness.training_state(resumed), uninterrupted)


def test_our_checkpoint_is_nnunets_plus_our_entry_and_loads_with_weights_only(folders):
    trainer = harness.make_trainer(MeanTeacherTrainer, seed=0)
    harness.run_steps(trainer, harness.batches(trainer, seed=1, count=1), seed=3)
    trainer.logger.log("train_losses", np.float64(0.25), 0)  # nnU-Net logs numpy scalars
    ours, theirs = str(folders / "ours.pth"), str(folders / "theirs.pth")
    trainer.save_checkpoint(ours)
    nnUNetTrainer.save_checkpoint(trainer, theirs)
    mine = torch.load(ours, map_location="cpu", weights_only=False)
    reference = torch.load(theirs, map_location="cpu", weights_only=False)
    changed = "nnU-Net's checkpoint entries changed: update checkpoint_io.nnunet_checkpoint_entries"
    assert set(mine) == set(reference) | {CHECKPOINT_KEY}, changed
    assert_same_tensors(mine["network_weights"], reference["network_weights"], "network")
    assert_same_optimizer(mine["optimizer_state"], reference["optimizer_state"])
    for key in set(reference) - {"network_weights", "optimizer_state"}:
        assert mine[key] == reference[key], key
    assert set(mine[CHECKPOINT_KEY]) == {"teacher", "ema_step"} and mine[CHECKPOINT_KEY]["ema_step"] == 1

    whole = torch.load(ours, map_location="cpu", weights_only=True)  # no numpy allowance needed for our files
    assert type(whole["logging"]["train_losses"][0]) is float and whole["logging"]["train_losses"] == [0.25]
    state = read_extra_state(ours)
    assert read_extra_state(theirs) is None  # nnU-Net's own file, numpy log values: read, nothing of ours
    assert_same_tensors(state["teacher"], trainer.teacher.module.state_dict(), "teacher")
    assert not [name for name in os.listdir(folders) if name.endswith(".partial")]


class _Bank:
    def __init__(self):
        self.values = [1, 2]


def test_checkpoint_state_must_be_tensors_and_plain_containers():
    check_plain_state({"teacher": {"w": torch.ones(2)}, "ema_step": 3, "names": ["a", ("b", None)], "x": 0.5})
    with pytest.raises(TypeError, match=r"mmssl_state\['bank'\]\[1\] is a numpy.ndarray"):
        check_plain_state({"bank": [torch.ones(1), np.ones(2)]})
    with pytest.raises(TypeError, match=r"mmssl_state\['bank'\] is a .*_Bank.*weights_only=True"):
        check_plain_state({"bank": _Bank()})
    with pytest.raises(TypeError, match="key of type tuple"):
        check_plain_state({(1, 2): torch.ones(1)})


def test_save_refuses_non_plain_state_and_leaves_previous_file(folders):
    trainer = harness.make_trainer(MeanTeacherTrainer, seed=0)
    target = str(folders / "checkpoint_latest.pth")
    trainer.save_checkpoint(target)
    before = open(target, "rb").read()
    trainer.checkpoint_extra_state = lambda: {"bank": _Bank()}
    with pytest.raises(TypeError, match=r"mmssl_state\['bank'\]"):
        trainer.save_checkpoint(target)
    assert open(target, "rb").read() == before


def test_read_extra_state_refuses_arbitrary_objects(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"network_weights": {}, CHECKPOINT_KEY: {"bank": _Bank()}}, path)
    with pytest.raises(RuntimeError, match="evil.pth holds objects that torch.load\\(weights_only=True\\) refuses"):
        read_extra_state(path)
    torch.save({"network_weights": {}}, path)
    assert read_extra_state(path) is None


class _Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("killed half-way")


def test_atomic_save_keeps_the_previous_file_when_a_write_fails(tmp_path):
    target = str(tmp_path / "checkpoint_latest.pth")
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, target)
    with pytest.raises(pickle.PicklingError):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(1000), "x": _Unpicklable()}, target)
    assert torch.load(target, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint_latest.pth"]


KILL_TRAINER = textwrap.dedent('''
    import os

    import torch
    from nnunet_mmssl.trainers import MeanTeacherTrainer, SMMLSSLTrainer, SMMLTrainer


    class MeanTeacherTrainer_killtest(MeanTeacherTrainer):
        """Test-only: MMSSL_TEST_EPOCHS epochs of 2 steps, checkpoint_latest after every epoch, no final validation;
        after load_checkpoint the state it resumes from is written to MMSSL_TEST_DUMP."""

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = int(os.environ["MMSSL_TEST_EPOCHS"])
            self.num_iterations_per_epoch = 2
            self.num_val_iterations_per_epoch = 1
            self.save_every = 1

        def load_checkpoint(self, filename_or_checkpoint):
            super().load_checkpoint(filename_or_checkpoint)
            torch.save({"network": self.network_module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "teacher": self.teacher.module.state_dict(), "ema_step": self.teacher.step,
                        "current_epoch": self.current_epoch, "logging": self.logger.get_checkpoint()},
                       os.environ["MMSSL_TEST_DUMP"])

        def perform_actual_validation(self, save_probabilities=False):
            pass
''')


@pytest.fixture(scope="module")
def kill_workspace(tmp_path_factory, planned_phantom):
    """The session's converted and preprocessed phantom (tests/phantom_workspace.py), copied."""
    root = tmp_path_factory.mktemp("kill")
    (root / "user_trainers").mkdir()
    (root / "user_trainers" / "kill_trainers.py").write_text(KILL_TRAINER)
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_extTrainer=str(root / "user_trainers"),
               nnUNet_def_n_proc="2", nnUNet_n_proc_DA="0", nnUNet_compile="false",
               PATH=os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]))
    phantom_workspace.copy_into(planned_phantom, root)
    return root, env


@pytest.mark.slow
def test_sigkill_then_resume_with_c_restores_every_piece_of_state(kill_workspace):
    root, env = kill_workspace
    fold = root / "results" / phantom_workspace.DATASET / "MeanTeacherTrainer_killtest__nnUNetPlans__2d" / "fold_0"
    command = ["nnUNetv2_train", str(phantom_workspace.DATASET_ID), "2d", "0", "-tr", "MeanTeacherTrainer_killtest",
               "-device", "cpu"]
    process = subprocess.Popen(command, env={**env, "MMSSL_TEST_EPOCHS": "1000"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (fold / "checkpoint_latest.pth").is_file():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint_latest.pth after 10 minutes"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    # whatever epoch the kill hit, checkpoint_latest is complete (written under a temporary name, then renamed)
    saved = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    epoch = saved["current_epoch"]
    assert epoch >= 1 and saved[CHECKPOINT_KEY]["ema_step"] == 2 * epoch  # 2 optimizer steps per epoch

    dump = root / "resumed_state.pth"
    result = subprocess.run(command + ["--c"], env={**env, "MMSSL_TEST_EPOCHS": str(epoch + 2),
                                                    "MMSSL_TEST_DUMP": str(dump)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(dump, map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == epoch
    assert_same_tensors(resumed["network"], saved["network_weights"], "network")
    assert_same_optimizer(resumed["optimizer"], saved["optimizer_state"])
    assert_same_tensors(resumed["teacher"], saved[CHECKPOINT_KEY]["teacher"], "teacher")
    assert resumed["ema_step"] == saved[CHECKPOINT_KEY]["ema_step"]
    assert resumed["logging"] == saved["logging"]
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == epoch + 2 and final[CHECKPOINT_KEY]["ema_step"] == 2 * (epoch + 2)
    assert len(final["logging"]["train_unsup_losses"]) == epoch + 2
    # Mean Teacher through nnUNetv2_train: a real unsupervised term every epoch, a teacher of its own (moved by EMA)
    assert all(v > 0 for v in final["logging"]["train_unsup_losses"])
    teacher = final[CHECKPOINT_KEY]["teacher"]
    assert teacher.keys() == final["network_weights"].keys()
    assert any(not torch.equal(teacher[k], final["network_weights"][k]) for k in teacher)
    assert not (fold / "checkpoint_latest.pth").exists()

"""The study's self-training arm (``nnUNetv2_mmssl_study --selftrain``): pseudo-labels by hand, the jobs, the data
folder a real (untrained) nnU-Net teacher writes, and the student that reads it."""

import copy
import importlib.util
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from plans_fixtures import DATASET_JSON
from trainer_harness import plans as tiny_plans
from trainer_harness import set_folders

from nnunet_mmssl.study.runner import StudyJob, plan_jobs, write_study_trainers
from nnunet_mmssl.study.selftrain_arm import (
    build_data_folder,
    class_locations,
    manifest_path,
    pseudo_label,
    read_manifest,
)
from nnunet_mmssl.study.splits import RunSplit


# ---------------------------------------------------------------------------------------------- pseudo-labels
def test_pseudo_label_softmax_by_hand():
    labels = LabelManager({"background": 0, "tumour": 1}, regions_class_order=None)
    # three voxels: confident background, confident tumour, a coin toss; a fourth outside the nonzero region
    p1 = np.array([0.02, 0.97, 0.55, 0.99], dtype=np.float32)
    probabilities = np.stack([1 - p1, p1])[:, None, None, :]  # (C, 1, 1, 4)
    # normalised binary entropy: h(0.02)/log2 = 0.141, h(0.97) = 0.194, h(0.55) = 0.993
    h = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2) for p in (0.02, 0.97, 0.55)]
    assert h[0] < 0.2 and h[1] < 0.2 and h[2] > 0.99
    outside = np.array([False, False, False, True])[None, None, :]
    out = pseudo_label(probabilities, labels, threshold=0.5, ignore_label=2, outside=outside)
    assert out.shape == (1, 1, 1, 4) and out.dtype == np.int16
    assert out.ravel().tolist() == [0, 1, 2, -1]
    # a threshold between the two confident voxels' entropies ignores the less confident one (0.97) too
    assert pseudo_label(probabilities, labels, 0.17, 2).ravel().tolist() == [0, 2, 2, 1]
    assert pseudo_label(probabilities, labels, 1.0, 2).ravel().tolist() == [0, 1, 1, 1]  # 1 ignores nothing


def test_pseudo_label_regions_use_sigmoid_entropy_and_nnunets_region_order():
    # BraTS-like nested regions: whole = {1, 2}, core = {2}; labels written in regions_class_order [1, 2]
    labels = LabelManager({"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2])
    whole = np.array([0.9, 0.9, 0.1, 0.6], dtype=np.float32)
    core = np.array([0.1, 0.95, 0.05, 0.6], dtype=np.float32)
    probabilities = np.stack([whole, core])[:, None, None, :]

    def h(p):
        return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)

    mean_h = [(h(a) + h(b)) / 2 for a, b in zip(whole, core)]
    assert mean_h[0] < 0.5 and mean_h[1] < 0.5 and mean_h[2] < 0.5 and mean_h[3] > 0.9
    out = pseudo_label(probabilities, labels, threshold=0.5, ignore_label=3).ravel().tolist()
    assert out == [1, 2, 0, 3]
    # the threshold decides by the mean of the regions' entropies: 0.45 lies between voxel 0's (0.469) and voxel 1's
    assert mean_h[1] < 0.45 < mean_h[0]
    assert pseudo_label(probabilities, labels, 0.45, 3).ravel().tolist() == [3, 2, 0, 3]


def test_class_locations_add_the_annotated_key_nnunets_loader_samples_from():
    labels = LabelManager({"background": 0, "tumour": 1, "ignore": 2}, regions_class_order=None)
    seg = np.zeros((1, 1, 4, 4), dtype=np.int16)
    seg[0, 0, 0, :2] = 1
    seg[0, 0, 1, :] = 2  # ignored
    seg[0, 0, 3, 3] = -1  # outside
    locations = class_locations(seg, labels)
    assert set(locations) == {1, (-1, 0, 1)}
    assert sorted(map(tuple, locations[1][:, 1:].tolist())) == [(0, 0, 0), (0, 0, 1)]
    annotated = {tuple(r) for r in locations[(-1, 0, 1)][:, 1:].tolist()}
    assert not annotated & {(0, 1, k) for k in range(4)}  # never an ignored voxel
    assert (0, 0, 0) in annotated and (0, 3, 3) in annotated  # labelled and outside (-1) voxels are annotated


# ---------------------------------------------------------------------------------------------- jobs
def _run(name_seed=0, fold=0):
    return RunSplit(1, name_seed, ("a",), ("b",), ("b", "u1"), ("c",), fold, 2)


def test_selftrain_jobs_follow_their_teacher_and_are_named_plus_st():
    runs = [_run(0, 0), _run(0, 1)]
    folds = {r.name: k + 5 for k, r in enumerate(runs)}
    jobs = plan_jobs(runs, ["nnUNetTrainer", "MeanTeacherTrainer"], folds, {"MeanTeacherTrainer": "nnUNetTrainer"},
                     ("scratch", "supervised"), selftrain=["nnUNetTrainer"], finetune=["MeanTeacherTrainer"])
    names = [(j.label, j.fold) for j in jobs]
    assert names == [("nnUNetTrainer", 5), ("MeanTeacherTrainer", 5), ("MeanTeacherTrainer+ft", 5),
                     ("nnUNetTrainer+st", 5), ("nnUNetTrainer", 6), ("MeanTeacherTrainer", 6),
                     ("MeanTeacherTrainer+ft", 6), ("nnUNetTrainer+st", 6)]
    student = jobs[3]
    assert student.trainer_class == "nnUNetTrainer__study_st" and student.init == "selftrain"
    assert student.twin_job == StudyJob("nnUNetTrainer", runs[0], 5)  # the teacher: the same fold's scratch run
    # --init supervised alone: the teacher of a fine-tuned-and-self-trained trainer still trains from scratch
    only = plan_jobs(runs[:1], ["nnUNetTrainer", "MeanTeacherTrainer"], folds, {"MeanTeacherTrainer": "nnUNetTrainer"},
                     ("supervised",), selftrain=["MeanTeacherTrainer"])
    assert [j.label for j in only] == ["nnUNetTrainer", "MeanTeacherTrainer", "MeanTeacherTrainer+ft",
                                       "MeanTeacherTrainer+st"]


def test_finetune_restricts_the_fine_tuned_trainers_and_bad_options_are_refused():
    runs = [_run()]
    folds = {runs[0].name: 3}
    pairs = {"MeanTeacherTrainer": "nnUNetTrainer", "MMFMCMLTrainer": "nnUNetTrainer"}
    trainers = ["nnUNetTrainer", "MeanTeacherTrainer", "MMFMCMLTrainer"]
    all_ft = plan_jobs(runs, trainers, folds, pairs, ("supervised",))
    assert [j.label for j in all_ft] == ["nnUNetTrainer", "MeanTeacherTrainer+ft", "MMFMCMLTrainer+ft"]
    some = plan_jobs(runs, trainers, folds, pairs, ("supervised",), finetune=["MMFMCMLTrainer"])
    assert [j.label for j in some] == ["nnUNetTrainer", "MeanTeacherTrainer", "MMFMCMLTrainer+ft"]
    with pytest.raises(ValueError, match="--selftrain PlainSupervisedTrainer: not among the trainers"):
        plan_jobs(runs, trainers, folds, pairs, selftrain=["PlainSupervisedTrainer"])
    with pytest.raises(ValueError, match="add --init supervised"):
        plan_jobs(runs, trainers, folds, pairs, ("scratch",), finetune=["MMFMCMLTrainer"])
    with pytest.raises(ValueError, match="--finetune nnUNetTrainer: has no supervised twin"):
        plan_jobs(runs, trainers, folds, pairs, ("supervised",), finetune=["nnUNetTrainer"])
    with pytest.raises(ValueError, match="'selftrain' with one"):
        StudyJob("nnUNetTrainer", runs[0], 3, "selftrain")


# ---------------------------------------------------------------------------------------------- data folder
def _save(folder, case, data, seg, spacing=(1.0, 1.0, 1.0)):
    properties = {"spacing": list(spacing), "shape_before_cropping": data.shape[1:],
                  "bbox_used_for_cropping": [[0, s] for s in data.shape[1:]],
                  "shape_after_cropping_and_before_resampling": data.shape[1:], "class_locations": {}}
    nnUNetDatasetBlosc2.save_case(data.astype(np.float32), seg.astype(np.int16), properties,
                                  os.path.join(folder, case), chunks=data.shape, blocks=data.shape,
                                  chunks_seg=seg.shape, blocks_seg=seg.shape)


@pytest.fixture
def study_like_folders(tmp_path):
    """A tiny preprocessed dataset (2 labelled cases), the study's unlabelled folder (3 cases) and an untrained
    nnUNetTrainer teacher's model folder, all on the 2d tiny plans of plans_fixtures."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    set_folders(str(tmp_path))
    plans = tiny_plans()
    name = plans["dataset_name"]
    preprocessed = os.path.join(tmp_path, "preprocessed", name)
    data_folder = os.path.join(preprocessed, plans["configurations"]["2d"]["data_identifier"])
    os.remove(os.path.join(data_folder, "case_0000.b2nd"))
    unlabelled = data_folder + "_unlabeled_study"
    os.makedirs(unlabelled)
    rng = np.random.default_rng(0)
    shape = (2, 2, 40, 36)
    for case in ("lab_0", "lab_1"):
        seg = (rng.random((1, *shape[1:])) > 0.7).astype(np.int16)
        _save(data_folder, case, rng.normal(size=shape), seg)
    for k, case in enumerate(("lab_1x", "unl_0", "unl_1")):
        seg = np.zeros((1, *shape[1:]), dtype=np.int16)
        seg[..., : 3 + k] = -1  # a strip outside the nonzero region
        _save(unlabelled, case, rng.normal(size=shape) + k, seg)
    with open(os.path.join(preprocessed, "dataset.json"), "w") as handle:
        json.dump(DATASET_JSON, handle)
    with open(os.path.join(preprocessed, "nnUNetPlans.json"), "w") as handle:
        json.dump(plans, handle)
    torch.manual_seed(0)
    teacher = nnUNetTrainer(plans, "2d", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    teacher.print_to_log_file = lambda *args, **kwargs: None
    teacher.initialize()
    fold_folder = os.path.join(tmp_path, "teacher", "nnUNetTrainer__nnUNetPlans__2d", "fold_0")
    os.makedirs(fold_folder)
    teacher.save_checkpoint(os.path.join(fold_folder, "checkpoint_final.pth"))
    for file, content in (("plans.json", plans), ("dataset.json", DATASET_JSON)):
        with open(os.path.join(os.path.dirname(fold_folder), file), "w") as handle:
            json.dump(content, handle)
    return {"data": data_folder, "unlabelled": unlabelled, "teacher": fold_folder, "network": teacher.network,
            "root": str(tmp_path), "plans": plans}


def test_teacher_pseudo_labels_the_runs_unlabelled_stream_into_a_data_folder(study_like_folders):
    f = study_like_folders
    final = os.path.join(f["root"], "study", "selftrain", "nnUNetTrainer", "fold_0")
    manifest = build_data_folder(final, f["teacher"], ["lab_0"], ["lab_1x", "unl_1"], f["data"], f["unlabelled"],
                                 threshold=0.5, progress=lambda m: None)
    assert read_manifest(final) == manifest and manifest["ignore_label"] == 2
    assert manifest["labelled_cases"] == ["lab_0"] and manifest["pseudo_labelled_cases"] == ["lab_1x", "unl_1"]
    names = sorted(os.listdir(final))
    assert names == sorted(["lab_0.b2nd", "lab_0_seg.b2nd", "lab_0.pkl", "lab_1x.b2nd", "lab_1x_seg.b2nd",
                            "lab_1x.pkl", "unl_1.b2nd", "unl_1_seg.b2nd", "unl_1.pkl"])
    assert os.path.islink(os.path.join(final, "lab_0_seg.b2nd"))  # the labelled case's label, untouched
    assert not any(n.startswith("unl_0") or n.startswith("lab_1.") for n in names)  # only the run's cases
    # the pseudo-label is what nnU-Net's sliding window of the teacher's network gives on the preprocessed image
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(os.path.dirname(f["teacher"]), (0,), "checkpoint_final.pth")
    dataset = nnUNetDatasetBlosc2(final, ["lab_1x", "unl_1"])
    source = nnUNetDatasetBlosc2(f["unlabelled"], ["unl_1"])
    data, seg, _, properties = dataset.load_case("unl_1")
    source_data, source_seg, _, _ = source.load_case("unl_1")
    np.testing.assert_array_equal(np.asarray(data), np.asarray(source_data))
    with torch.no_grad():
        logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(source_data)))
    probabilities = torch.softmax(logits.float(), 0).numpy()
    expected = pseudo_label(probabilities, predictor.label_manager, 0.5, 2, np.asarray(source_seg)[0] < 0)
    np.testing.assert_array_equal(np.asarray(seg), expected)
    assert (np.asarray(seg)[..., :4] == -1).all()  # outside the nonzero region, as nnU-Net writes it
    assert set(np.unique(np.asarray(seg))) <= {-1, 0, 1, 2}
    assert (-1, 0, 1) in properties["class_locations"]
    with open(os.path.join(final, "lab_0.pkl"), "rb") as handle:
        assert (-1, 0, 1) in pickle.load(handle)["class_locations"]
    # the same call again does nothing; another threshold rewrites the folder
    stamp = os.stat(manifest_path(final)).st_mtime_ns
    build_data_folder(final, f["teacher"], ["lab_0"], ["unl_1", "lab_1x"], f["data"], f["unlabelled"], 0.5,
                      progress=lambda m: None)
    assert os.stat(manifest_path(final)).st_mtime_ns == stamp
    again = build_data_folder(final, f["teacher"], ["lab_0"], ["lab_1x", "unl_1"], f["data"], f["unlabelled"], 1.0,
                              progress=lambda m: None)
    assert again["threshold"] == 1.0 and all(r["ignored_fraction"] == 0 for r in again["pseudo_labels"].values())
    assert not [n for n in os.listdir(os.path.dirname(final)) if n.startswith(".")]  # nothing half-written left


def test_bad_teacher_or_cases_leave_nothing_behind(study_like_folders):
    f = study_like_folders
    final = os.path.join(f["root"], "st", "fold_0")
    with pytest.raises(ValueError, match="lacks the unlabelled case"):
        build_data_folder(final, f["teacher"], ["lab_0"], ["nope"], f["data"], f["unlabelled"], 0.5)
    with pytest.raises(ValueError, match=r"fold_7/checkpoint_final.pth not found"):
        build_data_folder(final, os.path.join(os.path.dirname(f["teacher"]), "fold_7"), ["lab_0"], ["unl_0"],
                          f["data"], f["unlabelled"], 0.5)
    with pytest.raises(ValueError, match="use a value in"):
        build_data_folder(final, f["teacher"], ["lab_0"], ["unl_0"], f["data"], f["unlabelled"], 1.5)
    parent = os.path.dirname(final)
    assert not os.path.exists(final) and (not os.path.exists(parent) or not os.listdir(parent))


def test_student_trains_on_labelled_plus_pseudo_labelled_cases_with_the_ignore_label(study_like_folders, tmp_path):
    f = study_like_folders
    selftrain_root = os.path.join(f["root"], "study", "selftrain")
    build_data_folder(os.path.join(selftrain_root, "nnUNetTrainer", "fold_0"), f["teacher"], ["lab_0"],
                      ["lab_1x", "unl_1"], f["data"], f["unlabelled"], 0.5, progress=lambda m: None)
    with open(os.path.join(os.path.dirname(f["data"]), "splits_final.json"), "w") as handle:
        json.dump([{"train": ["lab_0"], "val": ["lab_0"]}], handle)
    module = write_study_trainers(str(tmp_path / "ext"), ["nnUNetTrainer"], 1, 2, 1, "unused", {"0": []},
                                  self_trained=["nnUNetTrainer"], selftrain_root=selftrain_root)
    spec = importlib.util.spec_from_file_location("mmssl_study_trainers_test", module)
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    student_class = generated.nnUNetTrainer__study_st
    assert student_class.__name__ == "nnUNetTrainer__study_st"
    student = student_class(tiny_plans(), "2d", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    student.print_to_log_file = lambda *args, **kwargs: None
    assert student.label_manager.ignore_label == 2 and student.dataset_json["labels"]["ignore"] == 2
    assert "ignore" not in DATASET_JSON["labels"]  # the dataset's own labels are not modified
    assert student.preprocessed_dataset_folder == os.path.join(selftrain_root, "nnUNetTrainer", "fold_0")
    train, validation = student.do_split()
    assert train == ["lab_0", "lab_1x", "unl_1"] and validation == ["lab_0"]
    assert (student.num_epochs, student.num_iterations_per_epoch) == (1, 2)  # the study's budget
    student.initialize()
    loader, _ = student.get_dataloaders()
    batch = next(loader)
    target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    assert set(torch.unique(target).tolist()) <= {0, 1, 2}
    loss = student.train_step(batch)["loss"]
    assert np.isfinite(loss)
    output = student.network(batch["data"])
    assert (output[0] if isinstance(output, (list, tuple)) else output).shape[1] == 2  # no head for the ignore label


def test_console_refuses_bad_selftrain_and_finetune_options_in_one_line(tmp_path, monkeypatch, capsys):
    from nnunet_mmssl.cli.study import main

    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    base = ["-d", "1", "--labeled", "1", "-o", str(tmp_path / "out"), "-tr", "nnUNetTrainer", "MeanTeacherTrainer",
            "--pair", "MeanTeacherTrainer=nnUNetTrainer"]
    for extra, message in ((["--selftrain", "MMFMCMLTrainer"], "--selftrain MMFMCMLTrainer: not among the trainers"),
                           (["--selftrain", "nnUNetTrainer", "--selftrain-threshold", "2"],
                            "--selftrain-threshold 2.0: the normalised entropy is in [0, 1]"),
                           (["--finetune", "MeanTeacherTrainer"], "add --init supervised"),
                           (["--init", "supervised", "--finetune", "nnUNetTrainer"], "has no supervised twin")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_report_only_reads_the_finished_runs_and_the_selftrained_runner_waits_for_its_teacher(tmp_path, monkeypatch):
    import nnunet_mmssl.study.runner as runner_module
    from nnunet_mmssl.study.runner import StudyContext, StudyRunner, finished_results, run_state

    context = StudyContext(dataset_name="Dataset999_X", raw_folder=str(tmp_path / "raw"), configuration="2d",
                           plans="nnUNetPlans", device="cpu", output=str(tmp_path / "study"),
                           env={"nnUNet_results": str(tmp_path / "results")}, test_images="", test_labels="")
    split = _run()
    teacher, student = StudyJob("nnUNetTrainer", split, 5), StudyJob("nnUNetTrainer", split, 5, "selftrain",
                                                                     "nnUNetTrainer")
    assert context.model_folder(student).endswith(os.path.join("nnUNetTrainer__study_st__nnUNetPlans__2d", "fold_5"))
    assert context.selftrain_folder(student) == str(tmp_path / "study" / "selftrain" / "nnUNetTrainer" / "fold_5")
    assert context.result_file(student).endswith(os.path.join("runs", "nnUNetTrainer+st", split.name + ".json"))
    for job, dice in ((teacher, 0.25),):
        os.makedirs(context.model_folder(job))
        open(os.path.join(context.model_folder(job), "checkpoint_final.pth"), "w").close()
        os.makedirs(os.path.dirname(context.result_file(job)))
        with open(context.result_file(job), "w") as handle:
            json.dump({"trainer": job.label, "mean": {"dice": dice}, "seconds": 1.0, "training": None}, handle)
    assert [run_state(context, j) for j in (teacher, student)] == ["done", "todo"]
    assert [r["mean"] for r in finished_results(context, [student, teacher])] == [{"dice": 0.25}]
    assert not os.path.exists(context.model_folder(student))  # nothing written
    os.remove(os.path.join(context.model_folder(teacher), "checkpoint_final.pth"))  # archived without checkpoints
    assert run_state(context, teacher) == "todo"
    assert [r["mean"] for r in finished_results(context, [student, teacher])] == [{"dice": 0.25}]
    open(os.path.join(context.model_folder(teacher), "checkpoint_final.pth"), "w").close()

    calls = []

    class Runner(StudyRunner):
        def pseudo_label(self, job):
            calls.append(("pseudo_label", job.label, job.twin_job.label))

        def predict(self, job):
            return "unused"

        def evaluate(self, job, prediction_folder):
            return {"metric_per_case": [{"case": "c", "metrics": {"1": {"dice": 0.5}}}]}

        def signals(self, job):
            return None

    def fake_nnunet_train(cmd, env, log_file, prefix="    "):  # nnUNetv2_train's subprocess: leaves a final model
        calls.append(("nnUNetv2_train", cmd[cmd.index("-tr") + 1], cmd[-1]))
        folder = context.model_folder(student)
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "checkpoint_final.pth"), "w").close()

    monkeypatch.setattr(runner_module, "_run", fake_nnunet_train)
    results = Runner(context, progress=lambda m: None).run_all([teacher, student])
    assert calls == [("pseudo_label", "nnUNetTrainer+st", "nnUNetTrainer"),
                     ("nnUNetv2_train", "nnUNetTrainer__study_st", "--c")]
    assert results[1]["init"] == "selftrain" and results[1]["teacher"] == "nnUNetTrainer"
    assert results[1]["trainer"] == "nnUNetTrainer+st"


def test_runner_hands_build_data_folder_the_runs_cases_in_a_pinned_subprocess(tmp_path, monkeypatch):
    import inspect
    import sys

    import nnunet_mmssl.study.runner as runner_module
    from nnunet_mmssl.study.runner import StudyContext, StudyRunner

    context = StudyContext(dataset_name="Dataset999_X", raw_folder="", configuration="2d", plans="nnUNetPlans",
                           device="cpu", output=str(tmp_path / "study"), env={"nnUNet_results": str(tmp_path / "r")},
                           test_images="", test_labels="", preprocessed_data_folder="/pre/data",
                           unlabeled_study_folder="/pre/unl", selftrain_threshold=0.3)
    split = _run()
    student = StudyJob("nnUNetTrainer", split, 5, "selftrain", "nnUNetTrainer")
    runner = StudyRunner(context, progress=lambda m: None)
    with pytest.raises(RuntimeError, match="the teacher's run must train first"):
        runner.pseudo_label(student)
    teacher_folder = context.model_folder(student.twin_job)
    os.makedirs(teacher_folder)
    open(os.path.join(teacher_folder, "checkpoint_final.pth"), "w").close()
    commands = []
    monkeypatch.setattr(runner_module, "_run", lambda cmd, env, log, prefix="": commands.append((cmd, log)))
    runner._local.cores = (1,)
    runner.pseudo_label(student)
    (cmd, log), = commands
    assert cmd[0] == sys.executable and "os.sched_setaffinity(0, [1])" in cmd[2]  # on the worker's core
    spec = json.loads(cmd[-1])
    inspect.signature(build_data_folder).bind(**spec)  # every key is an argument of the function the child calls
    assert spec == {"final": context.selftrain_folder(student), "teacher_fold_folder": teacher_folder,
                    "labelled": ["a"], "pseudo": ["b", "u1"], "preprocessed_folder": "/pre/data",
                    "unlabeled_folder": "/pre/unl", "threshold": 0.3, "device": "cpu"}
    assert "c" not in spec["pseudo"] + spec["labelled"]  # the run's test case is never pseudo-labelled
    assert log.endswith("pseudolabel_nnUNetTrainer+st_" + split.name + ".log")

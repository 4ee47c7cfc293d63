"""nnUNetv2_mmssl_study --cv K (test set rotated over the labelled pool) and --init supervised (SSL fine-tuned from
its supervised twin): splits, split file, intervals over all test cases, job order and command lines, resume, bad
values (fast); one warm-start study through nnU-Net's real commands (slow)."""

import importlib.util
import json
import os
import threading
import time

import numpy as np
import pytest
import torch

import nnunet_mmssl.study.runner as runner_module
from nnunet_mmssl.study.report import paired_differences, summary_table, write_report
from nnunet_mmssl.study.runner import (
    StudyContext,
    StudyJob,
    StudyRunner,
    plan_jobs,
    run_state,
    write_study_trainers,
)
from nnunet_mmssl.study.splits import TEST_KEY, RunSplit, assign_folds, plan_cv_runs, plan_runs

POOL = [f"case_{k:03d}" for k in range(10)]
UNLABELED = ["unl_000", "unl_001"]
MT, SUP = "MeanTeacherTrainer", "PlainSupervisedTrainer"


# ---------------------------------------------------------------------------------------------- splits
def test_cv_folds_test_every_pool_case_once_per_seed_and_hide_it_from_training():
    runs = plan_cv_runs(POOL, UNLABELED, [1, 3], [0, 1], 3)
    assert len(runs) == 2 * 3 * 2
    for seed in (0, 1):
        mine = [r for r in runs if r.seed == seed]
        tests = {r.cv_fold: r.test for r in mine}
        assert sorted(tests) == [0, 1, 2] and all(r.cv_folds == 3 for r in mine)
        assert sorted(c for test in tests.values() for c in test) == POOL  # disjoint and covering: once each
        assert sorted(len(test) for test in tests.values()) == [3, 3, 4]
        for run in mine:
            assert len(run.labeled) == run.size
            assert not set(run.test) & (set(run.labeled) | set(run.hidden) | set(run.unlabeled))
            assert set(run.labeled) | set(run.hidden) | set(run.test) == set(POOL)  # labelled from the other folds
            assert run.unlabeled == tuple(sorted(UNLABELED + list(run.hidden)))
        for fold in range(3):
            one, three = (next(r for r in mine if (r.cv_fold, r.size) == (fold, s)) for s in (1, 3))
            assert set(one.labeled) < set(three.labeled) and one.test == three.test  # nested within seed and fold
    assert plan_cv_runs(POOL[::-1], UNLABELED, [3, 1], [0, 1], 3) == runs  # deterministic, input order irrelevant
    assert {r.test for r in runs if r.seed == 0} != {r.test for r in runs if r.seed == 1}
    names = [r.name for r in runs]
    assert len(set(names)) == len(names) and "n3_seed1_cv2of3" in names
    assert plan_runs(POOL, [], ["t"], [1], [0])[0].name == "n1_seed0"  # the fixed test set's names unchanged


def test_cv_sizes_are_bounded_by_the_cases_outside_the_largest_fold():
    assert max(len(r.labeled) for r in plan_cv_runs(POOL, [], [6], [0], 3)) == 6  # 10 - 4
    with pytest.raises(ValueError, match="may label at most 6"):
        plan_cv_runs(POOL, [], [7], [0], 3)
    with pytest.raises(ValueError, match="both in the labelled pool and the unlabelled cases"):
        plan_cv_runs(POOL, ["case_001"], [1], [0], 2)


def test_cv_split_entries_hold_no_test_case_and_differ_by_test_set():
    runs = plan_cv_runs(POOL, UNLABELED, [1, 3], [0], 3)
    user = [{"train": list(runs[0].labeled), "val": list(runs[0].labeled)}]  # same labels, no test set: not reused
    splits, folds = assign_folds(user, runs)
    for run in runs:
        entry = splits[folds[run.name]]
        assert entry["train"] == entry["val"] == list(run.labeled) and entry[TEST_KEY] == list(run.test)
    assert 0 not in folds.values() and len(set(folds.values())) == len(runs)
    assert assign_folds(splits, runs) == (splits, folds)  # a rerun finds the same folds
    # two runs labelling the same case, tested on different cases, have different unlabelled streams: two folds
    a = RunSplit(1, 0, ("case_000",), ("case_002",), ("case_002",), ("case_001",), 0, 2)
    b = RunSplit(1, 1, ("case_000",), ("case_001",), ("case_001",), ("case_002",), 1, 2)
    _, two = assign_folds([], [a, b])
    assert two[a.name] != two[b.name]


# ---------------------------------------------------------------------------------------------- report
def _result(trainer, seed, fold, dice):
    per_case = {c: {"dice": d, "hd95": 1.0, "sensitivity": d} for c, d in dice.items()}
    mean = {m: float(np.mean([v[m] for v in per_case.values()])) for m in ("dice", "hd95", "sensitivity")}
    return {"trainer": trainer, "size": 1, "seed": seed, "cv_fold": fold, "per_case": per_case, "mean": mean}


def test_table_and_intervals_pool_the_test_cases_of_all_folds():
    # seed 0: fold 0 tests a, b, c; fold 1 tests d. SSL - Sup: 0 on fold 0's cases, 0.4 on d
    sup = [_result("Sup", 0, 0, {"a": 0.2, "b": 0.4, "c": 0.6}), _result("Sup", 0, 1, {"d": 0.2})]
    ssl = [_result("SSL", 0, 0, {"a": 0.2, "b": 0.4, "c": 0.6}), _result("SSL", 0, 1, {"d": 0.6})]
    rows = {r["trainer"]: r for r in summary_table(sup + ssl)}
    assert rows["Sup"]["dice"]["mean"] == pytest.approx(1.4 / 4)  # over the 4 cases, not the fold means' 0.3
    assert rows["SSL"]["dice"]["mean"] == pytest.approx(1.8 / 4) and rows["SSL"]["dice"]["std"] == 0  # one seed
    assert (rows["SSL"]["n_test_cases"], rows["SSL"]["n_runs"], rows["SSL"]["seeds"]) == (4, 2, [0])
    d = next(x for x in paired_differences(sup + ssl, {"SSL": "Sup"}, 2000) if x["metric"] == "dice")
    assert (d["n_pairs"], d["n_rows"], d["n_cols"]) == (4, 1, 4)
    # resampling the 4 cases' differences (0, 0, 0, 0.4): the mean is 0.1 k for k draws of d ~ Binomial(4, 1/4):
    # P(k = 0) = 32 % (so the 2.5 % quantile is 0), P(k <= 2) = 94.9 % < 97.5 % < P(k <= 3) = 99.6 % (so 0.3)
    assert d["mean_difference"] == pytest.approx(0.1)
    assert d["low"] == pytest.approx(0.0) and d["high"] == pytest.approx(0.3)
    # a second seed adds its own cases' pairs (rows = seeds)
    more = [_result("Sup", 1, 0, {"a": 0.5, "d": 0.5}), _result("Sup", 1, 1, {"b": 0.5, "c": 0.5}),
            _result("SSL", 1, 0, {"a": 0.5, "d": 0.5}), _result("SSL", 1, 1, {"b": 0.5, "c": 0.5})]
    d2 = next(x for x in paired_differences(sup + ssl + more, [("SSL", "Sup")], 500) if x["metric"] == "dice")
    assert (d2["n_pairs"], d2["n_rows"], d2["n_cols"]) == (8, 2, 4) and d2["mean_difference"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="test case a is in two runs"):
        summary_table(sup + [_result("Sup", 0, 2, {"a": 0.1})])


def test_table_text_shows_the_number_of_test_cases(tmp_path):
    results = [_result("Sup", 0, 0, {"a": 0.2, "b": 0.4, "c": 0.6}), _result("Sup", 0, 1, {"d": 0.2})]
    text = write_report(str(tmp_path), results, {}, {}, n_resamples=100)["table_text"]
    header, _, line = text.splitlines()[:3]
    assert "test cases" in header
    assert line.split()[:4] == ["Sup", "1", "1", "4"]  # trainer, labelled, seeds, test cases


# ---------------------------------------------------------------------------------------------- jobs and commands
def _context(tmp_path):
    return StudyContext(dataset_name="Dataset999_X", raw_folder=str(tmp_path / "raw"), configuration="2d",
                        plans="nnUNetPlans", device="cpu", output=str(tmp_path / "study"),
                        env={"nnUNet_results": str(tmp_path / "results")}, test_images="/ts/images",
                        test_labels="/ts/labels")


def _runs_and_folds():
    runs = plan_cv_runs(POOL[:6], [], [1, 2], [0], 2)
    return runs, assign_folds([], runs)[1]


def test_init_supervised_puts_the_twin_first_and_fixed_mode_jobs_are_unchanged():
    runs, folds = _runs_and_folds()
    pairs = {MT: SUP}
    jobs = plan_jobs(runs, [MT, SUP], folds, pairs, ["scratch", "supervised"])
    assert [j.name for j in jobs[:3]] == [f"{MT}/n1_seed0_cv0of2", f"{SUP}/n1_seed0_cv0of2",
                                          f"{MT}+ft/n1_seed0_cv0of2"]
    assert len(jobs) == 3 * len(runs)
    for k, job in enumerate(jobs):
        if job.init == "supervised":
            twin = jobs.index(job.twin_job)
            assert twin < k and (jobs[twin].trainer, jobs[twin].split, jobs[twin].fold) == (SUP, job.split, job.fold)
    only = plan_jobs(runs, [MT, SUP], folds, pairs, ["supervised"])
    assert [j.label for j in only[:2]] == [SUP, f"{MT}+ft"] and len(only) == 2 * len(runs)
    # the fixed test set: the jobs the study always made (trainers in order per (size, seed))
    fixed = plan_runs(POOL, [], ["t"], [2, 1], [1, 0])
    fixed_folds = assign_folds([], fixed)[1]
    old = [StudyJob(t, r, fixed_folds[r.name]) for r in sorted(fixed, key=lambda r: (r.size, r.seed))
           for t in (MT, SUP)]
    assert plan_jobs(fixed, [MT, SUP], fixed_folds, pairs) == old
    with pytest.raises(ValueError, match="--init other: not an initialisation"):
        plan_jobs(runs, [MT, SUP], folds, pairs, ["other"])


def _save_checkpoint(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"network_weights": {"w": torch.zeros(2)}, "trainer_name": SUP}, path)


def test_fine_tuned_training_passes_the_twins_checkpoint_once_then_continues(tmp_path, monkeypatch):
    context = _context(tmp_path)
    runs, folds = _runs_and_folds()
    scratch, twin, ft = plan_jobs(runs[:1], [MT, SUP], folds, {MT: SUP}, ["scratch", "supervised"])
    launched = []
    monkeypatch.setattr(runner_module, "_run", lambda cmd, *args, **kwargs: launched.append(cmd[3:]))
    runner = StudyRunner(context, progress=lambda m: None)
    with pytest.raises(RuntimeError, match=f"{MT}\\+ft/n1_seed0_cv0of2 starts from its supervised twin's model"):
        runner.train(ft)
    weights = os.path.join(context.model_folder(twin), "checkpoint_final.pth")
    _save_checkpoint(weights)
    runner.train(ft)
    runner.train(scratch)
    fold = str(folds[runs[0].name])
    assert launched[0] == ["Dataset999_X", "2d", fold, "-tr", f"{MT}__study_ft", "-p", "nnUNetPlans", "-device", "cpu",
                           "-pretrained_weights", weights]
    assert launched[1] == ["Dataset999_X", "2d", fold, "-tr", f"{MT}__study", "-p", "nnUNetPlans", "-device", "cpu",
                           "--c"]
    assert context.model_folder(ft) != context.model_folder(scratch)
    assert context.result_file(ft).endswith(os.path.join("runs", f"{MT}+ft", "n1_seed0_cv0of2.json"))
    # an interrupted fine-tuning continues from its own checkpoint (nnU-Net refuses --c with -pretrained_weights)
    _save_checkpoint(os.path.join(context.model_folder(ft), "checkpoint_latest.pth"))
    runner.train(ft)
    assert launched[2][-1] == "--c" and "-pretrained_weights" not in launched[2]
    # the test fold is what is predicted and scored
    assert context.test_folders(ft) == (os.path.join(context.output, "cv_test", "seed0_cv0of2", "imagesTs"),
                                        os.path.join(context.output, "cv_test", "seed0_cv0of2", "labelsTs"))
    assert context.test_folders(StudyJob(SUP, plan_runs(POOL, [], ["t"], [1], [0])[0], 5)) == ("/ts/images",
                                                                                              "/ts/labels")


def test_generated_module_defines_the_fine_tuned_trainer(tmp_path):
    from nnunet_mmssl.trainers import MeanTeacherTrainer

    path = write_study_trainers(str(tmp_path), [MT, SUP], 1, 2, 1, "x_study", {"7": ["a"]}, [MT])
    spec = importlib.util.spec_from_file_location("mmssl_study_trainers_cv_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = module.MeanTeacherTrainer__study_ft
    assert issubclass(cls, MeanTeacherTrainer) and cls.__name__ == f"{MT}__study_ft"
    assert cls.study_unlabeled_by_fold == {"7": ("a",)} and not hasattr(module, f"{SUP}__study_ft")


class _FakeRunner(StudyRunner):
    """Records train start and end times; the ``together`` jobs wait (up to 10 s) until both train, then the first
    of them trains 0.3 s longer."""

    def __init__(self, context, workers=1, together=()):
        self.events, self.calls, self.together = {}, [], list(together)
        self.barrier = threading.Barrier(2, timeout=10)
        super().__init__(context, progress=lambda m: None, workers=workers)

    def train(self, job):
        start = time.perf_counter()
        self.calls.append(("train", job.name))
        if job.name in self.together:
            self.barrier.wait()
        if self.together and job.name == self.together[0]:
            time.sleep(0.3)
        _save_checkpoint(os.path.join(self.context.model_folder(job), "checkpoint_final.pth"))
        self.events[job.name] = (start, time.perf_counter(), threading.current_thread().name)

    def predict(self, job):
        self.calls.append(("predict", job.name))
        return "unused"

    def evaluate(self, job, prediction_folder):
        return {"metric_per_case": [{"case": c, "metrics": {"1": {"dice": 0.5, "hd95": 1.0, "sensitivity": 0.5}}}
                                    for c in job.split.test]}

    def signals(self, job):
        return None


def test_parallel_fine_tuned_run_waits_for_its_twin(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    context = _context(tmp_path)
    runs, folds = _runs_and_folds()
    jobs = plan_jobs(runs[:1], [MT, SUP], folds, {MT: SUP}, ["scratch", "supervised"])  # MT, SUP, MT+ft
    runner = _FakeRunner(context, workers=2, together=[jobs[1].name, jobs[0].name])  # MT ends 0.3 s before SUP
    results = runner.run_all(jobs)
    assert [r["trainer"] for r in results] == [MT, SUP, f"{MT}+ft"]
    assert results[2]["pretrained_from"] == SUP and results[2]["base_trainer"] == MT
    assert runner.events[jobs[2].name][0] >= runner.events[jobs[1].name][1]  # started after the twin's training
    assert len({e[2] for e in runner.events.values()}) == 2  # two workers did run


def test_resume_skips_finished_fold_jobs(tmp_path):
    context = _context(tmp_path)
    runs, folds = _runs_and_folds()
    jobs = plan_jobs(runs, [SUP], folds, {})
    assert len({context.result_file(j) for j in jobs}) == len({context.model_folder(j) for j in jobs}) == len(jobs)
    first = _FakeRunner(context)
    results = first.run_all(jobs)
    assert [sorted(r["per_case"]) for r in results] == [list(j.split.test) for j in jobs]
    assert all(r["test_cases"] == list(j.split.test) and r["cv_folds"] == 2 for r, j in zip(results, jobs))
    os.remove(context.result_file(jobs[1]))  # fold 1 of size 1 trained but not scored
    again = _FakeRunner(context)
    assert [r["per_case"] for r in again.run_all(jobs)] == [r["per_case"] for r in results]
    assert again.calls == [("predict", jobs[1].name)]  # nothing trained again, the other folds read back
    assert all(run_state(context, j) == "done" for j in jobs)


# ---------------------------------------------------------------------------------------------- command line
@pytest.fixture
def fake_dataset(tmp_path, monkeypatch):
    """A raw dataset of 6 pool cases (2 channels; empty files: the study only lists them here), a plans file and
    an empty data folder; the runs and the unlabelled preprocessing replaced by recorders."""
    raw, pre = tmp_path / "raw" / "Dataset998_Cv", tmp_path / "pre" / "Dataset998_Cv"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (raw / sub).mkdir(parents=True)
    pool = [f"cv_{k:03d}" for k in range(6)]
    for case in pool:
        for channel in (0, 1):
            (raw / "imagesTr" / f"{case}_{channel:04d}.nii.gz").write_bytes(b"")
        (raw / "labelsTr" / f"{case}.nii.gz").write_bytes(b"")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "FLAIR", "1": "T1"}, "numTraining": 6,
                                                  "labels": {"background": 0, "lesion": 1},
                                                  "file_ending": ".nii.gz"}))
    (pre / "nnUNetPlans_2d").mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"2d": {
        "data_identifier": "nnUNetPlans_2d",
        "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}}}}))
    monkeypatch.setenv("nnUNet_raw", str(raw.parent))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre.parent))
    built, seen = [], []
    monkeypatch.setattr(runner_module, "build_study_unlabeled_folder", lambda final, images, *a, **k:
                        built.append(sorted(images)))

    def run_all(self, jobs):
        seen.extend(jobs)
        return [{"trainer": j.label, "size": j.split.size, "seed": j.split.seed, "fold": j.fold, "training": None,
                 "per_case": {c: {"dice": 0.5 + 0.1 * (j.init == "supervised"), "hd95": 1.0, "sensitivity": 0.5}
                              for c in j.split.test},
                 "mean": {"dice": 0.5 + 0.1 * (j.init == "supervised"), "hd95": 1.0, "sensitivity": 0.5}}
                for j in jobs]

    monkeypatch.setattr(runner_module.StudyRunner, "run_all", run_all)
    return {"raw": raw, "pre": pre, "pool": pool, "built": built, "jobs": seen, "out": tmp_path / "study"}


def test_cli_cv_hides_test_cases_from_every_training_input(fake_dataset, capsys):
    from nnunet_mmssl.cli.study import main

    d = fake_dataset
    argv = ["-d", "998", "--labeled", "1", "2", "-tr", MT, SUP, "--cv", "3", "--seeds", "0", "1",
            "--init", "scratch", "supervised", "--bootstrap", "100", "-o", str(d["out"])]
    assert main(argv) == 0, capsys.readouterr().err
    jobs, pool = d["jobs"], d["pool"]
    assert len(jobs) == 2 * 3 * 2 * 3  # seeds x folds x sizes x (MT, SUP, MT+ft)
    splits = json.loads((d["pre"] / "splits_final.json").read_text())
    spec = importlib.util.spec_from_file_location("gen_cv", d["out"] / "ext_trainers" / "mmssl_study_trainers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for seed in (0, 1):
        tested = {j.split.cv_fold: j.split.test for j in jobs if j.split.seed == seed}
        assert sorted(c for test in tested.values() for c in test) == pool
    for job in jobs:
        test = set(job.split.test)
        entry = splits[job.fold]
        assert not test & (set(entry["train"]) | set(entry["val"])) and entry[TEST_KEY] == sorted(test)
        assert not test & set(module.UNLABELED_BY_FOLD[str(job.fold)])
        folder = d["out"] / "cv_test" / f"seed{job.split.seed}_{job.split.test_name}"
        assert sorted(os.listdir(folder / "labelsTs")) == [f"{c}.nii.gz" for c in sorted(test)]
        assert sorted(os.listdir(folder / "imagesTs")) == [f"{c}_{k:04d}.nii.gz" for c in sorted(test) for k in (0, 1)]
        assert os.path.realpath(folder / "labelsTs" / f"{min(test)}.nii.gz") == \
            str(d["raw"] / "labelsTr" / f"{min(test)}.nii.gz")
        if job.init == "supervised":
            assert jobs.index(job.twin_job) < jobs.index(job)
    assert hasattr(module, f"{MT}__study_ft") and d["built"] == [pool]
    report = json.loads((d["out"] / "study_results.json").read_text())
    assert {r["n_test_cases"] for r in report["table"]} == {6}
    assert report["settings"]["cv"] == 3 and report["settings"]["init"] == ["scratch", "supervised"]
    diffs = {(x["ssl"], x["supervised"], x["size"]): x for x in report["differences"] if x["metric"] == "dice"}
    assert set(diffs) == {(a, b, s) for a, b in ((MT, SUP), (f"{MT}+ft", SUP), (f"{MT}+ft", MT)) for s in (1, 2)}
    assert all((x["n_pairs"], x["n_rows"], x["n_cols"]) == (12, 2, 6) for x in diffs.values())
    assert diffs[(f"{MT}+ft", MT, 1)]["mean_difference"] == pytest.approx(0.1)
    assert "test cases" in (d["out"] / "study_table.txt").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--cv", "1"], "--cv 1: a cross-validated test set needs at least 2 folds. Use --cv 2 or more"),
    (["--cv", "7"], "--cv 7: more folds than the 6 cases of the labelled pool (imagesTr/labelsTr)"),
    (["--cv", "3", "--labeled", "5"], "--labeled 5: 5 case(s), but the pool outside the largest of the --cv 3"),
    (["--init", "other"], "--init other: not an initialisation; use --init scratch (default), --init supervised"),
    (["--init", "supervised", "-tr", MT], f"--init supervised: {MT} has no supervised twin among -tr {MT}; add"),
])
def test_bad_values_are_one_line_errors(fake_dataset, capsys, extra, message):
    from nnunet_mmssl.cli.study import PROG, main

    argv = ["-d", "998", "--labeled", "1", "-tr", MT, SUP, "-o", str(fake_dataset["out"])]
    code = main(argv + extra)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"{PROG}: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert fake_dataset["jobs"] == [] and not (fake_dataset["pre"] / "splits_final.json").exists()

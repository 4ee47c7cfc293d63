"""nnUNetv2_mmssl_study: splits, paired bootstrap, resume logic, report (fast); one tiny end-to-end study (slow)."""

import importlib.util
import itertools
import json
import os

import numpy as np
import pytest

from nnunet_mmssl.study.bootstrap import crossed_bootstrap, paired_bootstrap
from nnunet_mmssl.study.report import format_table, paired_differences, signal_table, summary_table, write_report
from nnunet_mmssl.study.runner import (
    STUDY_SUFFIX,
    StudyContext,
    StudyJob,
    StudyRunner,
    pinned_command,
    run_state,
    study_trainer_class,
    training_signals,
    worker_cores,
    write_study_trainers,
)
from nnunet_mmssl.study.splits import RunSplit, assign_folds, parse_labeled, plan_runs, seed_permutation

POOL = [f"case_{k:03d}" for k in range(10)]
UNLABELED = ["unl_000", "unl_001", "unl_002"]
TEST = ["test_000", "test_001"]


# ---------------------------------------------------------------------------------------------- splits
def test_sizes_are_nested_within_each_seed_and_differ_between_seeds():
    runs = plan_runs(POOL, UNLABELED, TEST, [1, 2, 4, 8], [0, 1, 3])
    assert len(runs) == 12
    for seed in (0, 1, 3):
        mine = {r.size: set(r.labeled) for r in runs if r.seed == seed}
        assert [len(mine[s]) for s in (1, 2, 4, 8)] == [1, 2, 4, 8]
        assert mine[1] < mine[2] < mine[4] < mine[8]
    # the 4 labelled cases of different seeds differ (10 choose 4 = 210: three equal sets would be a bug)
    fours = [frozenset(r.labeled) for r in runs if r.size == 4]
    assert len(set(fours)) == 3


def test_hidden_pool_cases_join_the_unlabelled_stream_never_the_training_keys():
    for run in plan_runs(POOL, UNLABELED, TEST, [1, 3, 10], [0, 5]):
        assert set(run.hidden) == set(POOL) - set(run.labeled)
        assert set(run.unlabeled) == set(UNLABELED) | set(run.hidden)
        assert not set(run.unlabeled) & set(run.labeled)
        assert not (set(run.labeled) | set(run.unlabeled)) & set(TEST)
    full = plan_runs(POOL, UNLABELED, TEST, [10], [0])[0]
    assert full.hidden == () and full.unlabeled == tuple(UNLABELED)


def test_splits_are_reproducible_by_seed_and_independent_of_input_order():
    a = plan_runs(POOL, UNLABELED, TEST, [2, 4], [0, 1])
    b = plan_runs(list(reversed(POOL)), UNLABELED[::-1], TEST, [4, 2], [0, 1])
    assert a == b
    assert seed_permutation(POOL, 3) == seed_permutation(POOL[::-1], 3)
    assert seed_permutation(POOL, 3) != seed_permutation(POOL, 4)
    assert sorted(seed_permutation(POOL, 3)) == POOL


def test_seeds_labelling_the_same_cases_are_refused_unless_unavoidable():
    pool = [f"p{k}" for k in range(6)]
    first = {s: seed_permutation(pool, s)[0] for s in range(20)}
    a, b = next((a, b) for a in first for b in first if a < b and first[a] == first[b])
    with pytest.raises(ValueError, match=f"seeds {a} and {b} label the same 1 case"):
        plan_runs(pool, [], [], [1, 3], [a, b])
    # 2 cases, 3 seeds: only 2 subsets of size 1 exist, so a repeat is unavoidable and allowed
    assert len(plan_runs(["x", "y"], [], [], [1], [0, 1, 2, 3])) == 4


def test_overlapping_test_set_or_unlabelled_cases_are_refused():
    with pytest.raises(ValueError, match=r"case_003.*labelled pool.*test set"):
        plan_runs(POOL, UNLABELED, TEST + ["case_003"], [2], [0])
    with pytest.raises(ValueError, match=r"unl_001.*unlabelled cases.*test set"):
        plan_runs(POOL, UNLABELED, TEST + ["unl_001"], [2], [0])


def test_fractions_become_counts_with_clear_errors():
    assert parse_labeled(["10%", "50%", "100%"], 10) == [1, 5, 10]
    assert parse_labeled(["5%"], 10) == [1]  # 0.5 cases rounds (half up) to 1
    assert parse_labeled(["4", "2", "25%", "2"], 8) == [2, 4]
    with pytest.raises(ValueError, match=r"4% of the 10 pool cases is 0 case\(s\).*at least 1"):
        parse_labeled(["4%"], 10)
    with pytest.raises(ValueError, match=r"--labeled 0: 0 case\(s\).*at least 1"):
        parse_labeled(["0"], 10)
    with pytest.raises(ValueError, match=r"--labeled 11: .*holds only 10.*at most 10"):
        parse_labeled(["11"], 10)
    with pytest.raises(ValueError, match=r"120% of the 10 pool cases is 12 .*holds only 10"):
        parse_labeled(["120%"], 10)
    with pytest.raises(ValueError, match=r"'four': not a count"):
        parse_labeled(["four"], 10)
    with pytest.raises(ValueError, match="pool .* is empty"):
        parse_labeled(["1"], 0)


def test_folds_are_appended_and_existing_entries_reused():
    user = [{"train": ["case_000"], "val": ["case_001"]}]
    runs = plan_runs(POOL, [], TEST, [2, 4], [0])
    same = {"train": list(runs[1].labeled), "val": list(runs[1].labeled)}
    new, folds = assign_folds(user + [same], runs)
    assert user == [{"train": ["case_000"], "val": ["case_001"]}]  # the input is not modified
    assert new[0] == user[0] and folds[runs[1].name] == 1
    assert folds[runs[0].name] == 2 and new[2] == {"train": list(runs[0].labeled), "val": list(runs[0].labeled)}
    again, folds_again = assign_folds(new, runs)
    assert again == new and folds_again == folds


class _FakeDataset:
    def __init__(self, folder, identifiers):
        self.source_folder, self.identifiers = folder, list(identifiers)


class _FakeTrainer:
    is_ddp = False

    def __init__(self, plans, configuration, fold, dataset_json, device):
        self.fold, self.preprocessed_dataset_folder_base = fold, "/pre"

    def unlabeled_dataset(self):
        return _FakeDataset(self.unlabeled_folder(), ["unl_000", "case_001", "case_002", "case_003"])

    def print_to_log_file(self, *args, **kwargs):
        pass


def test_study_trainer_reads_only_its_folds_unlabelled_cases():
    cls = study_trainer_class(_FakeTrainer, 2, 3, 1, "data_unlabeled_study",
                              {"7": ["unl_000", "case_002"], "8": ["case_009"]})
    assert cls.__name__ == "_FakeTrainer" + STUDY_SUFFIX
    trainer = cls({}, "2d", 7, {}, None)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (2, 3, 1)
    dataset = trainer.unlabeled_dataset()
    assert dataset.identifiers == ["unl_000", "case_002"]
    assert dataset.source_folder == os.path.join("/pre", "data_unlabeled_study")
    with pytest.raises(ValueError, match=r"lacks the unlabelled case\(s\) \['case_009'\] of fold 8"):
        cls({}, "2d", 8, {}, None).unlabeled_dataset()
    with pytest.raises(ValueError, match="no unlabelled cases for fold 3"):
        cls({}, "2d", 3, {}, None).unlabeled_dataset()


def test_generated_module_defines_study_trainers(tmp_path):
    from nnunet_mmssl.trainers import MeanTeacherTrainer

    path = write_study_trainers(str(tmp_path), ["MeanTeacherTrainer"], 3, 4, 2, "x_unlabeled_study",
                                {5: ["a", "b"]})
    spec = importlib.util.spec_from_file_location("mmssl_study_trainers_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = module.MeanTeacherTrainer__study
    assert issubclass(cls, MeanTeacherTrainer) and cls.__name__ == "MeanTeacherTrainer__study"
    assert cls.study_unlabeled_by_fold == {"5": ("a", "b")} and cls.study_unlabeled_folder_name == "x_unlabeled_study"
    with pytest.raises(ValueError, match="unknown trainer 'NoSuchTrainer'"):
        write_study_trainers(str(tmp_path), ["NoSuchTrainer"], 1, 1, 1, "x", {})


# ---------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_identical_values_give_zero_interval():
    a = [0.3, 0.9, 0.5, 0.7]
    r = paired_bootstrap(a, list(a), n_resamples=500)
    assert (r["mean_difference"], r["low"], r["high"], r["n_pairs"]) == (0.0, 0.0, 0.0, 4)


def test_bootstrap_constant_shift_gives_point_interval():
    """Paired: each pair differs by 0.25 although the values spread widely (an unpaired bootstrap would not)."""
    b = np.array([0.1, 0.9, 0.4, 0.6, 0.2])
    r = paired_bootstrap(b + 0.25, b, n_resamples=500)
    assert r["mean_difference"] == pytest.approx(0.25)
    assert r["low"] == pytest.approx(0.25) and r["high"] == pytest.approx(0.25)


def test_bootstrap_small_case_matches_exact_resampling_distribution():
    """n = 4 differences: the 4^4 equally likely resamples give the exact distribution of the resampled mean."""
    d = np.array([0.0, 1.0, 2.0, 10.0])
    exact = np.sort([d[list(idx)].mean() for idx in itertools.product(range(4), repeat=4)])
    r = paired_bootstrap(d, np.zeros(4), n_resamples=40000, seed=1)
    assert r["mean_difference"] == pytest.approx(3.25)
    assert np.quantile(exact, 0.02) <= r["low"] <= np.quantile(exact, 0.03)
    assert np.quantile(exact, 0.97) <= r["high"] <= np.quantile(exact, 0.98)
    assert r == paired_bootstrap(d, np.zeros(4), n_resamples=40000, seed=1)  # fixed RNG seed


def test_bootstrap_drops_non_finite_pairs_and_checks_lengths():
    r = paired_bootstrap([1.0, np.nan, 3.0], [0.0, 1.0, np.inf], n_resamples=100)
    assert (r["n_pairs"], r["n_dropped"], r["mean_difference"]) == (1, 2, 1.0)
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_crossed_bootstrap_matches_exact_resampling_distribution():
    """2 seeds × 3 cases: the 2^2 · 3^3 equally likely (seed, case) resamples give the exact distribution."""
    d = np.array([[0.0, 1.0, 5.0], [2.0, 0.5, 9.0]])
    rows, cols = np.indices(d.shape).reshape(2, -1)
    exact = np.sort([d[np.ix_(list(r), list(c))].mean() for r in itertools.product(range(2), repeat=2)
                     for c in itertools.product(range(3), repeat=3)])
    r = crossed_bootstrap(d.ravel(), np.zeros(6), rows, cols, n_resamples=40000, seed=3)
    assert r["mean_difference"] == pytest.approx(d.mean())
    assert (r["n_pairs"], r["n_rows"], r["n_cols"], r["n_empty_resamples"]) == (6, 2, 3, 0)
    # 108 atoms: the 2.5 / 97.5 % points lie between neighbouring atoms, bracketed by the 1.5 / 3.5 % quantiles
    assert np.quantile(exact, 0.015) <= r["low"] <= np.quantile(exact, 0.035)
    assert np.quantile(exact, 0.965) <= r["high"] <= np.quantile(exact, 0.985)
    # resampling the 6 cells as independent pairs gives a different (here narrower) interval: the test tells them apart
    naive = paired_bootstrap(d.ravel(), np.zeros(6), n_resamples=40000, seed=3)
    assert naive["high"] < np.quantile(exact, 0.965)


def test_crossed_bootstrap_counts_a_shared_case_effect_once_per_case():
    """Differences that depend only on the test case, repeated over 5 seeds: the crossed interval is the case
    bootstrap of the 4 case values (the seeds add nothing), while resampling the 20 pairs as independent narrows it
    by about sqrt(5)."""
    case_effect = np.array([-0.1, 0.0, 0.05, 0.25])
    d = np.tile(case_effect, (5, 1))
    rows, cols = np.indices(d.shape).reshape(2, -1)
    crossed = crossed_bootstrap(d.ravel(), np.zeros(20), rows, [f"case{c}" for c in cols], n_resamples=20000)
    by_case = paired_bootstrap(case_effect, np.zeros(4), n_resamples=20000)
    naive = paired_bootstrap(d.ravel(), np.zeros(20), n_resamples=20000)
    assert crossed["low"] == pytest.approx(by_case["low"], abs=0.01)
    assert crossed["high"] == pytest.approx(by_case["high"], abs=0.01)
    width = crossed["high"] - crossed["low"]
    assert width > 1.8 * (naive["high"] - naive["low"])


def test_crossed_bootstrap_drops_non_finite_cells_and_checks_input():
    r = crossed_bootstrap([1.0, np.nan, 3.0, 2.0], [0.0, 0.0, np.inf, 1.0], [0, 0, 1, 1], ["a", "b", "a", "b"],
                          n_resamples=2000)
    # finite cells (0, a) = 1 and (1, b) = 1: every resample that picks a cell has mean 1; the rest are discarded
    assert (r["n_pairs"], r["n_dropped"], r["mean_difference"], r["low"], r["high"]) == (2, 2, 1.0, 1.0, 1.0)
    assert 0 < r["n_empty_resamples"] < 2000
    with pytest.raises(ValueError, match=r"\(0, 'a'\) is given more than once"):
        crossed_bootstrap([1.0, 2.0], [0.0, 0.0], [0, 0], ["a", "a"])
    with pytest.raises(ValueError, match="one length"):
        crossed_bootstrap([1.0, 2.0], [0.0, 0.0], [0], ["a", "b"])


# ---------------------------------------------------------------------------------------------- resume
def _context(tmp_path):
    return StudyContext(dataset_name="Dataset999_X", raw_folder=str(tmp_path / "raw"), configuration="2d",
                        plans="nnUNetPlans", device="cpu", output=str(tmp_path / "study"),
                        env={"nnUNet_results": str(tmp_path / "results")}, test_images="", test_labels="")


class _FakeRunner(StudyRunner):
    def __init__(self, context):
        self.lines, self.calls = [], []
        super().__init__(context, progress=self.lines.append)

    def train(self, job):
        self.calls.append(("train", job.name))
        os.makedirs(self.context.model_folder(job), exist_ok=True)
        open(os.path.join(self.context.model_folder(job), "checkpoint_final.pth"), "w").close()

    def predict(self, job):
        self.calls.append(("predict", job.name))
        return "unused"

    def evaluate(self, job, prediction_folder):
        return {"metric_per_case": [{"case": "t0", "metrics": {"lesion": {"dice": 0.5, "hd95": 2.0,
                                                                          "sensitivity": 0.6}}}]}

    def signals(self, job):
        self.calls.append(("signals", job.name))
        return {"unsup_grad_share": 0.25, "unsup_weight": 1.0, "unsup_loss": 0.1, "sup_loss": 0.5}


def _job(trainer, size):
    split = RunSplit(size, 0, tuple(POOL[:size]), tuple(POOL[size:]), tuple(POOL[size:]))
    return StudyJob(trainer, split, 5 + size)


def test_finished_runs_are_skipped_half_finished_redone(tmp_path):
    context = _context(tmp_path)
    done, trained, todo = _job("A", 1), _job("A", 2), _job("B", 1)
    for job in (done, trained):
        os.makedirs(context.model_folder(job))
        open(os.path.join(context.model_folder(job), "checkpoint_final.pth"), "w").close()
    os.makedirs(os.path.dirname(context.result_file(done)))
    with open(context.result_file(done), "w") as handle:
        json.dump({"trainer": "A", "size": 1, "seed": 0, "seconds": 100.0, "mean": {"dice": 0.123}}, handle)
    # a killed training: only checkpoint_latest
    os.makedirs(context.model_folder(todo))
    open(os.path.join(context.model_folder(todo), "checkpoint_latest.pth"), "w").close()
    assert [run_state(context, j) for j in (done, trained, todo)] == ["done", "trained", "todo"]

    runner = _FakeRunner(context)
    results = runner.run_all([done, trained, todo])
    assert runner.calls == [("signals", "A/n1_seed0"),  # a result written before signals were recorded: filled in
                            ("predict", "A/n2_seed0"), ("signals", "A/n2_seed0"),
                            ("train", "B/n1_seed0"), ("predict", "B/n1_seed0"), ("signals", "B/n1_seed0")]
    assert results[0]["mean"]["dice"] == 0.123  # read back, not recomputed
    assert all(r["training"]["unsup_grad_share"] == 0.25 for r in results)
    with open(context.result_file(done)) as handle:
        assert json.load(handle)["training"]["unsup_weight"] == 1.0
    assert [r["mean"]["dice"] for r in results[1:]] == [0.5, 0.5]
    assert all(run_state(context, j) == "done" for j in (done, trained, todo))
    assert "3 runs, 1 already done, 2 to do" in runner.lines[0]
    assert any("left" in line for line in runner.lines)

    again = _FakeRunner(context)
    assert [r["mean"] for r in again.run_all([done, trained, todo])] == [r["mean"] for r in results]
    assert again.calls == []


def test_worker_cores_deal_the_available_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 5}, raising=False)
    assert worker_cores(1, "cpu") == [None]  # alone: nnU-Net takes every core as usual
    assert worker_cores(2, "cpu") == [(0, 2), (1, 5)]
    assert worker_cores(4, "cpu") == [(0,), (1,), (2,), (5,)]
    assert worker_cores(3, "cuda") == [None, None, None]
    with pytest.raises(ValueError, match="only 4 CPU core"):
        worker_cores(5, "cpu")
    with pytest.raises(ValueError, match="at least 1"):
        worker_cores(0, "cpu")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only")
def test_pinned_command_confines_the_process_and_its_cpu_count():
    import subprocess

    core = min(os.sched_getaffinity(0))
    code = ("import os, multiprocessing, torch; torch.set_num_threads(multiprocessing.cpu_count()); "
            "print(sorted(os.sched_getaffinity(0)), multiprocessing.cpu_count(), os.cpu_count(), "
            "torch.get_num_threads())")
    out = subprocess.run(pinned_command(code, [], (core,)), capture_output=True, text=True, check=True).stdout
    assert out.split() == [f"[{core}]", "1", "1", "1"]
    assert pinned_command(code, ["a"], None)[1:] == ["-c", code, "a"]  # unpinned: the code unchanged


class _ParallelRunner(_FakeRunner):
    """Each training waits (up to 10 s) until ``together`` trainings are running at the same time."""

    def __init__(self, context, workers, together, fail=None):
        import threading

        self.barrier, self.fail, self.seen = threading.Barrier(together, timeout=10), fail, {}
        _FakeRunner.__init__(self, context)
        StudyRunner.__init__(self, context, progress=self.lines.append, workers=workers)

    def train(self, job):
        self.seen[job.name] = self.cores
        if job.name == self.fail:
            raise RuntimeError(f"training {job.name} failed")
        self.barrier.wait()
        super().train(job)


def test_workers_run_jobs_at_the_same_time_each_on_its_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    context = _context(tmp_path)
    jobs = [_job(t, size) for t in ("A", "B") for size in (1, 2)]
    runner = _ParallelRunner(context, workers=2, together=2)  # the barrier breaks unless two run at once
    results = runner.run_all(jobs)
    assert [(r["trainer"], r["size"]) for r in results] == [("A", 1), ("A", 2), ("B", 1), ("B", 2)]  # job order
    assert sorted(runner.seen) == sorted(j.name for j in jobs)
    assert set(runner.seen.values()) == {(0,), (1,)}
    assert all(run_state(context, j) == "done" for j in jobs)
    assert "4 runs, 0 already done, 4 to do, 2 at a time" in runner.lines[0]
    assert sum("done]" in line for line in runner.lines) == 4


def test_a_failed_run_stops_new_runs_and_is_raised(tmp_path):
    context = _context(tmp_path)
    jobs = [_job("A", 1), _job("A", 2), _job("B", 1)]
    runner = _ParallelRunner(context, workers=1, together=1, fail="A/n2_seed0")
    with pytest.raises(RuntimeError, match="training A/n2_seed0 failed"):
        runner.run_all(jobs)
    assert [run_state(context, j) for j in jobs] == ["done", "todo", "todo"]  # B/n1 never started
    assert "B/n1_seed0" not in runner.seen


def test_training_signals_average_the_last_epochs_of_the_log(tmp_path):
    import torch

    path = str(tmp_path / "checkpoint_final.pth")
    nan = float("nan")
    torch.save({"logging": {"unsup_grad_shares": [9.0, 9.0, nan, 0.2, nan, 0.4, nan],
                            "unsup_weights": [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0],
                            "train_unsup_losses": [1.0] * 7, "train_sup_losses": [3.0, 3.0, 1.0, 2.0, 3.0, 4.0, 5.0],
                            "train_losses": [0.0] * 7}}, path)
    signals = training_signals(path, last=5)
    assert signals["unsup_grad_share"] == pytest.approx(0.3)  # NaN epochs (not measured) skipped; 9.0 too early
    assert signals["unsup_weight"] == 1.0 and signals["unsup_loss"] == 1.0
    assert signals["sup_loss"] == pytest.approx(3.0)
    torch.save({"logging": {"unsup_grad_shares": [nan, nan], "unsup_weights": [0.0, 0.0]}}, path)
    assert training_signals(path)["unsup_grad_share"] is None and training_signals(path)["unsup_loss"] is None
    torch.save({"logging": {"train_losses": [1.0]}}, path)  # nnU-Net's own trainer
    assert training_signals(path) is None
    assert training_signals(str(tmp_path / "absent.pth")) is None


def test_signal_table_and_text():
    def run(trainer, size, seed, share, weight=1.0):
        training = None if share is None else {"unsup_grad_share": share, "unsup_weight": weight,
                                               "unsup_loss": 0.1 * (seed + 1), "sup_loss": 0.5}
        return {"trainer": trainer, "size": size, "seed": seed, "training": training}

    results = [run("M", 1, 0, 0.2), run("M", 1, 1, 0.4), run("M", 3, 0, None), run("P", 1, 0, None, 0.0),
               run("S", 1, 0, 0.0, weight=0.0)]
    rows = signal_table(results)
    assert [(r["trainer"], r["size"], r["n"]) for r in rows] == [("M", 1, 2), ("S", 1, 1)]
    assert rows[0]["unsup_grad_share"] == pytest.approx(0.3) and rows[0]["unsup_loss"] == pytest.approx(0.15)
    text = format_table([], [], rows)
    assert "M                               1 labelled: share 0.300, w 1, L_unsup 0.1500, L_sup 0.5000" in text
    assert "S " not in text.split("L_sup:")[1]  # weight 0: no unsupervised term, not listed


# ---------------------------------------------------------------------------------------------- report
def _fake_result(trainer, size, seed, dice_per_case):
    per_case = {f"t{k}": {"dice": d, "hd95": 10 * (1 - d), "sensitivity": d} for k, d in enumerate(dice_per_case)}
    mean = {m: float(np.mean([c[m] for c in per_case.values()])) for m in ("dice", "hd95", "sensitivity")}
    return {"trainer": trainer, "size": size, "seed": seed, "per_case": per_case, "mean": mean}


def _fake_results():
    return [_fake_result("Sup", 1, 0, [0.3, 0.5]), _fake_result("Sup", 1, 1, [0.5, 0.7]),   # means 0.4, 0.6
            _fake_result("Sup", 4, 0, [0.7, 0.7]), _fake_result("Sup", 4, 1, [0.8, 0.8]),   # 0.7, 0.8
            _fake_result("SSL", 1, 0, [0.4, 0.6]), _fake_result("SSL", 1, 1, [0.6, 0.8]),   # Sup + 0.1 per case
            _fake_result("SSL", 4, 0, [0.7, 0.9]), _fake_result("SSL", 4, 1, [0.8, 0.8])]   # 0.8, 0.8


def test_table_values_by_hand():
    rows = {(r["trainer"], r["size"]): r for r in summary_table(_fake_results())}
    assert rows[("Sup", 1)]["dice"]["mean"] == pytest.approx(0.5)
    assert rows[("Sup", 1)]["dice"]["std"] == pytest.approx(0.1)  # population std of 0.4, 0.6
    assert rows[("Sup", 4)]["dice"]["mean"] == pytest.approx(0.75)
    assert rows[("SSL", 4)]["dice"]["mean"] == pytest.approx(0.8) and rows[("SSL", 4)]["dice"]["std"] == 0
    assert rows[("Sup", 1)]["hd95"]["mean"] == pytest.approx(5.0)
    assert rows[("Sup", 1)]["seeds"] == [0, 1]
    diffs = {(d["size"], d["metric"]): d for d in paired_differences(_fake_results(), {"SSL": "Sup"}, 2000)}
    assert (diffs[(1, "dice")]["n_pairs"], diffs[(1, "dice")]["n_rows"], diffs[(1, "dice")]["n_cols"]) == (4, 2, 2)
    assert diffs[(1, "dice")]["low"] == pytest.approx(0.1) and diffs[(1, "dice")]["high"] == pytest.approx(0.1)
    # size 4 differences per (seed, case): 0, 0.2, 0, 0 -> mean 0.05
    assert diffs[(4, "dice")]["mean_difference"] == pytest.approx(0.05)
    assert diffs[(4, "hd95")]["mean_difference"] == pytest.approx(-0.5)


def test_report_files_agree(tmp_path):
    import matplotlib.image

    report = write_report(str(tmp_path), _fake_results(), {"SSL": "Sup"}, {"dataset": "X"}, n_resamples=500)
    with open(tmp_path / "study_results.json") as handle:
        saved = json.load(handle)
    assert saved["table"] == json.loads(json.dumps(report["table"]))
    text = (tmp_path / "study_table.txt").read_text()
    for row in saved["table"]:
        assert f"{row['dice']['mean']:.3f} ± {row['dice']['std']:.3f}" in text
    assert "+0.100 [+0.100, +0.100]" in text
    series = saved["plot_series"]
    assert series["Sup"] == {"sizes": [1, 4], "dice_mean": pytest.approx([0.5, 0.75]),
                             "dice_std": pytest.approx([0.1, 0.05])}
    image = matplotlib.image.imread(str(tmp_path / "dice_vs_labeled.png"))
    assert image.shape[:2] == (480, 720)
    assert not list(tmp_path.glob("*partial*"))


# ---------------------------------------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
def test_study_end_to_end_on_tiny_phantom(tmp_path, monkeypatch, capsys):
    """1 size x 2 trainers x 1 seed, 2d, 1 epoch of 2 iterations, through nnU-Net's real commands; then resume;
    then --cv 2 at 1 labelled case with Mean Teacher fine-tuned from its twin (--init supervised). (Sizes nest and
    fractions become counts: the fast tests above; CI's time budget.)"""
    import subprocess
    import sys

    from nnunet_mmssl.cli.study import main
    from nnunet_mmssl.dataset_conversion import PHANTOM_LABEL_GLOB, PHANTOM_MODALITY_GLOBS, convert_dataset
    from nnunet_mmssl.dataset_conversion.phantom import make_phantom_cases

    raw, pre = tmp_path / "raw", tmp_path / "preprocessed"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    src = make_phantom_cases(tmp_path / "phantom", num_labeled=6, num_unlabeled=2, shape=(12, 32, 32),
                             spacing=(2.0, 1.0, 1.0), seed=3)
    convert_dataset([str(src / "labeled"), str(src / "unlabeled")], PHANTOM_MODALITY_GLOBS, PHANTOM_LABEL_GLOB,
                    str(raw), 902, "Study", num_labeled=4, num_test=2, seed=0, labels={"background": 0, "lesion": 1})
    code = "from nnunet_mmssl.cli.plan_and_preprocess import main; raise SystemExit(main(['-d', '902', '-c', '2d']))"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
    dataset = raw / "Dataset902_Study"
    pool = sorted(p.name[:-len("_0000.nii.gz")] for p in (dataset / "imagesTr").glob("*_0000.nii.gz"))
    assert len(pool) == 4
    out = tmp_path / "study"
    argv = ["-d", "902", "--labeled", "1", "-tr", "PlainSupervisedTrainer", "MeanTeacherTrainer",
            "--seeds", "0", "-c", "2d", "--epochs", "1", "--iterations", "2", "--val-iterations", "1",
            "--bootstrap", "500", "--workers", str(min(2, len(os.sched_getaffinity(0)))), "-o", str(out)]
    assert main(argv) == 0  # two runs at once on a 2-core machine (CI's time budget), each on its own core

    report = json.loads((out / "study_results.json").read_text())
    rows = {(r["trainer"], r["size"]): r for r in report["table"]}
    assert set(rows) == {(t, 1) for t in ("PlainSupervisedTrainer", "MeanTeacherTrainer")}
    text = (out / "study_table.txt").read_text()
    for (trainer, size), row in rows.items():
        run = json.loads((out / "runs" / trainer / f"n{size}_seed0.json").read_text())
        assert row["dice"]["mean"] == pytest.approx(run["mean"]["dice"]) and row["dice"]["std"] == 0
        assert sorted(run["per_case"]) == sorted(report["settings"]["test_cases"])
        assert f"{row['dice']['mean']:.3f} ± 0.000" in text
        assert report["plot_series"][trainer]["dice_mean"] == [pytest.approx(row["dice"]["mean"])]
    assert (out / "dice_vs_labeled.png").stat().st_size > 1000
    diffs = [d for d in report["differences"] if d["metric"] == "dice"]
    assert [(d["ssl"], d["supervised"], d["size"], d["n_pairs"]) for d in diffs] == \
        [("MeanTeacherTrainer", "PlainSupervisedTrainer", 1, 2)]
    # each run is a fold of splits_final.json; the run's unlabelled stream = the unlabelled cases + the pool cases it
    # does not label
    splits = json.loads((pre / "Dataset902_Study" / "splits_final.json").read_text())
    folds = report["settings"]["folds"]
    one = set(splits[folds["n1_seed0"]]["train"])
    assert len(one) == 1 and one <= set(pool) and splits[folds["n1_seed0"]]["val"] == sorted(one)
    log = next((out / "nnUNet_results" / "Dataset902_Study" / "MeanTeacherTrainer__study__nnUNetPlans__2d"
                / f"fold_{folds['n1_seed0']}").glob("training_log*.txt")).read_text()
    assert "study fold {}: 5 unlabelled cases allowed".format(folds["n1_seed0"]) in log  # 2 unlabelled + 3 pool
    study_folder = pre / "Dataset902_Study" / "nnUNetPlans_2d_unlabeled_study"
    assert {p.name[:-5] for p in study_folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")} >= set(pool)

    # resume: nothing repeated; a run without its result is predicted and scored again, not retrained
    capsys.readouterr()
    (out / "runs" / "MeanTeacherTrainer" / "n1_seed0.json").unlink()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 runs, 1 already done, 1 to do" in printed and "trained: predicting again" in printed
    assert "Preprocessing the" not in printed  # the study's unlabelled folder is built once
    assert (study_folder.parent / f".{study_folder.name}.plans.json").is_file()
    assert json.loads((out / "study_results.json").read_text())["table"] == report["table"]
    assert main(argv[:-2] + ["--epochs", "2", "-o", str(out)]) == 2  # other settings in the same folder: refused

    # --cv 2, same folder and budget: every pool case is tested once, by models that never saw it; Mean Teacher
    # fine-tuned from its supervised twin of the same run (nnUNetv2_train -pretrained_weights), after the twin (the
    # scratch runs beside it are covered by the fast tests of tests/test_study_cv.py; CI's time budget)
    capsys.readouterr()
    cv_argv = argv[:2] + ["--labeled", "1"] + argv[4:-2] + ["--cv", "2", "--init", "supervised", "-o",
                                                            str(out)]
    assert main(cv_argv) == 0
    printed = capsys.readouterr().out
    assert "4 runs, 0 already done, 4 to do" in printed and "Preprocessing the" not in printed
    report = json.loads((out / "study_results.json").read_text())
    assert report["settings"]["cv"] == 2 and sorted(report["settings"]["test_cases"]) == pool
    assert {(r["trainer"], r["n_test_cases"]) for r in report["table"]} == \
        {("PlainSupervisedTrainer", 4), ("MeanTeacherTrainer+ft", 4)}
    splits = json.loads((pre / "Dataset902_Study" / "splits_final.json").read_text())
    tested = []
    for fold in (0, 1):
        for trainer in ("PlainSupervisedTrainer", "MeanTeacherTrainer+ft"):
            run = json.loads((out / "runs" / trainer / f"n1_seed0_cv{fold}of2.json").read_text())
            assert sorted(run["per_case"]) == run["test_cases"]
            entry = splits[run["fold"]]
            assert not set(run["test_cases"]) & set(entry["train"] + entry["val"])
        tested += run["test_cases"]
        ft_fold = out / "nnUNet_results" / "Dataset902_Study" / "MeanTeacherTrainer__study_ft__nnUNetPlans__2d" / \
            f"fold_{run['fold']}"
        twin = out / "nnUNet_results" / "Dataset902_Study" / "PlainSupervisedTrainer__study__nnUNetPlans__2d" / \
            f"fold_{run['fold']}" / "checkpoint_final.pth"
        log = next(ft_fold.glob("training_log*.txt")).read_text()
        assert f"Warm start from {twin}" in log and (ft_fold / "checkpoint_final.pth").is_file()
    assert sorted(tested) == pool
    diffs = {(d["ssl"], d["supervised"]): d for d in report["differences"] if d["metric"] == "dice"}
    assert {k: d["n_pairs"] for k, d in diffs.items()} == {("MeanTeacherTrainer+ft", "PlainSupervisedTrainer"): 4}


def test_console_script_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from nnunet_mmssl.cli.study import main

    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    base = ["-d", "1", "--labeled", "1", "-o", str(tmp_path / "out")]
    assert main(base + ["-tr", "NoSuchTrainer"]) == 2
    assert "unknown trainer 'NoSuchTrainer'" in capsys.readouterr().err
    assert main(base + ["-tr", "MeanTeacherTrainer", "--pair", "MeanTeacherTrainer"]) == 2
    assert "write SSL=SUP" in capsys.readouterr().err
    assert main(base + ["-tr", "MeanTeacherTrainer", "--pair", "MeanTeacherTrainer=MemCifSupervisedTrainer"]) == 2
    assert "MemCifSupervisedTrainer is not among the trainers" in capsys.readouterr().err
    assert main(base + ["-tr", "MeanTeacherTrainer"]) == 2
    err = capsys.readouterr().err
    assert "-d 1: no matching dataset folder" in err and "Traceback" not in err


def test_missing_splits_file_starts_with_nnunets_own_folds(tmp_path):
    """Folds 0-4 stay nnU-Net's (a later plain nnUNetv2_train FOLD trains what it always did); the study appends."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from nnunet_mmssl.cli.study import _splits_file_content

    assert _splits_file_content(str(tmp_path / "splits_final.json"), POOL) == \
        generate_crossval_split(sorted(POOL), seed=12345, n_splits=5)
    assert _splits_file_content(str(tmp_path / "splits_final.json"), POOL[:3]) == []
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    assert _splits_file_content(str(tmp_path / "splits_final.json"), POOL) == [{"train": ["a"], "val": ["b"]}]

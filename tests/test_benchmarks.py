"""Fast tests of the pure helpers of ``benchmarks/benchmark_trainers.py`` (no training, no child processes)."""

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_trainers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_trainers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _row(trainer, s, flops, peak, estimate, predict, wait=0.0, labelled=2, unlabelled=0, network=None):
    return {"trainer": trainer, "s_per_iter": s, "flops_per_iter": flops, "peak_mem_mib": peak,
            "memory_estimate": estimate, "predict_s_per_case": predict, "predict_network_s_per_case": network,
            "data_wait_fraction": wait, "batch_labeled": labelled, "batch_unlabeled": unlabelled}


def test_ratio_and_efficiency_hand_values(bench):
    assert bench.ratio(3.0, 1.5) == 2.0
    assert bench.ratio(None, 1.0) is None and bench.ratio(1.0, None) is None
    assert bench.ratio(1.0, 0.0) is None
    assert bench.efficiency(4.5, 2.5) == pytest.approx(1.8)
    assert bench.efficiency(None, 2.0) is None


def test_add_ratios_against_nnunet_trainer(bench):
    rows = [_row("MemCifSSLTrainer", 2.5, 45e9, 1500.0, 420, 3.0, wait=0.25, unlabelled=2, network=0.9),
            _row("nnUNetTrainer", 1.0, 10e9, 1000.0, 100, 2.0, wait=0.1, network=0.3)]
    assert bench.add_ratios(rows) == "nnUNetTrainer"
    ours, base = rows
    assert base["time_ratio"] == 1.0 and base["efficiency"] == 1.0
    assert ours["time_ratio"] == pytest.approx(2.5)
    assert ours["flop_ratio"] == pytest.approx(4.5)
    assert ours["efficiency"] == pytest.approx(1.8)
    # compute time = step time minus data wait: base 1.0 * 0.9, ours 2.5 * 0.75
    assert ours["compute_efficiency"] == pytest.approx(4.5 / (1.875 / 0.9))
    assert ours["mem_ratio"] == pytest.approx(1.5)
    assert ours["estimate_ratio"] == pytest.approx(4.2)
    assert ours["predict_ratio"] == pytest.approx(1.5)
    assert ours["predict_network_ratio"] == pytest.approx(3.0)
    assert ours["gflop_per_iter"] == pytest.approx(45.0)
    assert ours["data_wait_pct"] == pytest.approx(25.0)
    assert ours["batch"] == "2+2" and base["batch"] == "2+0"


def test_baseline_falls_back_to_first_measured_row(bench):
    rows = [{"trainer": "nnUNetTrainer", "error": "boom"}, _row("A", 2.0, 4e9, 800.0, 10, None),
            _row("B", 4.0, 8e9, 1600.0, 20, None)]
    assert bench.add_ratios(rows) == "A"
    assert rows[2]["time_ratio"] == 2.0 and rows[2]["flop_ratio"] == 2.0 and rows[2]["efficiency"] == 1.0
    assert rows[2]["predict_ratio"] is None
    assert rows[0]["time_ratio"] is None
    assert bench.add_ratios([{"trainer": "X", "error": "boom"}]) is None


def test_format_table_fixed_width_errors_and_missing_cells(bench):
    rows = [_row("nnUNetTrainer", 1.0, 10e9, 1000.0, 100, 2.0),
            {**_row("MemCifSSLTrainer", 2.0, 30e9, 1200.0, 300, None, unlabelled=2), "error": "prediction: boom"},
            {"trainer": "MMFMCMLTrainer", "error": "RuntimeError: out of memory"}]
    baseline = bench.add_ratios(rows)
    table = bench.format_table(rows, baseline)
    lines = table.splitlines()
    header = lines[0]
    for title in ("trainer", "s/iter", "time x", "FLOP x", "effic.", "peak MiB", "mem x", "est x", "wait %",
                  "pred s/case", "pred x"):
        assert title in header
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(header)
    assert len(lines[2]) == len(header) and len(lines[3]) == len(header)  # numeric rows: fixed width
    assert lines[2].startswith("nnUNetTrainer*")
    assert " 2.000 " in lines[3] and lines[3].split()[-4] == "-"  # no prediction: "-" cells
    assert lines[4].startswith("MMFMCMLTrainer") and "ERROR: RuntimeError: out of memory" in lines[4]
    assert "* ratios are relative to nnUNetTrainer" in table
    assert "MemCifSSLTrainer: prediction: boom" in table
    # columns line up: every number of a column ends at the header title's end
    end = header.index("s/iter") + len("s/iter")
    assert lines[2][:end].endswith("1.000") and lines[3][:end].endswith("2.000")


def test_wait_timer_on_fake_iterator(bench):
    ticks = iter([0.0, 0.5, 1.0, 3.0, 10.0, 10.25])

    class Fake:
        finished = False

        def __init__(self):
            self.items = iter(["a", "b"])

        def __next__(self):
            return next(self.items)

        def _finish(self):
            self.finished = True

    fake = Fake()
    timer = bench.WaitTimer(fake, clock=lambda: next(ticks))
    assert iter(timer) is timer
    assert next(timer) == "a" and timer.seconds == pytest.approx(0.5) and timer.calls == 1
    assert next(timer) == "b" and timer.seconds == pytest.approx(2.5) and timer.calls == 2
    with pytest.raises(StopIteration):
        next(timer)
    assert timer.seconds == pytest.approx(2.75) and timer.calls == 3  # the failed wait counts too
    timer._finish()  # attribute access falls through to the wrapped iterator
    assert fake.finished and timer.inner is fake
    timer.reset()
    assert timer.seconds == 0.0 and timer.calls == 0


def test_wait_timer_with_real_clock(bench):
    timer = bench.WaitTimer(iter(range(3)))
    assert list(timer) == [0, 1, 2]
    assert timer.calls == 4 and timer.seconds >= 0.0


def test_parse_args_defaults_and_phantom(bench):
    args = bench.parse_args([])
    assert args.phantom and args.dataset is None
    assert args.configurations == ["2d", "3d_fullres"]
    assert args.trainers == list(bench.DEFAULT_TRAINERS) and args.trainers[0] == "nnUNetTrainer"
    assert (args.iterations, args.warmup, args.predict_cases, args.device) == (20, 3, 2, "cpu")
    assert args.n_proc_da == 2 and args.threads == (os.cpu_count() or 1)
    assert args.fold == "all" and not args.mirror and not args.worker
    args = bench.parse_args(["-d", "501", "-c", "2d", "-tr", "nnUNetTrainer", "MemCifSSLTrainer", "--iterations", "2",
                             "--warmup", "1", "-device", "cuda", "--predict-cases", "1", "-f", "0", "--json", "o.json",
                             "--phantom-shape", "16", "48", "48"])
    assert not args.phantom and args.dataset == "501" and args.configurations == ["2d"]
    assert args.trainers == ["nnUNetTrainer", "MemCifSSLTrainer"] and args.fold == "0"
    assert args.device == "cuda" and args.threads is None and args.n_proc_da >= 1
    assert args.phantom_shape == [16, 48, 48] and args.json == "o.json"


@pytest.mark.parametrize("argv", [["-d", "5", "--phantom"], ["--iterations", "0"], ["-f", "one"],
                                  ["--worker", "-d", "5"], ["-device", "tpu"]])
def test_parse_args_errors(bench, argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_worker_argv_round_trip(bench):
    args = bench.parse_args(["--iterations", "4", "--warmup", "0", "--mirror", "--n-proc-da", "1",
                             "--share-steps", "5"])
    argv = bench.worker_argv(args, "Dataset979_X", "3d_fullres", "MemCifSSLTrainer", "/tmp/out")
    assert argv[0] == sys.executable and argv[1] == str(SCRIPT)
    worker = bench.parse_args(argv[2:])
    assert worker.worker and worker.dataset == "Dataset979_X" and not worker.phantom
    assert (worker.worker_configuration, worker.worker_trainer, worker.worker_output) == \
        ("3d_fullres", "MemCifSSLTrainer", "/tmp/out")
    assert (worker.iterations, worker.warmup, worker.mirror, worker.n_proc_da, worker.threads) == \
        (4, 0, True, 1, args.threads)
    assert worker.share_steps == 5  # the child measures the gradient share with the parent's setting


def test_parse_worker_output(bench):
    text = "noise\nBENCHMARK_RESULT {\"a\": 1}\nmore noise\nBENCHMARK_RESULT {\"a\": 2}\ntrailing"
    assert bench.parse_worker_output(text) == {"a": 2}
    assert bench.parse_worker_output("nothing here") is None
    assert bench.parse_worker_output("BENCHMARK_RESULT {broken") is None
    line = bench.RESULT_MARKER + json.dumps({"trainer": "x", "s_per_iter": 0.5})
    assert bench.parse_worker_output(line)["s_per_iter"] == 0.5


def test_effective_batch_size(bench):
    assert bench.effective_batch_size(SimpleNamespace(batch_size=2)) == (2, 0)
    ssl = SimpleNamespace(batch_size=2, use_unlabeled=True, unlabeled_batch_size=None, dataloader_unlabeled=object())
    assert bench.effective_batch_size(ssl) == (2, 2)
    ssl.unlabeled_batch_size = 4
    assert bench.effective_batch_size(ssl) == (2, 4)
    ssl.dataloader_unlabeled = None  # stream not built: nothing unlabelled in the step
    assert bench.effective_batch_size(ssl) == (2, 0)
    supervised = SimpleNamespace(batch_size=3, use_unlabeled=False, unlabeled_batch_size=None,
                                 dataloader_unlabeled=None)
    assert bench.effective_batch_size(supervised) == (3, 0)


def test_case_file_lists(bench):
    files = ["/x/B_0001.nii.gz", "/x/A_0001.nii.gz", "/x/A_0000.nii.gz", "/x/B_0000.nii.gz", "/x/C_0000.nii.gz",
             "/x/readme.txt", "/x/D_0000.mha"]
    assert bench.case_file_lists(files, ".nii.gz", 2) == [
        ("A", ["/x/A_0000.nii.gz", "/x/A_0001.nii.gz"]), ("B", ["/x/B_0000.nii.gz", "/x/B_0001.nii.gz"])]
    assert [c for c, _ in bench.case_file_lists(files, ".nii.gz", 10)] == ["A", "B", "C"]
    assert bench.case_file_lists(files, ".nii.gz", 0) == []


def test_benchmark_environment_phantom(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", "/somewhere/else")
    monkeypatch.setenv("NNUNET_MMSSL_NO_EXT_TRAINER", "1")
    args = bench.parse_args(["--compile", "--n-proc-da", "3"])
    env = bench.benchmark_environment(args, str(tmp_path))
    assert env["nnUNet_raw"] == str(tmp_path / "nnUNet_raw")
    assert env["nnUNet_preprocessed"] == str(tmp_path / "nnUNet_preprocessed")
    assert env["nnUNet_results"] == str(tmp_path / "nnUNet_results")  # never the user's results folder
    assert env["nnUNet_n_proc_DA"] == "3" and env["nnUNet_compile"] == "true"
    assert "NNUNET_MMSSL_NO_EXT_TRAINER" not in env
    assert env["nnUNet_extTrainer"].split(os.pathsep)[-1].endswith("nnunet_ext")


def test_format_header(bench):
    args = bench.parse_args(["-device", "cuda"])
    info = bench.machine_info(args, {"device_name": "NVIDIA H100", "torch_threads": 8})
    header = bench.format_header(info, "python benchmarks/benchmark_trainers.py -device cuda", "2025-01-01", "D")
    assert "NVIDIA H100" in header and "torch threads 8" in header and "benchmark_trainers.py" in header
    assert info["cores"] == os.cpu_count() and info["device"] == "cuda"


def test_rotated_orders_every_round_differently(bench):
    names = ["nnUNetTrainer", "A", "B"]
    assert bench.rotated(names, 0) == names
    assert bench.rotated(names, 1) == ["A", "B", "nnUNetTrainer"]
    assert bench.rotated(names, 4) == ["A", "B", "nnUNetTrainer"]
    assert bench.rotated([], 3) == []
    assert names == ["nnUNetTrainer", "A", "B"]  # input not modified


def _round(s_steps, wait_l, wait_u=0.0, peak=1000.0, train=100.0, **extra):
    total = sum(s_steps)
    return {"trainer": "A", "step_seconds": list(s_steps), "s_per_iter": total / len(s_steps),
            "data_wait_s": wait_l + wait_u, "data_wait_labeled_s": wait_l, "data_wait_unlabeled_s": wait_u,
            "data_wait_fraction": (wait_l + wait_u) / total, "peak_mem_mib": peak, "train_mem_mib": train,
            "flops_per_iter": 7e9, "wall_s": 10.0, **extra}


def test_merge_rounds_pools_steps_and_keeps_first_round_prediction(bench):
    first = _round([1.0, 3.0], 0.4, 0.1, peak=1000.0, predict_s_per_case=2.5)
    second = _round([2.0, 2.0, 2.0], 0.3, peak=1200.0, train=150.0)
    merged = bench.merge_rounds([first, second])
    assert merged["step_seconds"] == [1.0, 3.0, 2.0, 2.0, 2.0]
    assert merged["s_per_iter"] == pytest.approx(2.0)  # median of the two rounds' means (2.0, 2.0)
    assert merged["s_per_iter_pooled_mean"] == pytest.approx(10.0 / 5)
    assert (merged["s_per_iter_min"], merged["s_per_iter_median"]) == (1.0, 2.0)
    assert merged["data_wait_s"] == pytest.approx(0.8) and merged["data_wait_unlabeled_s"] == pytest.approx(0.1)
    assert merged["data_wait_fraction"] == pytest.approx(0.8 / 10.0)
    assert merged["peak_mem_mib"] == 1200.0 and merged["train_mem_mib"] == 150.0
    assert merged["round_s_per_iter"] == [2.0, 2.0] and merged["rounds"] == 2
    assert merged["predict_s_per_case"] == 2.5 and merged["wall_s"] == 20.0
    assert "error" not in merged
    assert first["step_seconds"] == [1.0, 3.0]  # inputs not modified
    assert bench.merge_rounds([first]) == first


def test_merge_rounds_median_of_round_means_ignores_one_slow_round(bench):
    rounds = [_round([0.9, 1.5], 0.0), _round([0.5, 0.5], 0.0), _round([0.4, 0.4], 0.0)]
    merged = bench.merge_rounds(rounds)
    assert merged["round_s_per_iter"] == pytest.approx([1.2, 0.5, 0.4])
    assert merged["s_per_iter"] == pytest.approx(0.5)
    assert merged["s_per_iter_pooled_mean"] == pytest.approx(4.2 / 6)
    assert bench.merge_rounds(rounds[1:])["s_per_iter"] == pytest.approx(0.45)  # even count: mean of the middle two


def test_merge_rounds_with_a_failed_round(bench):
    failed = {"trainer": "A", "error": "worker exit code 1: boom", "wall_s": 1.0}
    merged = bench.merge_rounds([failed, _round([2.0], 0.0)])
    assert merged["s_per_iter"] == 2.0 and merged["flops_per_iter"] == 7e9
    assert merged["error"] == "round 1: worker exit code 1: boom"
    with pytest.raises(ValueError):
        bench.merge_rounds([])


def test_interleaved_efficiency_against_the_baseline(bench):
    rows = [_row("nnUNetTrainer", 1.0, 10e9, 1000.0, 100, 2.0), _row("B", 3.0, 40e9, 1500.0, 400, 2.0),
            _row("C", 2.0, 20e9, 1200.0, 200, 2.0)]
    interleaved = {"trainers": {"nnUNetTrainer": {"s_per_iter_min": 0.5, "s_per_iter_median": 0.6,
                                                  "flops_per_iter": 10e9, "step_seconds": [0.5, 0.6, 0.7],
                                                  "inference_flops_per_patch": 2e9, "inference_s_min": 0.1,
                                                  "inference_s_median": 0.2},
                                "B": {"s_per_iter_min": 1.6, "s_per_iter_median": 3.0, "flops_per_iter": 40e9,
                                      "step_seconds": [1.6, 3.0, 3.1], "inference_flops_per_patch": 4.4e9,
                                      "inference_s_min": 0.25, "inference_s_median": 0.3}},
                   "errors": {"C": "RuntimeError: out of memory"}}
    bench.merge_interleaved(rows, interleaved)
    bench.add_ratios(rows)
    base, b, c = rows
    assert base["interleaved_efficiency"] == 1.0
    # paired by round: 1.6 / 0.5, 3.0 / 0.6, 3.1 / 0.7 -> median 3.1 / 0.7 (not 1.6 / 0.5 of the fastest of each)
    assert b["interleaved_time_ratio"] == pytest.approx(3.1 / 0.7)
    assert b["interleaved_s_per_iter"] == 1.6 and b["interleaved_repeats"] == 1
    assert b["interleaved_s_per_iter_median"] == 3.0 and b["inference_s_per_patch_median"] == 0.3
    assert b["interleaved_efficiency"] == pytest.approx(4.0 / (3.1 / 0.7))
    assert b["efficiency"] == pytest.approx(4.0 / 3.0)  # the row's own columns are unchanged
    # no per-round inference timings in this input: the fastest of each (0.25 / 0.1)
    assert b["inference_flop_ratio"] == pytest.approx(2.2) and b["inference_time_ratio"] == pytest.approx(2.5)
    assert b["inference_efficiency"] == pytest.approx(2.2 / 2.5) and base["inference_efficiency"] == 1.0
    assert c["interleaved_efficiency"] is None and c["interleaved_error"].startswith("RuntimeError")
    assert c["inference_efficiency"] is None
    assert "eff.ilv" in bench.format_table(rows, "nnUNetTrainer")


def test_paired_time_ratio_follows_the_machine_through_its_phases(bench):
    # the machine slows down by 1.5x in round 2 and speeds up again; B is always exactly 2x the baseline
    baseline = [1.0, 1.5, 1.0]
    assert bench.paired_time_ratio([2.0, 3.0, 2.0], baseline) == pytest.approx(2.0)
    # one slow repetition of B (round 1) does not decide
    assert bench.paired_time_ratio([3.0, 3.0, 2.0], baseline) == pytest.approx(2.0)  # median of 3, 2, 2
    # two repetitions per round: the fastest within each round, then pair
    assert bench.paired_time_ratio([2.2, 2.0, 3.3, 3.0], [1.0, 1.1, 1.5, 1.6], repeats=2) == pytest.approx(2.0)
    # a trainer that failed after the first round: only the common rounds
    assert bench.paired_time_ratio([4.0], baseline) == pytest.approx(4.0)
    assert bench.paired_time_ratio(None, baseline) is None and bench.paired_time_ratio([], baseline) is None
    assert bench.paired_time_ratio([1.0], [1.0, 1.0], repeats=2) is None  # no complete common round


def test_worker_argv_interleaved_and_prediction_override(bench):
    args = bench.parse_args(["--interleaved-rounds", "4", "--interleaved-steps", "3", "--predict-cases", "2"])
    argv = bench.worker_argv(args, "D", "2d", "nnUNetTrainer,MemCifSSLTrainer", "/tmp/o", predict_cases=0,
                             interleaved=True)
    worker = bench.parse_args(argv[2:])
    assert worker.worker and worker.worker_interleaved and worker.predict_cases == 0
    assert worker.worker_trainer.split(",") == ["nnUNetTrainer", "MemCifSSLTrainer"]
    assert (worker.interleaved_rounds, worker.interleaved_steps) == (4, 3)
    assert not bench.parse_args(bench.worker_argv(args, "D", "2d", "A", "/tmp/o")[2:]).worker_interleaved


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--interleaved-rounds", "-1"], ["--interleaved-steps", "0"]])
def test_parse_args_rejects_bad_rounds(bench, argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


@pytest.mark.parametrize("stop,code,reason", [(KeyboardInterrupt, 130, "SIGINT"), (SystemExit(143), 143, "exit 143")])
def test_interrupted_run_reports_and_saves_the_rows_measured_so_far(bench, tmp_path, monkeypatch, capsys, stop, code,
                                                                    reason):
    """Ctrl-C / SIGTERM / timeout during the second trainer: the first trainer's row is printed and in the JSON."""
    calls = []

    def fake_run_one(args, env, dataset, configuration, trainer, workdir, round_index):
        calls.append(trainer)
        if len(calls) == 2:
            raise stop
        return {**_row(trainer, 0.5, 1e9, 100.0, 10.0, None), "wall_s": 1.0}

    monkeypatch.setattr(bench.parent, "prepare_phantom", lambda args, workdir: "Dataset979_X")
    monkeypatch.setattr(bench.parent, "run_one", fake_run_one)
    monkeypatch.setattr(bench.cli, "exit_on_sigterm", lambda: None)  # keep pytest's own SIGTERM handling
    saved = dict(os.environ)
    try:
        out = tmp_path / "o.json"
        code_returned = bench.main(["-c", "2d", "-tr", "nnUNetTrainer", "MemCifSSLTrainer", "--workdir",
                                    str(tmp_path / "w"), "--json", str(out), "--interleaved-rounds", "0"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert calls == ["nnUNetTrainer", "MemCifSSLTrainer"] and code_returned == code
    summary = json.loads(out.read_text())
    assert summary["interrupted"] == reason
    assert [row["trainer"] for row in summary["results"]["2d"]] == ["nnUNetTrainer"]
    assert summary["results"]["2d"][0]["s_per_iter"] == 0.5 and summary["results"]["2d"][0]["time_ratio"] == 1.0
    printed = capsys.readouterr().out
    assert "interrupted" in printed and "nnUNetTrainer*" in printed


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="fork-only behaviour")
def test_sigterm_ends_the_benchmark_by_systemexit_but_forked_pool_workers_by_default():
    import subprocess

    code = ("import importlib.util, os, signal, sys; "
            f"spec = importlib.util.spec_from_file_location('b', {str(SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.exit_on_sigterm(); "
            "assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None); pid = os.fork()\n"
            "if pid == 0: os._exit(0 if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else 3)\n"
            "print(os.waitpid(pid, 0)[1] >> 8)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "0"  # the forked child has the default SIGTERM again


# ---------------------------------------------------------------- -pl: rows on another planner's plans (ResEnc)
def test_planner_sets_the_plans_of_every_row(bench, capsys):
    args = bench.parse_args([])
    assert (args.planner, args.plans) == ("ExperimentPlanner", "nnUNetPlans")
    args = bench.parse_args(["-pl", "nnUNetPlannerResEncM"])
    assert (args.planner, args.plans) == ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans")
    assert bench.parse_args(["-pl", "nnUNetPlannerResEncM", "-p", "MyPlans"]).plans == "MyPlans"
    worker = bench.parse_args(bench.worker_argv(args, "D", "2d", "MemCifSSLTrainer", "/tmp/o")[2:])
    assert worker.plans == "nnUNetResEncUNetMPlans"  # the children build every trainer on those plans
    for argv in (["-pl", "NoSuchPlanner"], ["-pl", "NoSuchPlanner", "-p", "nnUNetPlans"]):
        with pytest.raises(SystemExit) as stop:
            bench.parse_args(argv)
        assert stop.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, then one error line
        assert ": error: -pl NoSuchPlanner: no nnU-Net experiment planner of that name" in last


def test_phantom_planned_with_the_planner_and_rebuilt_when_it_changes(bench, tmp_path, monkeypatch):
    import nnunet_mmssl.dataset_conversion as conversion
    import nnunet_mmssl.dataset_conversion.phantom as phantom
    import nnunet_mmssl.planners.plan_and_preprocess as planning

    planned = []
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setattr(phantom, "make_phantom_cases", lambda folder, **kwargs: folder)
    monkeypatch.setattr(conversion, "convert_dataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(planning, "plan_and_preprocess",
                        lambda dataset_id, configurations, **kwargs: planned.append(kwargs["planner"]))
    (tmp_path / "logs").mkdir()
    default = bench.parse_args(["-c", "2d"])
    resenc = bench.parse_args(["-c", "2d", "-pl", "nnUNetPlannerResEncM"])
    marker = tmp_path / bench.PHANTOM_MARKER
    for args, expected in ((default, ["ExperimentPlanner"]), (default, []), (resenc, ["nnUNetPlannerResEncM"]),
                           (resenc, []), (default, ["ExperimentPlanner"])):
        planned.clear()
        assert bench.prepare_phantom(args, str(tmp_path)) == "Dataset979_MMSSLBenchPhantom"
        assert planned == expected  # [] = reused
        recipe = json.loads(marker.read_text())
        assert recipe.get("planner") == (None if args is default else "nnUNetPlannerResEncM")


def test_unregistered_phantom_planned_in_a_child_with_the_planner(bench, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench.cases.subprocess, "call", lambda argv, **kwargs: calls.append(argv) or 0)
    log = str(tmp_path / "plan.log")
    bench.plan_in_child(978, ["2d"], 1, log, planner="nnUNetPlannerResEncM")
    bench.plan_in_child(978, ["2d"], 1, log)
    assert calls[0][-2:] == ["-pl", "nnUNetPlannerResEncM"] and "-pl" not in calls[1]


@pytest.mark.parametrize("extra, title", [([], "configuration 2d (1 timed"),
                                          (["-pl", "nnUNetPlannerResEncM"],
                                           "configuration 2d on nnUNetResEncUNetMPlans (1 timed")])
def test_table_title_names_plans_other_than_nnunets_default(bench, tmp_path, monkeypatch, capsys, extra, title):
    seen = []

    def fake_run_one(args, env, dataset, configuration, trainer, workdir, round_index):
        seen.append(args.plans)
        return {**_row(trainer, 0.5, 1e9, 100.0, 10.0, None), "wall_s": 1.0}

    monkeypatch.setattr(bench.parent, "prepare_phantom", lambda args, workdir: "Dataset979_X")
    monkeypatch.setattr(bench.parent, "run_one", fake_run_one)
    monkeypatch.setattr(bench.cli, "exit_on_sigterm", lambda: None)
    saved = dict(os.environ)
    try:
        assert bench.main(["-c", "2d", "-tr", "nnUNetTrainer", "MemCifSSLTrainer", "--iterations", "1",
                           "--workdir", str(tmp_path / "w"), "--interleaved-rounds", "0", *extra]) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("configuration ")] == [
        next(line for line in lines if line.startswith(title))]
    assert set(seen) == {"nnUNetResEncUNetMPlans" if extra else "nnUNetPlans"}

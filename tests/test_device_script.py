"""The one-command GPU check (``benchmarks/device/gpu_check.py``) end to end on the CPU at a tiny size, so that it is
known to work before a GPU is lent: every trainer present, real steps with finite losses, sane numbers."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device", "gpu_check.py")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_arguments_exit_2_with_one_line(capsys, tmp_path):
    gpu_check = _module()
    for argv, words in ((["--steps", "0"], "--steps 0"), (["--phantom-shape", "8", "32", "32"], "--phantom-shape"),
                        (["--phantom-cases", "1", "2"], "--phantom-cases [1, 2]")):
        with pytest.raises(SystemExit) as stop:
            gpu_check.main([*argv, "--out", str(tmp_path / "out")])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gpu_check.py: error: ") and words in err, err
    assert not (tmp_path / "out").exists()  # nothing written on bad input


def _run(out, work, *extra) -> dict:
    # a child process: nnU-Net reads its folders from the environment when first imported, and the check sets them
    env = dict(os.environ, nnUNet_n_proc_DA="0", nnUNet_def_n_proc="2")
    done = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--out", str(out), "--workdir", str(work),
                           "--phantom-shape", "16", "32", "32", "--phantom-cases", "2", "2", "--steps", "1",
                           "--warmup", "0", "--n-proc-da", "0", "-np", "2", "--width-divisor", "8",
                           "--budget-s", "1000", *extra], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_gpu_check_runs_every_trainer_on_the_cpu(tmp_path):
    """Every trainer's real steps at a tiny size (narrowed networks, no tracing: tests/test_compile.py traces every
    network), then the reference again with the check's own compilation, on the phantoms already built."""
    gpu_check = _module()
    work = tmp_path / "work"
    summary = _run(tmp_path / "out", work, "--compile", "off")
    assert summary["complete"] and summary["device"] == "cpu"
    rows = {(r["phantom"], r["trainer"]): r for r in summary["rows"]}
    expected = [("registered", t) for t in gpu_check.REGISTERED_TRAINERS] + \
        [("unregistered", t) for t in gpu_check.UNREGISTERED_TRAINERS]
    assert sorted(rows) == sorted(expected)
    table = (tmp_path / "out" / "gpu_check.txt").read_text()
    for (phantom, name), row in rows.items():
        what = f"{name} on the {phantom} phantom: {row}"
        assert "error" not in row and "skipped" not in row, what
        assert name in table
        assert row["losses_finite"] and all(math.isfinite(v) for step in row["losses"] for v in step.values()), what
        assert row["amp"] is False and row["scaler_skipped_steps"] is None  # nnU-Net uses AMP on CUDA only
        assert row["compiled"] is False and row["graph_breaks"] is None, what  # --compile off
        assert row["s_per_iter"] > 0 and row["flops_per_iter"] > 0, what
        assert row["batch_labeled"] >= 2 and len(row["patch_size"]) == 3 and min(row["patch_size"]) >= 16, what
        assert isinstance(row["host_syncs"], int) and row["host_syncs"] >= 1, what  # each step logs its losses once
        assert row["peak_mem_gib"] is None  # GPU memory only
        assert row["plans_gpu_target_gib"] == 8.0  # nnU-Net's default target
        assert row["est_over_budget"] > 0
        assert math.isclose(row["efficiency"], row["flop_ratio"] / row["time_ratio"]), what
    for phantom in ("registered", "unregistered"):
        reference = rows[(phantom, "nnUNetTrainer")]
        assert reference["time_ratio"] == reference["flop_ratio"] == 1.0
        assert reference["est_over_budget"] == 1.0
    # a second network or the teacher's forward and an unlabelled batch: more FLOPs than the plain U-Net's step
    for name in ("MemCifSSLTrainer", "MMFMCMLTrainer", "MeanTeacherTrainer", "SMMLTrainer"):
        assert rows[("registered", name)]["flop_ratio"] > 1.5, rows[("registered", name)]
    assert rows[("unregistered", "DBDCTrainer")]["flop_ratio"] > 1.5
    assert rows[("registered", "PlainSupervisedTrainer")]["flop_ratio"] == pytest.approx(1.0, rel=0.01)

    # the compiled path: the check traces the network as nnU-Net's torch.compile would, Dynamo's counters read back
    compiled = _run(tmp_path / "out_compiled", work, "-tr", "nnUNetTrainer")["rows"]
    assert [r["trainer"] for r in compiled] == ["nnUNetTrainer"]
    assert compiled[0]["compiled"] is True and compiled[0]["graph_breaks"] == 0 and compiled[0]["graphs"] >= 1
    assert compiled[0]["losses_finite"]

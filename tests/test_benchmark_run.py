"""benchmarks/benchmark_trainers.py end to end on a tiny phantom (slow: child processes train and predict).

Asserts what the table is made of (shapes of the work, counted FLOPs, memory estimates and budgets), never timings.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_trainers.py"


def test_benchmark_on_tiny_phantom_with_budgeted_plans(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--phantom", "-c", "3d_fullres", "-tr", "nnUNetTrainer", "MemCifSSLTrainer",
         "--mmssl-plans", "nnUNetMMSSLPlans", "--gpu-memory-target", "0.3", "--iterations", "1", "--warmup", "1",
         "--predict-cases", "1", "--phantom-shape", "16", "48", "48", "--phantom-cases", "2", "2", "--n-proc-da", "1",
         "--interleaved-rounds", "1", "--interleaved-steps", "1", "--workdir", str(tmp_path / "work"),
         "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["trainer"]: r for r in json.loads(out.read_text())["results"]["3d_fullres"]}
    base, ours = rows["nnUNetTrainer"], rows["MemCifSSLTrainer"]
    assert not base.get("error") and not ours.get("error"), (base.get("error"), ours.get("error"))
    assert base["plans"] == "nnUNetPlans" and ours["plans"] == "nnUNetMMSSLPlans"
    # the budgeted plans shrink our trainer's patch or batch; its step stays within the plans' budget
    assert ours["patch_size"] != base["patch_size"] or ours["batch_labeled"] < base["batch_labeled"]
    assert ours["batch_unlabeled"] == ours["batch_labeled"]
    assert base["budget_ratio"] == 1.0 and ours["budget_ratio"] <= 1.25
    # two branches + fusion blocks on a labelled and an unlabelled batch: more FLOPs per sample than nnU-Net's
    per_sample = [r["flops_per_iter"] / (r["batch_labeled"] + r["batch_unlabeled"]) /
                  (r["patch_size"][0] * r["patch_size"][1] * r["patch_size"][2]) for r in (base, ours)]
    assert per_sample[1] > 1.8 * per_sample[0]
    assert ours["s_per_iter"] > 0 and 0.0 <= ours["data_wait_fraction"] <= 1.0
    assert base["predict_s_per_case"] > 0 and ours["predict_s_per_case"] > 0
    # the interleaved compute measurement ran both trainers on fixed batches in one process, same FLOPs as the rows
    for row in (base, ours):
        assert row["interleaved_s_per_iter"] > 0 and row["interleaved_flops_per_iter"] == row["flops_per_iter"]
        assert len(row["interleaved_step_seconds"]) == 1 and row["interleaved_efficiency"] is not None
    assert base["interleaved_efficiency"] == 1.0 and "eff.ilv" in result.stdout
    # inference FLOPs of one patch: both branches (plus fusion) against one plain U-Net
    assert 1.8 * base["inference_flops_per_patch"] < ours["inference_flops_per_patch"] * \
        (base["patch_size"][0] * base["patch_size"][1] * base["patch_size"][2]) / \
        (ours["patch_size"][0] * ours["patch_size"][1] * ours["patch_size"][2])
    assert ours["inference_s_per_patch"] > 0 and ours["inference_efficiency"] is not None
    assert "est/plan" in result.stdout and "MemCifSSLTrainer nnUNetMMSSLPlans" in result.stdout
    # the gradient share of the unsupervised term: measured for the SSL trainer, absent for nnU-Net's
    assert base["unsup_grad_share"] is None and 0 < ours["unsup_grad_share"] < 1e3 and "u.share" in result.stdout

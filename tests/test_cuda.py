"""CUDA behaviour of every trainer against nnUNetTrainer's (skipped without a GPU; CI has none).

The facts come from one run of the GPU check, ``benchmarks/device/gpu_check.py`` (its docstring says what it
measures), in a child process at a small size: nnU-Net's AMP and nnU-Net's own ``torch.compile`` of the network. What
must hold on CUDA:
- nnU-Net's AMP is active for every trainer (GradScaler) and real steps keep losses finite; the GradScaler does not
  skip every step (an overflow in every step -- SMML's FRC before its float32 region -- would train nothing);
- every network but DBDC's compiles without a graph break;
- the check measured peak memory and CUDA's own count of synchronising calls for every trainer.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "device",
                      "gpu_check.py")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run([sys.executable, SCRIPT, "--device", "cuda", "--out", str(out), "--phantom-shape", "32",
                           "64", "64", "--steps", "2", "--warmup", "1", "--budget-s", "900"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"gpu_check failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["complete"]
    for row in summary["rows"]:
        assert "error" not in row and "skipped" not in row, row
    return summary["rows"]


def test_every_trainer_steps_with_amp_and_stays_finite(rows):
    for row in rows:
        assert row["amp"], f"{row['trainer']}: nnU-Net's GradScaler is missing on CUDA"
        assert row["losses_finite"], f"{row['trainer']}: {row['losses']}"
        assert row["scaler_skipped_steps"] < len(row["losses"]), f"{row['trainer']}: every step overflowed"


def test_networks_compile_and_the_check_measures(rows):
    for row in rows:
        assert row["compiled"], row["trainer"]
        if not row["trainer"].startswith("DBDC"):
            assert row["graph_breaks"] == 0, f"{row['trainer']}: {row['graph_break_reasons']}"
        assert row["peak_mem_gib"] > 0 and isinstance(row["cuda_sync_warnings"], int), row["trainer"]


def test_channel_attention_is_finite_in_float16_where_a_naive_affinity_overflows():
    from nnunet_mmssl.building_blocks.attention import ChannelSelfAttention

    block = ChannelSelfAttention(8).cuda()
    with torch.no_grad():
        block.gamma.fill_(1.0)
    x = torch.full((1, 8, 32, 32, 32), 8.0, device="cuda") + torch.randn(1, 8, 32, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        f = x.half().reshape(1, 8, -1)
        naive = torch.bmm(f, f.transpose(1, 2))  # sums 32768 products of ~64: beyond float16's 65504
        out = block(x.half())
    assert not torch.isfinite(naive).all()
    assert out.dtype == torch.float16 and torch.isfinite(out).all()

"""CUDA behaviour of our trainers against nnUNetTrainer's (skipped without a GPU; CI has none).

Run on a lent GPU by ``benchmarks/device/gpu_check.sh``. The trainer facts come from ``tests/cuda_probe.py`` in a
child process (its docstring says what it measures). What must hold on CUDA:
- nnU-Net's AMP is active for every trainer (GradScaler, float16 logits under autocast) and a real step keeps
  losses and parameters finite: our float16-sensitive parts (the channel attention's affinity, the losses) survive
  mixed precision;
- our train step synchronises host and device no more often than nnUNetTrainer's (no ``.item()``, boolean
  indexing or host-side branching on device values in the step);
- inference under autocast gives finite logits of the patch's shape.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_probe.py")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cuda_probe")
    output = workdir / "probe.json"
    done = subprocess.run([sys.executable, PROBE, str(workdir), str(output), "cuda"], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"cuda_probe failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(output.read_text())


def _trainers(probe):
    for name, facts in probe["trainers"].items():
        assert "error" not in facts, f"{name}: {facts.get('error')}"
    return probe["trainers"]


def test_every_trainer_steps_with_amp_and_stays_finite(probe):
    for name, facts in _trainers(probe).items():
        assert facts["amp_grad_scaler"], f"{name}: nnU-Net's GradScaler is missing on CUDA"
        assert facts["losses_finite"], f"{name}: {facts['losses']}"
        assert facts["parameters_finite"], f"{name}: a parameter became inf/nan after one AMP step"


def test_our_steps_synchronise_no_more_than_nnunet(probe):
    trainers = _trainers(probe)
    reference = trainers["nnUNetTrainer"]["step_syncs"]
    assert reference >= 1  # nnU-Net reads its loss back once per step: the counter works
    for name, facts in trainers.items():
        assert facts["step_syncs"] <= reference, f"{name}: {facts['step_syncs']} syncs per step vs {reference}"


def test_inference_under_autocast_is_finite(probe):
    for name, facts in _trainers(probe).items():
        assert facts["inference_finite"], name
        assert facts["inference_dtype"] == "float16", f"{name}: autocast inactive ({facts['inference_dtype']})"
        assert facts["inference_shape"][1] == 2  # background + lesion


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

"""The CPU allocator setting of our trainers: what it asks glibc for, that it removes the page faults of a
repeated large allocation (the pattern of a training step), and that the trainers apply it on CPU only."""

import subprocess
import sys
import textwrap

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from plans_fixtures import DATASET_JSON, PLANS

from nnunet_mmssl.trainers import MemCifSSLTrainer, SSLTrainerBase, cpu_allocator
from nnunet_mmssl.trainers import base as trainer_base


class FakeLibc:
    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return self.answer


def test_asks_glibc_for_no_mmap_and_no_trim():
    libc = FakeLibc()
    assert cpu_allocator.keep_freed_memory_in_process(libc) is True
    assert libc.calls == [(cpu_allocator.M_MMAP_MAX, 0), (cpu_allocator.M_TRIM_THRESHOLD, -1)]
    assert (cpu_allocator.M_MMAP_MAX, cpu_allocator.M_TRIM_THRESHOLD) == (-4, -1)  # glibc's malloc.h


def test_reports_a_refusal_and_a_missing_glibc(monkeypatch):
    assert cpu_allocator.keep_freed_memory_in_process(FakeLibc(answer=0)) is False
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: None)
    assert cpu_allocator.keep_freed_memory_in_process() is False


PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    from nnunet_mmssl.trainers.cpu_allocator import keep_freed_memory_in_process
    if sys.argv[1] == "keep":
        assert keep_freed_memory_in_process()
    w = torch.ones(1, 16, 1, 1, 1, requires_grad=True)
    x = torch.randn(8, 1, 16, 64, 64)
    def step():  # activations of 32 MiB each (8 x 16 x 16 x 64 x 64 floats), made and freed as in a training step
        y = torch.nn.functional.leaky_relu(x * w)
        torch.nn.functional.instance_norm(y).square().mean().backward()
        w.grad = None
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(cpu_allocator._glibc() is None, reason="needs glibc (Linux)")
def test_repeated_training_steps_stop_page_faulting():
    # both probes at once (CI's time budget): each counts its own process's page faults (RUSAGE_SELF)
    probes = [subprocess.Popen([sys.executable, "-c", PROBE, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for mode in ("default", "keep")]
    outputs = [probe.communicate() for probe in probes]
    assert [probe.returncode for probe in probes] == [0, 0], [err[-2000:] for _, err in outputs]
    activation_pages = 8 * 16 * 16 * 64 * 64 * 4 // 4096
    default, kept = (int(out.split()[-1]) for out, _ in outputs)
    # glibc default: the 32 MiB activations are mapped and unmapped, every step faults them in again
    assert default > 5 * 2 * activation_pages
    # kept in the heap: later steps reuse the pages (measured here: 450,000 vs 16,000-41,000)
    assert kept < 0.2 * default


def _trainer(tmp_path, monkeypatch, cls=MemCifSSLTrainer):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    return cls(dict(PLANS, continue_training=False), "2d", 0, dict(DATASET_JSON), device=torch.device("cpu"))


@pytest.mark.parametrize("device,enabled,expected", [("cpu", True, 1), ("cpu", False, 0), ("cuda", True, 0)])
def test_trainers_apply_it_on_cpu_only(tmp_path, monkeypatch, device, enabled, expected):
    calls = []
    monkeypatch.setattr(trainer_base, "keep_freed_memory_in_process", lambda: calls.append(1) or True)
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: None)  # no data needed for the wiring
    monkeypatch.setattr(SSLTrainerBase, "memory_check", lambda self: None)
    trainer = _trainer(tmp_path, monkeypatch)
    trainer.device = torch.device(device)
    trainer.cpu_keep_freed_memory = enabled
    trainer.on_train_start()
    assert len(calls) == expected

"""Fast tests of benchmarks/benchmark_trainers.py's DBDC support: phantom kind, prototype share column, per-modality
loaders and prediction groups (no training, no child processes)."""

import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_trainers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_trainers_dbdc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("trainers, expected", [
    (["nnUNetTrainer", "DBDCTrainer"], "unregistered"),
    (["nnUNetTrainer", "DBDCSupervisedTrainer"], "unregistered"),
    (["PooledUNetTrainer"], "unregistered"),
    (["nnUNetTrainer", "MemCifSSLTrainer"], "registered"),
])
def test_auto_phantom_kind_follows_the_trainers(bench, trainers, expected):
    assert bench.resolve_phantom_kind("auto", trainers) == expected
    # an explicit kind is kept whatever the trainers
    assert bench.resolve_phantom_kind("registered", trainers) == "registered"
    assert bench.resolve_phantom_kind("unregistered", trainers) == "unregistered"


def test_phantom_kind_arguments(bench):
    with pytest.raises(ValueError, match="--phantom-kind 'both'"):
        bench.resolve_phantom_kind("both", ["DBDCTrainer"])
    args = bench.parse_args(["-tr", "nnUNetTrainer", "DBDCTrainer", "-c", "2d"])
    assert args.phantom and args.phantom_kind == "unregistered"
    assert bench.parse_args(["-tr", "nnUNetTrainer"]).phantom_kind == "registered"
    with pytest.raises(SystemExit):  # DBDC cannot train on the registered phantom: a usage error, not a crash later
        bench.parse_args(["-tr", "DBDCTrainer", "--phantom-kind", "registered"])
    # with -d the dataset is the user's: the kind is only recorded
    assert bench.parse_args(["-d", "5", "-tr", "DBDCTrainer", "--phantom-kind", "registered"]).dataset == "5"


def test_prototype_share_column(bench):
    assert bench.prototype_share(0.5, 2.0) == 0.25
    assert bench.prototype_share(None, 2.0) is None and bench.prototype_share(0.5, 0.0) is None
    rows = [{"trainer": "nnUNetTrainer", "s_per_iter": 1.0, "flops_per_iter": 10e9},
            {"trainer": "DBDCTrainer", "s_per_iter": 3.0, "flops_per_iter": 24e9, "prototype_share": 0.125}]
    assert bench.add_ratios(rows) == "nnUNetTrainer"
    assert rows[1]["prototype_pct"] == pytest.approx(12.5)
    assert rows[0]["prototype_pct"] is None
    assert rows[1]["flop_ratio"] == pytest.approx(2.4) and rows[1]["time_ratio"] == pytest.approx(3.0)
    assert rows[1]["efficiency"] == pytest.approx(0.8)
    table = bench.format_table(rows, "nnUNetTrainer").splitlines()
    header = table[0].split()
    assert header[-2:] == ["proto", "%"]
    assert table[3].split()[0] == "DBDCTrainer" and table[3].split()[-1] == "12.5"
    assert table[2].split()[-1] == "-"


def test_merge_rounds_pools_prototype_seconds(bench):
    rounds = [{"trainer": "DBDCTrainer", "s_per_iter": 1.0, "step_seconds": [1.0, 1.0], "prototype_s": 0.2},
              {"trainer": "DBDCTrainer", "s_per_iter": 2.0, "step_seconds": [2.0, 2.0], "prototype_s": 1.0}]
    merged = bench.merge_rounds(rounds)
    assert merged["prototype_s"] == pytest.approx(1.2)
    assert merged["prototype_share"] == pytest.approx(1.2 / 6.0)
    # a round without the measurement: no pooled share (never a share of part of the steps), in either order
    first = {**rounds[0], "prototype_share": 0.1}
    assert "prototype_share" not in bench.merge_rounds([first, {**rounds[1], "prototype_s": None}])
    assert "prototype_share" not in bench.merge_rounds([{**rounds[0], "prototype_s": None}, rounds[1]])


def test_effective_batch_size_of_per_modality_loaders(bench):
    plain = SimpleNamespace(batch_size=4, dataloader_train=iter([]), use_unlabeled=True, unlabeled_batch_size=None,
                            dataloader_unlabeled=iter([]))
    assert bench.effective_batch_size(plain) == (4, 4)
    # DBDC: one labelled loader per modality, one unlabelled per modality (None: a modality without unlabelled case)
    dbdc = SimpleNamespace(batch_size=4, dataloader_train=SimpleNamespace(loaders=[object(), object(), object()]),
                           use_unlabeled=True, unlabeled_batch_size=2, dataloader_unlabeled=[iter([]), None, iter([])])
    assert bench.effective_batch_size(dbdc) == (12, 4)
    supervised = SimpleNamespace(batch_size=4, dataloader_train=SimpleNamespace(loaders=[object(), object()]),
                                 use_unlabeled=False, dataloader_unlabeled=None)
    assert bench.effective_batch_size(supervised) == (8, 0)


def test_wrap_unlabeled_times_each_modality_loader(bench):
    ticks = iter(range(100))
    clock = lambda: float(next(ticks))  # noqa: E731 - each call one second later
    stream = [iter([1, 2]), None, iter([3])]
    wrapped, timers = bench.wrap_unlabeled(stream)
    for timer in timers:
        timer.clock = clock
    assert wrapped[1] is None and len(timers) == 2
    assert next(wrapped[0]) == 1 and next(wrapped[2]) == 3
    assert [t.calls for t in timers] == [1, 1] and sum(t.seconds for t in timers) == 2.0
    original = bench.unwrap_unlabeled(wrapped)
    assert original[0] is stream[0] and original[1] is None and original[2] is stream[2]
    single, [timer] = bench.wrap_unlabeled(iter([5]))
    assert next(single) == 5 and bench.unwrap_unlabeled(single) is timer.inner


def test_cases_by_modality(bench):
    cases = [("c0", ["c0_0000.nii.gz"]), ("c1", ["c1_0000.nii.gz"]), ("c2", ["c2_0000.nii.gz"])]
    assert bench.cases_by_modality(cases, None) == [(None, cases)]
    groups = bench.cases_by_modality(cases, {"c0": "MR", "c1": "CT", "c2": "MR"})
    assert groups == [("MR", [cases[0], cases[2]]), ("CT", [cases[1]])]
    with pytest.raises(ValueError, match="case c2 has no modality"):
        bench.cases_by_modality(cases, {"c0": "MR", "c1": "CT"})


class _FakeNetwork:
    def compute_conv_feature_map_size(self, patch_size):
        return 1000


class _FakeDBDC:
    """What measure_training touches: each train_step spends 10 ms (5 ms of it "in prototypes")."""

    def __init__(self):
        self.device = SimpleNamespace(type="cpu")
        self.batch_size = 2
        self.configuration_manager = SimpleNamespace(patch_size=(8, 8))
        self.network = _FakeNetwork()
        self.prototype_bank = object()
        self._prototype_seconds = 0.0
        self.dataloader_train = _Modalities(2)
        self.use_unlabeled = True
        self.unlabeled_batch_size = None
        self.dataloader_unlabeled = [iter(range(100)), iter(range(100))]

    def train_step(self, batch):
        for stream in self.dataloader_unlabeled:
            next(stream)
        time.sleep(0.01)
        self._prototype_seconds += 0.005
        return {"loss": 0.0}


class _Modalities:
    def __init__(self, k):
        self.loaders = [iter(range(100)) for _ in range(k)]

    def __iter__(self):
        return self

    def __next__(self):
        return [next(loader) for loader in self.loaders]


def test_measure_training_reads_the_timed_steps_prototype_seconds(bench):
    """Warm-up, FLOP-counted and gradient-share steps must not count: 3 timed steps of 5 ms each = 15 ms."""
    trainer = _FakeDBDC()
    args = SimpleNamespace(warmup=2, iterations=3, share_steps=0)
    result = {}
    bench.measure_training(trainer, args, result)
    assert result["prototype_s"] == pytest.approx(0.015)
    assert result["prototype_share"] == pytest.approx(0.015 / sum(result["step_seconds"]))
    assert 0.1 < result["prototype_share"] < 0.5
    assert (result["batch_labeled"], result["batch_unlabeled"]) == (4, 4)
    assert result["memory_estimate"] == 8000
    # the unlabelled loaders were wrapped per modality and their waits counted
    assert all(isinstance(s, bench.WaitTimer) for s in trainer.dataloader_unlabeled)
    assert result["data_wait_unlabeled_s"] >= 0.0
    # a trainer without prototypes gets no share
    trainer = _FakeDBDC()
    trainer.prototype_bank = None
    result = {}
    bench.measure_training(trainer, args, result)
    assert "prototype_share" not in result

"""Every trainer of ours under nnU-Net's DDP, on the CPU: a 2-process ``gloo`` group.

nnU-Net's launcher (``nnUNetv2_train -num_gpus N``) hard-codes NCCL and CUDA; here two processes join a ``gloo``
group and each builds the trainer with nnU-Net's own ``__init__`` and ``initialize`` while the group is up (so
``is_ddp``, the per-rank batch split and the DDP wrapping are nnU-Net's; only ``device_ids`` is dropped from the DDP
call, which is CUDA-only, and the device is set to the CPU). Each rank starts from its own random initialisation and
trains three steps on its own fixed batches (different data per rank, as in real DDP). Afterwards:

* every parameter the optimizer updates and the teacher (weights and step) are identical on both ranks;
* every parameter the optimizer updates lives inside a DDP module (nnU-Net's ``self.network``, or a trainer's own
  wrapper: SMML's refinement networks);
* our extra logs are the mean over both ranks' steps (gathered like nnU-Net's ``train_losses``);
* the unlabelled stream: each rank reads its own shard of the cases with its share of ``unlabeled_batch_size``;
* a checkpoint is written by rank 0 only and resumes to identical state on both ranks.

Deliberately broken trainers check that the comparison can fail: a teacher copied from the network before DDP
wrapping (each rank's own random initialisation), a trainable branch kept outside the DDP module, and a parameter no
step uses (which is how a trainer that needed ``find_unused_parameters`` would fail here: all of ours pass without).
"""

import os
import socket
import traceback
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import trainer_harness as harness
from torch import nn

from nnunet_mmssl.semisup.ema import EMATeacher
from nnunet_mmssl.trainers import MeanTeacherTrainer, PlainSupervisedTrainer, SMMLTrainer
from nnunet_mmssl.trainers.ddp import per_rank_batch_size, shard_identifiers

# the tests using ``ranks`` are slow: two fresh processes import torch and nnU-Net (most of ~1 min on 2 cores)
WORLD_SIZE = 2
STEPS = 3
UNLABELED_CASES = 5


class TeacherBeforeWrapTrainer(MeanTeacherTrainer):
    """Broken on purpose: the teacher is copied from the network before nnU-Net wraps it in DDP."""

    def configure_optimizers(self):
        self.teacher = EMATeacher(self.network, alpha=self.ema_alpha)  # rank-specific random weights
        return super().configure_optimizers()


class BranchOutsideDDPTrainer(PlainSupervisedTrainer):
    """Broken on purpose: a trainable output branch outside the DDP module (its gradients are never averaged)."""

    def configure_optimizers(self):
        self.branch = nn.Conv2d(2, 2, 1)
        optimizer, scheduler = super().configure_optimizers()
        optimizer.add_param_group({"params": list(self.branch.parameters())})
        return optimizer, scheduler

    def compute_losses(self, data, target, unlabeled):
        return self.loss([self.branch(o) for o in self.network(data)], target), torch.zeros(())


class UnusedParameterTrainer(PlainSupervisedTrainer):
    """Broken on purpose: a parameter inside the DDP module that no step uses (DDP without find_unused_parameters
    must refuse the next step)."""

    def configure_optimizers(self):
        self.network.unused = nn.Conv2d(1, 1, 1)
        return super().configure_optimizers()


BROKEN = [TeacherBeforeWrapTrainer, BranchOutsideDDPTrainer, UnusedParameterTrainer]
#: the harness's trainers and SMML (its refinement networks are trained outside ``self.network``)
DDP_TRAINERS = [*harness.TRAINERS, SMMLTrainer]


def _cpu_ddp(module, device_ids=None, **kwargs):
    """nnU-Net's DDP call without its CUDA-only ``device_ids``."""
    return nn.parallel.DistributedDataParallel(module, **kwargs)


def _write_unlabeled_cases(folder: str) -> None:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

    os.makedirs(folder, exist_ok=True)
    for index in range(UNLABELED_CASES):
        data = np.full((2, 1, 20, 20), float(index), dtype=np.float32)
        nnUNetDatasetNumpy.save_case(data, np.zeros((1, 1, 20, 20), dtype=np.int16),
                                     {"class_locations": {}, "spacing": [1.0, 1.0, 1.0]},
                                     os.path.join(folder, f"unl_{index:03d}"))


def _parameters(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for group in trainer.optimizer.param_groups for p in group["params"]]


def _one_trainer(trainer_class, rank: int, root: str) -> dict:
    torch.manual_seed(1000 + rank)  # each rank its own initialisation, as unseeded ranks of a real run
    trainer = trainer_class(harness.plans(), "2d", 0, harness.DATASET_JSON.copy(), torch.device("cpu"))
    assert trainer.is_ddp and trainer.local_rank == rank
    trainer.device, trainer.grad_scaler = torch.device("cpu"), None  # nnU-Net set cuda:<rank>
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.initialize()
    result = {"batch_size": trainer.batch_size,
              "in_ddp": isinstance(trainer.network, nn.parallel.DistributedDataParallel)}
    params_in_optimizer = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    ddp_modules = [m for m in vars(trainer).values() if isinstance(m, nn.parallel.DistributedDataParallel)]
    ddp_params = {id(p) for module in ddp_modules for p in module.parameters()}
    result["outside_ddp"] = [tuple(p.shape) for p in params_in_optimizer if id(p) not in ddp_params]
    step_batches = harness.batches(trainer, seed=rank, count=STEPS)  # different data on each rank
    outputs = harness.run_steps(trainer, step_batches, seed=50 + rank)
    trainer.on_train_epoch_end(outputs)
    result.update(sup_losses=[float(o["sup_loss"]) for o in outputs],
                  unsup_losses=[float(o["unsup_loss"]) for o in outputs],
                  logged_sup=trainer.logger.get_value("train_sup_losses", step=-1),
                  logged_unsup=trainer.logger.get_value("train_unsup_losses", step=-1),
                  parameters=_parameters(trainer))
    teacher = getattr(trainer, "teacher", None)
    if teacher is not None:
        result.update(teacher=[t.clone() for t in teacher.module.state_dict().values()], ema_step=teacher.step)
    if trainer_class in BROKEN:
        return result

    # checkpoint: rank 0 writes, both ranks resume from it
    checkpoint = os.path.join(root, f"{trainer_class.__name__}.pth")
    trainer.save_checkpoint(checkpoint if rank == 0 else checkpoint + f".rank{rank}")
    result["rank_wrote"] = os.path.isfile(checkpoint + f".rank{rank}") if rank else os.path.isfile(checkpoint)
    dist.barrier()
    torch.manual_seed(2000 + rank)
    resumed = trainer_class(harness.plans(), "2d", 0, harness.DATASET_JSON.copy(), torch.device("cpu"))
    resumed.device, resumed.grad_scaler = torch.device("cpu"), None
    resumed.print_to_log_file = lambda *args, **kwargs: None
    resumed.load_checkpoint(checkpoint)
    result["resumed_parameters"] = _parameters(resumed)
    if getattr(resumed, "teacher", None) is not None:
        result["resumed_teacher"] = [t.clone() for t in resumed.teacher.module.state_dict().values()]

    # the unlabelled stream: this rank's shard, this rank's share of the unlabelled batch
    if trainer.use_unlabeled:
        trainer.unlabeled_batch_size = 3
        result["unlabeled_ids"] = list(trainer.unlabeled_dataset().identifiers)
        result["unlabeled_batch"] = trainer.unlabeled_batch_size_per_rank()
        loader = trainer.get_unlabeled_dataloader()
        batch = next(loader)["data"]
        result["unlabeled_batch_shape"] = tuple(batch.shape)
    return result


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), nnUNet_n_proc_DA="0", nnUNet_compile="false")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

    nnunet_trainer_module.DDP = _cpu_ddp
    harness.set_folders(root)
    if rank == 0:
        _write_unlabeled_cases(os.path.join(root, "preprocessed", harness.PLANS["dataset_name"],
                                            "nnUNetPlans_2d_unlabeled"))
    dist.barrier()
    results = {}
    for trainer_class in DDP_TRAINERS + BROKEN:
        try:
            results[trainer_class.__name__] = _one_trainer(trainer_class, rank, root)
        except Exception:  # reported by the test of this trainer
            results[trainer_class.__name__] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(root, f"rank{rank}.pth"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(_free_port(), root), nprocs=WORLD_SIZE, join=True)
    return [torch.load(os.path.join(root, f"rank{r}.pth"), weights_only=False) for r in range(WORLD_SIZE)]


def _results(ranks, name: str) -> list[dict]:
    results = [r[name] for r in ranks]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
    return results


def _identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("name", [c.__name__ for c in DDP_TRAINERS])
def test_ranks_stay_identical_and_logs_are_gathered(ranks, name):
    zero, one = _results(ranks, name)
    assert zero["in_ddp"] and zero["outside_ddp"] == [] and one["outside_ddp"] == []
    assert zero["batch_size"] == one["batch_size"] == 1  # nnU-Net's split of the plans' batch 2
    assert zero["sup_losses"] != one["sup_losses"], "the ranks must see different data"
    assert _identical(zero["parameters"], one["parameters"]), "trained weights differ between ranks"
    assert ("teacher" in zero) == (name == "MeanTeacherTrainer")
    if "teacher" in zero:
        assert zero["ema_step"] == one["ema_step"] == STEPS
        assert _identical(zero["teacher"], one["teacher"]), "teachers differ between ranks"
        assert not _identical(zero["teacher"], zero["parameters"])  # a real EMA, not a copy of the student
    for key, values in (("logged_sup", "sup_losses"), ("logged_unsup", "unsup_losses")):
        expected = float(np.mean(zero[values] + one[values]))
        assert zero[key] == pytest.approx(expected) and one[key] == pytest.approx(expected), key
    assert zero["rank_wrote"] and not one["rank_wrote"], "only rank 0 writes the checkpoint"
    assert _identical(zero["resumed_parameters"], zero["parameters"])
    assert _identical(one["resumed_parameters"], zero["parameters"])
    if "teacher" in zero:
        assert _identical(zero["resumed_teacher"], zero["teacher"])
        assert _identical(one["resumed_teacher"], zero["teacher"])


@pytest.mark.slow
@pytest.mark.parametrize("name", [c.__name__ for c in DDP_TRAINERS if c.use_unlabeled])
def test_unlabelled_stream_is_sharded_with_the_per_rank_batch(ranks, name):
    zero, one = _results(ranks, name)
    assert zero["unlabeled_ids"] == ["unl_000", "unl_002", "unl_004"]
    assert one["unlabeled_ids"] == ["unl_001", "unl_003"]
    assert (zero["unlabeled_batch"], one["unlabeled_batch"]) == (2, 1)  # nnU-Net's rule for a global batch of 3
    assert zero["unlabeled_batch_shape"] == (2, 2, 16, 16) and one["unlabeled_batch_shape"] == (1, 2, 16, 16)


@pytest.mark.slow
def test_the_comparison_fails_for_a_teacher_copied_before_wrapping(ranks):
    zero, one = _results(ranks, TeacherBeforeWrapTrainer.__name__)
    assert _identical(zero["parameters"], one["parameters"])  # the student is synchronised by DDP
    assert not _identical(zero["teacher"], one["teacher"])


@pytest.mark.slow
def test_the_comparison_fails_for_a_branch_outside_ddp(ranks):
    zero, one = _results(ranks, BranchOutsideDDPTrainer.__name__)
    assert zero["outside_ddp"] == [(2, 2, 1, 1), (2,)]
    assert not _identical(zero["parameters"], one["parameters"])


@pytest.mark.slow
def test_a_parameter_left_without_gradient_stops_ddp(ranks):
    for result in (r[UnusedParameterTrainer.__name__] for r in ranks):
        assert "Expected to have finished reduction in the prior iteration" in result.get("error", ""), result


def test_per_rank_batch_size_is_nnunets_split(monkeypatch):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

    for world in (2, 3, 4):
        for global_batch in range(world, 10):
            sizes = []
            for rank in range(world):
                monkeypatch.setattr(nnunet_trainer_module, "dist", SimpleNamespace(
                    get_world_size=lambda w=world: w, get_rank=lambda r=rank: r))
                fake = SimpleNamespace(is_ddp=True, oversample_foreground_percent=0.33,
                                       configuration_manager=SimpleNamespace(batch_size=global_batch))
                nnunet_trainer_module.nnUNetTrainer._set_batch_size_and_oversample(fake)
                sizes.append(fake.batch_size)
                assert per_rank_batch_size(global_batch, world, rank) == fake.batch_size, (global_batch, world, rank)
            assert sum(sizes) == global_batch
    with pytest.raises(ValueError, match="global batch of 1 cannot be split across 2 GPUs"):
        per_rank_batch_size(1, 2, 0)


def test_shard_identifiers():
    ids = ["c", "a", "e", "b", "d"]
    shards = [shard_identifiers(ids, 2, rank) for rank in range(2)]
    assert shards == [["a", "c", "e"], ["b", "d"]]
    assert shard_identifiers(ids, 1, 0) == sorted(ids)
    assert shard_identifiers(["a"], 2, 1) == ["a"]  # fewer cases than ranks: every rank keeps all

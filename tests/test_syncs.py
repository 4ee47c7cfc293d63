"""Host-device synchronisations per training step, counted on the CPU (issue #22): every trainer within nnU-Net's.

On CUDA each ``.item()``, ``.tolist()``, boolean index, ``nonzero`` or copy to the host stalls the GPU until the queued
kernels have run. :func:`nnunet_mmssl.diagnostics.count_host_syncs` counts them at torch's dispatcher, which sees the
same calls on a CPU. Each trainer is built and initialised by nnU-Net's own code on the tiny fixture plans (DBDC and
the pooled U-Net on unregistered CT/MR plans), takes a warm-up step, then one step that does not measure the gradient
share and one that does (the only per-step logging of our trainers, every :attr:`gradient_share_every` iterations).

Budget: nnU-Net's ``nnUNetTrainer`` on the same plans makes one synchronisation per step (the loss it logs,
``l.detach().cpu().numpy()``); our logging needs none more, since the gradient share and the losses travel to the host
in that one copy. So every trainer must make exactly what nnUNetTrainer makes, on both kinds of step (on CUDA both
also wait for the GradScaler's overflow check, which a CPU step has no scaler for).

Variants are grouped where they share the step's code (see :data:`GROUPS`), so that every code path of every
exported trainer's step is counted once.
"""

import copy
import math
import sys
import tempfile

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import trainer_harness  # noqa: E402
from plans_fixtures import DATASET_JSON  # noqa: E402

import nnunet_mmssl.trainers as trainers  # noqa: E402
from nnunet_mmssl.diagnostics import count_host_syncs  # noqa: E402

#: synchronisations our logging adds on a step that logs (the gradient share goes to the host with the losses)
LOGGING_SYNCS = 0
#: what nnUNetTrainer's step makes on the CPU: one host copy of the loss
NNUNET_SYNCS = {"host_copy.cpu": 1}

#: trainer counted -> trainers whose step it covers. A member has the same step methods (checked below) and differs
#: only in settings: a schedule, a switch whose both settings are counted (on in one representative, off in another:
#: MEM, CIF, MMF, MAE, MCML, SMML's branches, PBC, FRC, SRN, DBDC's norm-bank scope, MAW), or a loss term the
#: representative computes too (DBDC's loss ablations).
GROUPS = {
    "MemCifSSLTrainer": ["MemCifSSLTrainer_noCIF", "MemCifSSLTrainer_noMEM", "MemCifSSLTrainer_demo",
                         "MemCifSupervisedTrainer", "MemCifSupervisedTrainer_demo",
                         # the weight set by the gradient share: the switch is counted on in MeanTeacherTrainer_share0p1
                         "MemCifSSLTrainer_share0p05", "MemCifSSLTrainer_share0p1", "MemCifSSLTrainer_share0p2"],
    "MemCifSSLTrainer_plain": [],  # MEM and CIF off
    "MemCifSSLTrainer_printedConsistency": [],  # the other reduction of the consistency loss
    "MMFMCMLTrainer": ["MMFMCMLTrainer_MMF_MCML", "MMFMCMLTrainer_MMF_MAE", "MMFMCMLTrainer_MMF",
                       "MMFMCMLSupervisedTrainer"],
    "MMFMCMLTrainer_baseline": [],  # MMF, MAE, MCML and the unlabelled stream off
    "MeanTeacherTrainer": [],
    # the weight set by the gradient share (its controller updated from the logged share, on measuring steps)
    "MeanTeacherTrainer_share0p1": ["MeanTeacherTrainer_share0p05", "MeanTeacherTrainer_share0p2"],
    "PlainSupervisedTrainer": [],
    "DBDCTrainer": ["DBDCTrainer_lossIpc", "DBDCTrainer_lossIpcFpc", "DBDCTrainer_lossIpcFpcMc",
                    "DBDCTrainer_lossIpcFpcMcPc", "DBDCTrainer_noMAW", "DBDCTrainer_mlmbEncoder",
                    "DBDCTrainer_mlmbEncoderBottleneck"],
    "DBDCTrainer_lossNone": ["DBDCSupervisedTrainer"],  # no unlabelled stream
    "DBDCTrainer_noMLPB_noMAW": [],  # no prototypes, no embeddings
    "DBDCTrainer_mlmbNone": [],  # every norm shared by the modalities
    "PooledUNetTrainer": [],
    "SMMLTrainer": ["SMMLTrainer_dualPBCFRC", "SMMLTrainer_dualPBC", "SMMLTrainer_dualFRC", "SMMLTrainer_dual"],
    "SMMLTrainer_single": ["SMMLTrainer_singleSRN"],  # one branch, no PBC, FRC, SRN
    "SMMLSSLTrainer": [],
    "ModalityDropoutTrainer": [],
}
#: the methods that make a step: a member of a group must inherit all of them from where its representative does
STEP_METHODS = ("train_step", "step_inputs", "compute_losses", "unsupervised_loss", "unlabeled_consistency",
                "after_optimizer_step")
UNREGISTERED_JSON = {"channel_names": {"0": "CT+MR"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                     "file_ending": ".nii.gz"}


@pytest.fixture(scope="module", autouse=True)
def folders():
    trainer_harness.set_folders(tempfile.mkdtemp(prefix="syncs-"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny steps run fastest on one thread (a second one only waits for the first on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unregistered(name: str) -> bool:
    return name.startswith(("DBDC", "Pooled"))


def make(trainer_class, unregistered: bool):
    torch.manual_seed(0)
    plans = trainer_harness.plans()
    dataset_json = DATASET_JSON
    if unregistered:
        plans["configurations"]["2d"].update(use_mask_for_norm=[False], normalization_schemes=["ZScoreNormalization"])
        plans["mmssl"] = {"layout": "unregistered", "modalities": ["CT", "MR"],
                          "intensity_schemes": {"CT": "CTNormalization", "MR": "ZScoreNormalization"}}
        dataset_json = UNREGISTERED_JSON
    trainer = trainer_class(plans, "2d", 0, copy.deepcopy(dataset_json), torch.device("cpu"))
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.initialize()
    trainer.gradient_share_every = 2  # steps 0 and 2 measure it, step 1 does not
    return trainer


def _labelled(trainer, generator: torch.Generator) -> dict:
    patch = trainer.configuration_manager.patch_size
    data = torch.randn((trainer.batch_size, trainer.num_input_channels, *patch), generator=generator)
    full = (torch.rand((trainer.batch_size, 1, *patch), generator=generator) > 0.6).float()
    scales = trainer._get_deep_supervision_scales()
    target = [torch.nn.functional.interpolate(full, scale_factor=s, mode="nearest-exact") if s[0] != 1 else full
              for s in scales]
    return {"data": data, "target": target}


def _step(trainer, generator: torch.Generator) -> tuple[dict, dict]:
    """One ``train_step`` on fresh synthetic batches; returns its output and the synchronisations it made."""
    unlabelled_size = trainer.unlabeled_batch_size_per_rank() if hasattr(trainer, "use_unlabeled") else 0
    patch = trainer.configuration_manager.patch_size

    def unlabelled() -> dict:
        return {"data": torch.randn((unlabelled_size, trainer.num_input_channels, *patch), generator=generator)}

    if isinstance(trainer, trainers.DBDCTrainer):  # one labelled and one unlabelled batch per modality
        batch = {"modality_batches": [_labelled(trainer, generator) for _ in range(trainer.num_modalities)]}
        trainer.dataloader_unlabeled = [iter([unlabelled()]) for _ in range(trainer.num_modalities)] \
            if trainer.use_unlabeled else None
    else:
        batch = _labelled(trainer, generator)
        if getattr(trainer, "use_unlabeled", False):
            trainer.dataloader_unlabeled = iter([unlabelled()])
    with count_host_syncs() as syncs:
        output = trainer.train_step(batch)
    return output, dict(syncs.by_op)


def step_syncs(trainer) -> dict[str, dict]:
    """Synchronisations of a non-logging and a logging step, after a warm-up step."""
    generator = torch.Generator().manual_seed(0)
    trainer.on_train_epoch_start()
    _step(trainer, generator)
    plain_output, plain = _step(trainer, generator)
    logging_output, logging = _step(trainer, generator)
    if getattr(trainer, "use_unlabeled", False):  # the gradient share was measured on the logging step only
        assert math.isfinite(float(logging_output["grad_share"])) and math.isnan(float(plain_output["grad_share"]))
    return {"logging": logging, "plain": plain}


@pytest.fixture(scope="module")
def nnunet_syncs() -> dict[bool, dict[str, dict]]:
    """nnUNetTrainer's synchronisations per step on the registered and on the unregistered plans."""
    return {unregistered: step_syncs(make(nnUNetTrainer, unregistered)) for unregistered in (False, True)}


def test_groups_cover_every_exported_trainer():
    covered = [name for representative, members in GROUPS.items() for name in [representative, *members]]
    assert len(covered) == len(set(covered))
    assert sorted(covered) == sorted(n for n in trainers.__all__ if n not in ("MMSSLTrainerBase", "SSLTrainerBase"))
    for representative, members in GROUPS.items():  # a member shares the representative's step code
        for member in members:
            for method in STEP_METHODS:
                assert getattr(getattr(trainers, member), method, None) is \
                    getattr(getattr(trainers, representative), method, None), (member, method)


def test_nnunet_trainer_syncs_once_per_step(nnunet_syncs):
    for counts in nnunet_syncs.values():
        assert counts == {"logging": NNUNET_SYNCS, "plain": NNUNET_SYNCS}


@pytest.mark.parametrize("name", list(GROUPS))
def test_step_syncs_within_nnunets_budget(name, nnunet_syncs):
    counts = step_syncs(make(getattr(trainers, name), _unregistered(name)))
    reference = nnunet_syncs[_unregistered(name)]
    assert sum(counts["plain"].values()) <= sum(reference["plain"].values()), counts
    assert sum(counts["logging"].values()) <= sum(reference["logging"].values()) + LOGGING_SYNCS, counts
    # and exactly nnU-Net's one copy of the logged values (a regression or a new sync shows the operation)
    assert counts == {"logging": NNUNET_SYNCS, "plain": NNUNET_SYNCS}


# ---------------------------------------------------------------- the counter itself
def test_counter_counts_what_synchronises_and_nothing_else():
    x = torch.arange(6.0)
    mask = x > 2
    with count_host_syncs() as syncs:
        x.sum().item()  # _local_scalar_dense
        x[mask]  # boolean index: nonzero inside
        torch.nonzero(x)
        torch.unique(x)
        x.masked_select(mask)
        bool(x.max() > 1)  # is_nonzero / _local_scalar_dense
        host = torch.stack([x.sum(), x.mean()]).cpu()  # one host copy
        host.numpy(), host[0].item(), float(host[1]), host.tolist()  # free: views of the host copy
        x.tolist()  # another copy
        # sync-free: index with long tensors, where, reductions, one-hot by comparison
        x[torch.tensor([0, 2])], torch.where(mask, x, 0), x.sum(), x[:, None] == torch.arange(3)
    assert syncs.by_op["host_copy.cpu"] == 1 and syncs.by_op["host_copy.tolist"] == 1
    assert syncs.by_op["aten.index"] == 1 and syncs.by_op["aten.nonzero"] == 1
    assert syncs.by_op["aten.masked_select"] == 1 and syncs.by_op["aten._local_scalar_dense"] == 2
    assert sum(v for k, v in syncs.by_op.items() if "unique" in k) == 1
    assert syncs.total == 8
    assert torch.Tensor.cpu is not None and "counted" not in torch.Tensor.cpu.__name__  # restored after the block

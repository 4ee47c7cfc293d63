"""Real trainers of ours on the tiny plans of plans_fixtures, driven step by step with fixed batches (no data files).

Used by the resume and DDP tests: the trainer is constructed and initialised by nnU-Net's own code; only the data
loaders are replaced by fixed synthetic batches (labelled batch with deep-supervision targets, unlabelled batch).
"""

import copy
import os

import torch
from plans_fixtures import DATASET_JSON, PLANS

from nnunet_mmssl.trainers import (
    MeanTeacherTrainer,
    MemCifSSLTrainer,
    MemCifSupervisedTrainer,
    MMFMCMLSupervisedTrainer,
    MMFMCMLTrainer,
    PlainSupervisedTrainer,
)

TRAINERS = [MemCifSSLTrainer, MemCifSupervisedTrainer, MMFMCMLTrainer, MMFMCMLSupervisedTrainer, MeanTeacherTrainer,
            PlainSupervisedTrainer]


def set_folders(root: str) -> None:
    """Point nnU-Net at ``root`` and give it a preprocessed folder whose dataset class it can infer."""
    os.environ["nnUNet_raw"] = os.path.join(root, "raw")
    os.environ["nnUNet_preprocessed"] = os.path.join(root, "preprocessed")
    os.environ["nnUNet_results"] = os.path.join(root, "results")
    folder = os.path.join(root, "preprocessed", PLANS["dataset_name"], PLANS["configurations"]["2d"]["data_identifier"])
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "case_0000.b2nd"), "a").close()


def plans() -> dict:
    """The fixture plans with what nnU-Net's initialize reads besides the architecture."""
    new = copy.deepcopy(PLANS)
    new["configurations"]["2d"].update(batch_dice=False, use_mask_for_norm=[False, False],
                                       normalization_schemes=["ZScoreNormalization"] * 2)
    new["continue_training"] = False
    return new


def make_trainer(trainer_class, seed: int, initialize: bool = True):
    """A trainer built and initialised by nnU-Net's code on the CPU, network initialised with ``seed``."""
    torch.manual_seed(seed)
    trainer = trainer_class(plans(), "2d", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    trainer.print_to_log_file = lambda *args, **kwargs: None
    if initialize:
        trainer.initialize()
    return trainer


def batches(trainer, seed: int, count: int) -> list[tuple[dict, dict]]:
    """``count`` fixed (labelled, unlabelled) batches for ``trainer``'s batch sizes and deep-supervision scales."""
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales() or [[1.0] * len(patch)]
    result = []
    for _ in range(count):
        data = torch.randn((trainer.batch_size, trainer.num_input_channels, *patch), generator=generator)
        full = (torch.rand((trainer.batch_size, 1, *patch), generator=generator) > 0.7).float()
        target = [torch.nn.functional.interpolate(full, scale_factor=s, mode="nearest-exact") if s[0] != 1 else full
                  for s in scales]
        unlabeled_size = trainer.unlabeled_batch_size_per_rank()
        unlabeled = torch.randn((unlabeled_size, trainer.num_input_channels, *patch), generator=generator)
        result.append(({"data": data, "target": target}, {"data": unlabeled}))
    return result


def run_steps(trainer, step_batches, seed: int) -> list[dict]:
    """One epoch start, then one ``train_step`` per batch, the global RNG reseeded before each step."""
    trainer.on_train_epoch_start()
    outputs = []
    for index, (labelled, unlabelled) in enumerate(step_batches):
        trainer.dataloader_unlabeled = iter([unlabelled])
        torch.manual_seed(seed + index)
        outputs.append(trainer.train_step(labelled))
    return outputs


def training_state(trainer) -> dict:
    """Deep copy of everything a resumed step depends on: network, optimizer, teacher and its step, epoch."""
    state = {"network": copy.deepcopy(trainer.network_module.state_dict()),
             "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
             "current_epoch": trainer.current_epoch}
    refiners = getattr(trainer, "refiners", None)  # SMML's training-only refinement networks
    if refiners is not None:
        state["refiners"] = copy.deepcopy(refiners.state_dict())
    teacher = getattr(trainer, "teacher", None)
    if teacher is not None:
        state["teacher"] = copy.deepcopy(teacher.module.state_dict())
        state["ema_step"] = teacher.step
    return state

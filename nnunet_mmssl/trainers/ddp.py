"""What our trainers need under nnU-Net's DDP (``nnUNetv2_train -num_gpus N``): pure helpers.

nnU-Net splits the global batch of the plans across the ranks (``nnUNetTrainer._set_batch_size_and_oversample``)
and gathers per-rank training losses with ``all_gather_object`` before logging (``on_train_epoch_end``). Our
unlabelled stream and our extra logs follow the same rules: :func:`per_rank_batch_size` is nnU-Net's split,
:func:`shard_identifiers` gives each rank its own unlabelled cases, :func:`gather_across_ranks` is nnU-Net's gather.
"""

from collections.abc import Sequence

import numpy as np
import torch.distributed as dist


def per_rank_batch_size(global_batch_size: int, world_size: int, rank: int) -> int:
    """This rank's share of ``global_batch_size``, as nnU-Net splits the labelled batch (first ranks get the rest).

    Raises:
        ValueError: if the global batch is smaller than the number of ranks (nnU-Net asserts the same).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes.")
    if global_batch_size < world_size:
        raise ValueError(f"A global batch of {global_batch_size} cannot be split across {world_size} GPUs; use at "
                         f"least one sample per GPU (raise the batch size or lower -num_gpus).")
    base = global_batch_size // world_size
    return base + 1 if base * world_size + rank < global_batch_size else base


def shard_identifiers(identifiers: Sequence[str], world_size: int, rank: int) -> list[str]:
    """This rank's cases: every ``world_size``-th of the sorted identifiers, starting at ``rank``.

    With fewer cases than ranks every rank keeps all cases (no rank may be left without data).
    """
    ordered = sorted(identifiers)
    if world_size <= 1 or len(ordered) < world_size:
        return ordered
    return ordered[rank::world_size]


def gather_across_ranks(values) -> np.ndarray:
    """All ranks' values of a per-epoch log (``all_gather_object``, as nnU-Net gathers ``train_losses``), flat.

    Without an initialised process group this rank's values are returned. Every rank must call it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return np.ravel(np.asarray(values, dtype=np.float64))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, np.asarray(values, dtype=np.float64))
    return np.concatenate([np.ravel(g) for g in gathered])

"""Losses, each as a function plus a thin module, with its paper."""

from nnunet_mmssl.losses.consistency import (
    CrossModalConsistencyLoss,
    cross_modal_consistency_loss,
    pairwise_consistency_loss,
    probabilities,
)
from nnunet_mmssl.losses.mutual_learning import ContrastiveMutualLearningLoss, contrastive_mutual_learning_loss
from nnunet_mmssl.losses.prototypes import (
    MPCLLoss,
    PrototypeBank,
    modality_contrast_loss,
    mpcl_loss,
    prototype_contrast_loss,
    prototype_distance_loss,
    prototype_similarity,
    pseg_loss,
    sinkhorn_knopp,
)

__all__ = ["CrossModalConsistencyLoss", "cross_modal_consistency_loss", "pairwise_consistency_loss", "probabilities"]
__all__ += ["ContrastiveMutualLearningLoss", "contrastive_mutual_learning_loss"]
__all__ += ["MPCLLoss", "PrototypeBank", "modality_contrast_loss", "mpcl_loss", "prototype_contrast_loss",
            "prototype_distance_loss", "prototype_similarity", "pseg_loss", "sinkhorn_knopp"]

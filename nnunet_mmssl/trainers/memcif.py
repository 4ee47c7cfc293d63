"""MemCifSSLTrainer: Chung et al. 2025, "Modality-Specific Enhancement and Complementary Fusion for
Semi-Supervised Multi-Modal Brain Tumor Segmentation" (METHODS.md §1).

Dual-branch U-Net (one nnU-Net encoder/decoder per modality group) with MEM on each bottleneck and CIF between
them (:class:`nnunet_mmssl.architectures.MemCifUNet`). Loss: Dice+CE on both heads (eqs. 2-3) +
``0.01 * L_cons`` on unlabelled data (eqs. 4-5), gradient to both branches, constant weight (the paper uses no ramp).
Two readings of ``L_cons`` (:attr:`MemCifSSLTrainer.consistency_reduction`, see
:func:`~nnunet_mmssl.losses.consistency.cross_modal_consistency_loss`): ``"mean"`` (default), the mean of
``(softmax p1_u - softmax p2_u)^2`` over voxels and classes; ``"printed"``
(:class:`MemCifSSLTrainer_printedConsistency`), eq. 4 as printed -- per-sample squared norm over pixels and
classes, averaged over samples, patch-size-independent,
referenced to the paper's 240 x 240 slices -- 115,200 times the mean for two classes. The default was chosen by
measurement on the real BraTS data (README, "Does the unlabelled data act?"): with the printed reduction the two heads
agree on background from the first epoch and nnU-Net's validation pseudo Dice stayed 0 for the 8 epochs we ran (0 for
the first two with a sigmoid ramp over a quarter of the run), while the mean reduction trains like the supervised twin;
its gradient share is ~0.1 %, so at the paper's weight its unlabelled term barely acts.
Inference: mean of the two heads' logits.

Variants (paper Table 3 and an honest baseline): ``_noMEM``, ``_noCIF``, ``_plain`` (neither), and
:class:`MemCifSupervisedTrainer` (same network, labelled data only).
"""

import torch

from nnunet_mmssl.losses.consistency import PAPER_SAMPLE_VOXELS, pairwise_consistency_loss
from nnunet_mmssl.trainers.base import MMSSLTrainerBase


class MemCifSSLTrainer(MMSSLTrainerBase):
    """MEM + CIF dual-branch network with cross-modal consistency on unlabelled data."""

    network_class_name = "nnunet_mmssl.architectures.multi_branch.MemCifUNet"
    use_mem: bool = True
    use_cif: bool = True
    mem_type: str = "channel_attention"
    #: gamma_cons of eq. 5
    unsupervised_weight: float = 0.01
    unsupervised_rampup_fraction: float = 0.0
    #: reduction of eq. 4: ``"mean"`` (over voxels and classes) or ``"printed"`` (per-sample squared norm, as printed)
    consistency_reduction: str = "mean"
    #: voxels of the reference sample of the ``"printed"`` reduction (the paper's 240 x 240 slices)
    consistency_reference_voxels: int = PAPER_SAMPLE_VOXELS

    def network_kwargs(self) -> dict:
        return {"use_mem": self.use_mem, "use_cif": self.use_cif, "mem_type": self.mem_type}

    def unsupervised_loss(self, unlabeled_logits: list[torch.Tensor], unlabeled_data: torch.Tensor) -> torch.Tensor:
        return pairwise_consistency_loss(unlabeled_logits, use_sigmoid=self.label_manager.has_regions,
                                         reduction=self.consistency_reduction,
                                         reference_voxels=self.consistency_reference_voxels)


class MemCifSSLTrainer_noMEM(MemCifSSLTrainer):
    """Ablation: CIF only."""

    use_mem = False


class MemCifSSLTrainer_noCIF(MemCifSSLTrainer):
    """Ablation: MEM only (each branch decodes its own enhanced bottleneck)."""

    use_cif = False


class MemCifSSLTrainer_plain(MemCifSSLTrainer):
    """Ablation: plain dual-branch network (paper's 'Baseline'), still with cross-modal consistency."""

    use_mem = False
    use_cif = False


class MemCifSSLTrainer_printedConsistency(MemCifSSLTrainer):
    """Eq. 4 as printed: the per-sample squared norm (patch-size-independent), 115,200x the mean for two classes."""

    consistency_reduction = "printed"


class MemCifSupervisedTrainer(MemCifSSLTrainer):
    """Same MEM + CIF network trained on the labelled cases only (no unlabelled stream)."""

    use_unlabeled = False

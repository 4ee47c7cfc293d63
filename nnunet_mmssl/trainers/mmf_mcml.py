"""MMFMCMLTrainer: Meng et al. 2025, "Semi-Supervised Multi-Modal Medical Image Segmentation for Complex
Situations", MICCAI 2025 (METHODS.md §2).

Dual-branch U-Net (one nnU-Net encoder/decoder per modality group) with multi-stage fusion between the encoders and
modality-aware enhancement of the bottlenecks (:class:`nnunet_mmssl.architectures.mmf_mae.MMFMAEUNet`). Loss:
nnU-Net's deep-supervised Dice+CE on both heads (eq. 4) + ``alpha * L_unsup`` with the contrastive mutual learning
loss between the two heads' full-resolution predictions on unlabelled data (eqs. 5-6,
:func:`~nnunet_mmssl.losses.mutual_learning.contrastive_mutual_learning_loss`), ``alpha = 1.0``, constant (the paper
uses no ramp). Inference: mean of the two heads' logits (each head alone through the network's ``inference_heads``).

Ablation variants of paper Table 2 (rows without MCML use no unlabelled data, since MCML is the only unlabelled term):
``_baseline`` (plain dual-branch), ``_MMF``, ``_MMF_MAE``, ``_MMF_MCML``; and :class:`MMFMCMLSupervisedTrainer`
(the full network on the labelled cases only; the same training as ``_MMF_MAE``, named like the other methods'
supervised baselines).
"""

import torch

from nnunet_mmssl.losses.mutual_learning import contrastive_mutual_learning_loss
from nnunet_mmssl.trainers.base import MMSSLTrainerBase


class MMFMCMLTrainer(MMSSLTrainerBase):
    """MMF + MAE dual-branch network with contrastive mutual learning (MCML) on unlabelled data."""

    network_class_name = "nnunet_mmssl.architectures.mmf_mae.MMFMAEUNet"
    #: multi-stage multi-modal fusion (eq. 3) between the encoders
    use_mmf: bool = True
    #: modality-aware enhancement (eq. 2) of the bottlenecks
    use_mae: bool = True
    #: contrastive mutual learning (eq. 6) on unlabelled data; without it set ``use_unlabeled = False`` too
    use_mcml: bool = True
    #: MAE descriptor: ``"per_modality"`` (eq. 2 as written) or ``"shared"`` (SKNet-style, psi on ``F_a + F_b``)
    mae_descriptor: str = "per_modality"
    #: channel reduction of MAE's first fully connected layer
    mae_reduction: int = 16
    #: kernel of MAE's psi2; None = the bottleneck's kernel, dilated by 2 (receptive field of a 5-kernel)
    mae_psi2_kernel_size: int | list[int] | None = None
    #: dilation of MAE's psi2; None = 2 without ``mae_psi2_kernel_size``, 1 with it (that kernel, undilated)
    mae_psi2_dilation: int | None = None
    #: alpha of ``L_sup + alpha * L_unsup``
    unsupervised_weight: float = 1.0
    unsupervised_rampup_fraction: float = 0.0

    def network_kwargs(self) -> dict:
        return {"use_mmf": self.use_mmf, "use_mae": self.use_mae, "mae_descriptor": self.mae_descriptor,
                "mae_reduction": self.mae_reduction, "mae_psi2_kernel_size": self.mae_psi2_kernel_size,
                "mae_psi2_dilation": self.mae_psi2_dilation}

    def unsupervised_loss(self, unlabeled_logits: list[torch.Tensor], unlabeled_data: torch.Tensor) -> torch.Tensor:
        if not self.use_mcml:
            raise RuntimeError(f"{type(self).__name__} sets use_mcml = False but reads unlabelled data; set "
                               f"use_unlabeled = False as well (MCML is the method's only unlabelled loss).")
        if len(unlabeled_logits) != 2:
            raise ValueError(f"Contrastive mutual learning needs two heads, got {len(unlabeled_logits)}.")
        return contrastive_mutual_learning_loss(*unlabeled_logits, use_sigmoid=self.label_manager.has_regions)


class MMFMCMLTrainer_baseline(MMFMCMLTrainer):
    """Table 2, row 1: plain dual-branch network (no MMF, no MAE), labelled data only (no MCML)."""

    use_mmf = False
    use_mae = False
    use_mcml = False
    use_unlabeled = False


class MMFMCMLTrainer_MMF(MMFMCMLTrainer):
    """Table 2, row 2: + MMF; labelled data only."""

    use_mae = False
    use_mcml = False
    use_unlabeled = False


class MMFMCMLTrainer_MMF_MAE(MMFMCMLTrainer):
    """Table 2, row 3: + MMF + MAE; labelled data only."""

    use_mcml = False
    use_unlabeled = False


class MMFMCMLTrainer_MMF_MCML(MMFMCMLTrainer):
    """Table 2, row 4: + MMF + MCML (no MAE), with unlabelled data."""

    use_mae = False


class MMFMCMLSupervisedTrainer(MMFMCMLTrainer):
    """The full MMF + MAE network trained on the labelled cases only (no unlabelled stream)."""

    use_mcml = False
    use_unlabeled = False

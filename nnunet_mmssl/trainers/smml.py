"""SMMLTrainer: Semantic-guided Masked Mutual Learning (Liang et al. 2025; METHODS.md section 4).

Full supervision on K registered modalities (nnU-Net input channels, K >= 2) so that one model serves every subset
of modalities at inference. The network (:class:`~nnunet_mmssl.architectures.smml.SMMLNet`) has two branches of K
narrow modality encoders, per-scale fusion and one decoder each; every training sample gets two different random
modality masks (one per branch, :func:`branch_masks`), each masking one or more modalities and keeping at least one
(the paper's "randomly mask one or more modalities in each branch": the 2^K - 2 non-empty proper subsets;
:attr:`SMMLTrainer.mask_full_set` also allows the full set).
On nnU-Net's residual-encoder (ResEnc) plans the narrow modality encoders are narrowed residual encoders (the planned
stem and residual blocks per stage, the same width factor) and the decoders nnU-Net's decoder of that U-Net; the SRNs
stay small plain U-Nets (:meth:`SMMLTrainer._build_refiners` says why).

Loss per branch (eq. 13): nnU-Net's deep-supervised Dice+CE on the initial prediction + the task loss on the refined
prediction + PBC (eqs. 1-3, tau 6) + FRC (eqs. 4-9) + the refinement KL (eq. 11). The objective is the sum of the
two branches' objectives with ``L_fc`` entering it once: ``L_fc`` depends on both branches' features, so its gradient
then reaches each branch once, as each branch's own objective ``L_i`` of eq. 13 gives (adding it per branch would
give every branch its gradient twice). The refinement network (SRN, eq. 10) is a small U-Net per branch used in
training only (not saved into the plans, not needed to predict); it reads the softmax (sigmoid) of the initial
prediction and, when the dataset has them, the case's priors (``priorsTr/``, one per modality, e.g. masks of a
zero-shot model; :mod:`nnunet_mmssl.dataloading.priors`), which go through the image's spatial augmentation; the
priors of the modalities a branch has masked out are zeros for that branch and sample (eq. 10). Without priors the
SRN refines the prediction alone: what that loses is the second, independent opinion the priors give. The SRNs are
optimised with the network, their gradients clipped to nnU-Net's norm 12 (on their own: the network's clip is
nnU-Net's), and under DDP they are wrapped in their own ``DistributedDataParallel`` (gradients averaged over ranks,
weights broadcast from rank 0 at the start).

``SMMLSSLTrainer`` (beyond the paper) adds our unlabelled stream: PBC and FRC between the two masked branches on
unlabelled batches, against confident pseudo-labels of the branches' mean.

Inference (nnU-Net's predictor): the mean of the two branches with every modality present, or, with
``nnUNetv2_mmssl_predict --missing``, the network's mask for the absent modalities
(:meth:`~nnunet_mmssl.architectures.smml.SMMLNet.set_missing_modalities`).
"""

from __future__ import annotations

import copy
import os

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch.nn.parallel import DistributedDataParallel

from nnunet_mmssl.architectures.encoders import BASE_KWARG, architecture_kind, base_kind
from nnunet_mmssl.architectures.smml import SMMLNet, random_modality_masks
from nnunet_mmssl.dataloading.priors import (
    PRIORS_FOLDER,
    DatasetWithPriors,
    PriorsError,
    priors_data_identifier,
    wrap_transforms_for_priors,
)
from nnunet_mmssl.losses.smml import class_entropy_weights, frc_loss, pbc_loss, refinement_kl
from nnunet_mmssl.losses.targets import class_map_from_target, regions_to_classes
from nnunet_mmssl.trainers.base import SSLTrainerBase, network_from_plans

#: nnU-Net's gradient clipping norm (its ``train_step``)
GRADIENT_CLIP_NORM = 12.0


def branch_masks(batch_size: int, num_modalities: int, full_set: bool = False,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """SMML's training masks: (2, B, K) bool, True = present; per sample two different subsets, each drawn
    uniformly from the non-empty proper subsets (one or more modalities masked, at least one kept; with K = 2 the
    two branches see one modality each), or with ``full_set`` from all 2^K - 1 non-empty subsets.

    Raises:
        ValueError: K < 2.
    """
    if num_modalities < 2:
        raise ValueError("SMML's two masks per sample need at least 2 modalities.")
    if full_set:
        return random_modality_masks(batch_size, num_modalities, generator, device)
    count = 2 ** num_modalities - 2  # subset codes 1 .. 2^K - 2: neither empty (0) nor full (2^K - 1)
    first = torch.randint(1, count + 1, (batch_size,), generator=generator)
    offset = torch.randint(1, count, (batch_size,), generator=generator)  # count >= 2 for K >= 2
    second = (first - 1 + offset) % count + 1  # uniform over the other count - 1 subsets
    bits = torch.arange(num_modalities)
    masks = torch.stack([(first.view(-1, 1) >> bits) & 1, (second.view(-1, 1) >> bits) & 1]).bool()
    return masks.to(device) if device is not None else masks


class SMMLRefiners(torch.nn.ModuleList):
    """The branches' refinement networks; ``forward`` runs each on its branch's input (one call per step, so that
    one DDP wrapper synchronises all of them)."""

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [net(x) for net, x in zip(self, inputs, strict=True)]



class SMMLTrainer(SSLTrainerBase):
    """Liang et al.'s SMML on nnU-Net (see module docstring); settings are class attributes."""

    network_class_name: str = "nnunet_mmssl.architectures.smml.SMMLNet"
    use_unlabeled: bool = False
    #: width factor of each modality encoder (None = 1/sqrt(K): K encoders ~ one nnU-Net encoder)
    encoder_width: float | None = None
    #: fusion stage whose features FRC reads (0 = full resolution)
    feature_stage: int = 1
    #: two branches with different masks (False: one masked branch, the paper's Table 4 baseline)
    dual_branch: bool = True
    #: False (the paper): every branch masks one or more modalities; True: a branch may also keep all of them
    mask_full_set: bool = False
    use_pbc: bool = True
    pbc_temperature: float = 6.0
    use_frc: bool = True
    use_srn: bool = True
    #: per-case priors (``priorsTr/``, see :mod:`nnunet_mmssl.dataloading.priors`) as extra SRN input: None = when
    #: the configuration's preprocessed priors exist, True = required, False = never
    use_priors: bool | None = None
    #: SRN widths (a small U-Net with the plans' first strides and kernels)
    srn_features: tuple[int, ...] = (16, 32, 64)
    #: semi-supervised variant: confidence a voxel's pseudo-label needs to enter PBC/FRC on unlabelled data
    pseudo_label_threshold: float = 0.9

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
        plain = copy.deepcopy(PlansManager(plans).get_configuration(configuration).configuration["architecture"])
        plans = copy.deepcopy(plans)
        plans["configurations"][configuration]["architecture"] = self.training_architecture(plain)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.plain_architecture = plain
        self.refiners: SMMLRefiners | None = None
        #: the refiners' DDP wrapper under DDP (None otherwise); the step calls it instead of :attr:`refiners`
        self.refiners_ddp: DistributedDataParallel | None = None
        self.priors_folder = os.path.join(self.preprocessed_dataset_folder_base,
                                          priors_data_identifier(self.configuration_manager.data_identifier))
        found = os.path.isdir(self.priors_folder)
        if self.use_priors and not found:
            raise PriorsError(f"{type(self).__name__} needs priors, but {self.priors_folder} does not exist. Put "
                              f"them into the raw dataset's {PRIORS_FOLDER}/ (CASE_XXXX per modality) and rerun "
                              f"nnUNetv2_mmssl_plan_and_preprocess, or train SMMLTrainer without priors.")
        self.priors_enabled = bool(self.use_srn and (found if self.use_priors is None else self.use_priors))

    # ------------------------------------------------------------------ network as data
    def network_kwargs(self) -> dict:
        return {"encoder_width": self.encoder_width, "feature_stage": self.feature_stage,
                "num_branches": 2 if self.dual_branch else 1}

    def training_architecture(self, base_architecture: dict, modality_groups=None) -> dict:
        """SMMLNet's architecture entry on the plans' U-Net (PlainConvUNet or ResEnc's ResidualEncoderUNet, recorded
        as ``base``): the planned kwargs + :meth:`network_kwargs`; any other class is refused naming it and the
        supported ones."""
        name = base_architecture["network_class_name"]
        arch = copy.deepcopy(dict(base_architecture))
        if name == self.network_class_name:
            kind = architecture_kind(arch["arch_kwargs"])
        else:
            try:
                kind = base_kind(name)
            except ValueError as error:
                raise ValueError(f"{type(self).__name__}: {error}") from None
        arch["network_class_name"] = self.network_class_name
        arch["arch_kwargs"] = {**arch["arch_kwargs"], BASE_KWARG: kind, **self.network_kwargs()}
        return arch

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        return network_from_plans(configuration_manager, num_input_channels, num_output_channels,
                                  enable_deep_supervision, SMMLNet, "SMMLNet",
                                  "the model folder's plans.json (written by SMMLTrainer)")

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self.network_module.deep_supervision = enabled

    def samples_per_step(self, batch_size: float) -> float:
        """Both branches are in the network's estimate; the SRNs are small (not counted); the semi-supervised
        variant adds its unlabelled batch."""
        return float(super().samples_per_step(batch_size))

    # ------------------------------------------------------------------ set-up
    def _build_refiners(self) -> SMMLRefiners:
        """The SRNs: small plain U-Nets (also on ResEnc plans: they refine the prediction's probabilities in training
        only, with their own fixed widths :attr:`srn_features`, so they follow neither the plans' widths nor their
        encoder; the same SRN on both keeps the ResEnc and plain runs comparable), with the plans' first kernels and
        strides, conv and norm ops."""
        kwargs = self.configuration_manager.network_arch_init_kwargs
        encoder = self.network_module.branches[0].encoders[0]  # the plans' ops, as nnU-Net imported them
        conv_op, norm_op = encoder.conv_op, encoder.norm_op
        stages = min(len(self.srn_features), len(kwargs["strides"]))
        outputs = self.label_manager.num_segmentation_heads
        inputs = outputs + (self.num_input_channels if self.priors_enabled else 0)
        refiners = SMMLRefiners()
        for _ in range(2 if self.dual_branch else 1):
            net = PlainConvUNet(inputs, stages, list(self.srn_features[:stages]), conv_op,
                                list(kwargs["kernel_sizes"][:stages]), list(kwargs["strides"][:stages]), 2, outputs,
                                1, True, norm_op,
                                {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                                deep_supervision=False)
            net.apply(net.initialize)
            # without deep supervision only the last segmentation head is used: the others are frozen (a parameter
            # without gradient stops DDP, and a dead one should not be counted as trained)
            for head in net.decoder.seg_layers[:-1]:
                head.requires_grad_(False)
            refiners.append(net)
        return refiners.to(self.device)

    def configure_optimizers(self):
        """nnU-Net's SGD and poly schedule over the network and the refinement networks; under DDP the refinement
        networks get their own DDP wrapper (nnU-Net wraps only ``self.network``, after this)."""
        if self.use_srn and self.refiners is None:
            self.refiners = self._build_refiners()
        optimizer, scheduler = super().configure_optimizers()
        if self.refiners is not None:
            optimizer.add_param_group({"params": list(self.refiners.parameters())})
            if self.is_ddp and self.refiners_ddp is None:
                self.refiners = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.refiners)
                self.refiners_ddp = DistributedDataParallel(
                    self.refiners, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        return optimizer, scheduler

    def clip_gradients(self) -> None:
        """nnU-Net's clip of the network's gradient norm, and the same clip of the refinement networks' norm."""
        super().clip_gradients()
        if self.refiners is not None:
            torch.nn.utils.clip_grad_norm_(self.refiners.parameters(), GRADIENT_CLIP_NORM)

    # ------------------------------------------------------------------ the step
    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.label_manager.has_regions else torch.softmax(logits, 1)

    def training_masks(self, data: torch.Tensor) -> torch.Tensor:
        """(2, B, K) masks of a batch (:func:`branch_masks`); one branch: both rows are its mask."""
        masks = branch_masks(data.shape[0], data.shape[1], self.mask_full_set, device=data.device)
        return masks if self.dual_branch else torch.stack([masks[0], masks[0]])

    def _branch_outputs(self, data: torch.Tensor, masks: torch.Tensor | None = None):
        """Both branches' outputs and fused features under the masks (default: :meth:`training_masks`)."""
        net = self.network_module
        if masks is None:
            masks = self.training_masks(data)
        net.return_branches = True
        try:
            return self.network(data, masks=masks)
        finally:
            net.return_branches = False

    def _consistency(self, top: list[torch.Tensor], feat1, feat2, classes, valid, pbc_target) -> torch.Tensor:
        """PBC (both directions) + FRC (once: its gradient reaches each branch once) against labels or
        pseudo-labels."""
        sigmoid = self.label_manager.has_regions
        loss = torch.zeros((), device=top[0].device)
        if self.dual_branch and self.use_pbc:
            l1, l2 = pbc_loss(top[0], top[1], pbc_target, self.pbc_temperature, sigmoid, valid)
            loss = loss + l1 + l2
        if self.dual_branch and self.use_frc:
            weights = class_entropy_weights(top[0], top[1], sigmoid)
            frc_classes = classes if valid is None else torch.where(valid, classes, torch.full_like(classes, -1))
            loss = loss + frc_loss(feat1, feat2, frc_classes, weights, weights.shape[1])
        return loss

    # ------------------------------------------------------------------ priors (extra channels of the batches)
    def on_train_start(self):
        if self.priors_enabled:
            self.print_to_log_file(f"SRN priors from {self.priors_folder}")
        super().on_train_start()

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if not self.priors_enabled:
            return dataset_tr, dataset_val
        k = self.num_input_channels
        return (DatasetWithPriors(dataset_tr, self.priors_folder, k),
                DatasetWithPriors(dataset_val, self.priors_folder, k))

    def get_training_transforms(self, *args, **kwargs):
        transforms = SSLTrainerBase.get_training_transforms(*args, **kwargs)
        return wrap_transforms_for_priors(transforms, self.num_input_channels) if self.priors_enabled else transforms

    def get_validation_transforms(self, *args, **kwargs):
        transforms = SSLTrainerBase.get_validation_transforms(*args, **kwargs)
        return wrap_transforms_for_priors(transforms, self.num_input_channels) if self.priors_enabled else transforms

    def split_priors(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image channels, priors or None) of a batch."""
        k = self.num_input_channels
        if data.shape[1] == k:
            if self.priors_enabled:
                raise PriorsError(f"A labelled batch has {k} channels but the SRN expects {k} priors after them.")
            return data, None
        if data.shape[1] != 2 * k or not self.priors_enabled:
            raise ValueError(f"A batch has {data.shape[1]} channels; expected {k} (images) or {2 * k} (images and "
                             f"priors, with priors enabled).")
        return data[:, :k], data[:, k:]

    def validation_step(self, batch: dict) -> dict:
        return super().validation_step({**batch, "data": self.split_priors(batch["data"])[0]})

    def compute_losses(self, data: torch.Tensor, target, unlabeled):
        lm = self.label_manager
        sigmoid = lm.has_regions
        data, priors = self.split_priors(data)
        masks = self.training_masks(data)
        out1, out2, feat1, feat2 = self._branch_outputs(data, masks)
        outputs = [out1, out2] if self.dual_branch else [out1]
        full = target[0] if isinstance(target, list) else target
        classes, valid = class_map_from_target(full, lm.has_regions, lm.ignore_label)
        if sigmoid:  # PBC's cross entropy against the regions (without nnU-Net's ignore channel)
            pbc_target = full[:, :-1] if lm.ignore_label is not None else full
        else:
            pbc_target = classes
        top = [o[0] if isinstance(o, (list, tuple)) else o for o in outputs]

        loss = sum(self.loss(o, target) for o in outputs)
        with torch.no_grad():
            fused = [(a + b) / 2 for a, b in zip(out1, out2, strict=True)] if isinstance(out1, (list, tuple)) else \
                (out1 + out2) / 2
            self.monitor_loss = self.loss(fused, target).detach()
        inner = self.loss.loss if hasattr(self.loss, "loss") else self.loss
        if self.use_srn:
            refiners = self.refiners_ddp if self.refiners_ddp is not None else self.refiners
            refined = refiners([self.srn_input(logits, priors, masks[branch]) for branch, logits in enumerate(top)])
            for logits, out in zip(top, refined, strict=True):
                loss = loss + inner(out, full) + refinement_kl(logits, out, sigmoid, valid)
        loss = loss + self._consistency(top, feat1, feat2, classes, valid, pbc_target)
        unsup = torch.zeros((), device=self.device)
        if unlabeled is not None:
            unsup = self.unlabeled_consistency(unlabeled)
        return loss, unsup

    def srn_input(self, logits: torch.Tensor, priors: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 10's SRN input of one branch: the initial prediction's probabilities and, with priors, the priors of
        the modalities this branch kept (the masked ones' are zeros).

        Args:
            logits: (B, C, *S) the branch's full-resolution logits.
            priors: (B, K, *S) or None.
            mask: (B, K) bool, the branch's modality mask.
        """
        probabilities = self._probabilities(logits)
        if priors is None:
            return probabilities
        keep = mask.to(probabilities.dtype).view(*mask.shape, *([1] * (priors.ndim - 2)))
        return torch.cat([probabilities, priors.to(probabilities.dtype) * keep], 1)

    def unlabeled_consistency(self, unlabeled: torch.Tensor) -> torch.Tensor:
        """PBC + FRC on unlabelled data against confident pseudo-labels (our semi-supervised extension).

        The pseudo-label is the two branches' mean probability (no gradient); a voxel takes part when its confidence
        (softmax: the top probability; regions: every region's ``max(p, 1 - p)``) reaches
        :attr:`pseudo_label_threshold`. PBC's per-voxel direction is then decided by each branch's cross entropy to
        the pseudo-label, and FRC's prototypes are those of the pseudo-label's classes.
        """
        sigmoid = self.label_manager.has_regions
        out1, out2, feat1, feat2 = self._branch_outputs(unlabeled)
        top = [o[0] if isinstance(o, (list, tuple)) else o for o in (out1, out2)]
        with torch.no_grad():
            probs = (self._probabilities(top[0].float()) + self._probabilities(top[1].float())) / 2
            if sigmoid:
                pbc_target = (probs > 0.5).to(probs.dtype)
                confidence = torch.maximum(probs, 1 - probs).amin(1)
                classes = regions_to_classes(pbc_target.bool())
            else:
                confidence, classes = probs.max(1)
                pbc_target = classes
            valid = confidence >= self.pseudo_label_threshold
        return self._consistency(top, feat1, feat2, classes, valid, pbc_target)

    # ------------------------------------------------------------------ checkpoints (the SRNs are training-only)
    def checkpoint_extra_state(self) -> dict:
        if self.refiners is None:
            return {}
        return {"refiners": {k: v.detach().cpu() for k, v in self.refiners.state_dict().items()}}

    def load_checkpoint_extra_state(self, state: dict) -> None:
        if "refiners" in state:
            if self.refiners is None:
                self.refiners = self._build_refiners()
            self.refiners.load_state_dict({k: v.to(self.device) for k, v in state["refiners"].items()})

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.refiners is not None:
            self.refiners.train()


class SMMLTrainer_single(SMMLTrainer):
    """Paper Table 4 baseline: one masked branch, task loss only."""

    dual_branch = False
    use_pbc = False
    use_frc = False
    use_srn = False


class SMMLTrainer_singleSRN(SMMLTrainer_single):
    """Table 4: single masked branch + SRN."""

    use_srn = True


class SMMLTrainer_dual(SMMLTrainer):
    """Table 4: two masked branches (different masks), task losses only."""

    use_pbc = False
    use_frc = False
    use_srn = False


class SMMLTrainer_dualPBC(SMMLTrainer_dual):
    """Table 4: dual branch + PBC."""

    use_pbc = True


class SMMLTrainer_dualFRC(SMMLTrainer_dual):
    """Table 4: dual branch + FRC."""

    use_frc = True


class SMMLTrainer_dualPBCFRC(SMMLTrainer_dual):
    """Table 4: dual branch + PBC + FRC (the full SMMLTrainer adds the SRN)."""

    use_pbc = True
    use_frc = True


class SMMLSSLTrainer(SMMLTrainer):
    """Beyond the paper: SMML + our unlabelled stream. On each unlabelled batch the two masked branches are held to
    each other by PBC and FRC against confident pseudo-labels (:meth:`SMMLTrainer.unlabeled_consistency`), weighted
    by :attr:`unsupervised_weight` and a sigmoid ramp over the first 20 % of the run; the SRN sees labelled data
    only. Compare with ``SMMLTrainer`` on the same split (it is the supervised twin)."""

    use_unlabeled = True
    unsupervised_weight = 1.0
    unsupervised_rampup_fraction = 0.2


class ModalityDropoutTrainer(SSLTrainerBase):
    """nnU-Net's plain U-Net with random modality dropout: each labelled sample's input channels outside a random
    non-empty subset (uniform over the 2^K - 1) are zeroed -- the missing-modality baseline nnU-Net users build today.
    Predict with ``nnUNetv2_mmssl_predict --missing`` (zeroed normalised input, what it was trained on)."""

    use_unlabeled = False

    def compute_losses(self, data: torch.Tensor, target, unlabeled):
        if data.shape[1] >= 2:
            mask = random_modality_masks(data.shape[0], data.shape[1], device=data.device)[0]
            data = data * mask.to(data.dtype).view(*mask.shape, *([1] * (data.ndim - 2)))
        return self.loss(self.network(data), target), torch.zeros((), device=data.device)

"""DBDCTrainer: Double Bank Dual Consistency (Chen et al., dbdc_chen2024.txt; METHODS.md section 3).

One U-Net for any number K of *unregistered* modalities (CT of some patients, MR of others): every case is one
single-channel image of one modality (recorded at conversion, normalised by its modality at preprocessing, see
:mod:`nnunet_mmssl.planners.modality_normalization`).

* **Network** (:class:`~nnunet_mmssl.architectures.dbdc.DBDCUNet`, on ResEnc plans
  :class:`~nnunet_mmssl.architectures.dbdc.DBDCResEncUNet`): nnU-Net's planned PlainConvUNet (ResidualEncoderUNet,
  its stem and residual blocks as planned), all convolutions shared, every norm a bank of K norms selected per
  sample by its modality (MLMB, eqs. 1-3), plus the projector of the prototype bank.
* **One step** = for each modality k one labelled batch (nnU-Net's planned batch size, its loader restricted to the
  modality's cases) and one unlabelled batch of that modality; all of them go through the network in one forward pass
  with a per-sample modality vector: each bank normalises each modality's samples with their own pooled batch
  statistics, so a modality's labelled, image-perturbed and feature-perturbed samples share one set of batch
  statistics (as one pass per modality would; not one pass per batch), and the running statistics are updated once
  per step, from this pass. Plus one no-grad pass of the clean unlabelled images for the pseudo-labels, in train mode
  (batch statistics) with the running-statistics update switched off
  (:func:`~nnunet_mmssl.building_blocks.norm_bank.running_statistics_frozen`). Objective
  ``sum_k w_k (L_sup^k + lambda(t) L_dc^k)`` (eqs. 20-23), where
  ``L_sup^k`` = nnU-Net's deep-supervised Dice+CE + ``delta * L_MPCL`` on the labels (eq. 21),
  ``L_dc^k`` = ``L_ipc^k + L_fpc^k`` (eqs. 17-19): CE of the image-perturbed (noise + intensity scaling) and of the
  feature-perturbed (bottleneck channel dropout) predictions to the pseudo-label of the clean prediction, each
  ``+ delta * L_MPCL`` on the pseudo-label; ``lambda(t) = exp(-5 (1 - t/T)^2)`` over the whole run.
  ``L_MPCL`` = the sum of the active terms over 4 (eq. 12), also in Table III's rows that leave terms out (each term
  keeps the weight delta / 4); with K = 1 there is no ``L_mc`` (no other modality to contrast with).
* **MLPB / MPCL** (eqs. 4-12): per-modality class prototypes (:class:`~nnunet_mmssl.losses.prototypes.PrototypeBank`,
  EMA from correctly predicted labelled voxels after each optimizer step, Sinkhorn-Knopp weights). Training only:
  the prototypes and the projector take no part in prediction (the paper's "plug-ins for segmentation prediction"
  are not used at inference; the segmentation head alone predicts, and the prototypes are not in the checkpoint's
  network weights).
* **MAW** (eqs. 13-16): per-modality weights from each modality's validation pseudo-Dice history (nnU-Net's
  validation patches, split by modality), updated each epoch, logged and drawn in progress.png.

Region datasets (nnU-Net's ``regions_class_order``, sigmoid outputs) work too: the consistency terms are then binary
CE to thresholded pseudo-regions, and the prototype classes are background + one per region (a voxel belongs to the
last region of the order that contains it). K = 1 (any single-modality or registered dataset, all channels as one
"modality") is plain semi-supervised DBDC without modality contrast.

Variants (paper's ablations, a supervised twin, the pooled plain U-Net) are in
:mod:`nnunet_mmssl.trainers.dbdc_variants`.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_mmssl.architectures.dbdc import DBDC_NETWORKS, DBDCResEncUNet, DBDCUNet, architecture_on_base
from nnunet_mmssl.building_blocks.norm_bank import modality_runs, running_statistics_frozen
from nnunet_mmssl.dataloading.per_modality import (
    DBDCDataError,
    ModalityBatches,
    augmentation_processes,
    case_modality_index,
    finish_loaders,
    identifiers_by_modality,
    labelled_loaders_per_modality,
    unlabeled_loaders_per_modality,
    workers_per_loader,
)
from nnunet_mmssl.dataloading.unlabeled_loader import build_unlabeled_augmenter
from nnunet_mmssl.dataset_conversion.modality_layout import is_unregistered
from nnunet_mmssl.evaluation.per_modality import write_summary_per_modality
from nnunet_mmssl.losses.prototypes import MPCL_TERMS, PrototypeBank, mpcl_loss
from nnunet_mmssl.losses.targets import class_map_from_target, regions_to_classes  # noqa: F401 (re-exported)
from nnunet_mmssl.planners import get_mmssl_block
from nnunet_mmssl.semisup.modality_weighting import ModalityWeighting
from nnunet_mmssl.trainers.base import SSLTrainerBase, network_from_plans


def plan_modalities(plans: dict, dataset_json: dict) -> list[str]:
    """The modality names a DBDC network of these plans has: the unregistered layout's, else one "modality" made
    of all channels (K = 1)."""
    block = get_mmssl_block(plans) or {}
    if is_unregistered(block):
        return list(block["modalities"])
    return ["+".join(str(v) for v in dataset_json["channel_names"].values())]


class DBDCTrainer(SSLTrainerBase):
    """Chen et al.'s DBDC on nnU-Net (see module docstring); settings are class attributes."""

    network_class_name: str = "nnunet_mmssl.architectures.dbdc.DBDCUNet"
    #: the network for each base U-Net of the plans (the plain one is :attr:`network_class_name`)
    network_class_names: dict = DBDC_NETWORKS
    # --- MLMB
    #: where norms are per modality: "all" (paper), "encoder+bottleneck", "encoder", "none" (Table IV)
    norm_bank_scope: str = "all"
    #: "batch" (paper: running statistics per modality) or "instance" (nnU-Net's norm, per-modality affine only)
    norm_bank_kind: str = "batch"
    #: running-statistics momentum (eqs. 2-3, alpha = 0.99)
    norm_bank_momentum: float = 0.01
    # --- MLPB / MPCL
    use_prototypes: bool = True
    embedding_dim: int = 64
    projector_scales: int = 3
    prototype_momentum: float = 0.99
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    #: temperature of L_pc (eq. 10)
    mpcl_temperature: float = 0.1
    #: MPCL terms (eq. 12: their sum over 4, also for subsets: the paper's Table III; "mc" dropped when K = 1)
    mpcl_terms: tuple[str, ...] = ("pseg", "mc", "pc", "pd")
    #: delta of eqs. 18, 19, 21
    mpcl_weight: float = 0.1
    #: labelled voxels per modality and step used for the prototype update (random subset; memory bound)
    prototype_update_voxels: int = 65536
    # --- MAW
    use_maw: bool = True
    #: window of eqs. 15-16 in epochs (paper 20 of 100 epochs), at most a fifth of the run (at least 2) so that a
    #: short run uses it too; weights stay 1 until the window is full
    maw_tau: int = 20
    maw_beta: float = 0.2
    # --- dual consistency
    #: "ipc" (image perturbation) and/or "fpc" (feature perturbation)
    consistency_terms: tuple[str, ...] = ("ipc", "fpc")
    feature_dropout: float = 0.5
    image_noise_std: float = 0.1
    image_intensity_scale: float = 0.1
    #: lambda_max and the Gaussian ramp exp(-5(1 - t/T)^2) over the whole run (T = num_epochs)
    unsupervised_weight: float = 1.0
    unsupervised_rampup_fraction: float = 1.0
    extra_log_keys: tuple[str, ...] = SSLTrainerBase.extra_log_keys + ("modality_val_dice", "maw_weights",
                                                                       "prototype_seconds")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
        plain = copy.deepcopy(PlansManager(plans).get_configuration(configuration).configuration["architecture"])
        self.modalities = plan_modalities(plans, dataset_json)
        plans = self.plans_with_network(plans, configuration, dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.plain_architecture = plain
        self.logger.local_logger.modality_names = list(self.modalities)
        self.num_modalities = len(self.modalities)
        self._maw = None
        self.modality_weights = np.ones(self.num_modalities)
        self.prototype_bank = None
        self._pending_prototype_updates: list = []
        self._prototype_seconds = 0.0
        self._modality_filter: int | None = None
        self.case_modality: dict[str, int] = {}

    # ------------------------------------------------------------------ network as data
    def network_kwargs(self) -> dict:
        """Arch kwargs added to the plain U-Net's (also on the memory planner's probe, which has no plans: it sets
        ``planning_modalities``)."""
        modalities = getattr(self, "modalities", None) or getattr(self, "planning_modalities", None) or ["image"]
        return {"modalities": list(modalities), "norm_bank_scope": self.norm_bank_scope,
                "norm_bank_kind": self.norm_bank_kind, "norm_bank_momentum": self.norm_bank_momentum,
                "use_projector": self.use_prototypes, "embedding_dim": self.embedding_dim,
                "projector_scales": self.projector_scales, "feature_dropout": self.feature_dropout}

    def training_architecture(self, base_architecture: dict, modality_groups=None) -> dict:
        """DBDC's architecture entry: :class:`DBDCUNet` on nnU-Net's PlainConvUNet plans, :class:`DBDCResEncUNet` on
        its ResidualEncoderUNet (ResEnc) plans, the planned kwargs + ``base`` + :meth:`network_kwargs`; any other
        class is refused naming it and the supported ones."""
        return architecture_on_base(base_architecture, self.network_class_names, self.network_kwargs(),
                                    type(self).__name__)

    def plans_with_network(self, plans: dict, configuration: str, dataset_json: dict) -> dict:
        new_plans = copy.deepcopy(plans)
        base = PlansManager(plans).get_configuration(configuration).configuration["architecture"]
        new_plans["configurations"][configuration]["architecture"] = self.training_architecture(base)
        return new_plans

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        return network_from_plans(configuration_manager, num_input_channels, num_output_channels,
                                  enable_deep_supervision, (DBDCUNet, DBDCResEncUNet), "DBDCUNet or DBDCResEncUNet",
                                  "the model folder's plans.json (written by DBDCTrainer)")

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self.network_module.deep_supervision = enabled

    def samples_per_step(self, batch_size: float) -> float:
        """K x (labelled + one unlabelled batch per consistency term); the pseudo-label pass stores nothing."""
        k = getattr(self, "num_modalities", None) or len(getattr(self, "planning_modalities", None) or [0])
        unlabeled = self.unlabeled_batch_size if self.unlabeled_batch_size is not None else batch_size
        terms = len(self.consistency_terms) if self.use_unlabeled else 0
        return float(k * (batch_size + terms * unlabeled))

    # ------------------------------------------------------------------ data: one loader per modality
    def _properties_modality(self, folder: str, identifier: str) -> int:
        if self.num_modalities == 1:
            return 0
        return case_modality_index(folder, identifier, self.modalities)

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self._modality_filter is None:
            return dataset_tr, dataset_val
        k = self._modality_filter
        folder = self.preprocessed_dataset_folder
        tr = [i for i in dataset_tr.identifiers if self._modality_of(folder, i) == k]
        val = [i for i in dataset_val.identifiers if self._modality_of(folder, i) == k]
        if not tr:
            raise DBDCDataError(f"Fold {self.fold} has no training case of modality {self.modalities[k]!r}. Use a "
                                f"split with every modality in training (nnUNetv2_mmssl_plan_and_preprocess writes "
                                f"folds stratified by modality) or fold 'all'.")
        self._val_available[k] = bool(val)
        kwargs = {"folder_with_segs_from_previous_stage": self.folder_with_segs_from_previous_stage}
        return (self.dataset_class(folder, tr, **kwargs), self.dataset_class(folder, val or tr, **kwargs))

    def get_dataloaders(self):
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        allowed = get_allowed_n_proc_DA()
        share = workers_per_loader(allowed, self.num_modalities)
        self._val_available = [False] * self.num_modalities
        with augmentation_processes(share):
            train, val = labelled_loaders_per_modality(self._modality_dataloaders, self.modalities,
                                                       lambda k: self._val_available[k], self.fold,
                                                       self.print_to_log_file)
        counts = {m: sum(1 for v in self.case_modality.values() if v == k) for k, m in enumerate(self.modalities)}
        self.print_to_log_file(f"DBDC: one labelled loader per modality (cases incl. validation: {counts}), "
                               f"{share} augmentation worker(s) each")
        if self.use_unlabeled:
            self.dataloader_unlabeled = self.get_unlabeled_dataloader()
        return ModalityBatches(train, "all"), ModalityBatches(val, "cycle")

    def _modality_dataloaders(self, k: int) -> tuple:
        """nnU-Net's (training, validation) loaders on modality ``k``'s cases (:meth:`get_tr_and_val_datasets`)."""
        self._modality_filter = k
        try:
            return nnUNetTrainer.get_dataloaders(self)
        finally:
            self._modality_filter = None

    def get_unlabeled_dataloader(self):
        """One unlabelled loader per modality (None where the modality has no unlabelled case)."""
        dataset = self.unlabeled_dataset()
        folder = self.unlabeled_folder()
        by_modality = identifiers_by_modality(dataset.identifiers,
                                              lambda identifier: self._properties_modality(folder, identifier),
                                              self.num_modalities)
        transforms, initial_patch_size = self.unlabeled_transforms()
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        allowed = get_allowed_n_proc_DA()
        processes = workers_per_loader(allowed, 2 * self.num_modalities)

        def augmenter(subset):
            return build_unlabeled_augmenter(
                subset, self.unlabeled_batch_size_per_rank(), initial_patch_size,
                self.configuration_manager.patch_size, self.label_manager, transforms, num_processes=processes,
                pin_memory=self.device.type == "cuda", sampling=self.unlabeled_sampling)

        return unlabeled_loaders_per_modality(dataset, by_modality, self.modalities, augmenter,
                                              self.print_to_log_file)

    def on_train_end(self):
        for loader in (self.dataloader_train, self.dataloader_val):
            if isinstance(loader, ModalityBatches):
                loader._finish()
        finish_loaders(self.dataloader_unlabeled or [])
        self.dataloader_unlabeled = None
        nnUNetTrainer.on_train_end(self)

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        """nnU-Net's initialisation, then the prototype bank (training-only, saved in the checkpoint)."""
        was = self.was_initialized
        super().initialize()
        if not was and self.use_prototypes:
            self.prototype_bank = PrototypeBank(
                self.num_modalities, self.num_prototype_classes(), self.embedding_dim,
                momentum=self.prototype_momentum, sinkhorn_epsilon=self.sinkhorn_epsilon,
                sinkhorn_iterations=self.sinkhorn_iterations).to(self.device)

    def num_prototype_classes(self) -> int:
        """Classes of the prototype bank: the labels, or background + one per region."""
        if self.label_manager.has_regions:
            return len(self.label_manager.foreground_regions) + 1
        return self.label_manager.num_segmentation_heads

    # ------------------------------------------------------------------ the step
    def step_inputs(self, batch: dict) -> tuple:
        per_modality = []
        for k, b in enumerate(batch["modality_batches"]):
            data = b["data"].to(self.device, non_blocking=True)
            target = b["target"]
            target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else \
                target.to(self.device, non_blocking=True)
            unlabeled = None
            if self.use_unlabeled and self.dataloader_unlabeled[k] is not None:
                unlabeled = next(self.dataloader_unlabeled[k])["data"].to(self.device, non_blocking=True)
            per_modality.append((data, target, unlabeled))
        return (per_modality,)

    def step_uses_unlabeled(self, inputs: tuple) -> bool:
        return bool(self.consistency_terms) and any(u is not None for _, _, u in inputs[0])

    def perturb_images(self, x: torch.Tensor) -> torch.Tensor:
        """Image perturbation of eq. 18: per-sample intensity scaling (1 +- :attr:`image_intensity_scale`) and
        Gaussian noise (sd :attr:`image_noise_std`, in normalised units)."""
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        scale = 1.0 + (torch.rand(shape, device=x.device, dtype=x.dtype) * 2 - 1) * self.image_intensity_scale
        return x * scale + torch.randn_like(x) * self.image_noise_std

    def pseudo_targets(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From clean-prediction logits: ``(target of the consistency loss, prototype classes)``: the argmax class
        (softmax outputs) or the thresholded regions (sigmoid outputs, float)."""
        if self.label_manager.has_regions:
            regions = (logits > 0).float()
            return regions, regions_to_classes(regions > 0.5)
        classes = logits.argmax(1)
        return classes, classes

    def consistency_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CE to the pseudo-label (eqs. 18-19); binary CE per region for region datasets."""
        if self.label_manager.has_regions:
            return F.binary_cross_entropy_with_logits(logits.float(), target)
        return F.cross_entropy(logits.float(), target)

    def active_mpcl_terms(self) -> tuple[str, ...]:
        """The MPCL terms this run computes: :attr:`mpcl_terms`, without ``"mc"`` when K = 1 (eq. 9 contrasts a
        modality's prototypes with the other modalities'; with none it would reduce to a pull towards the own
        prototype, which ``pd`` already is)."""
        return tuple(t for t in self.mpcl_terms if not (t == "mc" and self.num_modalities == 1))

    def _mpcl(self, embeddings, classes, modality, valid=None) -> torch.Tensor:
        """Eq. 12: the sum of the active terms over 4, whatever the subset (Table III's rows leave terms out, so each
        term keeps the weight delta / 4 in every row)."""
        start = time.perf_counter()
        terms = self.active_mpcl_terms()
        if not terms:
            loss = embeddings.sum() * 0.0
        else:
            mean, _ = mpcl_loss(embeddings, classes, self.prototype_bank.prototypes, modality, valid=valid,
                                temperature=self.mpcl_temperature, terms=terms)
            loss = mean * (len(terms) / len(MPCL_TERMS))
        self._prototype_seconds += time.perf_counter() - start
        return loss

    def compute_losses(self, per_modality: list):
        lm = self.label_manager
        net = self.network_module
        zero = torch.zeros((), device=self.device)
        labelled = [d for d, _, _ in per_modality]
        unlabelled = [(k, u) for k, (_, _, u) in enumerate(per_modality) if u is not None]
        use_dc = self.use_unlabeled and bool(self.consistency_terms) and bool(unlabelled)

        # pseudo-labels from the clean unlabelled images (no gradient)
        pseudo = {}
        if use_dc:
            clean = torch.cat([u for _, u in unlabelled])
            modality_u = torch.cat([torch.full((u.shape[0],), k, dtype=torch.long, device=self.device)
                                    for k, u in unlabelled])
            # train mode (each modality's batch statistics, as the main pass) but the running statistics left alone:
            # the main pass below updates them once per step
            with torch.no_grad(), running_statistics_frozen(net):
                net.return_embeddings = False
                out = self.network(clean, modality=modality_u,
                                   modality_runs=modality_runs([(k, u.shape[0]) for k, u in unlabelled],
                                                               clean.shape[0]))
                out = out[0] if isinstance(out, (list, tuple)) else out
            start = 0
            for k, u in unlabelled:
                pseudo[k] = self.pseudo_targets(out[start:start + u.shape[0]])
                start += u.shape[0]

        # one forward pass: labelled, image-perturbed and feature-perturbed unlabelled batches of every modality
        parts, modality, perturb, slices = [], [], [], {}
        position = 0

        part_modality = []

        def add(key, x, k, feature_perturbation=False):
            nonlocal position
            parts.append(x)
            part_modality.append(k)
            modality.append(torch.full((x.shape[0],), k, dtype=torch.long, device=self.device))
            perturb.append(torch.full((x.shape[0],), feature_perturbation, dtype=torch.bool, device=self.device))
            slices[key] = slice(position, position + x.shape[0])
            position += x.shape[0]

        unlabelled_of = dict(unlabelled)
        for k, x in enumerate(labelled):  # one contiguous run per modality: the norm banks split, not gather
            add(("sup", k), x, k)
            if use_dc and k in unlabelled_of:
                if "ipc" in self.consistency_terms:
                    add(("ipc", k), self.perturb_images(unlabelled_of[k]), k)
                if "fpc" in self.consistency_terms:
                    add(("fpc", k), unlabelled_of[k], k, feature_perturbation=True)
        net.return_embeddings = self.use_prototypes
        try:
            batch = torch.cat(parts)
            runs = modality_runs([(k, x.shape[0]) for k, x in zip(part_modality, parts, strict=True)], batch.shape[0])
            out = self.network(batch, modality=torch.cat(modality), perturb_features=torch.cat(perturb),
                               modality_runs=runs)
        finally:
            net.return_embeddings = False
        logits, embeddings = out if self.use_prototypes else (out, None)
        logits = logits if isinstance(logits, (list, tuple)) else [logits]
        all_modality = torch.cat(modality)

        weights = self.modality_weights if self.use_maw else np.ones(self.num_modalities)
        sup_total, unsup_total, monitor = zero, zero, []
        self._pending_prototype_updates = []
        for k, (_, target, _) in enumerate(per_modality):
            s = slices[("sup", k)]
            outputs = [scale[s] for scale in logits]
            nnunet_loss = self.loss(outputs if self.enable_deep_supervision else outputs[0], target)
            monitor.append(nnunet_loss.detach())
            sup = nnunet_loss
            if self.use_prototypes:
                full = target[0] if isinstance(target, list) else target
                classes, valid = class_map_from_target(full, lm.has_regions, lm.ignore_label)
                sup = sup + self.mpcl_weight * self._mpcl(embeddings[s], classes, all_modality[s], valid)
                self._queue_prototype_update(embeddings[s], outputs[0], classes, valid, k)
            sup_total = sup_total + float(weights[k]) * sup
            if k in pseudo:
                target_u, classes_u = pseudo[k]
                dc = zero
                for term in ("ipc", "fpc"):
                    if (term, k) not in slices:
                        continue
                    s_u = slices[(term, k)]
                    dc = dc + self.consistency_loss(logits[0][s_u], target_u)
                    if self.use_prototypes:
                        dc = dc + self.mpcl_weight * self._mpcl(embeddings[s_u], classes_u, all_modality[s_u])
                unsup_total = unsup_total + float(weights[k]) * dc
        self.monitor_loss = torch.stack(monitor).mean()
        return sup_total, unsup_total

    # ------------------------------------------------------------------ prototype bank updates
    @torch.no_grad()
    def _queue_prototype_update(self, embeddings, logits, classes, valid, k: int) -> None:
        """Correctly predicted labelled voxels of modality k (a random subset of at most
        :attr:`prototype_update_voxels`), applied after the optimizer step (eq. 7)."""
        predicted = self.pseudo_targets(logits.detach())[1]
        correct = predicted == classes
        if valid is not None:
            correct &= valid
        flat_embeddings = embeddings.detach().movedim(1, -1).reshape(-1, embeddings.shape[1])
        flat_classes = classes.reshape(-1)
        flat_correct = correct.reshape(-1)
        if flat_classes.numel() > self.prototype_update_voxels:
            pick = torch.randperm(flat_classes.numel(), device=flat_classes.device)[:self.prototype_update_voxels]
            flat_embeddings, flat_classes, flat_correct = flat_embeddings[pick], flat_classes[pick], flat_correct[pick]
        self._pending_prototype_updates.append((flat_embeddings.float(), flat_classes, flat_correct, k))

    def after_optimizer_step(self) -> None:
        if self.prototype_bank is None:
            return
        start = time.perf_counter()
        for embeddings, classes, correct, k in self._pending_prototype_updates:
            self.prototype_bank.update(embeddings, classes, correct, k)
        self._prototype_seconds += time.perf_counter() - start
        self._pending_prototype_updates = []

    # ------------------------------------------------------------------ validation per modality, MAW
    def validation_step(self, batch: dict) -> dict:
        k = int(batch["modality"])
        net = self.network_module
        previous = net.inference_modality
        net.set_inference_modality(k)
        try:
            result = super().validation_step(batch)
        finally:
            net.inference_modality = previous
        result["modality"] = k
        return result

    def per_modality_dice(self, val_outputs: list[dict]) -> np.ndarray:
        """(K,) mean foreground pseudo-Dice of each modality's validation batches (nnU-Net's global Dice per class
        over the epoch's patches, averaged over classes; NaN for a modality without validation batches), summed
        over DDP ranks."""
        num_fg = len(self.label_manager.foreground_regions if self.label_manager.has_regions
                     else self.label_manager.foreground_labels)
        dice = np.full(self.num_modalities, np.nan)
        for k in range(self.num_modalities):
            mine = [o for o in val_outputs if o["modality"] == k]
            counts = np.zeros(3 * num_fg)
            if mine:
                counts = np.concatenate([np.sum([o[key] for o in mine], 0)
                                         for key in ("tp_hard", "fp_hard", "fn_hard")]).astype(np.float64)
            if self.is_ddp:
                tensor = torch.as_tensor(counts, device=self.device, dtype=torch.float64)
                dist.all_reduce(tensor)
                counts = tensor.cpu().numpy()
            tp, fp, fn = np.split(counts, 3)
            denominator = 2 * tp + fp + fn
            per_class = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), np.nan)
            if np.isfinite(per_class).any():
                dice[k] = float(np.nanmean(per_class))
        return dice

    @property
    def maw(self) -> ModalityWeighting:
        """The MAW history, made on first use with the run's window (:attr:`maw_tau`, capped by the run length)."""
        if self._maw is None:
            tau = min(int(self.maw_tau), max(2, int(self.num_epochs) // 5))
            self._maw = ModalityWeighting(self.modalities, tau=tau, beta=self.maw_beta)
        return self._maw

    def current_maw_weights(self) -> np.ndarray:
        """Eqs. 13-16 on the validation Dice history once it spans the window (``tau`` changes), else ones."""
        if len(self.maw.history) <= self.maw.tau:
            return np.ones(self.num_modalities)
        return np.asarray(self.maw.weights(), dtype=np.float64)

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        dice = self.per_modality_dice(val_outputs)
        super().on_validation_epoch_end([{k: v for k, v in o.items() if k != "modality"} for o in val_outputs])
        self.maw.record(dice.tolist())
        if self.use_maw:
            self.modality_weights = self.current_maw_weights()
        self.logger.log("modality_val_dice", dice.tolist(), self.current_epoch)
        self.logger.log("maw_weights", [float(w) for w in self.modality_weights], self.current_epoch)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._prototype_seconds = 0.0

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        self.logger.log("prototype_seconds", float(self._prototype_seconds), self.current_epoch)

    def on_epoch_end(self):
        dice = self.logger.get_value("modality_val_dice", step=-1)
        self.print_to_log_file("per-modality pseudo dice " + ", ".join(
            f"{m} {d:.4f}" for m, d in zip(self.modalities, dice, strict=True)) + "; MAW weights " + ", ".join(
            f"{m} {w:.3f}" for m, w in zip(self.modalities, self.modality_weights, strict=True)) +
            (f"; prototypes+MPCL {self.logger.get_value('prototype_seconds', step=-1):.1f} s"
             if self.use_prototypes else ""))
        super().on_epoch_end()

    # ------------------------------------------------------------------ final validation per modality
    _validation_modality: int | None = None

    def do_split(self):
        tr_keys, val_keys = super().do_split()
        if self._validation_modality is not None:
            folder = self.preprocessed_dataset_folder
            val_keys = [v for v in val_keys if self._modality_of(folder, v) == self._validation_modality]
        return tr_keys, val_keys

    def _modality_of(self, folder: str, identifier: str) -> int:
        if identifier not in self.case_modality:
            self.case_modality[identifier] = self._properties_modality(folder, identifier)
        return self.case_modality[identifier]

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation, once per modality (the network told each case's modality), then
        ``summary_per_modality.json`` beside nnU-Net's summary.json."""
        net = self.network_module
        for k in range(self.num_modalities):
            self._validation_modality = k if self.num_modalities > 1 else None
            _, keys = self.do_split()
            if not keys:
                continue
            net.set_inference_modality(k)
            try:
                super().perform_actual_validation(save_probabilities)
            finally:
                self._validation_modality = None
                net.set_inference_modality(None)
        self._write_summary_per_modality()

    def _write_summary_per_modality(self) -> None:
        if self.local_rank != 0:
            return
        folder = self.preprocessed_dataset_folder
        write_summary_per_modality(join(self.output_folder, "validation"), self.modalities,
                                   lambda case: self.modalities[self._modality_of(folder, case)],
                                   self.dataset_json["file_ending"], self.print_to_log_file)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_extra_state(self) -> dict:
        state = {"maw": self.maw.state_dict(), "modality_weights": [float(w) for w in self.modality_weights],
                 "modalities": list(self.modalities)}
        if self.prototype_bank is not None:
            state["prototypes"] = {k: v.detach().cpu() for k, v in self.prototype_bank.state_dict().items()}
        return state

    def load_checkpoint_extra_state(self, state: dict) -> None:
        if list(state.get("modalities", self.modalities)) != list(self.modalities):
            raise DBDCDataError(f"The checkpoint was trained on modalities {state['modalities']}, these plans have "
                                f"{self.modalities}.")
        self.maw.load_state_dict(state["maw"])
        self.modality_weights = np.asarray(state["modality_weights"], dtype=np.float64)
        if "prototypes" in state and self.prototype_bank is not None:
            self.prototype_bank.load_state_dict({k: v.to(self.device) for k, v in state["prototypes"].items()})

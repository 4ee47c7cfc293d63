"""Base trainers of our (semi-)supervised methods: wiring only, the arithmetic lives elsewhere.

:class:`SSLTrainerBase` adds the unlabelled stream, the weighted unsupervised term, logs and checkpoint state to
``nnUNetTrainer`` (any network); :class:`MMSSLTrainerBase` adds our multi-branch networks on top. Both keep
``nnUNetTrainer.__init__``'s signature exactly. Together they provide:

* **Network as data.** ``__init__`` works on a deep copy of the plans in which the configuration's
  ``PlainConvUNet`` or ``ResidualEncoderUNet`` entry becomes this trainer's network (:attr:`network_class_name`, the
  planned kwargs and the base's kind, so every branch encoder is the planned one, the modality groups of the plans'
  ``mmssl`` block, :meth:`network_kwargs`). nnU-Net stores that copy as the model
  folder's ``plans.json``, so ``nnUNetv2_predict`` rebuilds the trained network from the plans alone.
* **Unlabelled stream.** One training step = one labelled batch + one unlabelled batch (:attr:`unlabeled_batch_size`,
  default the labelled one) from ``<data_identifier>_unlabeled``, run through the network in a single forward pass
  (exact with nnU-Net's instance norm). Loss = sum over heads of nnU-Net's deep-supervised Dice+CE on the labelled
  part + ``unsupervised_weight * ramp(progress) *`` :meth:`unsupervised_loss` on the full-resolution logits of the
  unlabelled part, the ramp a fraction of the run (:attr:`unsupervised_rampup_fraction`). ``use_unlabeled = False``
  gives the supervised-only variant of the same network.
* **Logging and checkpoints.** The supervised and unsupervised losses, the objective, the weight and the gradient
  share of the unsupervised term (:attr:`gradient_share_every`) are logged each epoch and drawn in progress.png;
  nnU-Net's ``train_losses`` is the loss of the output the network predicts, comparable with ``val_losses``;
  :meth:`checkpoint_extra_state` lets a method store training-only state under the checkpoint key
  ``mmssl_state``, restored on ``--c``.

Settings are class attributes, so a variant is a ten-line subclass.
"""

import copy

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import autocast
from torch._dynamo import OptimizedModule

from nnunet_mmssl.architectures.multi_branch import MultiBranchUNet, mean_of_heads
from nnunet_mmssl.dataloading.unlabeled_loader import build_unlabeled_augmenter, open_unlabeled_dataset
from nnunet_mmssl.planners import (
    default_modality_groups,
    get_mmssl_block,
    multi_branch_architecture,
    unlabeled_data_identifier,
)
from nnunet_mmssl.safe_load import check_configuration_manager
from nnunet_mmssl.semisup.gradient_share import difference_norm, global_norm, gradient_share
from nnunet_mmssl.semisup.ramps import sigmoid_rampup
from nnunet_mmssl.semisup.share_control import ShareController
from nnunet_mmssl.trainers.checkpoint_io import (
    CHECKPOINT_KEY,
    SafeLoadingMixin,
    atomic_torch_save,
    check_plain_state,
    nnunet_checkpoint_entries,
    read_extra_state,
)
from nnunet_mmssl.trainers.cpu_allocator import keep_freed_memory_in_process
from nnunet_mmssl.trainers.ddp import gather_across_ranks, per_rank_batch_size, shard_identifiers
from nnunet_mmssl.trainers.logging import register_log_keys
from nnunet_mmssl.trainers.user_errors import install_user_error_hook


def network_from_plans(configuration_manager, num_input_channels: int, num_output_channels: int,
                       enable_deep_supervision: bool, expected: type, expected_name: str, fix: str) -> torch.nn.Module:
    """nnU-Net's ``get_network_from_plans`` for a configuration, refusing a network that is not ``expected``.

    Our trainers' ``build_network_architecture`` (also what ``nnUNetv2_predict`` calls) read the network from the
    plans; plans without our network (e.g. stock nnU-Net plans) would otherwise build a network our trainer cannot
    drive. The error names what the plans build, what was expected (``expected_name``) and ``fix``. The plans'
    class names are checked before anything is imported (:func:`nnunet_mmssl.safe_load.check_network_classes`).
    """
    check_configuration_manager(configuration_manager)
    network = get_network_from_plans(
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
        allow_init=True, deep_supervision=enable_deep_supervision)
    if not isinstance(network, expected):
        raise TypeError(f"The plans build {type(network).__name__}, not {expected_name}. Use {fix}.")
    return network


#: per-epoch log key added when the weight is set by the gradient share (the target, drawn with the shares)
SHARE_LOG_KEYS = ("unsup_share_targets",)
#: entry of the checkpoint's ``mmssl_state`` holding the share controller's state
SHARE_STATE_KEY = "unsupervised_share_control"


class SSLTrainerBase(SafeLoadingMixin, nnUNetTrainer):
    """nnUNetTrainer with an unlabelled stream, an unsupervised loss term, extra logs and checkpoint state.

    Subclasses implement :meth:`compute_losses` (supervised and unsupervised terms of one step); the step itself
    (AMP, gradient scaling and clipping as in nnU-Net, the weight ramp) is here.
    """

    #: train on the unlabelled stream (False = supervised-only variant)
    use_unlabeled: bool = True
    #: unlabelled patches per step; None = the labelled batch size
    unlabeled_batch_size: int | None = None
    #: where unlabelled patches are taken: "uniform" or "foreground" (centred on the nonzero / body region)
    unlabeled_sampling: str = "uniform"
    #: weight of the unsupervised loss, multiplied by the ramp
    unsupervised_weight: float = 1.0
    #: sigmoid ramp-up (Laine & Aila 2017) length as a fraction of the whole run (``num_epochs`` x iterations), so
    #: that a short run and a 1000-epoch run see the same schedule; 0 = constant weight
    unsupervised_rampup_fraction: float = 0.0
    #: measure the gradient share ``|grad(w L_unsup)| / |grad(L_sup)|`` every this many training iterations
    #: (one extra backward pass of the supervised loss then); 0 = never
    gradient_share_every: int = 20
    #: steer the weight so that the measured gradient share equals this target (e.g. 0.1): the weight becomes
    #: :class:`~nnunet_mmssl.semisup.share_control.ShareController`'s (starting at ``unsupervised_weight``, updated at
    #: each measurement, times the ramp); None = off, the fixed ``unsupervised_weight``
    unsupervised_share_target: float | None = None
    #: the share controller's bounds of the weight (before the ramp)
    share_weight_bounds: tuple[float, float] = (1e-4, 100.0)
    #: the share controller's averaging of the measurements ("mean": the mean share is the target; "log": the
    #: geometric mean is, the rule before 2026-12-07), its smoothing and its rate (see ShareController)
    share_averaging: str = "mean"
    share_smoothing: float = 0.1
    share_rate: float = 0.5
    #: the controller made in ``__init__`` (None: off; also for an instance made without ``__init__``)
    share_controller: ShareController | None = None
    #: per-epoch log keys added to nnU-Net's
    extra_log_keys: tuple[str, ...] = ("train_sup_losses", "train_unsup_losses", "unsup_weights",
                                       "train_objectives", "unsup_grad_shares")
    #: warn at the start of training when a step needs more than this times the feature-map memory the plans budget
    memory_warning_factor: float = 1.25
    #: on CPU, keep freed memory in the process (glibc) so that steps do not page-fault their tensors in again
    #: (:mod:`nnunet_mmssl.trainers.cpu_allocator`); no effect on CUDA
    cpu_keep_freed_memory: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        install_user_error_hook()
        #: the weight's controller when :attr:`unsupervised_share_target` is set, else None
        self.share_controller = self.make_share_controller()
        register_log_keys(self.logger, self.extra_log_keys + (() if self.share_controller is None else SHARE_LOG_KEYS))
        self.dataloader_unlabeled = None
        #: training iterations taken in the current epoch (the ramp's position inside the epoch)
        self.iteration_in_epoch = 0
        self._optimizer_stepped = False
        self._step_hook_optimizer = None
        #: loss to log as nnU-Net's ``train_losses`` (comparable with ``val_losses``); None = the supervised loss
        self.monitor_loss = None
        #: nnU-Net's U-Net entry of the plans, PlainConvUNet or ResidualEncoderUNet (the memory check's reference)
        self.plain_architecture = copy.deepcopy(self.configuration_manager.configuration["architecture"])

    @property
    def network_module(self) -> torch.nn.Module:
        """The bare network (unwrapped from DDP and torch.compile; under DDP also before nnU-Net wraps it, e.g. in
        ``configure_optimizers``)."""
        wrapped = isinstance(self.network, torch.nn.parallel.DistributedDataParallel)
        module = self.network.module if wrapped else self.network
        return module._orig_mod if isinstance(module, OptimizedModule) else module

    # ------------------------------------------------------------------ memory
    def training_architecture(self, base_architecture: dict, modality_groups: list[list[int]]) -> dict:
        """The architecture entry of the network this trainer trains, from nnU-Net's U-Net entry (plain or ResEnc)."""
        return copy.deepcopy(dict(base_architecture))

    def samples_per_step(self, batch_size: float) -> float:
        """Samples one step sends through the network with gradient: labelled + unlabelled."""
        if not self.use_unlabeled:
            return batch_size
        return batch_size + (self.unlabeled_batch_size if self.unlabeled_batch_size is not None else batch_size)

    def memory_check(self) -> dict:
        """Compare this trainer's step (feature-map elements, nnU-Net's memory proxy) with the plans' budget.

        The budget is the one recorded by :class:`~nnunet_mmssl.planners.memory.MMSSLExperimentPlanner` in the
        plans' ``mmssl`` block, else what nnU-Net planned for its own trainer (plain U-Net x batch size).
        Logs a warning with the fix when the step needs more than :attr:`memory_warning_factor` times the budget.
        """
        from nnunet_mmssl.planners.memory import mmssl_plans_identifier, network_feature_map_size

        patch = self.configuration_manager.patch_size
        channels = self.num_input_channels
        outputs = self.label_manager.num_segmentation_heads
        need = float(self.network_module.compute_conv_feature_map_size(list(patch))) * \
            self.samples_per_step(self.batch_size)
        record = ((get_mmssl_block(self.plans_manager.plans) or {}).get("memory") or {}).get(self.configuration_name)
        if record:
            budget, source = record["feature_map_budget"], f"budget of {self.plans_manager.plans_name}"
        else:
            budget = float(network_feature_map_size(self.plain_architecture, patch, channels, outputs)) * \
                self.batch_size
            source = "what nnU-Net planned for nnUNetTrainer"
        ratio = need / budget
        if ratio > self.memory_warning_factor:
            plans = self.plans_manager.plans
            ours = plans.get("plans_name", "nnUNetPlans")
            ours = ours if record else mmssl_plans_identifier(ours)
            planner = plans.get("experiment_planner_used", "ExperimentPlanner")
            option = "" if planner == "ExperimentPlanner" else f" -pl {planner}"
            self.print_to_log_file(
                f"WARNING: one step of {type(self).__name__} stores {ratio:.1f}x the feature maps of {source} "
                f"(batch {self.batch_size}, patch {list(patch)}): it may not fit the GPU this plan was made for. Plan "
                f"with nnUNetv2_mmssl_plan_and_preprocess{option} (writes {ours}, budgeted for our trainers) and "
                f"train with -p {ours}, or lower the batch size.", also_print_to_console=True)
        return {"need": need, "budget": budget, "ratio": ratio, "source": source}

    def on_train_start(self):
        if self.device.type == "cpu" and self.cpu_keep_freed_memory:
            applied = keep_freed_memory_in_process()
            self.print_to_log_file("CPU training: freed memory stays in the process (glibc mallopt M_MMAP_MAX=0, "
                                   "M_TRIM_THRESHOLD=-1), so steps reuse it without page faults." if applied else
                                   "CPU training: the C library is not glibc; memory allocation left as it is.")
        super().on_train_start()
        self.memory_check()

    # ------------------------------------------------------------------ unlabelled stream
    def unlabeled_folder(self) -> str:
        return join(self.preprocessed_dataset_folder_base,
                    unlabeled_data_identifier(self.configuration_manager.data_identifier, self.plans_manager.plans))

    def get_dataloaders(self):
        dataloader_train, dataloader_val = super().get_dataloaders()
        if self.use_unlabeled:
            self.dataloader_unlabeled = self.get_unlabeled_dataloader()
        return dataloader_train, dataloader_val

    def unlabeled_batch_size_per_rank(self) -> int:
        """Unlabelled patches per step on this rank: :attr:`unlabeled_batch_size` split across DDP ranks as nnU-Net
        splits the labelled batch; None follows the (already per-rank) labelled batch size."""
        if self.unlabeled_batch_size is None:
            return self.batch_size
        if not self.is_ddp:
            return self.unlabeled_batch_size
        return per_rank_batch_size(self.unlabeled_batch_size, dist.get_world_size(), dist.get_rank())

    def unlabeled_dataset(self):
        """The preprocessed unlabelled cases this rank reads: all of them, or its own shard under DDP."""
        dataset = open_unlabeled_dataset(self.unlabeled_folder())
        if not self.is_ddp:
            return dataset
        shard = shard_identifiers(dataset.identifiers, dist.get_world_size(), dist.get_rank())
        return type(dataset)(dataset.source_folder, shard)

    def _gather_across_ranks(self, values) -> np.ndarray:
        """All ranks' per-step values of a log (nnU-Net's ``all_gather_object``), flat; this rank's without DDP."""
        return gather_across_ranks(values) if self.is_ddp else np.ravel(np.asarray(values, dtype=np.float64))

    def unlabeled_transforms(self):
        """``(transforms, initial_patch_size)`` for the unlabelled stream: nnU-Net's training augmentation of this
        configuration, exactly as its labelled loader gets it."""
        rotation_for_da, do_dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation_for_da, None, mirror_axes, do_dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels,
            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
            ignore_label=self.label_manager.ignore_label)
        return transforms, initial_patch_size

    def get_unlabeled_dataloader(self):
        dataset = self.unlabeled_dataset()
        batch_size = self.unlabeled_batch_size_per_rank()
        transforms, initial_patch_size = self.unlabeled_transforms()
        num_processes = get_allowed_n_proc_DA()
        augmenter = build_unlabeled_augmenter(
            dataset, batch_size, initial_patch_size,
            self.configuration_manager.patch_size, self.label_manager, transforms,
            num_processes=max(1, num_processes // 2) if num_processes > 0 else 0,
            pin_memory=self.device.type == "cuda", sampling=self.unlabeled_sampling)
        next(augmenter)
        self.print_to_log_file(f"Unlabelled stream: {len(dataset.identifiers)} cases from {self.unlabeled_folder()}, "
                               f"batch size {batch_size}" + (" (rank 0's shard and share)" if self.is_ddp else ""))
        return augmenter

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
            self.dataloader_unlabeled._finish()
        self.dataloader_unlabeled = None

    # ------------------------------------------------------------------ training step
    def training_progress(self) -> float:
        """Fraction of the run done before the current step: ``(epoch + iteration / iterations) / num_epochs``."""
        iterations = max(1, self.num_iterations_per_epoch)
        return (self.current_epoch + min(self.iteration_in_epoch, iterations) / iterations) / max(1, self.num_epochs)

    def current_unsupervised_weight(self) -> float:
        """``unsupervised_weight * sigmoid_rampup(progress, unsupervised_rampup_fraction)``; 0 without unlabelled data.

        ``progress`` is :meth:`training_progress` (0 at the first step, 1 at the end of the run), so the ramp has the
        same value at the same fraction of any run length.
        """
        if not self.use_unlabeled:
            return 0.0
        weight = self.unsupervised_weight if self.share_controller is None else self.share_controller.weight
        if self.unsupervised_rampup_fraction == 0:
            return float(weight)
        return weight * sigmoid_rampup(self.training_progress(), self.unsupervised_rampup_fraction)

    def make_share_controller(self) -> ShareController | None:
        """The controller of the weight when :attr:`unsupervised_share_target` is set (None when it is not).

        It starts at :attr:`unsupervised_weight` and needs the unlabelled stream and measurements
        (:attr:`gradient_share_every` > 0); the weight it sets is multiplied by the ramp.

        Raises:
            ValueError: for a target without unlabelled stream or measurements, or an invalid setting.
        """
        target = self.unsupervised_share_target
        if target is None:
            return None
        if not self.use_unlabeled or self.gradient_share_every <= 0:
            raise ValueError(f"{type(self).__name__}: unsupervised_share_target {target!r} needs the unlabelled "
                             f"stream (use_unlabeled True, is {self.use_unlabeled}) and gradient-share measurements "
                             f"(gradient_share_every > 0, is {self.gradient_share_every}). Set both, or the target "
                             f"to None.")
        low, high = self.share_weight_bounds
        return ShareController(target, self.unsupervised_weight, min_weight=low, max_weight=high,
                               smoothing=self.share_smoothing, rate=self.share_rate, averaging=self.share_averaging)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.iteration_in_epoch = 0

    def measure_gradient_share_now(self) -> bool:
        """Whether this step measures the gradient share (every :attr:`gradient_share_every` iterations)."""
        if not self.use_unlabeled or self.gradient_share_every <= 0:
            return False
        return (self.current_epoch * self.num_iterations_per_epoch + self.iteration_in_epoch) % \
            self.gradient_share_every == 0

    def _trained_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def _mark_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._optimizer_stepped = True

    def _watch_optimizer_steps(self) -> None:
        """Register (once per optimizer) a post-step hook telling whether ``optimizer.step()`` really ran.

        nnU-Net's GradScaler skips the optimizer step when the scaled gradients overflow; a hook on the optimizer
        sees that without a host-device synchronisation.
        """
        if self._step_hook_optimizer is not self.optimizer:
            self.optimizer.register_step_post_hook(self._mark_optimizer_step)
            self._step_hook_optimizer = self.optimizer

    def compute_losses(self, data: torch.Tensor, target, unlabeled: torch.Tensor | None):
        """Return ``(supervised_loss, unsupervised_loss)`` for one step (inside autocast).

        Args:
            data: (B, channels, *S) labelled input; target: nnU-Net's (list of) targets.
            unlabeled: (B_u, channels, *S) unlabelled input, or None without the unlabelled stream.
        """
        raise NotImplementedError

    def clip_gradients(self) -> None:
        """nnU-Net's clip of the network's gradient norm to 12 (after unscaling); a trainer that also trains modules
        outside ``self.network`` clips those here too."""
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)

    def after_optimizer_step(self) -> None:
        """Hook after each optimizer step that was taken (e.g. an EMA teacher update).

        Not called when AMP's GradScaler skipped the step (overflowing gradients): the weights did not move.
        """

    def step_inputs(self, batch: dict) -> tuple:
        """The arguments of :meth:`compute_losses` for one step, on the device: ``(data, target, unlabeled)``.

        Reads the labelled batch nnU-Net's loader gave and, with :attr:`use_unlabeled`, the next unlabelled batch.
        A trainer with other streams (e.g. one batch per modality) overrides this, :meth:`step_uses_unlabeled` and
        :meth:`compute_losses` together.
        """
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)
        unlabeled = None
        if self.use_unlabeled:
            unlabeled = next(self.dataloader_unlabeled)["data"].to(self.device, non_blocking=True)
        return data, target, unlabeled

    def step_uses_unlabeled(self, inputs: tuple) -> bool:
        """Whether the step's inputs (:meth:`step_inputs`) contain unlabelled data."""
        return inputs[2] is not None

    def train_step(self, batch: dict) -> dict:
        inputs = self.step_inputs(batch)
        uses_unlabeled = self.step_uses_unlabeled(inputs)
        weight = self.current_unsupervised_weight()
        measure = uses_unlabeled and self.measure_gradient_share_now()
        self.iteration_in_epoch += 1
        self._watch_optimizer_steps()

        self.optimizer.zero_grad(set_to_none=True)
        self.monitor_loss = None
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            sup_loss, unsup_loss = self.compute_losses(*inputs)
            loss = sup_loss + weight * unsup_loss if uses_unlabeled else sup_loss

        scaler = self.grad_scaler
        scaled = scaler.scale if scaler is not None else (lambda x: x)
        params = self._trained_parameters() if measure else []
        share = float("nan")
        sup_grads = None
        if measure and self.is_ddp:
            # the step's gradients are averaged over ranks, so measure both terms on this rank's graph
            share = gradient_share(scaled(sup_loss), scaled(weight * unsup_loss), params)
        elif measure:
            # one extra backward: the supervised gradient; the unsupervised one is the step's gradient minus it
            sup_grads = torch.autograd.grad(scaled(sup_loss), params, retain_graph=True, allow_unused=True)

        self._optimizer_stepped = False
        scaled(loss).backward()
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if sup_grads is not None:  # a tensor, copied to the host with the losses below (no extra synchronisation)
            scale = 1.0 if scaler is None else scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") \
                else float(scaler.get_scale())
            share = difference_norm([p.grad for p in params], sup_grads, scale) / (global_norm(sup_grads) / scale)
        self.clip_gradients()
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        if self._optimizer_stepped:
            self.after_optimizer_step()
        monitor = sup_loss if self.monitor_loss is None else self.monitor_loss
        if not isinstance(share, torch.Tensor):  # a fill, not a copy from the host (that would synchronise too)
            share = torch.full((), share, dtype=torch.float32, device=loss.device)
        if measure and self.share_controller is not None and self.is_ddp:  # every rank steers the same weight
            share = share.detach().float().reshape(()).clone()
            dist.all_reduce(share)
            share = share / dist.get_world_size()
        values = torch.stack([monitor.detach().float(), sup_loss.detach().float(), unsup_loss.detach().float(),
                              loss.detach().float(), share.detach().float().reshape(())]).cpu()  # one host copy
        share = np.float64(values[4].numpy())
        if measure and self.share_controller is not None:  # the host copy above: no extra synchronisation
            self.share_controller.update(share, weight)
        return {"loss": values[0].numpy(), "sup_loss": values[1].numpy(), "unsup_loss": values[2].numpy(),
                "objective": values[3].numpy(), "unsup_weight": np.float64(weight),
                "grad_share": share if np.isfinite(share) else np.float64(np.nan)}

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        gathered = {key: self._gather_across_ranks(outputs[key])
                    for key in ("sup_loss", "unsup_loss", "unsup_weight", "objective", "grad_share")}
        shares = gathered["grad_share"]
        self.logger.log("train_sup_losses", float(np.mean(gathered["sup_loss"])), self.current_epoch)
        self.logger.log("train_unsup_losses", float(np.mean(gathered["unsup_loss"])), self.current_epoch)
        self.logger.log("unsup_weights", float(np.mean(gathered["unsup_weight"])), self.current_epoch)
        self.logger.log("train_objectives", float(np.mean(gathered["objective"])), self.current_epoch)
        self.logger.log("unsup_grad_shares", float(np.nanmean(shares)) if np.isfinite(shares).any() else float("nan"),
                        self.current_epoch)
        if self.share_controller is not None:
            self.logger.log("unsup_share_targets", float(self.share_controller.target), self.current_epoch)

    def on_epoch_end(self):
        share = self.logger.get_value("unsup_grad_shares", step=-1)
        self.print_to_log_file(
            f"sup_loss {np.round(self.logger.get_value('train_sup_losses', step=-1), decimals=4)}, unsup_loss "
            f"{np.round(self.logger.get_value('train_unsup_losses', step=-1), decimals=6)}, unsup_weight "
            f"{np.round(self.logger.get_value('unsup_weights', step=-1), decimals=6)}, unsup_grad_share "
            f"{'n/a' if not np.isfinite(share) else f'{share:.4g}'}" + (
                "" if self.share_controller is None else f" (target {self.share_controller.target:g}, weight before "
                f"the ramp {self.share_controller.weight:.4g})"))
        super().on_epoch_end()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_extra_state(self) -> dict:
        """Training-only state to store under the checkpoint key ``mmssl_state`` (a teacher, banks, ...).

        Tensors and plain containers only (dict, list, tuple, str, int, float, bool, None), so that it loads with
        ``torch.load(weights_only=True)``; :meth:`save_checkpoint` refuses anything else, naming the entry.
        """
        return {}

    def load_checkpoint_extra_state(self, state: dict) -> None:
        """Restore what :meth:`checkpoint_extra_state` stored."""

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus :meth:`checkpoint_extra_state` under ``mmssl_state``, in one atomic write.

        Rank 0 only, as in nnU-Net. The extra state must be tensors and plain containers (checked here, so that
        :meth:`load_checkpoint` reads it with ``torch.load(weights_only=True)``); the file is written under a
        temporary name and renamed, so a killed run never leaves a half-written checkpoint.
        """
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = nnunet_checkpoint_entries(self)
        extra = self.checkpoint_extra_state()
        if self.share_controller is not None:
            extra = {**extra, SHARE_STATE_KEY: self.share_controller.state_dict()}
        if extra:
            check_plain_state(extra, CHECKPOINT_KEY)
            checkpoint[CHECKPOINT_KEY] = extra
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's loading (the file checked first, :class:`SafeLoadingMixin`), then our ``mmssl_state`` entry read
        with ``torch.load(weights_only=True)``."""
        if not isinstance(filename_or_checkpoint, str):
            raise TypeError("nnU-Net 2.8's load_checkpoint takes a checkpoint file name.")
        super().load_checkpoint(filename_or_checkpoint)
        extra = read_extra_state(filename_or_checkpoint)
        share_state = extra.pop(SHARE_STATE_KEY, None) if extra else None
        if share_state is not None and self.share_controller is not None:
            self.share_controller.load_state_dict(share_state)
        if extra:
            self.load_checkpoint_extra_state(extra)


class MMSSLTrainerBase(SSLTrainerBase):
    """Trainer of our multi-branch networks (one encoder/decoder per modality group), see module docstring.

    Loss = sum over heads of nnU-Net's deep-supervised Dice+CE on the labelled part of a joint forward pass +
    :meth:`unsupervised_loss` on the full-resolution logits of the unlabelled part.
    """

    #: dotted path of the network class written into the plans
    network_class_name: str = "nnunet_mmssl.architectures.multi_branch.MultiBranchUNet"
    #: channel groups, one per branch; None = the plans' ``mmssl`` block, else first half / second half
    modality_groups: list[list[int]] | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
        plain = self._configuration_architecture(plans, configuration)
        plans = self.plans_with_network(plans, configuration, dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.plain_architecture = plain

    # ------------------------------------------------------------------ network as data
    def network_kwargs(self) -> dict:
        """Method switches written into the arch kwargs (e.g. ``use_mem``). Override in subclasses."""
        return {}

    def resolve_modality_groups(self, plans: dict, dataset_json: dict) -> list[list[int]]:
        if self.modality_groups is not None:
            return [list(g) for g in self.modality_groups]
        block = get_mmssl_block(plans)
        if block is not None and block.get("modality_groups"):
            return [list(g) for g in block["modality_groups"]]
        return default_modality_groups(len(dataset_json["channel_names"]))

    @staticmethod
    def _configuration_architecture(plans: dict, configuration: str) -> dict:
        if configuration not in plans.get("configurations", {}):
            raise ValueError(f"Configuration {configuration!r} is not in the plans "
                             f"({sorted(plans.get('configurations', {}))}).")
        return copy.deepcopy(PlansManager(plans).get_configuration(configuration).configuration["architecture"])

    def training_architecture(self, base_architecture: dict, modality_groups: list[list[int]]) -> dict:
        """Our network's architecture entry: the plain kwargs + modality groups + :meth:`network_kwargs`."""
        return multi_branch_architecture(base_architecture, self.network_class_name, modality_groups,
                                         self.network_kwargs())

    def plans_with_network(self, plans: dict, configuration: str, dataset_json: dict) -> dict:
        """Deep copy of ``plans`` whose ``configuration`` builds this trainer's network (input not modified)."""
        base = self._configuration_architecture(plans, configuration)
        new_plans = copy.deepcopy(plans)
        new_plans["configurations"][configuration]["architecture"] = self.training_architecture(
            base, self.resolve_modality_groups(new_plans, dataset_json))
        return new_plans

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        return network_from_plans(configuration_manager, num_input_channels, num_output_channels,
                                  enable_deep_supervision, MultiBranchUNet, "one of our multi-branch networks",
                                  "the model folder's plans.json (written by our trainer) or train with an "
                                  "nnunet_mmssl trainer, which writes its network into the plans")

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self.network_module.deep_supervision = enabled

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.network_module.return_heads = True

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.network_module.return_heads = False

    def on_train_end(self):
        super().on_train_end()
        self.network_module.return_heads = False

    def unsupervised_loss(self, unlabeled_logits: list[torch.Tensor], unlabeled_data: torch.Tensor) -> torch.Tensor:
        """The method's loss on unlabelled data.

        Args:
            unlabeled_logits: one (B_u, C, *S) full-resolution logit tensor per head.
            unlabeled_data: the (B_u, channels, *S) unlabelled input.
        """
        raise NotImplementedError(f"{type(self).__name__} uses unlabelled data but defines no unsupervised_loss.")

    def supervised_loss(self, labelled_outputs: list, target) -> torch.Tensor:
        """Sum over heads of nnU-Net's (deep-supervised) Dice+CE loss."""
        return sum(self.loss(output, target) for output in labelled_outputs)

    @torch.no_grad()
    def fused_supervised_loss(self, labelled_outputs: list, target) -> torch.Tensor:
        """nnU-Net's loss of the heads' mean logits (what the network predicts and nnU-Net validates), no gradient.

        Logged as nnU-Net's ``train_losses`` so that progress.png compares it with ``val_losses`` (the same loss of
        the same fused output on validation patches) instead of the sum over heads that is optimised.
        """
        return self.loss(mean_of_heads(labelled_outputs), target).detach()

    def compute_losses(self, data: torch.Tensor, target, unlabeled: torch.Tensor | None):
        num_labelled = data.shape[0]
        inputs = data if unlabeled is None else torch.cat((data, unlabeled))
        heads = self.network(inputs)
        labelled = [[o[:num_labelled] for o in h] if isinstance(h, (list, tuple)) else h[:num_labelled]
                    for h in heads]
        sup_loss = self.supervised_loss(labelled, target)
        self.monitor_loss = self.fused_supervised_loss(labelled, target)
        if unlabeled is None:
            return sup_loss, torch.zeros((), device=self.device)
        full_res = [h[0] if isinstance(h, (list, tuple)) else h for h in heads]
        return sup_loss, self.unsupervised_loss([o[num_labelled:] for o in full_res], unlabeled)

"""GPU memory budgets for our trainers, in nnU-Net's own unit, and the planner that keeps plans within them.

nnU-Net's planner estimates memory with ``network.compute_conv_feature_map_size(patch_size)`` (feature-map elements
stored for backprop, per sample) and picks patch and batch so that ``estimate * batch_size`` stays within a reference
scaled to the GPU memory target (``reference * ref_bs``, see :func:`feature_map_budget`). Our trainers store more
per step: a dual-branch network has two encoders and decoders plus fusion blocks, and a semi-supervised step adds an
unlabelled batch. :func:`step_feature_map_size` is a trainer's estimate in that unit; :class:`MMSSLExperimentPlanner`
is nnU-Net's ``ExperimentPlanner`` with that estimate in place of the plain U-Net's, so nnU-Net's own search shrinks
the patch and the batch until the trainer's whole step fits the target. Its plans (``nnUNetMMSSLPlans`` by default)
share nnU-Net's preprocessed data wherever the preprocessing is identical. :func:`mmssl_planner_class` does the same
for nnU-Net's other planners, e.g. the residual-encoder presets ``nnUNetPlannerResEncM/L/XL`` (plans
``nnUNetMMSSLResEncUNetM/L/XLPlans``, :func:`mmssl_plans_identifier`): our networks are then built on the residual
encoder, and the estimate is that of those networks.

This module sizes trainer *classes* (their ``training_architecture`` and ``samples_per_step``) and never imports the
trainers, which import it: trainer names are resolved by the caller
(:func:`nnunet_mmssl.trainers.registry.resolve_trainer_class`, passed to the planner as ``resolve_trainer``).
"""

import copy
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_mmssl.architectures.encoders import base_kind
from nnunet_mmssl.planners.mmssl_plans import default_modality_groups

MMSSL_PLANS_NAME = "nnUNetMMSSLPlans"
#: trainers whose steps the default MMSSL plans must fit (the plans fit the largest of them)
DEFAULT_BUDGET_TRAINERS = ("MeanTeacherTrainer", "MemCifSSLTrainer", "MMFMCMLTrainer")
#: the same for unregistered datasets (one channel, a modality per case): only DBDC trains on them
UNREGISTERED_BUDGET_TRAINERS = ("DBDCTrainer",)
#: configuration keys that decide the preprocessed data; equal keys let two plans share one data folder
PREPROCESSING_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                      "resampling_fn_seg", "resampling_fn_data_kwargs", "resampling_fn_seg_kwargs", "preprocessor_name")


def network_feature_map_size(architecture: Mapping, patch_size: Sequence[int], num_input_channels: int,
                             num_output_channels: int) -> int:
    """``compute_conv_feature_map_size(patch_size)`` of the network an architecture entry builds (one sample); its
    class names are checked before import (:func:`nnunet_mmssl.safe_load.check_network_classes`)."""
    from nnunet_mmssl.safe_load import check_network_classes

    check_network_classes(architecture["network_class_name"], architecture["arch_kwargs"],
                          architecture["_kw_requires_import"], "the plans")
    network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], num_input_channels, num_output_channels,
                                     allow_init=False, deep_supervision=True)
    return int(network.compute_conv_feature_map_size(list(patch_size)))


def step_feature_map_size(trainer_class, base_architecture: Mapping, modality_groups: Sequence[Sequence[int]],
                          patch_size: Sequence[int], num_input_channels: int, num_output_channels: int,
                          batch_size: float = 1, modalities: Sequence[str] | None = None) -> float:
    """Feature-map elements one training step of ``trainer_class`` stores for backprop, for a labelled batch size.

    The trainer's network (built from ``base_architecture``, nnU-Net's U-Net entry, as the trainer builds
    it) times the samples of a step: labelled + unlabelled (the unlabelled batch defaults to the labelled one; a
    fixed ``unlabeled_batch_size`` is counted as it is). A no-grad forward (a Mean Teacher's teacher) stores nothing.

    Args:
        trainer_class: a trainer class (ours: :class:`~nnunet_mmssl.trainers.SSLTrainerBase` subclasses; any other
            trainer counts as nnU-Net's, one network and one batch).
        base_architecture: ``configurations[c]["architecture"]`` of nnU-Net's plans (or the planner's candidate).
        modality_groups: channel groups of multi-branch networks.
        patch_size: patch size.
        num_input_channels, num_output_channels: channels of the network.
        batch_size: labelled batch size (1 = per labelled sample, what nnU-Net's planner works with).
        modalities: the unregistered modalities of the dataset (a DBDC step has one labelled and one unlabelled
            batch per modality), or None.
    """
    probe = trainer_class.__new__(trainer_class)
    probe.planning_modalities = list(modalities) if modalities else None
    architecture = probe.training_architecture(base_architecture, modality_groups) \
        if hasattr(probe, "training_architecture") else base_architecture
    per_sample = network_feature_map_size(architecture, patch_size, num_input_channels, num_output_channels)
    samples = probe.samples_per_step(batch_size) if hasattr(probe, "samples_per_step") else batch_size
    return float(per_sample * samples)


def feature_map_budget(planner: ExperimentPlanner, ndim: int) -> float:
    """The feature-map elements a whole batch may store under ``planner``'s GPU memory target (nnU-Net's rule:
    ``estimate * batch_size <= reference * ref_bs``)."""
    reference = (planner.UNet_reference_val_2d if ndim == 2 else planner.UNet_reference_val_3d) * \
        (planner.UNet_vram_target_GB / planner.UNet_reference_val_corresp_GB)
    ref_bs = planner.UNet_reference_val_corresp_bs_2d if ndim == 2 else planner.UNet_reference_val_corresp_bs_3d
    return float(reference * ref_bs)


def mmssl_plans_identifier(plans_identifier: str) -> str:
    """The name of our memory-budgeted plans beside nnU-Net's plans ``plans_identifier``.

    ``nnUNet<rest>`` becomes ``nnUNetMMSSL<rest>``: ``nnUNetPlans`` -> ``nnUNetMMSSLPlans`` (:data:`MMSSL_PLANS_NAME`),
    ``nnUNetResEncUNetMPlans`` -> ``nnUNetMMSSLResEncUNetMPlans`` (likewise L, XL, and ``-overwrite_plans_name``
    names such as ``nnUNetResEncUNetPlans_80G`` -> ``nnUNetMMSSLResEncUNetPlans_80G``); any other name gets
    ``_MMSSL`` appended.
    """
    prefix = "nnUNet"
    if plans_identifier.startswith(prefix) and not plans_identifier.startswith(prefix + "MMSSL"):
        return prefix + "MMSSL" + plans_identifier[len(prefix):]
    return plans_identifier + "_MMSSL"


def find_planner_class(name: str) -> type:
    """nnU-Net's experiment planner class of that name, found as ``nnUNetv2_plan_and_preprocess -pl`` finds it.

    Raises:
        ValueError: naming the planner and the usual ones when there is no such planner.
    """
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                        current_module="nnunetv2.experiment_planning") \
        if name.isidentifier() else None
    if not (isinstance(found, type) and issubclass(found, ExperimentPlanner)):
        raise ValueError(f"-pl {name}: no nnU-Net experiment planner of that name. Use ExperimentPlanner (nnUNetPlans) "
                         f"or a residual-encoder preset: nnUNetPlannerResEncM, nnUNetPlannerResEncL, "
                         f"nnUNetPlannerResEncXL.")
    return found


def planner_defaults(planner_class: type) -> tuple[float, str]:
    """``(gpu_memory_target_in_gb, plans_name)`` defaults of an nnU-Net planner class (8 GB and ``nnUNetPlans`` for
    ``ExperimentPlanner``, 24 GB and ``nnUNetResEncUNetLPlans`` for ``nnUNetPlannerResEncL``, ...)."""
    parameters = inspect.signature(planner_class.__init__).parameters
    gpu = parameters.get("gpu_memory_target_in_gb")
    name = parameters.get("plans_name")
    return (float(gpu.default) if gpu is not None and gpu.default is not inspect.Parameter.empty else 8.0,
            name.default if name is not None and isinstance(name.default, str) else "nnUNetPlans")


class MMSSLPlannerMixin:
    """Makes an nnU-Net experiment planner plan for our trainers' whole steps (see :class:`MMSSLExperimentPlanner`).

    Mixed in before an nnU-Net planner class (:func:`mmssl_planner_class`): everything but the memory estimate is
    that planner's (its U-Net, plain or residual encoder, its blocks per stage, references and GPU memory target).
    ``gpu_memory_target_in_gb`` and ``plans_name`` default to the planner's own defaults, the name made with
    :func:`mmssl_plans_identifier`.

    Raises:
        ValueError: if the planner plans a U-Net our networks are not built from (naming it and the supported ones).
    """

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float | None = None,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str | None = None,
                 overwrite_target_spacing=None, suppress_transpose: bool = False,
                 budget_trainers: Sequence = DEFAULT_BUDGET_TRAINERS,
                 modality_groups: Sequence[Sequence[int]] | None = None,
                 resolve_trainer: Callable[[str], type] | None = None):
        names = [t for t in budget_trainers if isinstance(t, str)]
        if names and resolve_trainer is None:
            raise TypeError(f"{type(self).__name__} got trainer names {names} but no resolve_trainer: pass the "
                            f"classes, or resolve_trainer=nnunet_mmssl.trainers.registry.resolve_trainer_class.")
        default_gpu, default_name = planner_defaults(self.planner_base())
        gpu = default_gpu if gpu_memory_target_in_gb is None else gpu_memory_target_in_gb
        super().__init__(dataset_name_or_id, gpu, preprocessor_name, plans_name or mmssl_plans_identifier(default_name),
                         overwrite_target_spacing, suppress_transpose)
        self.base_kind = base_kind(f"{self.UNet_class.__module__}.{self.UNet_class.__name__}")
        if not budget_trainers:
            raise ValueError(f"{type(self).__name__} needs at least one trainer to budget for.")
        from nnunet_mmssl.dataset_conversion.modality_layout import read_layout

        self.budget_trainers = [resolve_trainer(t) if isinstance(t, str) else t for t in budget_trainers]
        layout = read_layout(self.dataset_json.get("mmssl"))
        self.modalities = list(layout.modalities) if layout is not None else None
        num_channels = len(self.dataset_json["channel_names"])
        self.modality_groups = [list(g) for g in modality_groups] if modality_groups else \
            ([[0]] if num_channels == 1 else default_modality_groups(num_channels))

    @classmethod
    def planner_base(cls) -> type:
        """The nnU-Net planner class this planner extends."""
        return cls.__mro__[cls.__mro__.index(MMSSLPlannerMixin) + 1]

    def static_estimate_VRAM_usage(self, patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
                                   arch_kwargs_req_import):
        base = {"network_class_name": arch_class_name, "arch_kwargs": arch_kwargs,
                "_kw_requires_import": arch_kwargs_req_import}
        return max(step_feature_map_size(t, base, self.modality_groups, patch_size, input_channels, output_channels,
                                         modalities=self.modalities)
                   for t in self.budget_trainers)

    def memory_record(self, configuration: Mapping) -> dict:
        """What the plans' ``mmssl`` block records about a configuration's budget (read by the trainers' check)."""
        ndim = len(configuration["patch_size"])
        return {"budget_trainers": [t.__name__ for t in self.budget_trainers],
                "planner": self.planner_base().__name__,
                "gpu_memory_target_in_gb": float(self.UNet_vram_target_GB),
                "feature_map_budget": feature_map_budget(self, ndim)}


class MMSSLExperimentPlanner(MMSSLPlannerMixin, ExperimentPlanner):
    """nnU-Net's ``ExperimentPlanner`` whose memory estimate is that of our trainers' whole steps.

    Everything but the estimate is nnU-Net's: spacing, topology, the patch-shrinking search, the batch-size rule
    (minimum 2, at most 5 % of the dataset). For each candidate patch the estimate is the largest
    :func:`step_feature_map_size` per labelled sample over ``budget_trainers``, so the labelled batch it picks plus
    the trainer's unlabelled batch fit the target that nnU-Net's plain plans fit. The same for another nnU-Net
    planner (e.g. the residual-encoder presets): :func:`mmssl_planner_class`.

    Args:
        budget_trainers: trainer classes whose steps must fit, or their names (default
            :data:`DEFAULT_BUDGET_TRAINERS`) when ``resolve_trainer`` is given.
        modality_groups: channel groups of the multi-branch networks (default first half / second half).
        resolve_trainer: name -> trainer class, for names in ``budget_trainers``
            (:func:`nnunet_mmssl.trainers.registry.resolve_trainer_class`; this module does not import the trainers).
        Others: as nnU-Net's ``ExperimentPlanner``; ``plans_name`` defaults to :data:`MMSSL_PLANS_NAME`.
    """


_PLANNER_CLASSES: dict[type, type] = {ExperimentPlanner: MMSSLExperimentPlanner}


def mmssl_planner_class(planner_class: type) -> type:
    """The memory-budgeted version of an nnU-Net planner class: :class:`MMSSLPlannerMixin` + ``planner_class``
    (:class:`MMSSLExperimentPlanner` for ``ExperimentPlanner``; ``MMSSLnnUNetPlannerResEncM`` for
    ``nnUNetPlannerResEncM``, whose plans are ``nnUNetMMSSLResEncUNetMPlans``)."""
    if planner_class not in _PLANNER_CLASSES:
        _PLANNER_CLASSES[planner_class] = type(
            f"MMSSL{planner_class.__name__}", (MMSSLPlannerMixin, planner_class),
            {"__module__": __name__, "__doc__": f"nnU-Net's {planner_class.__name__} with the memory estimate of our "
                                                 f"trainers' whole steps (see MMSSLPlannerMixin)."})
    return _PLANNER_CLASSES[planner_class]


def _canonical(mapping: Mapping, keys: Sequence[str]) -> str:
    return json.dumps([mapping.get(k) for k in keys], sort_keys=True, default=lambda v: np.asarray(v).tolist())


def share_preprocessed_data(plans: Mapping, base_plans: Mapping) -> tuple[dict, list[str]]:
    """Point configurations of ``plans`` at ``base_plans``' data where the preprocessing is identical.

    Returns:
        A copy of ``plans`` and the configurations that still need their own preprocessing.
    """
    new_plans = copy.deepcopy(dict(plans))
    own = []
    for name, configuration in new_plans["configurations"].items():
        base = base_plans.get("configurations", {}).get(name)
        same = base is not None and "data_identifier" in base and "data_identifier" in configuration and \
            _canonical(configuration, PREPROCESSING_KEYS) == _canonical(base, PREPROCESSING_KEYS) and \
            _canonical(plans, ("transpose_forward",)) == _canonical(base_plans, ("transpose_forward",))
        if same:
            configuration["data_identifier"] = base["data_identifier"]
        elif "data_identifier" in configuration:
            own.append(name)
    return new_plans, own

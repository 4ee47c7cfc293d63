"""nnU-Net's fingerprint, planning and preprocessing on the labelled cases, then our additions.

1. nnU-Net's own ``extract_fingerprints`` / ``plan_experiments`` / ``preprocess`` (called programmatically, since
   nnU-Net looks up planners only inside its package). They read ``imagesTr``/``labelsTr`` only, so the
   unlabelled images change neither the plans nor the intensity fingerprint.
2. The ``mmssl`` block (modality groups, ...) is added to the plans file.
3. ``imagesUnlabeled/`` is preprocessed with the same plans into ``<data_identifier>_unlabeled/`` per configuration.
4. A second plans file, ``nnUNetMMSSLPlans``, made by :class:`~nnunet_mmssl.planners.memory.MMSSLExperimentPlanner`:
   nnU-Net's planning with the memory of our trainers' whole steps (dual-branch networks, unlabelled batch), so that
   ``-p nnUNetMMSSLPlans`` stays within the GPU memory target. Configurations whose preprocessing equals nnU-Net's
   share its data folders; others are preprocessed too. With a residual-encoder planner (``-pl nnUNetPlannerResEncM``
   etc.) both plans build the residual encoder and ours are ``nnUNetMMSSLResEncUNetMPlans`` etc.
   (:func:`~nnunet_mmssl.planners.memory.mmssl_plans_identifier` of nnU-Net's plans identifier).
5. ``priorsTr/`` (optional per-case priors for SMML's refinement network) is preprocessed like its images into
   ``<data_identifier>_priors/`` (:mod:`nnunet_mmssl.dataloading.priors`); checked before anything is written.
"""

import contextlib
import os
from collections.abc import Sequence

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_mmssl.architectures.encoders import base_kind
from nnunet_mmssl.dataloading.image_checks import check_image_files
from nnunet_mmssl.dataloading.priors import (
    PRIORS_FOLDER,
    check_prior_grids,
    find_prior_files,
    has_priors,
    preprocess_priors,
)
from nnunet_mmssl.dataloading.unlabeled_preprocessing import (
    UNLABELED_IMAGES_FOLDER,
    UnlabeledDataError,
    find_cases,
    find_unlabeled_cases,
    preprocess_unlabeled,
)
from nnunet_mmssl.dataset_conversion.modality_layout import check_single_channel, read_layout
from nnunet_mmssl.planners.memory import (
    DEFAULT_BUDGET_TRAINERS,
    UNREGISTERED_BUDGET_TRAINERS,
    find_planner_class,
    mmssl_planner_class,
    mmssl_plans_identifier,
    planner_defaults,
    share_preprocessed_data,
)
from nnunet_mmssl.planners.mmssl_plans import MMSSL_KEY, add_mmssl_block, parse_modality_groups

#: keys of the plans' mmssl block describing an unregistered dataset (shared by both plans files)
UNREGISTERED_PLANS_KEYS = ("layout", "modalities", "intensity_schemes", "modality_intensity_properties")


@contextlib.contextmanager
def _at_least_one_da_process():
    """nnU-Net 2.8's planner calls ``torch.set_num_threads(nnUNet_n_proc_DA)``, which fails for 0 (a valid value
    for training: single-threaded augmentation). Plan with 1 in that case and restore the variable afterwards."""
    old = os.environ.get("nnUNet_n_proc_DA")
    if old is not None and old.strip() == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        if old is not None:
            os.environ["nnUNet_n_proc_DA"] = old


def _maybe_write_small_dataset_splits(preprocessed_folder: str, raw_folder: str, dataset_json: dict, progress,
                                      layout=None) -> None:
    """nnU-Net builds 5 folds, which fails with fewer than 5 labelled cases -- common in semi-supervised work. Then
    write ``splits_final.json`` with one fold per case (leave-one-out) unless the user already has one. For an
    unregistered dataset the folds are stratified by modality (every modality validated in every fold it can be)."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    splits_file = os.path.join(preprocessed_folder, "splits_final.json")
    identifiers = sorted(get_filenames_of_train_images_and_targets(raw_folder, dataset_json).keys())
    if os.path.isfile(splits_file) or len(identifiers) < 2:
        return
    if layout is not None:
        from nnunet_mmssl.planners.modality_normalization import stratified_splits

        per_modality = [sum(1 for c in identifiers if layout.modality_of(c) == m) for m in layout.modalities]
        smallest = min(n for n in per_modality if n > 0)
        # as many folds as the rarest modality has cases (at most 5), so every fold validates every modality
        n_splits = min(5, smallest) if smallest >= 2 else min(5, len(identifiers))
        save_json(stratified_splits(layout.case_modality, identifiers, n_splits), splits_file)
        progress(f"Wrote {n_splits} folds stratified by modality to {splits_file} (labelled cases per modality: "
                 f"{dict(zip(layout.modalities, per_modality, strict=True))}).")
        return
    if len(identifiers) >= 5:
        return
    save_json(generate_crossval_split(identifiers, seed=12345, n_splits=len(identifiers)), splits_file)
    progress(f"Only {len(identifiers)} labelled cases: wrote {len(identifiers)} leave-one-out folds to {splits_file} "
             f"(nnU-Net's 5 folds need 5 cases). Fold 'all' trains on every labelled case.")


def _check_raw_images(raw_folder: str, dataset_json: dict, unlabeled_cases: dict, num_processes: int,
                      progress) -> None:
    """Every labelled case has all channels and a label; every raw image (imagesTr, labelsTr, imagesUnlabeled) is
    read whole and checked (complete file, an image, finite voxels) before nnU-Net reads it (SimpleITK would read a
    truncated NIfTI as zeros and NaN as 0).

    Raises:
        UnlabeledDataError: a labelled case lacks a channel or its label.
        ImageFileError: naming the bad file.
    """
    if "dataset" in dataset_json:  # nnU-Net's explicit file lists: not our layout, leave them to nnU-Net
        return
    file_ending = dataset_json["file_ending"]
    labelled = find_cases(os.path.join(raw_folder, "imagesTr"), dataset_json, "Labelled case",
                          ignore_other_endings=True)  # as nnU-Net does
    files = [f for channels in labelled.values() for f in channels]
    for case in labelled:
        label = os.path.join(raw_folder, "labelsTr", case + file_ending)
        if not os.path.isfile(label):
            raise UnlabeledDataError(f"Labelled case {case!r} has images in imagesTr but no label {label}. Add the "
                                     f"label, or move its images to {UNLABELED_IMAGES_FOLDER}/.")
        files.append(label)
    files += [f for channels in unlabeled_cases.values() for f in channels]
    progress(f"Checking {len(files)} raw image files (complete, readable, finite voxels)")
    check_image_files(files, num_processes)


def plan_and_preprocess(dataset_id: int, configurations: Sequence[str] = ("2d", "3d_fullres"),
                        num_processes: int = 2, planner: str = "ExperimentPlanner",
                        gpu_memory_target_in_gb: float | None = None, plans_name: str | None = None,
                        modality_groups: Sequence[str] | None = None, verify_dataset_integrity: bool = False,
                        fingerprint: bool = True, plan: bool = True, preprocess: bool = True,
                        unlabeled: bool = True, overwrite_target_spacing: Sequence[float] | None = None,
                        mmssl_plans: bool = True, mmssl_plans_name: str | None = None,
                        budget_trainers: Sequence[str] | None = None, progress=print) -> str:
    """Run the whole pipeline for one dataset; return the plans file path.

    Args:
        dataset_id: nnU-Net dataset id.
        configurations: configurations to preprocess (labelled and unlabelled).
        num_processes: worker processes for each step.
        planner: nnU-Net experiment planner class name: ``ExperimentPlanner`` (``PlainConvUNet``) or a
            residual-encoder planner such as ``nnUNetPlannerResEncM``/``L``/``XL`` (``ResidualEncoderUNet``); a
            planner of any other network is refused.
        gpu_memory_target_in_gb: nnU-Net's ``-gpu_memory_target`` (None: the planner's own default).
        plans_name: nnU-Net's ``-overwrite_plans_name``; default the planner's (``nnUNetPlans``,
            ``nnUNetResEncUNetMPlans``, ...).
        modality_groups: one string per branch, channel names or indices separated by commas.
        verify_dataset_integrity, fingerprint, plan, preprocess: as in nnU-Net (skip steps already done).
        unlabeled: preprocess ``imagesUnlabeled/`` (error if it is empty or missing).
        overwrite_target_spacing: nnU-Net's ``-overwrite_target_spacing`` (z, y, x in mm, the plans' axis order;
            applies to 3d_fullres and, through it, to 2d), e.g. to train on coarser voxels than the images'.
        mmssl_plans: make the memory-budgeted plans for our trainers, with ``planner``'s network
            (:func:`~nnunet_mmssl.planners.memory.mmssl_planner_class`).
        mmssl_plans_name: their name; None = :func:`~nnunet_mmssl.planners.memory.mmssl_plans_identifier` of
            nnU-Net's plans (``nnUNetMMSSLPlans``, ``nnUNetMMSSLResEncUNetMPlans``, ...).
        budget_trainers: trainers whose steps those plans must fit (the largest decides); default
            :data:`~nnunet_mmssl.planners.memory.DEFAULT_BUDGET_TRAINERS`, or DBDCTrainer for an unregistered dataset.
        progress: callable taking a message.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
    )
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    planner_class = find_planner_class(planner)
    dataset_name = maybe_convert_to_dataset_name(dataset_id)
    raw_folder = os.path.join(nnUNet_raw.require(), dataset_name)
    preprocessed_folder = os.path.join(nnUNet_preprocessed.require(), dataset_name)
    dataset_json = load_json(os.path.join(raw_folder, "dataset.json"))
    layout = read_layout(dataset_json.get(MMSSL_KEY), os.path.join(raw_folder, "dataset.json"))
    if layout is not None:
        check_single_channel(dataset_json, layout, os.path.join(raw_folder, "dataset.json"))
        if modality_groups:
            raise ValueError("--modality-groups does not apply to an unregistered dataset (one channel; the "
                             "modality of each case is in dataset.json).")
    if budget_trainers is None:
        budget_trainers = UNREGISTERED_BUDGET_TRAINERS if layout is not None else DEFAULT_BUDGET_TRAINERS
    groups = parse_modality_groups(modality_groups, dataset_json["channel_names"]) if modality_groups else None
    unlabeled_cases = find_unlabeled_cases(raw_folder, dataset_json) if unlabeled else {}
    num_unlabeled = len(unlabeled_cases)
    if unlabeled and preprocess and not unlabeled_cases:
        raise UnlabeledDataError(f"No unlabelled cases found in {os.path.join(raw_folder, UNLABELED_IMAGES_FOLDER)}. "
                                 f"Put them there as CASE_XXXX{dataset_json['file_ending']} (nnUNetv2_mmssl_convert "
                                 f"does this), or pass --no-unlabeled for supervised-only training.")
    priors = has_priors(raw_folder)
    if priors and layout is not None:
        raise ValueError(f"{os.path.join(raw_folder, PRIORS_FOLDER)} exists, but priors are for registered "
                         f"multi-channel datasets (SMMLTrainer's refinement network); this dataset is unregistered. "
                         f"Remove the folder.")
    if priors and preprocess:
        ending = dataset_json["file_ending"]
        labelled = [f[:-len(ending)] for f in os.listdir(os.path.join(raw_folder, "labelsTr")) if f.endswith(ending)]
        # every file there, on its image's grid, before any work
        check_prior_grids(raw_folder, find_prior_files(raw_folder, dataset_json, labelled))
        progress(f"Priors found in {os.path.join(raw_folder, PRIORS_FOLDER)}: they are preprocessed with the images")
    if fingerprint or preprocess:
        _check_raw_images(raw_folder, dataset_json, unlabeled_cases, num_processes, progress)

    if fingerprint:
        progress(f"Fingerprint of {dataset_name} (labelled cases only)")
        extract_fingerprints([dataset_id], num_processes=num_processes,
                             check_dataset_integrity=verify_dataset_integrity, clean=True, verbose=False)
    plans_identifier = plans_name or planner_defaults(planner_class)[1]
    target_spacing = tuple(float(s) for s in overwrite_target_spacing) if overwrite_target_spacing else None
    if plan:
        _check_planner_network(planner_class, dataset_id, gpu_memory_target_in_gb)
        progress(f"Planning with nnU-Net's {planner}")
        with _at_least_one_da_process():
            plans_identifier = plan_experiments([dataset_id], planner, gpu_memory_target_in_gb,
                                                overwrite_target_spacing=target_spacing,
                                                overwrite_plans_name=plans_name) or plans_identifier
    plans_file = os.path.join(preprocessed_folder, plans_identifier + ".json")
    plans = load_json(plans_file)
    missing = [c for c in configurations if c not in plans["configurations"]]
    if missing:
        raise ValueError(f"Configuration(s) {missing} are not in {plans_file} (available: "
                         f"{sorted(plans['configurations'])}). nnU-Net drops 3d_lowres for small images.")
    plans = add_mmssl_block(plans, dataset_json, groups, num_unlabeled)
    if layout is not None:
        plans = _add_unregistered_block(plans, preprocessed_folder, raw_folder, dataset_json, layout, plan,
                                        num_processes, progress)
    save_json(plans, plans_file, sort_keys=False)
    progress(f"Modality groups {plans['mmssl']['modality_groups']} written to {plans_file}" if layout is None else
             f"Unregistered modalities {list(layout.modalities)} (schemes {dict(layout.intensity_schemes)}) "
             f"written to {plans_file}")
    _maybe_write_small_dataset_splits(preprocessed_folder, raw_folder, dataset_json, progress, layout)
    budgeted, mmssl_own = None, []
    if mmssl_plans:
        mmssl_plans_name = mmssl_plans_name or mmssl_plans_identifier(plans_identifier)
        budgeted = _plan_memory_budgeted(
            dataset_id, preprocessed_folder, plans, dataset_json, mmssl_plans_name, budget_trainers,
            gpu_memory_target_in_gb, target_spacing, groups, num_unlabeled, plan, progress,
            plans if layout is not None else None, planner_class)
        mmssl_own = [c for c in configurations if c in budgeted["configurations"] and
                     PlansManager(budgeted).get_configuration(c).data_identifier !=
                     PlansManager(plans).get_configuration(c).data_identifier]
    if preprocess:
        progress(f"Preprocessing labelled cases for {list(configurations)}" +
                 (" (each case normalised by its modality)" if layout is not None else ""))
        _preprocess_labelled(dataset_id, plans_identifier, list(configurations), num_processes, layout,
                             preprocessed_folder, progress)
        if unlabeled:
            preprocess_unlabeled(raw_folder, preprocessed_folder, plans, configurations, num_processes, progress,
                                 check_images=False)
        if priors:
            preprocess_priors(raw_folder, preprocessed_folder, plans, configurations, progress)
        if mmssl_own:
            progress(f"Preprocessing {mmssl_own} of {mmssl_plans_name} (preprocessing differs from "
                     f"{plans_identifier})")
            _preprocess_labelled(dataset_id, mmssl_plans_name, mmssl_own, num_processes, layout, preprocessed_folder,
                                 progress)
            if unlabeled:
                preprocess_unlabeled(raw_folder, preprocessed_folder, budgeted, mmssl_own, num_processes, progress,
                                     check_images=False)
            if priors:
                preprocess_priors(raw_folder, preprocessed_folder, budgeted, mmssl_own, progress)
    return plans_file


def _preprocess_labelled(dataset_id: int, plans_identifier: str, configurations: list[str], num_processes: int,
                         layout, preprocessed_folder: str, progress=print) -> None:
    """nnU-Net's preprocessing of imagesTr, or, for an unregistered dataset, the same with per-case normalisation.

    nnU-Net empties a configuration's data folder before it refills it, so an interrupted rerun would leave the
    plans beside an empty or half-filled folder. Here each folder is built under a hidden temporary name (nnU-Net is
    given a hidden copy of the plans whose ``data_identifier`` is that name) and swapped in when complete
    (:func:`~nnunet_mmssl.dataloading.unlabeled_preprocessing.build_folder_atomically`): the published folder is
    always the previous complete one or the new complete one.
    """
    import glob
    import uuid

    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    from nnunet_mmssl.dataloading.unlabeled_preprocessing import build_folder_atomically

    plans_file = os.path.join(preprocessed_folder, plans_identifier + ".json")
    for stale in glob.glob(os.path.join(preprocessed_folder, f".{glob.escape(plans_identifier)}.partial-*.json")):
        with contextlib.suppress(OSError):
            os.unlink(stale)  # a killed run's temporary plans
    plans = load_json(plans_file)
    manager = PlansManager(plans)
    for configuration in configurations:
        final = os.path.join(preprocessed_folder, manager.get_configuration(configuration).data_identifier)

        def fill(tmp: str, configuration=configuration) -> None:
            identifier = f".{plans_identifier}.partial-{uuid.uuid4().hex[:12]}"
            temporary_plans = dict(plans, configurations=dict(plans["configurations"]))
            temporary_plans["configurations"][configuration] = dict(plans["configurations"][configuration],
                                                                    data_identifier=os.path.basename(tmp))
            temporary_plans_file = os.path.join(preprocessed_folder, identifier + ".json")
            save_json(temporary_plans, temporary_plans_file, sort_keys=False)
            try:
                if layout is None:
                    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

                    preprocess_dataset(dataset_id, identifier, [configuration], [num_processes], verbose=False)
                else:
                    from nnunet_mmssl.planners.modality_normalization import preprocess_labelled

                    preprocess_labelled(dataset_id, identifier, [configuration], layout.case_modality, num_processes)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(temporary_plans_file)

        build_folder_atomically(final, fill, progress)


def _add_unregistered_block(plans: dict, preprocessed_folder: str, raw_folder: str, dataset_json: dict, layout,
                            plan: bool, num_processes: int, progress) -> dict:
    """The plans with the unregistered layout and each modality's intensity fingerprint in the mmssl block
    (computed when planning, else taken from the plans file as it is)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_mmssl.planners.modality_normalization import (
        modality_intensity_properties,
        unregistered_plans_block,
    )

    old = plans.get(MMSSL_KEY, {})
    properties = old.get("modality_intensity_properties") if not plan else None
    if properties is None or set(properties) != set(layout.modalities):
        fingerprint = load_json(os.path.join(preprocessed_folder, "dataset_fingerprint.json"))
        schemes = ", ".join(f"{m}: {s}" for m, s in layout.intensity_schemes.items())
        progress(f"Intensity fingerprint per modality ({schemes})")
        properties = modality_intensity_properties(raw_folder, dataset_json, layout,
                                                   fingerprint["foreground_intensity_properties_per_channel"]["0"],
                                                   num_processes)
    new = dict(plans)
    new[MMSSL_KEY] = {**plans[MMSSL_KEY], **unregistered_plans_block(layout, properties)}
    return new


def _check_planner_network(planner_class: type, dataset_id: int, gpu_memory_target_in_gb: float | None) -> None:
    """Refuse, before anything is planned, a planner whose U-Net our networks are not built from (one line naming
    the planner, its class and the supported ones)."""
    import warnings

    gpu = planner_defaults(planner_class)[0] if gpu_memory_target_in_gb is None else gpu_memory_target_in_gb
    with warnings.catch_warnings():  # nnU-Net warns about a non-default target; it says so again when it plans
        warnings.simplefilter("ignore")
        unet = planner_class(dataset_id, gpu).UNet_class
    try:
        base_kind(f"{unet.__module__}.{unet.__name__}")
    except ValueError as error:
        raise ValueError(f"-pl {planner_class.__name__}: {error}") from None


def _plan_memory_budgeted(dataset_id: int, preprocessed_folder: str, plans: dict, dataset_json: dict,
                          mmssl_plans_name: str, budget_trainers: Sequence[str], gpu_memory_target_in_gb,
                          target_spacing, groups, num_unlabeled: int, plan: bool, progress,
                          unregistered_plans: dict | None = None, planner_class: type | None = None) -> dict:
    """Make (or, with ``plan=False``, load) the memory-budgeted plans with ``planner_class``'s network (default
    nnU-Net's ``ExperimentPlanner``); return them."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    mmssl_file = os.path.join(preprocessed_folder, mmssl_plans_name + ".json")
    if not plan:
        if not os.path.isfile(mmssl_file):
            raise FileNotFoundError(f"{mmssl_file} does not exist: plan first, or pass "
                                    f"--no-mmssl-plans.")
        return load_json(mmssl_file)
    budget_planner = mmssl_planner_class(planner_class or ExperimentPlanner)
    progress(f"Planning {mmssl_plans_name}: nnU-Net's {budget_planner.planner_base().__name__} with the memory of "
             f"one step of {', '.join(budget_trainers)} (the largest decides patch and batch)")
    from nnunet_mmssl.trainers.registry import resolve_trainer_class

    with _at_least_one_da_process():
        planner = budget_planner(dataset_id, gpu_memory_target_in_gb, plans_name=mmssl_plans_name,
                                 overwrite_target_spacing=target_spacing, budget_trainers=budget_trainers,
                                 modality_groups=groups, resolve_trainer=resolve_trainer_class)
        planner.plan_experiment()
    mmssl_plans, _ = share_preprocessed_data(load_json(mmssl_file), plans)
    mmssl_plans = add_mmssl_block(mmssl_plans, dataset_json, groups, num_unlabeled)
    if unregistered_plans is not None:  # the same modalities and intensity fingerprints as nnU-Net's plans
        mmssl_plans[MMSSL_KEY].update({k: v for k, v in unregistered_plans[MMSSL_KEY].items()
                                       if k in UNREGISTERED_PLANS_KEYS})
    manager = PlansManager(mmssl_plans)
    mmssl_plans[MMSSL_KEY]["memory"] = {c: planner.memory_record(manager.get_configuration(c).configuration)
                                        for c in mmssl_plans["configurations"]}
    save_json(mmssl_plans, mmssl_file, sort_keys=False)
    for c in mmssl_plans["configurations"]:
        new, old = manager.get_configuration(c), PlansManager(plans).get_configuration(c) \
            if c in plans["configurations"] else None
        progress(f"  {c}: patch {new.patch_size}, batch {new.batch_size}" + (
            f" (nnU-Net's plans: patch {old.patch_size}, batch {old.batch_size})" if old else ""))
    return mmssl_plans

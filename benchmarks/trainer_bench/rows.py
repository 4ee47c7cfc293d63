"""Which rows the benchmark measures: the trainers, the configurations, the baseline and how each trainer is built.

A row is one (configuration, trainer) pair, measured on the plans :func:`build_trainer` picks for it. The rows of a
run share one plans identifier (``-p``; ``--mmssl-plans`` for our trainers), by default the plans of nnU-Net's planner
``-pl`` (:func:`planner_plans`): ``ExperimentPlanner`` -> ``nnUNetPlans`` (PlainConvUNet), ``nnUNetPlannerResEncM``
-> ``nnUNetResEncUNetMPlans`` (ResidualEncoderUNet), so ``-pl nnUNetPlannerResEncM`` gives every trainer's row on
nnU-Net's ResEnc M plans with its ratios to ``nnUNetTrainer`` on the same plans.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

BASELINE_TRAINER = "nnUNetTrainer"
DEFAULT_TRAINERS = ("nnUNetTrainer", "PlainSupervisedTrainer", "MeanTeacherTrainer", "MemCifSupervisedTrainer",
                    "MemCifSSLTrainer", "MMFMCMLTrainer")
DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres")
#: trainers that need an unregistered dataset (one modality per case)
UNREGISTERED_TRAINER_PREFIXES = ("DBDC", "PooledUNet")
PHANTOM_KINDS = ("auto", "registered", "unregistered")
#: nnU-Net's default planner and its plans
DEFAULT_PLANNER = "ExperimentPlanner"
DEFAULT_PLANS = "nnUNetPlans"


def planner_plans(planner: str) -> str:
    """The plans identifier nnU-Net's planner ``planner`` writes by default: ``nnUNetPlans`` for ``ExperimentPlanner``,
    ``nnUNetResEncUNetMPlans`` for ``nnUNetPlannerResEncM`` etc.

    Raises:
        ValueError: no nnU-Net planner of that name (the message names the usual ones).
    """
    if planner == DEFAULT_PLANNER:
        return DEFAULT_PLANS
    from nnunet_mmssl.planners.memory import find_planner_class, planner_defaults

    return planner_defaults(find_planner_class(planner))[1]


def resolve_phantom_kind(kind: str, trainers: Sequence[str]) -> str:
    """The phantom to build: ``kind`` itself, or for ``"auto"`` the unregistered phantom when any trainer needs one
    (DBDC*, PooledUNet*: they train on one modality per case), else the registered one.

    Raises:
        ValueError: an unknown kind (naming the choices).
    """
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"--phantom-kind {kind!r}: choose one of {', '.join(PHANTOM_KINDS)}")
    if kind != "auto":
        return kind
    return "unregistered" if any(t.startswith(UNREGISTERED_TRAINER_PREFIXES) for t in trainers) else "registered"


def choose_baseline(rows: Sequence[dict], preferred: str = BASELINE_TRAINER) -> dict | None:
    """The row the ratios refer to: ``preferred`` if it was measured, else the first row with a time."""
    measured = [r for r in rows if r.get("s_per_iter") is not None]
    for row in measured:
        if row["trainer"] == preferred:
            return row
    return measured[0] if measured else None


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """``items`` rotated left by ``shift`` (round ``r`` of ``--rounds`` starts with trainer ``r``)."""
    items = list(items)
    if not items:
        return items
    shift %= len(items)
    return items[shift:] + items[:shift]


def build_trainer(args: argparse.Namespace, name: str, device, folder: str, dataset_json: dict):
    """Construct trainer ``name`` as nnU-Net's ``get_trainer_from_args`` does; return ``(trainer, plans name)``.

    Our trainers (``SSLTrainerBase`` subclasses) use ``--mmssl-plans`` when given, every other trainer ``-p``.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_mmssl.trainers import SSLTrainerBase

    trainer_class = recursive_find_trainer_class_by_name(name)
    if trainer_class is None:
        raise RuntimeError(f"trainer class {name!r} not found (nnunetv2 or nnUNet_extTrainer)")
    plans_name = args.mmssl_plans if args.mmssl_plans and issubclass(trainer_class, SSLTrainerBase) else args.plans
    plans = load_json(os.path.join(folder, plans_name + ".json"))
    plans["continue_training"] = False
    fold = "all" if args.fold == "all" else int(args.fold)
    trainer = trainer_class(plans=plans, configuration=args.worker_configuration, fold=fold,
                            dataset_json=dataset_json, device=device)
    return trainer, plans_name

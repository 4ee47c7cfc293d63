"""Trainer classes by name: ours, nnU-Net's, or the class itself.

The memory-budgeted planner (:class:`nnunet_mmssl.planners.memory.MMSSLExperimentPlanner`) sizes trainer classes
but does not import the trainers (they import the planners); whoever plans with trainer names resolves them here and
hands the planner this function (:func:`nnunet_mmssl.planners.plan_and_preprocess.plan_and_preprocess` does).
"""

import nnunet_mmssl.trainers as ours
from nnunet_mmssl.planners.memory import DEFAULT_BUDGET_TRAINERS


def resolve_trainer_class(name_or_class):
    """A trainer class from its name (ours, nnU-Net's, or one in ``nnUNet_extTrainer``) or the class itself.

    Raises:
        ValueError: naming the trainer when it is not found.
    """
    if not isinstance(name_or_class, str):
        return name_or_class
    if hasattr(ours, name_or_class):
        return getattr(ours, name_or_class)
    import nnunetv2
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name_or_class,
                                        "nnunetv2.training.nnUNetTrainer")
    if found is None:
        raise ValueError(f"Unknown trainer {name_or_class!r} for the memory budget. Give one of nnunet_mmssl's "
                         f"trainers (e.g. {', '.join(DEFAULT_BUDGET_TRAINERS)}) or nnU-Net's.")
    return found

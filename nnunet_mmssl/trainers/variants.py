"""Short-schedule variants (like nnU-Net's ``nnUNetTrainer_5epochs``), used by the demo.

``*_demo`` trainers train for :data:`DEMO_EPOCHS` epochs of :data:`DEMO_ITERATIONS` iterations and skip nnU-Net's
final validation (the demo scores held-out test cases instead); everything else is the parent trainer.
"""

import torch

from nnunet_mmssl.trainers.memcif import MemCifSSLTrainer, MemCifSupervisedTrainer

DEMO_EPOCHS = 8
DEMO_ITERATIONS = 20
DEMO_VAL_ITERATIONS = 3


class _DemoSchedule:
    """Mixin: short schedule, no final validation."""

    def _set_demo_schedule(self) -> None:
        self.num_epochs = DEMO_EPOCHS
        self.num_iterations_per_epoch = DEMO_ITERATIONS
        self.num_val_iterations_per_epoch = DEMO_VAL_ITERATIONS

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Demo schedule: nnU-Net's final validation is skipped (the demo scores the test cases).")


class MemCifSSLTrainer_demo(_DemoSchedule, MemCifSSLTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._set_demo_schedule()


class MemCifSupervisedTrainer_demo(_DemoSchedule, MemCifSupervisedTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._set_demo_schedule()

"""Imported by nnU-Net as a top-level module when it searches ``nnUNet_extTrainer``: absolute imports only."""

from nnunet_mmssl.trainers import (  # noqa: F401
    MemCifSSLTrainer,
    MemCifSSLTrainer_demo,
    MemCifSSLTrainer_noCIF,
    MemCifSSLTrainer_noMEM,
    MemCifSSLTrainer_plain,
    MemCifSupervisedTrainer,
    MemCifSupervisedTrainer_demo,
)

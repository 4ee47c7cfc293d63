"""Imported by nnU-Net as a top-level module when it searches ``nnUNet_extTrainer``: absolute imports only.

Every trainer the package exports (``nnunet_mmssl.trainers.__all__``) is found here by name.
"""

from nnunet_mmssl.trainers import *  # noqa: F401,F403

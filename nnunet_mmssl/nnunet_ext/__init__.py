"""Folder listed in ``nnUNet_extTrainer`` (see ``nnunet_mmssl._ext_trainer_hook``).

nnU-Net imports the modules of this folder as top-level modules; they must only use absolute imports.
"""

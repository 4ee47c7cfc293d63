"""Start-up hook that lets nnU-Net find our trainers through ``nnUNet_extTrainer``.

``setup.py`` installs a one-line ``.pth`` file that calls :func:`register` when Python starts. It appends the
folder :data:`EXT_TRAINER_FOLDER` (``nnunet_mmssl/nnunet_ext``, holding one module that imports our trainers
with absolute imports) to ``nnUNet_extTrainer``, the environment variable nnU-Net >= 2.8 reads to search external
trainer folders. Nothing else is imported and nothing is printed. ``NNUNET_MMSSL_NO_EXT_TRAINER=1`` switches it off.
"""

import os

DISABLE_VARIABLE = "NNUNET_MMSSL_NO_EXT_TRAINER"
EXT_TRAINER_VARIABLE = "nnUNet_extTrainer"
EXT_TRAINER_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext")


def register(environ=None) -> bool:
    """Append our trainer folder to ``nnUNet_extTrainer`` unless disabled or already listed.

    Args:
        environ: the mapping to edit (default ``os.environ``).

    Returns:
        True if the folder is listed afterwards.
    """
    environ = os.environ if environ is None else environ
    if environ.get(DISABLE_VARIABLE, "0").lower() in ("1", "true", "yes"):
        return False
    current = [p for p in environ.get(EXT_TRAINER_VARIABLE, "").split(os.pathsep) if p.strip()]
    if any(os.path.abspath(p) == EXT_TRAINER_FOLDER for p in current):
        return True
    environ[EXT_TRAINER_VARIABLE] = os.pathsep.join(current + [EXT_TRAINER_FOLDER])
    return True

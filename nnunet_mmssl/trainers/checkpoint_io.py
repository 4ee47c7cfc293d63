"""Checkpoint files of our trainers: nnU-Net's entries plus ``mmssl_state``, written once and atomically.

* **What is stored.** :func:`nnunet_checkpoint_entries` builds exactly the entries nnU-Net 2.8's
  ``nnUNetTrainer.save_checkpoint`` writes (a test compares the two); our trainers add their training-only state
  (a teacher, its step, banks, ...) under :data:`CHECKPOINT_KEY`. That state must be tensors and plain containers
  (dict, list, tuple, str, int, float, bool, None): :func:`check_plain_state` refuses anything else when saving, naming
  the entry.
* **Atomic writes.** :func:`atomic_torch_save` writes a temporary file in the target folder and renames it
  (``os.replace``), so a run killed while saving leaves the previous ``checkpoint_latest.pth`` intact, never a
  half-written one that ``--c`` would pick up.
* **No code from a checkpoint.** :class:`SafeLoadingMixin` (a base of every trainer of ours) opens a checkpoint with
  :func:`nnunet_mmssl.safe_load.check_checkpoint` (``torch.load(weights_only=True)`` and nnU-Net's allowlist) before
  nnU-Net's ``load_checkpoint`` reads it (``--c``, ``--val``, ``--val_best``), and nnU-Net's read then runs
  weights-only too; a network class named in the plans is checked before it is imported.
  :func:`install_pretrained_weights_check` does the same for ``nnUNetv2_train -pretrained_weights FILE``: nnU-Net
  calls ``nnunetv2.run.run_training.load_pretrained_weights(network, FILE)`` and no trainer method sees ``FILE``, so
  our trainers (when constructed inside nnU-Net's ``run_training``) replace that module's reference with a wrapper that
  checks ``FILE`` first and then warm-starts our trainer's network from it (:mod:`nnunet_mmssl.trainers.warm_start`),
  or calls nnU-Net's function, weights-only, for any other network.
* **Safe reading.** nnU-Net loads the checkpoint its own way; :func:`read_extra_state` reads our entry with
  ``torch.load(weights_only=True)``, memory-mapped so that the tensors of nnU-Net's entries are not read again. Our
  files hold only tensors and plain containers (nnU-Net's numpy log values are written as Python numbers); numpy
  scalars are also accepted, for checkpoints written by nnU-Net's own ``save_checkpoint``. A file holding anything
  else is refused with its name instead of being unpickled.
"""

import os
import pickle
import sys
import tempfile
from collections import OrderedDict

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch._dynamo import OptimizedModule

from nnunet_mmssl.safe_load import (
    check_checkpoint,
    check_configuration_manager,
    safe_globals_context,
    weights_only_loads,
)
from nnunet_mmssl.trainers.user_errors import install_user_error_hook
from nnunet_mmssl.trainers.warm_start import (
    WarmStartError,
    is_registered,
    register_trainer,
    trainer_of_network,
    warm_start,
)

CHECKPOINT_KEY = "mmssl_state"

_PLAIN_SCALARS = (str, int, float, bool, type(None))


def plain_numbers(value):
    """``value`` with numpy scalars replaced by Python numbers, through dicts, lists and tuples (a new object)."""
    if isinstance(value, np.generic):
        return value.item()
    if type(value) in (dict, OrderedDict):
        return type(value)((key, plain_numbers(item)) for key, item in value.items())
    if type(value) in (list, tuple):
        return type(value)(plain_numbers(item) for item in value)
    return value


def nnunet_checkpoint_entries(trainer) -> dict:
    """The checkpoint dictionary nnU-Net's ``save_checkpoint`` writes for ``trainer`` (nnunetv2 2.8).

    The same entries and values, except that numpy scalars in the logs become Python numbers, so that the whole file
    loads with ``torch.load(weights_only=True)`` on every torch version.
    """
    module = trainer.network.module if trainer.is_ddp else trainer.network
    if isinstance(module, OptimizedModule):
        module = module._orig_mod
    return {
        "network_weights": module.state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": plain_numbers(trainer.logger.get_checkpoint()),
        "_best_ema": plain_numbers(trainer._best_ema),
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": plain_numbers(trainer.inference_allowed_mirroring_axes),
    }


def check_plain_state(value, where: str = CHECKPOINT_KEY) -> None:
    """Refuse anything but tensors and plain containers (what ``torch.load(weights_only=True)`` reads back).

    Raises:
        TypeError: naming the offending entry (e.g. ``mmssl_state['bank']``) and its type.
    """
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_SCALARS:
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} has a key of type {type(key).__name__} ({key!r}); checkpoint state keys "
                                f"must be str or int.")
            check_plain_state(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            check_plain_state(item, f"{where}[{index}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}; checkpoint state must be "
                    f"tensors and plain containers (dict, list, tuple, str, int, float, bool, None) so that it loads "
                    f"with torch.load(weights_only=True). Convert it (e.g. .item(), .tolist(), a state_dict()).")


def atomic_torch_save(obj, filename: str) -> None:
    """``torch.save(obj, filename)`` through a temporary file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(filename))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(filename)}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, filename)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def install_pretrained_weights_check() -> bool:
    """Make ``nnUNetv2_train -pretrained_weights FILE`` check ``FILE`` first and warm-start our trainers from it.

    Replaces ``nnunetv2.run.run_training.load_pretrained_weights`` (the name ``maybe_load_checkpoint`` calls) by a
    wrapper: :func:`~nnunet_mmssl.safe_load.check_checkpoint` (one-line refusal naming the file and the type); then,
    for the network of a trainer of ours (:func:`~nnunet_mmssl.trainers.warm_start.trainer_of_network`), the warm
    start of :func:`~nnunet_mmssl.trainers.warm_start.warm_start` (encoders/decoders from nnU-Net's U-Net, the table in
    the log); for any other network nnU-Net's function under :func:`~nnunet_mmssl.safe_load.weights_only_loads`.
    ``maybe_load_checkpoint`` is wrapped too, so that ``--c`` with ``-pretrained_weights`` is one line
    (:class:`~nnunet_mmssl.trainers.warm_start.WarmStartError`) for our trainers; nnU-Net's own are unaffected. Only if
    nnU-Net's training module is already imported (our trainers are then being built by it); once per process.

    Returns:
        True if the wrappers are installed afterwards.
    """
    module = sys.modules.get("nnunetv2.run.run_training")
    if module is None or not hasattr(module, "load_pretrained_weights"):
        return False
    nnunet_function = module.load_pretrained_weights
    if not getattr(nnunet_function, "mmssl_checked", False):
        def load_pretrained_weights(network, fname, verbose=False):
            check_checkpoint(fname)
            trainer = trainer_of_network(network)
            if trainer is not None:
                warm_start(trainer, fname)
                return None
            with weights_only_loads():
                return nnunet_function(network, fname, verbose=verbose)

        load_pretrained_weights.mmssl_checked = True
        module.load_pretrained_weights = load_pretrained_weights
    nnunet_maybe_load = getattr(module, "maybe_load_checkpoint", None)
    if nnunet_maybe_load is not None and not getattr(nnunet_maybe_load, "mmssl_checked", False):
        def maybe_load_checkpoint(nnunet_trainer, continue_training, validation_only, pretrained_weights_file=None):
            if continue_training and pretrained_weights_file is not None and is_registered(nnunet_trainer):
                raise WarmStartError(f"{pretrained_weights_file}, -pretrained_weights cannot be combined with --c "
                                     f"(nnU-Net's rule: pretrained weights only start a training). Drop --c to "
                                     f"start from the checkpoint, or drop -pretrained_weights to resume.")
            return nnunet_maybe_load(nnunet_trainer, continue_training, validation_only, pretrained_weights_file)

        maybe_load_checkpoint.mmssl_checked = True
        module.maybe_load_checkpoint = maybe_load_checkpoint
    return True


class SafeLoadingMixin:
    """Base of our trainers (before ``nnUNetTrainer``): checkpoints and plans networks checked before nnU-Net uses them.

    * ``load_checkpoint(file)``: :func:`~nnunet_mmssl.safe_load.check_checkpoint`, then nnU-Net's loading under
      :func:`~nnunet_mmssl.safe_load.weights_only_loads`.
    * ``build_network_architecture``: the plans' network class and layer names checked by name before import
      (:func:`~nnunet_mmssl.safe_load.check_configuration_manager`), then nnU-Net's.
    * construction installs the one-line user errors of ``nnUNetv2_train``
      (:func:`~nnunet_mmssl.trainers.user_errors.install_user_error_hook`), registers the trainer and installs
      :func:`install_pretrained_weights_check` (``-pretrained_weights`` is a warm start,
      :mod:`nnunet_mmssl.trainers.warm_start`).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        register_trainer(self)
        install_pretrained_weights_check()
        install_user_error_hook()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not isinstance(filename_or_checkpoint, str | os.PathLike):
            raise TypeError("nnU-Net 2.8's load_checkpoint takes a checkpoint file name.")
        check_checkpoint(filename_or_checkpoint)
        with weights_only_loads():
            super().load_checkpoint(os.fspath(filename_or_checkpoint))

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        check_configuration_manager(configuration_manager)
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)


def read_extra_state(filename: str) -> dict | None:
    """Our entry of a checkpoint file, read with ``torch.load(weights_only=True)``; None if it has none.

    Raises:
        RuntimeError: if the file holds objects other than tensors, plain containers and numpy scalars (naming the
            file and the refused object).
    """
    try:
        with safe_globals_context():
            checkpoint = torch.load(filename, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise RuntimeError(f"{filename} holds objects that torch.load(weights_only=True) refuses, so its "
                           f"{CHECKPOINT_KEY!r} entry is not read: {str(error).splitlines()[0]} Resume only from "
                           f"checkpoints written by nnunet_mmssl's trainers, or train without --c.") from None
    return checkpoint.get(CHECKPOINT_KEY)

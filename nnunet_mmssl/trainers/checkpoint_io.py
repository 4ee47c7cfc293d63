"""Checkpoint files of our trainers: nnU-Net's entries plus ``mmssl_state``, written once and atomically.

* **What is stored.** :func:`nnunet_checkpoint_entries` builds exactly the entries nnU-Net 2.8's
  ``nnUNetTrainer.save_checkpoint`` writes (a test compares the two); our trainers add their training-only state
  (a teacher, its step, banks, ...) under :data:`CHECKPOINT_KEY`. That state must be tensors and plain containers
  (dict, list, tuple, str, int, float, bool, None): :func:`check_plain_state` refuses anything else when saving, naming
  the entry.
* **Atomic writes.** :func:`atomic_torch_save` writes a temporary file in the target folder and renames it
  (``os.replace``), so a run killed while saving leaves the previous ``checkpoint_latest.pth`` intact, never a
  half-written one that ``--c`` would pick up.
* **Safe reading.** nnU-Net loads the checkpoint its own way; :func:`read_extra_state` reads our entry with
  ``torch.load(weights_only=True)``, memory-mapped so that the tensors of nnU-Net's entries are not read again. Our
  files hold only tensors and plain containers (nnU-Net's numpy log values are written as Python numbers); numpy
  scalars are also accepted, for checkpoints written by nnU-Net's own ``save_checkpoint``. A file holding anything
  else is refused with its name instead of being unpickled.
"""

import contextlib
import os
import pickle
import tempfile
from collections import OrderedDict

import numpy as np
import torch
from torch._dynamo import OptimizedModule

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


def _numpy_scalar_globals() -> list:
    """What pickled numpy scalars need (nnU-Net logs ``np.float64`` losses and Dice values)."""
    core = getattr(np, "_core", None) or np.core
    types = [core.multiarray.scalar, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        types += [getattr(dtypes, name) for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType",
                                                     "BoolDType") if hasattr(dtypes, name)]
    return types


def read_extra_state(filename: str) -> dict | None:
    """Our entry of a checkpoint file, read with ``torch.load(weights_only=True)``; None if it has none.

    Raises:
        RuntimeError: if the file holds objects other than tensors, plain containers and numpy scalars (naming the
            file and the refused object).
    """
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    allowed = safe_globals(_numpy_scalar_globals()) if safe_globals is not None else contextlib.nullcontext()
    try:
        with allowed:
            checkpoint = torch.load(filename, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise RuntimeError(f"{filename} holds objects that torch.load(weights_only=True) refuses, so its "
                           f"{CHECKPOINT_KEY!r} entry is not read: {str(error).splitlines()[0]} Resume only from "
                           f"checkpoints written by nnunet_mmssl's trainers, or train without --c.") from None
    return checkpoint.get(CHECKPOINT_KEY)

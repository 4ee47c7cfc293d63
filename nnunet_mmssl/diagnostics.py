"""Checks of GPU behaviour that the CPU can make: host-device synchronisations counted at the dispatcher.

On CUDA a host-device synchronisation stalls the pipeline until every queued kernel has run. The operations that
force one are visible at torch's dispatcher on any device, so they can be counted on a CPU:

- ``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``.tolist()`` on a tensor, an
  ``if t:`` on a tensor, ``torch.equal`` / ``allclose`` results used in Python;
- ``aten.nonzero`` / ``aten.nonzero_static`` is not counted (static size), ``aten.argwhere``, ``aten.masked_select``,
  ``aten.unique*``, ``aten.repeat_interleave`` without ``output_size``, ``aten.bincount`` and ``aten.histc`` (their
  output size depends on the data);
- ``aten.index`` / ``aten.index_put_`` with a boolean index (boolean indexing runs ``nonzero`` inside the kernel);
- ``aten.is_nonzero`` / ``aten.equal`` (Python bools from tensors).

What the dispatcher cannot see on a CPU: copies to the host (``.cpu()``, ``.numpy()``, ``.tolist()``) are no-ops
there. :func:`count_host_syncs` therefore also wraps ``Tensor.cpu``, ``Tensor.numpy`` and ``Tensor.tolist`` while it is
active and counts each call as ``host_copy.<name>`` (``t.cpu().numpy()`` counts once: the array of a tensor that is
already a host copy is free). A host copy is counted once: the tensors viewing a host copy's memory
(``t.cpu()[0]``, ``t.cpu().numpy()``, ``float(t.cpu()[1])``) are on the host already and are free. nnU-Net's own
training step makes one such copy per step (the loss it logs, ``l.detach().cpu().numpy()``), so ``nnUNetTrainer``
counts 1. ``torch.cuda.synchronize``, ``.to("cpu")`` and the GradScaler's own check of its step (CUDA only; nnU-Net's
step has it too) are not counted.

Checks of tensor values that would synchronise (index ranges of labels and modalities) run only with
:func:`debug_checks` on (or the environment variable ``nnUNet_mmssl_debug_checks=1``); by default a wrong index
fails inside the kernel that uses it (an index error on the CPU, a device-side assertion on CUDA).

Usage::

    with count_host_syncs() as syncs:
        trainer.train_step(batch)
    syncs.total, syncs.by_op     # e.g. 3, {"aten._local_scalar_dense": 3}
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose every call synchronises on CUDA (their result's size or value is needed on the host)
ALWAYS_SYNC = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.argwhere", "aten.masked_select", "aten.unique",
    "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.bincount", "aten.histc",
    "aten.is_nonzero", "aten.equal", "aten.masked_scatter", "aten.masked_scatter_",
})


#: environment variable that switches :func:`debug_checks_enabled` on for a whole run ("1", "true" or "yes")
DEBUG_CHECKS_ENV = "nnUNet_mmssl_debug_checks"
_debug_checks: bool | None = None


def debug_checks_enabled() -> bool:
    """Whether value checks that synchronise host and device (index ranges) run: off unless :func:`debug_checks`
    or ``nnUNet_mmssl_debug_checks=1`` (read once) switched them on."""
    global _debug_checks
    if _debug_checks is None:
        _debug_checks = os.environ.get(DEBUG_CHECKS_ENV, "").strip().lower() in ("1", "true", "yes")
    return _debug_checks


@contextmanager
def debug_checks(enabled: bool = True):
    """Switch the synchronising value checks on (or off) inside the ``with`` block."""
    global _debug_checks
    previous = debug_checks_enabled()
    _debug_checks = bool(enabled)
    try:
        yield
    finally:
        _debug_checks = previous


def _packet_name(func) -> str:
    return f"aten.{func._schema.name.split('::')[-1]}" if hasattr(func, "_schema") else str(func)


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices if i is not None)


def is_sync(func, args, kwargs) -> bool:
    """Whether one dispatched call forces a host-device synchronisation on CUDA."""
    name = _packet_name(func)
    if name in ALWAYS_SYNC:
        return True
    if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl", "aten._index_put_impl_"):
        return len(args) > 1 and _has_bool_index(args[1])
    if name == "aten.repeat_interleave":
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    return False


def _storage_key(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr() if tensor.numel() else None
    except (RuntimeError, NotImplementedError):
        return None


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode that counts the calls that would synchronise the host with a CUDA device."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        # host copies made inside the block, by storage; kept alive so that no other tensor reuses their memory
        self._host: dict[int, torch.Tensor] = {}

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def on_host(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` views the memory of a host copy made inside the block."""
        key = _storage_key(tensor)
        return key is not None and key in self._host

    def mark_host(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if key is not None:
            self._host[key] = tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_sync(func, args, kwargs) and not (
                _packet_name(func) == "aten._local_scalar_dense" and self.on_host(args[0])):
            self.by_op[_packet_name(func)] += 1
        return func(*args, **kwargs)


_HOST_COPIES = ("cpu", "numpy", "tolist")


@contextmanager
def count_host_syncs():
    """Count, inside the ``with`` block, the operations that force a host-device synchronisation on CUDA."""
    counter = HostSyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_COPIES}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            if not counter.on_host(self):
                counter.by_op[f"host_copy.{name}"] += 1
            result = original(self, *args, **kwargs)
            if isinstance(result, torch.Tensor):
                if _storage_key(result) is not None and _storage_key(result) == _storage_key(self):
                    result = result.clone()  # on the CPU .cpu() returns its input; on CUDA it is a new tensor
                counter.mark_host(result)
            return result
        return counted

    for name in _HOST_COPIES:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)

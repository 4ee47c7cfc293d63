"""Float32 regions: where a loss or statistic must not run in float16 (or bfloat16) under autocast.

nnU-Net trains on CUDA under ``torch.autocast(dtype=float16)`` with a GradScaler. Autocast casts the inputs of
matrix products (``matmul``, ``@``, ``bmm``, ``einsum``, ``linear``, convolutions) down to float16 *whatever their
dtype*, so ``.float()`` before an ``einsum`` does not help: a per-class sum over the 262,144 voxels of a 64^3 feature
map exceeds float16's largest value (65,504) and becomes ``inf``, the loss NaN, and the GradScaler skips every step
without a word. Exponentials, logarithms, softmax at a low temperature and squared differences of cosines lose most
of their digits in float16 (10 bits of mantissa) or bfloat16 (7 bits).

:func:`float32_region` (a decorator) and :func:`full_precision` (a context) make the rule explicit: autocast is
switched off for every device type (``cpu``, ``cuda`` and the inputs' own), and the decorator casts floating tensor
arguments of lower precision (float16, bfloat16) to float32 (float64 stays float64). Casting is differentiable:
gradient flows back into the float16 activations in their own dtype. Every loss and statistic of our trainers runs
inside one (see tests/test_amp.py, which runs them under forced CPU autocast at the plans' real patch sizes).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

FuncT = TypeVar("FuncT", bound=Callable[..., Any])

#: the device types whose autocast is always switched off (plus the inputs' own)
DEVICE_TYPES = ("cpu", "cuda")
_LOWER_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def full_precision(device_type: str = "cpu") -> Iterator[None]:
    """Context with autocast switched off for ``cpu``, ``cuda`` and ``device_type`` (e.g. ``x.device.type``).

    Inside it, operations run in the dtype of their inputs: give them float32 tensors (``.float()``).
    """
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False), \
            torch.autocast(device_type, enabled=False):
        yield


def to_float32(value: Any) -> Any:
    """``value`` with float16/bfloat16 tensors cast to float32, also inside lists and tuples; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _LOWER_PRECISION else value
    if isinstance(value, (list, tuple)) and any(isinstance(v, (torch.Tensor, list, tuple)) for v in value):
        return type(value)(to_float32(v) for v in value)
    return value


def _device_type(args: tuple, kwargs: dict) -> str:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    return item.device.type
        if isinstance(value, torch.nn.Module):
            for tensor in value.parameters():
                return tensor.device.type
    return "cpu"


def float32_region(fn: FuncT | None = None, *, cast_inputs: bool = True) -> FuncT | Callable[[FuncT], FuncT]:
    """Decorator: run ``fn`` with autocast switched off (:func:`full_precision`) and float32 floating inputs.

    Args:
        fn: the function (use as ``@float32_region`` or ``@float32_region(cast_inputs=False)``).
        cast_inputs: cast float16/bfloat16 tensor arguments (also in lists/tuples) to float32 before the call.
            False for functions that must receive the caller's own tensors (e.g. parameters to differentiate by).
    """
    def decorate(function: FuncT) -> FuncT:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with full_precision(_device_type(args, kwargs)):
                if cast_inputs:
                    args = tuple(to_float32(a) for a in args)
                    kwargs = {k: to_float32(v) for k, v in kwargs.items()}
                return function(*args, **kwargs)

        wrapper.float32_region = True  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate if fn is None else decorate(fn)

"""Checks of option values that are not the command line's business alone: the library functions behind the console
scripts (e.g. :func:`nnunet_mmssl.semisup.pseudolabel.pseudolabel`) refuse the same values with the same messages.

Each raises ``ValueError`` naming the option and value, and the fix; :mod:`nnunet_mmssl.cli._common` re-exports them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence


def check_step_size(value: float, option: str = "-step_size") -> float:
    """Refuse a tile step outside (0, 1] (nnU-Net asserts it deep inside prediction).

    Raises:
        ValueError: naming the option and value, and the fix.
    """
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"{option} {value:g}, must be in (0, 1]: the step between tiles as a fraction of the patch "
                         f"size. Use e.g. {option} 0.5 (nnU-Net's default; smaller is slower and smoother).")
    return value


def check_finite_number(value: float, option: str, low: float | None = None) -> float:
    """Refuse NaN/Inf (which would end up in JSON files as invalid ``NaN``) and, optionally, values below ``low``.

    Raises:
        ValueError: naming the option and value, and the fix.
    """
    if not math.isfinite(value):
        raise ValueError(f"{option} {value}, is not a finite number. Give a number, e.g. {option} 3.")
    if low is not None and value < low:
        raise ValueError(f"{option} {value:g}, must be >= {low:g}.")
    return value


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_folder(output: str, inputs: Sequence[str] = (), option: str = "-o",
                        input_option: str = "-i") -> str:
    """Refuse, before any work, an output folder that is an existing file, or lies in (or is) an input folder.

    Returns:
        The absolute output path.

    Raises:
        ValueError: naming the path and the fix.
    """
    absolute = os.path.abspath(output)
    existing = next((p for p in (absolute, *_parents(absolute)) if os.path.lexists(p)), None)
    if existing is not None and not os.path.isdir(existing):
        what = "exists and is a file" if existing == absolute else f"is below the file {existing}"
        raise ValueError(f"{option} {absolute}, {what}, not a folder. Give an output folder with {option} (a new "
                         f"one, or an existing folder).")
    for folder in inputs:
        if folder is not None and _inside(absolute, folder):
            raise ValueError(f"{option} {absolute}, is inside the input folder {input_option} "
                             f"{os.path.abspath(folder)}: outputs would mix with (and be read as) inputs. Choose an "
                             f"output folder outside it.")
    return absolute


def _parents(path: str) -> list[str]:
    result = []
    while os.path.dirname(path) != path:
        path = os.path.dirname(path)
        result.append(path)
    return result

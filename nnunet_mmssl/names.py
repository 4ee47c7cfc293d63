"""Names that end up in file or folder names (modalities, channels, regions, datasets, model folders).

Such a name comes from a command line or from a file somebody else wrote (a model folder's ``dataset.json``, a
downloaded plans file). Before it becomes part of a path it must be a plain name: ``../../x`` or ``T1/pre`` would
write outside the output folder or into a sub-folder. :func:`check_safe_name` is the one check every such name goes
through.
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 100
"""The longest name accepted (file systems allow 255 bytes per component; a name is often part of a longer one)."""

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


def _problem(name: object) -> str | None:
    """What is wrong with ``name`` as a file-name component; None if nothing."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a text"
    if not name:
        return "is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if "/" in name or "\\" in name:
        return "contains a path separator ('/' or '\\')"
    if ".." in name:
        return "contains '..'"
    if name.startswith("."):
        return "starts with '.' (a hidden file name)"
    if len(name) > MAX_NAME_LENGTH:
        return f"is {len(name)} characters long (at most {MAX_NAME_LENGTH})"
    if not _SAFE_NAME.fullmatch(name):
        bad = sorted({c for c in name if not _SAFE_NAME.fullmatch(c)})
        return f"contains {''.join(bad)!r}"
    return None


def is_safe_name(name: object) -> bool:
    """Whether ``name`` passes :func:`check_safe_name`."""
    return _problem(name) is None


def check_safe_name(name: str, what: str, source: str) -> str:
    """Return ``name`` if it is safe as (part of) a file name; raise ``ValueError`` otherwise.

    Allowed: letters, digits, ``_``, ``-``, ``.`` and ``+``; not empty, not starting with ``.``, no ``..``, no path
    separator, no control character, at most :data:`MAX_NAME_LENGTH` characters.

    Args:
        name: the name to check.
        what: what the name is, e.g. ``"modality name"`` or ``"channel name"``.
        source: where it came from, e.g. ``"--modality"`` or a ``dataset.json`` path.

    Raises:
        ValueError: one line naming ``what``, ``source`` and the name, and the fix.
    """
    problem = _problem(name)
    if problem is not None:
        shown = repr(name) if isinstance(name, str) and len(name) <= 2 * MAX_NAME_LENGTH else f"{str(name)[:40]!r}..."
        raise ValueError(f"{source}: {what} {shown} {problem}; it becomes part of a file name. Use only letters, "
                         f"digits, '_', '-', '.' and '+' (not starting with '.', no '..', at most {MAX_NAME_LENGTH} "
                         f"characters).")
    return name

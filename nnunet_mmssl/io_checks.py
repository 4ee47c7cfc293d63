"""Every file we write is checked before it is published: a short write is an error naming the file, never a file.

SimpleITK's writer does not raise when the disk is full or the process's file-size limit (``ulimit -f``,
``RLIMIT_FSIZE``) is reached: it leaves a truncated image and returns. ``numpy.save`` and blosc2 raise, but with
texts that name neither the file nor the cause (``81920 requested and 4968 written``). The helpers here write under a
hidden temporary name in the target's folder, read the whole file back and compare it with what was meant to be
written, and only then rename it to its final name; any failure removes the temporary file and raises
:class:`WriteError` naming the final file, the cause (disk full, file-size limit, or an incomplete file) and the fix.

Files written by others (nnU-Net's prediction export) are checked after the fact with :func:`verify_image_file`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator

import numpy as np

#: errno values meaning "no room": the disk (or quota) is full, or the file-size limit was reached
_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
         errno.EFBIG: "the file-size limit was reached"}
#: free bytes below which a failed or short write is put down to a full disk
_NEARLY_FULL = 1 << 20
#: hidden temporary names of ours (``.NAME.tmp-*``, ``.NAME.partial-*``, ``.NAME.old-*``, ``.NAME.XXXXXXXX.tmp``,
#: ``.partial-*-NAME``): :func:`public_path` maps them to the name they stand for
_TEMPORARY = [re.compile(r"^\.(?P<name>.+?)\.(?:tmp|partial|old)-[^/]*$"),
              re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$"),
              re.compile(r"^\.partial-[0-9a-f]+-(?P<name>.+)$")]
FIX = ("Free disk space (or raise the file-size limit: ulimit -f unlimited) and run the command again; nothing was "
       "published")


class WriteError(OSError):
    """A file could not be written completely; the message names the final file, the cause and the fix."""

    def __init__(self, message: str):
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


def public_path(path: str | os.PathLike) -> str:
    """``path`` with each hidden temporary component of ours replaced by the name it stands for."""
    parts = str(path).split(os.sep)
    for k, part in enumerate(parts):
        for pattern in _TEMPORARY:
            match = pattern.match(part)
            if match:
                parts[k] = match.group("name")
                break
    return os.sep.join(parts)


def file_size_limit() -> int | None:
    """The soft ``RLIMIT_FSIZE`` in bytes, or None if unlimited (or unknown on this platform)."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes this process may still write on the file system holding ``path`` (or its nearest existing parent)."""
    folder = os.path.abspath(str(path))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    blocks = stats.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else stats.f_bavail
    return int(blocks) * int(stats.f_frsize)


def failure_cause(written: str | os.PathLike, error: BaseException | None = None) -> str:
    """Why writing ``written`` (the file as far as it got) failed: disk full, file-size limit, or unknown."""
    code = getattr(error, "errno", None)
    limit = file_size_limit()
    size = os.path.getsize(written) if os.path.isfile(written) else 0
    if os.path.isdir(written):  # a folder someone else wrote into: its largest file
        size = max((os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(written) for f in files
                    if os.path.isfile(os.path.join(root, f))), default=0)
    if code == errno.EFBIG or (limit is not None and size >= limit):
        return f"the file-size limit of this process was reached (ulimit -f: {limit} bytes)" if limit is not None \
            else "the file-size limit was reached"
    free = free_bytes(written)
    if code in _FULL or (free is not None and free < _NEARLY_FULL):
        where = os.path.dirname(os.path.abspath(str(written)))
        free_text = f", {free} bytes free" if free is not None else ""
        return f"{_FULL.get(code, 'the disk is full')} ({where}{free_text})"
    if code is not None:
        return os.strerror(code).lower()
    return "the file read back is incomplete, unreadable or differs from what was written"


def write_error(target: str | os.PathLike, written: str | os.PathLike,
                error: BaseException | None = None) -> WriteError:
    """The :class:`WriteError` for ``target`` whose write (as far as it got: ``written``) failed with ``error``."""
    return WriteError(f"{public_path(target)}, could not be written completely: {failure_cause(written, error)}. "
                      f"{FIX}.")


def temporary_name(target: str | os.PathLike) -> str:
    """A hidden, unique name in ``target``'s folder that keeps its file ending (``.partial-<hex>-<name>``)."""
    folder, name = os.path.split(os.path.abspath(str(target)))
    return os.path.join(folder, f".partial-{uuid.uuid4().hex[:12]}-{name}")


def publish_folder(complete: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the complete folder ``complete`` (a hidden sibling of ``final``) to ``final``.

    An existing ``final`` is first renamed to a hidden ``.NAME.old-<pid>`` beside it and removed after the swap, so
    ``final`` is at every moment either the old complete folder or the new one, never a mix.
    """
    complete, final = str(complete), str(final)
    if os.path.exists(final):
        parent, name = os.path.split(os.path.abspath(final))
        old = os.path.join(parent, f".{name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(complete, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(complete, final)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def write_verified(target: str | os.PathLike, write: Callable[[str], None], verify: Callable[[str], None],
                   shown: str | os.PathLike | None = None) -> str:
    """Write ``target`` by ``write(tmp)``, check it with ``verify(tmp)``, then rename it to ``target``.

    Args:
        target: the final file.
        write: writes the file it is given.
        verify: reads it back whole; raises (anything) if it is not what was meant to be written.
        shown: the name used in messages (default ``target``; e.g. the final name of a file in a temporary folder).

    Returns:
        ``target``.

    Raises:
        WriteError: naming ``shown``, the cause and the fix; the temporary file is removed.
    """
    target = str(target)
    tmp = temporary_name(target)
    try:
        try:
            write(tmp)
        except (OSError, RuntimeError, ValueError) as error:
            raise write_error(shown or target, tmp, error) from error
        try:
            verify(tmp)
        except Exception as error:  # noqa: BLE001 -- whatever the reader says, the file is not what we wrote
            raise write_error(shown or target, tmp, error) from error
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    return target


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating):
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def write_image(image, target: str | os.PathLike, use_compression: bool = True,
                shown: str | os.PathLike | None = None) -> str:
    """Write a ``SimpleITK.Image``, read it back whole (complete file, same voxels and grid), then publish it."""
    import SimpleITK as sitk

    from nnunet_mmssl.dataloading.image_checks import read_image_checked

    expected = sitk.GetArrayViewFromImage(image)

    def verify(path: str) -> None:
        read = read_image_checked(path, require_finite=False)
        if read.GetSize() != image.GetSize() or not _same(sitk.GetArrayViewFromImage(read), expected):
            raise ValueError("the file read back differs from the image")

    return write_verified(target, lambda p: sitk.WriteImage(image, p, use_compression), verify, shown)


def write_nibabel(image, target: str | os.PathLike, shown: str | os.PathLike | None = None) -> str:
    """Write a nibabel image, read it back whole (same voxels), then publish it."""
    import nibabel

    from nnunet_mmssl.dataloading.image_checks import check_file_complete

    expected = np.asanyarray(image.dataobj)

    def verify(path: str) -> None:
        check_file_complete(path)
        if not _same(np.asanyarray(nibabel.load(path).dataobj), expected):
            raise ValueError("the file read back differs from the image")

    return write_verified(target, lambda p: nibabel.save(image, p), verify, shown)


def save_npy(array: np.ndarray, target: str | os.PathLike, shown: str | os.PathLike | None = None) -> str:
    """``numpy.save`` to ``target`` (which must end in ``.npy``), read back whole and compared, then published."""
    array = np.asanyarray(array)
    return write_verified(target, lambda p: np.save(p, array),
                          lambda p: _check(_same(np.load(p, allow_pickle=False), array)), shown)


def write_text(text: str, target: str | os.PathLike, shown: str | os.PathLike | None = None) -> str:
    """Write a UTF-8 text file, read it back and compare, then publish it."""

    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8", newline="") as f:  # exactly ``text`` (a CSV's \r\n included)
            f.write(text)

    def verify(path: str) -> None:
        with open(path, encoding="utf-8", newline="") as f:
            _check(f.read() == text)

    return write_verified(target, write, verify, shown)


def write_json(content, target: str | os.PathLike, shown: str | os.PathLike | None = None, indent: int = 2,
               sort_keys: bool = False) -> str:
    """Write ``content`` as JSON (``allow_nan=False``: NaN/Infinity are not JSON) with a final newline, checked."""
    text = json.dumps(content, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"
    return write_text(text, target, shown)


def _check(ok: bool) -> None:
    if not ok:
        raise ValueError("the file read back differs from what was written")


def verify_image_file(path: str | os.PathLike, shown: str | os.PathLike | None = None) -> None:
    """Check an image that someone else wrote (nnU-Net's export): complete and readable as a whole.

    Raises:
        WriteError: naming ``shown`` (default ``path``), the cause and the fix.
    """
    from nnunet_mmssl.dataloading.image_checks import read_image_checked

    try:
        read_image_checked(path, require_finite=False)
    except Exception as error:  # noqa: BLE001 -- an unreadable file we wrote is a failed write
        raise write_error(shown or path, path, error) from error


@contextlib.contextmanager
def reported_as(target: str | os.PathLike, written: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn an ``OSError``/``RuntimeError`` of a writer we do not control into a :class:`WriteError` naming
    ``target`` (the final name) and the cause."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError) as error:
        raise write_error(target, written or target, error) from error


@contextlib.contextmanager
def short_writes_reported(target: str | os.PathLike, written: str | os.PathLike) -> Iterator[None]:
    """Within the block, an ``OSError`` of a full disk or of the file-size limit raised by a writer we do not control
    (nnU-Net's export: numpy says "81920 requested and 4968 written" and names no file) becomes a
    :class:`WriteError` naming ``target``; other errors pass unchanged."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        if error.errno in _FULL or (error.errno is None and "written" in str(error)):
            raise write_error(target, written, error) from error
        raise

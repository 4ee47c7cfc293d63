"""Read every raw image whole and check it: complete file, an image at all, finite voxels.

SimpleITK (which nnU-Net's ``SimpleITKIO`` uses) reads a truncated NIfTI file -- compressed ``.nii.gz`` or plain
``.nii`` -- without complaint and fills the missing part with zeros; a dataset, its preprocessed data and every model
trained on it then silently carry the corrupt image. (Truncated ``.mha`` and ``.nrrd`` files are rejected by
SimpleITK itself; nibabel rejects a truncated ``.nii.gz`` but not all readers use it.) The checks here:

* a gzip file (any name; recognised by its magic bytes) is decompressed to its end, which verifies every member's
  CRC-32 and length trailer; a file named ``*.gz`` that is not gzip is rejected;
* a NIfTI file must hold at least ``vox_offset + prod(dim) * bitpix / 8`` (uncompressed) bytes;
* the file must be readable by SimpleITK as an image (so a text file named ``.nii.gz`` is caught with its name);
* floating-point voxels must be finite. NaN/+-Inf are counted and reported. NIfTI voxels are checked as stored
  (with nibabel): SimpleITK's NIfTI reader turns NaN and Inf into 0 without a word, so checking what SimpleITK
  returns would miss them, and the converted image would silently carry zeros.

Every problem raises :class:`ImageFileError` naming the file, what is wrong and the fix.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 22


class ImageFileError(ValueError):
    """A raw image file that is not a complete, readable, finite image; the message names the file and the fix."""


def _fix(path: str) -> str:
    return "Re-export or re-download it (or remove that case)."


def gzip_uncompressed_size(path: str | os.PathLike) -> int:
    """Decompress a gzip file to its end (all members) and return the uncompressed size in bytes.

    Python's :mod:`gzip` checks each member's CRC-32 and length trailer.

    Raises:
        ImageFileError: the stream ends early (truncated file), a trailer does not match (corrupt file) or the data
            are not valid deflate data.
    """
    path = str(path)
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while True:
                chunk = stream.read(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
    except EOFError:
        raise ImageFileError(f"{path} is truncated: its gzip stream ends before the end-of-stream marker (an "
                             f"interrupted copy or download?). {_fix(path)}") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise ImageFileError(f"{path} is a corrupt gzip file ({error}). {_fix(path)}") from None
    return total


def _nifti_expected_size(path: str) -> int | None:
    """``vox_offset + prod(dim) * itemsize`` of a NIfTI file, or None if nibabel cannot parse the header."""
    import nibabel

    try:
        header = nibabel.load(path).header
        shape = header.get_data_shape()
        itemsize = header.get_data_dtype().itemsize
        offset = int(header.get_data_offset())
    except Exception:  # noqa: BLE001 -- not parseable as NIfTI: SimpleITK's read below reports it
        return None
    return offset + int(np.prod(shape, dtype=np.int64)) * itemsize


def check_file_complete(path: str | os.PathLike) -> None:
    """Check that an image file exists, is not empty, and is complete (see the module docstring).

    Raises:
        ImageFileError: naming the file and the fix.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ImageFileError(f"{path} does not exist or is not a file. Check the path.")
    size = os.path.getsize(path)
    if size == 0:
        raise ImageFileError(f"{path} is empty (0 bytes). {_fix(path)}")
    with open(path, "rb") as f:
        magic = f.read(2)
    lower = path.lower()
    uncompressed = size
    if magic == GZIP_MAGIC:
        uncompressed = gzip_uncompressed_size(path)
    elif lower.endswith(".gz"):
        raise ImageFileError(f"{path} is named .gz but is not a gzip file (not an image, or saved without "
                             f"compression under a .gz name). {_fix(path)}")
    if lower.endswith((".nii", ".nii.gz")):
        expected = _nifti_expected_size(path)
        if expected is not None and uncompressed < expected:
            raise ImageFileError(f"{path} is truncated: its NIfTI header needs {expected} bytes of header and voxel "
                                 f"data, the file holds {uncompressed}. {_fix(path)}")


def count_nonfinite(array: np.ndarray) -> tuple[int, int, int]:
    """``(NaN count, +Inf count, -Inf count)`` of an array (zeros for integer arrays)."""
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.complexfloating):
        return 0, 0, 0
    nan = int(np.isnan(array).sum())
    inf = np.isinf(array)
    pos = int((inf & (array > 0)).sum())
    return nan, pos, int(inf.sum()) - pos


def check_finite(array: np.ndarray, path: str | os.PathLike) -> None:
    """Reject NaN/±Inf voxels.

    Raises:
        ImageFileError: naming the file, the counts and the fix.
    """
    nan, pos, neg = count_nonfinite(array)
    if nan or pos or neg:
        raise ImageFileError(f"{path} has non-finite voxels: {nan} NaN, {pos} +Inf, {neg} -Inf (of {array.size}). "
                             f"Replace them (e.g. with 0 or the background value, numpy.nan_to_num) and save the "
                             f"image again, or remove that case.")


def _is_nifti(path: str) -> bool:
    return path.lower().endswith((".nii", ".nii.gz"))


def _check_nifti_voxels(path: str) -> None:
    """Read a NIfTI file's voxels as stored (nibabel; SimpleITK maps NaN/Inf to 0) and check them."""
    import nibabel

    try:
        array = np.asanyarray(nibabel.load(path).dataobj)
    except Exception as error:  # noqa: BLE001 -- any parse failure is a bad file for the user
        raise ImageFileError(f"{path} cannot be read as a NIfTI image ({type(error).__name__}: "
                             f"{str(error).strip() or 'no detail'}). Is it an image file? {_fix(path)}") from None
    check_finite(array, path)


def _read_sitk(path: str):
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(path)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else "unknown reason"
        raise ImageFileError(f"{path} cannot be read as an image ({reason}). Is it an image file (NIfTI, NRRD, "
                             f"MetaImage)? {_fix(path)}") from None


def read_image_checked(path: str | os.PathLike, require_finite: bool = True):
    """Read a whole image with SimpleITK after :func:`check_file_complete`, and check its voxels are finite.

    Args:
        path: the image file.
        require_finite: reject NaN/±Inf voxels.

    Returns:
        The ``SimpleITK.Image``.

    Raises:
        ImageFileError: incomplete or non-image file, or non-finite voxels; the message names the file and the fix.
    """
    import SimpleITK as sitk

    path = str(path)
    check_file_complete(path)
    nifti = _is_nifti(path)
    if require_finite and nifti:
        _check_nifti_voxels(path)
    image = _read_sitk(path)
    if require_finite and not nifti:
        check_finite(sitk.GetArrayViewFromImage(image), path)
    return image


def check_image_file(path: str | os.PathLike) -> None:
    """Check that ``path`` is a complete, readable image with finite voxels (reads it whole); for worker pools.

    Raises:
        ImageFileError: see :func:`read_image_checked`.
    """
    path = str(path)
    check_file_complete(path)
    if _is_nifti(path):
        _check_nifti_voxels(path)
    else:
        import SimpleITK as sitk

        image = _read_sitk(path)  # keep a reference: the view below does not own its memory
        check_finite(sitk.GetArrayViewFromImage(image), path)


def check_image_files(paths: Iterable[str | os.PathLike], num_processes: int = 1) -> None:
    """:func:`check_image_file` on many files (in a spawn pool if ``num_processes > 1``); the first error raises.

    Raises:
        ImageFileError: see :func:`read_image_checked`.
    """
    files: Sequence[str] = [str(p) for p in paths]
    if num_processes <= 1 or len(files) <= 1:
        for f in files:
            check_image_file(f)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(files))) as pool:
        for _ in pool.imap_unordered(check_image_file, files, chunksize=4):
            pass


def check_input_folder(folder: str | os.PathLike, dataset_json: dict, num_processes: int = 1,
                       absent_channels: Sequence[int] = ()) -> dict[str, list[str]]:
    """Check a prediction input folder against a model's ``dataset.json`` and read every image whole.

    Files not ending in the model's ``file_ending`` and hidden files are ignored (as nnU-Net does); every other file
    must be ``CASE_XXXX<file_ending>`` with a declared channel, every case must have all channels except the
    ``absent_channels`` (whose files need not exist and are skipped if they do), and every image read must pass
    :func:`check_image_file`.

    Args:
        folder: the input folder.
        dataset_json: the model's ``dataset.json`` (``channel_names``, ``file_ending``).
        num_processes: processes for reading the images.
        absent_channels: channel indices declared missing (``--missing``).

    Returns:
        case id -> the present channels' files, in channel order.

    Raises:
        ImageFileError: missing or empty folder, or a bad image file.
        UnlabeledDataError: a case lacks a channel, or a file name does not follow ``CASE_XXXX<file_ending>``.
    """
    from nnunet_mmssl.dataloading.case_files import UnlabeledDataError, find_cases

    folder = str(folder)
    file_ending = dataset_json["file_ending"]
    channels = dataset_json["channel_names"]
    if not os.path.isdir(folder):
        raise ImageFileError(f"input folder {folder} does not exist or is not a folder. Pass the folder holding "
                             f"CASE_XXXX{file_ending} files (channels {channels}).")
    try:
        cases = find_cases(folder, dataset_json, "Input case", ignore_other_endings=True,
                           absent_channels=absent_channels)
    except UnlabeledDataError as error:
        if "lacks channel" not in str(error):
            raise
        raise UnlabeledDataError(f"{error} To predict a patient without a modality, declare it missing: "
                                 f"nnUNetv2_mmssl_predict --missing NAME.") from None
    if not cases:
        raise ImageFileError(f"input folder {folder} holds no CASE_XXXX{file_ending} files. The model expects the "
                             f"channels {channels} as CASE_0000{file_ending}, CASE_0001{file_ending}, ...")
    check_image_files([f for files in cases.values() for f in files], num_processes)
    return cases

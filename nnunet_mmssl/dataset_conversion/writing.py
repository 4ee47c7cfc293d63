"""Writing a checked, split dataset: ``<raw_root>/DatasetXXX_NAME`` with its case folders and JSON files.

The dataset is written into a hidden temporary sibling folder (``.DatasetXXX_NAME.tmp-*``) that is renamed to its
final name at the very end (an existing dataset, with ``overwrite``, is moved aside first and removed after the
rename), so a failure never leaves a half-written dataset behind; a raw root this run created is removed again when
it stays empty.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from nnunet_mmssl.dataset_conversion.checking import read_checked, read_label_array, remap_label
from nnunet_mmssl.dataset_conversion.finding import SourceCase, _relative
from nnunet_mmssl.dataset_conversion.request import FILE_ENDING, GROUP_FOLDERS, ConversionError, Tolerances
from nnunet_mmssl.io_checks import write_image, write_json

DESCRIPTION = ("Converted by nnUNetv2_mmssl_convert (nnunet_mmssl); imagesUnlabeled/ holds the unlabelled cases for "
               "semi-supervised training.")
"""``dataset.json`` description."""


def _write_case(task: dict) -> str:
    """Write one case (top-level so that it can run in a worker process).

    ``task``: ``case_id``, ``channels`` (source files), ``image_folder``, ``label`` (source file or None),
    ``label_folder`` (or None), optionally ``label_map`` (source value -> target value, applied to the label) and
    ``modality`` (for messages).
    """
    first = None
    for channel, source in enumerate(task["channels"]):
        image = read_checked(source)
        if first is None:
            first = image
        out = os.path.join(task["image_folder"], f"{task['case_id']}_{channel:04d}{FILE_ENDING}")
        write_image(image, out)
    if task["label"] is not None:
        array = read_label_array(Path(task["label"]))
        if task.get("label_map") is not None:
            array = remap_label(array, task["label_map"], task.get("modality", "?"), task["label"])
        label = sitk.GetImageFromArray(array)
        label.CopyInformation(first)
        write_image(label, os.path.join(task["label_folder"], f"{task['case_id']}{FILE_ENDING}"))
    return task["case_id"]


def dataset_folder_name(dataset_id: int, dataset_name: str) -> str:
    """``DatasetXXX_NAME``."""
    return f"Dataset{dataset_id:03d}_{dataset_name}"


def make_case_ids(num_cases: int, prefix: str) -> list[str]:
    """``<prefix>_<NNN>`` for ``num_cases`` cases (at least three digits)."""
    width = max(3, len(str(num_cases - 1)))
    return [f"{prefix}_{i:0{width}d}" for i in range(num_cases)]


def case_record(case: SourceCase, case_id: str, channel_names: Sequence[str], label_copied: bool) -> dict:
    """One case's entry in the ``split`` record (source, files relative to the case folder, label copied or not)."""
    return {
        "case_id": case_id,
        "source_index": case.source_index,
        "source": str(case.source),
        "case_folder": case.name,
        "images": {n: _relative(f, case.folder) for n, f in zip(channel_names, case.channel_files, strict=True)},
        "label": None if case.label_file is None else _relative(case.label_file, case.folder),
        "label_copied": label_copied,
    }


def tolerance_record(tol: Tolerances) -> dict:
    """The tolerances as recorded in the ``mmssl`` block."""
    return {"spacing": tol.spacing, "origin_mm": tol.origin, "direction": tol.direction}


def make_dataset_json(channel_names: Sequence[str], labels: Mapping[str, int], records: Mapping[str, list],
                      dataset_name: str, mmssl: dict) -> dict:
    """``dataset.json``: nnU-Net v2 keys, ``numUnlabeled``, ``numTest`` and the ``mmssl`` block."""
    return {
        "channel_names": {str(k): name for k, name in enumerate(channel_names)},
        "labels": dict(labels),
        "numTraining": len(records["labeled"]),
        "file_ending": FILE_ENDING,
        "numUnlabeled": len(records["unlabeled"]),
        "numTest": len(records["test"]),
        "name": dataset_name,
        "description": DESCRIPTION,
        "mmssl": mmssl,
    }


@dataclass(frozen=True)
class OutputTarget:
    """Where a dataset goes: ``root / folder_name``; :meth:`check` refuses an id in use or an existing output."""

    root: Path
    folder_name: str
    dataset_id: int
    overwrite: bool

    @property
    def path(self) -> Path:
        """The final dataset folder."""
        return self.root / self.folder_name

    def check(self) -> None:
        """Raise ConversionError if the output root is a file or not writable, another folder uses the id, or the
        output exists without ``overwrite``."""
        existing = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ConversionError(f"{existing}, is a file, not a folder. Give an output folder with -o.")
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise ConversionError(f"{existing}, is not writable by this user, so {self.path} cannot be created there. "
                                  f"Choose a writable output folder with -o (or change the folder's permissions).")
        if self.root.is_dir():
            others = sorted(p.name for p in self.root.glob(f"Dataset{self.dataset_id:03d}_*")
                            if p.is_dir() and p.name != self.folder_name)
            if others:
                raise ConversionError(f"dataset id {self.dataset_id} is already used by {others} in "
                                      f"{str(self.root)!r}; refusing to create {self.folder_name!r} with the same id. "
                                      f"Choose another id or remove the other folder.")
        if self.path.exists() and not self.overwrite:
            raise ConversionError(f"output {str(self.path)!r} exists; pass overwrite=True (--overwrite) to replace "
                                  f"it")


def output_target(output_root: str | os.PathLike, dataset_id: int, dataset_name: str,
                  overwrite: bool) -> OutputTarget:
    """The checked :class:`OutputTarget` of a request (nothing is created yet)."""
    target = OutputTarget(Path(output_root).expanduser().resolve(),
                          dataset_folder_name(int(dataset_id), dataset_name), int(dataset_id), bool(overwrite))
    target.check()
    return target


def write_dataset(target: OutputTarget, cases: Sequence[SourceCase], case_ids: Sequence[str],
                  split: Mapping[str, Sequence[int]], json_files: Mapping[str, dict], num_processes: int,
                  report: Callable[[str], None], write_case: Callable[[dict], str] = _write_case,
                  label_maps: Sequence[Mapping[int, int] | None] | None = None,
                  case_modalities: Sequence[str] | None = None) -> Path:
    """Write the cases of every split group and the JSON files under a temporary name, then rename.

    Args:
        target: where (checked again just before the rename).
        cases: all cases.
        case_ids: the id of each case.
        split: group -> indices into ``cases``.
        json_files: file name -> content (written with indent 2 and a final newline).
        num_processes: worker processes (1 = in this process; more: a ``spawn`` pool).
        report: progress callback.
        write_case: the per-case writer (``_write_case``; must be picklable when ``num_processes > 1``).
        label_maps: per case, a label map applied to its label, or None.
        case_modalities: per case, its modality (for messages of the label mapping).

    Returns:
        The written dataset folder.
    """
    root = target.root
    created_root = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.folder_name}.tmp-", dir=root))
    except OSError as error:
        raise ConversionError(f"{target.path}, cannot be created: {error.strerror or error}. Choose a writable output "
                              f"folder with -o (or free disk space).") from None
    try:
        tasks = []
        for group, (image_sub, label_sub) in GROUP_FOLDERS.items():
            (tmp / image_sub).mkdir()
            if label_sub is not None:
                (tmp / label_sub).mkdir()
            for i in split[group]:
                case = cases[i]
                copy_label = label_sub is not None
                task = {
                    "case_id": case_ids[i],
                    "channels": [str(f) for f in case.channel_files],
                    "image_folder": str(tmp / image_sub),
                    "label": str(case.label_file) if copy_label else None,
                    "label_folder": str(tmp / label_sub) if copy_label else None,
                }
                if label_maps is not None and label_maps[i] is not None:
                    task["label_map"] = dict(label_maps[i])
                    task["modality"] = case_modalities[i] if case_modalities is not None else "?"
                tasks.append(task)
        tasks.sort(key=lambda t: t["case_id"])
        if num_processes == 1:
            for k, task in enumerate(tasks):
                write_case(task)
                report(f"[{k + 1}/{len(tasks)}] wrote {task['case_id']}")
        else:
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(tasks))) as pool:
                for k, case_id in enumerate(pool.imap_unordered(write_case, tasks)):
                    report(f"[{k + 1}/{len(tasks)}] wrote {case_id}")
        for name, content in json_files.items():
            write_json(content, tmp / name)
        target.check()
        final = target.path
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.folder_name}.old-", dir=root))
            os.replace(final, old / target.folder_name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_root:
            with contextlib.suppress(OSError):  # only if still empty
                root.rmdir()
        raise
    report(f"done: {final}")
    return final

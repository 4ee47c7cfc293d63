"""Finding cases: each immediate, non-hidden subfolder of a source folder is one case; its files are matched by name.

Inside a case folder, files are searched recursively and matched by their *file name* (not their path) against
user-given globs, case-sensitively with :func:`fnmatch.fnmatchcase`; only image files (:data:`IMAGE_EXTENSIONS`) are
considered and hidden files (name starting with ``.``) are ignored. Exactly one file per modality (role) must match;
at most one file may match the label glob(s).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunet_mmssl.dataset_conversion.request import (
    IMAGE_EXTENSIONS,
    ConversionError,
    ModalitySpec,
    _normalise_label_globs,
    _normalise_modalities,
)


@dataclass(frozen=True)
class SourceCase:
    """One case folder of a source with its matched files.

    Attributes:
        source_index: index of the source folder in the user's list.
        source: the source folder (resolved).
        folder: the case folder (an immediate subfolder of ``source``).
        channel_files: one image file per modality, in channel order.
        label_file: the label file, or None for an unlabelled case.
    """

    source_index: int
    source: Path
    folder: Path
    channel_files: tuple[Path, ...]
    label_file: Path | None

    @property
    def name(self) -> str:
        """The case folder name."""
        return self.folder.name

    def describe(self) -> str:
        """Human-readable identification used in error messages."""
        return f"case folder {str(self.folder)!r}"


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive) and is not hidden."""
    name = path.name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_image_files(case_folder: Path) -> list[Path]:
    """All image files below ``case_folder`` (recursive, sorted, hidden files and folders skipped)."""
    files = []
    for root, dirs, names in os.walk(case_folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if is_image_file(path) and path.is_file():
                files.append(path)
    return sorted(files)


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def match_case_files(case_folder: Path, modalities: ModalitySpec,
                     label_globs: Sequence[str] | str | None) -> tuple[list[Path], Path | None]:
    """Match the image files of one case folder to the modalities and the label.

    Args:
        case_folder: the case folder (searched recursively).
        modalities: ``[(name, [glob, ...]), ...]`` in channel order (or a mapping).
        label_globs: glob(s) of the label file, or None.

    Returns:
        ``(channel_files, label_file_or_None)``.

    Raises:
        ConversionError: a file matches globs of two roles (ambiguous), a modality matches no file or several, or
            several files match the label glob(s).
    """
    mods = _normalise_modalities(modalities)
    lab_globs = _normalise_label_globs(label_globs)
    roles: list[tuple[str, list[str]]] = list(mods) + ([("label", lab_globs)] if lab_globs else [])
    files = find_image_files(case_folder)
    matches: dict[str, list[Path]] = {role: [] for role, _ in roles}
    for f in files:
        hit = [(role, [g for g in globs if fnmatch.fnmatchcase(f.name, g)]) for role, globs in roles]
        hit = [(role, gs) for role, gs in hit if gs]
        if len(hit) > 1:
            what = ", ".join(f"{'the label' if r == 'label' else 'modality ' + repr(r)} (glob(s) {gs})"
                             for r, gs in hit)
            raise ConversionError(f"case folder {str(case_folder)!r}: file {_relative(f, case_folder)!r} is "
                                  f"ambiguous: it matches {what}. Make the globs more specific.")
        if hit:
            matches[hit[0][0]].append(f)
    available = [_relative(f, case_folder) for f in files]
    channel_files = []
    for name, globs in mods:
        found = matches[name]
        if len(found) != 1:
            if not found:
                detail = f"no file matches; image files in the case folder: {available}"
            else:
                detail = f"{len(found)} files match: {[_relative(f, case_folder) for f in found]}"
            raise ConversionError(f"case folder {str(case_folder)!r}: modality {name!r} with glob(s) {globs}: "
                                  f"{detail}. Exactly one file per modality is needed.")
        channel_files.append(found[0])
    label_file = None
    if lab_globs:
        found = matches["label"]
        if len(found) > 1:
            raise ConversionError(f"case folder {str(case_folder)!r}: label glob(s) {lab_globs}: {len(found)} files "
                                  f"match: {[_relative(f, case_folder) for f in found]}. At most one label file "
                                  f"per case is allowed.")
        label_file = found[0] if found else None
    return channel_files, label_file


def resolve_sources(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """Resolve the source folders, in the user's order.

    Raises:
        ConversionError: no source, a source that is missing or not a folder, or a source given twice.
    """
    if not sources:
        raise ConversionError("at least one source folder is needed")
    resolved: list[Path] = []
    for s in sources:
        path = Path(s).expanduser().resolve()
        if not path.is_dir():
            raise ConversionError(f"source folder {str(s)!r} does not exist or is not a folder")
        if path in resolved:
            raise ConversionError(f"source folder {str(path)!r} is given twice")
        resolved.append(path)
    return resolved


def check_output_outside_sources(output_root: Path, dataset_folder: Path, sources: Sequence[Path]) -> None:
    """The converter writes nothing inside its sources, and no source lies inside the dataset folder it writes (which
    ``--overwrite`` would replace).

    Args:
        output_root: the (resolved) raw root the dataset folder and its temporary sibling are written into.
        dataset_folder: the (resolved) final dataset folder.
        sources: the resolved source folders.

    Raises:
        ConversionError: naming the output and the source, with the fix.
    """
    for source in sources:
        if output_root == source or source in output_root.parents:
            raise ConversionError(f"-o/--output-root {str(output_root)!r} is inside the source folder {str(source)!r}: "
                                  f"the converter would write into its own input (and the new dataset would be a case "
                                  f"folder of the next run). Choose an output root outside every source folder.")
        if dataset_folder == source or dataset_folder in source.parents:
            raise ConversionError(f"source folder {str(source)!r} is inside the dataset folder "
                                  f"{str(dataset_folder)!r} that this run writes (--overwrite would replace it). Move "
                                  f"the sources elsewhere, or choose another dataset id/name or output root.")


def discover_source_cases(index: int, source: Path, modalities: ModalitySpec,
                          label_globs: Sequence[str] | str | None) -> list[SourceCase]:
    """The cases of one (resolved) source, sorted by case folder name.

    Args:
        index: the source's index in the user's list (recorded in each case).
        source: the source folder.
        modalities: ``[(name, [glob, ...]), ...]`` in channel order (or a mapping).
        label_globs: glob(s) of the label file, or None.

    Raises:
        ConversionError: the source holds no case folder, or a case's files do not match (:func:`match_case_files`).
    """
    mods = _normalise_modalities(modalities)
    lab_globs = _normalise_label_globs(label_globs)
    folders = sorted((p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.name)
    if not folders:
        raise ConversionError(f"source folder {str(source)!r} holds no case subfolder (expected one subfolder "
                              f"per case)")
    cases = []
    for folder in folders:
        channel_files, label_file = match_case_files(folder, mods, lab_globs)
        cases.append(SourceCase(index, source, folder, tuple(channel_files), label_file))
    return cases


def discover_cases(sources: Sequence[str | os.PathLike], modalities: ModalitySpec,
                   label_globs: Sequence[str] | str | None) -> list[SourceCase]:
    """Find the cases of all sources (each immediate, non-hidden subfolder of a source is one case).

    Args:
        sources: source folders, in the user's order.
        modalities: ``[(name, [glob, ...]), ...]`` in channel order (or a mapping).
        label_globs: glob(s) of the label file, or None (all cases unlabelled).

    Returns:
        The cases sorted by (source index, case folder name).

    Raises:
        ConversionError: a source is missing, given twice or holds no case folder, or a case's files do not match
            (see :func:`match_case_files`).
    """
    if not sources:
        raise ConversionError("at least one source folder is needed")
    mods = _normalise_modalities(modalities)
    lab_globs = _normalise_label_globs(label_globs)
    cases: list[SourceCase] = []
    for index, source in enumerate(resolve_sources(sources)):
        cases.extend(discover_source_cases(index, source, mods, lab_globs))
    return cases

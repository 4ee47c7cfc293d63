"""Model folders are untrusted input: checkpoints opened without running code, network classes checked before import.

A model folder (``fold_X/checkpoint_*.pth``, ``plans.json``, ``dataset.json``) is often downloaded or shared. nnU-Net
reads checkpoints with ``torch.load(weights_only=False)``, which unpickles anything (a pickled ``os.system`` call runs),
and imports and builds whatever class ``plans.json`` names. Every command and trainer of ours goes through this module
first:

* :func:`load_checkpoint_safely` / :func:`check_checkpoint` open a checkpoint with ``torch.load(weights_only=True)``
  and the allowlist :func:`checkpoint_safe_globals` -- exactly the non-tensor types nnU-Net's own checkpoints hold
  (numpy scalars and their dtypes, which nnU-Net logs; found by saving a real ``nnUNetTrainer`` checkpoint and
  loading it weights-only). Anything else is refused with one line naming the file and the offending type
  (:class:`UnsafeModelError`), before nnU-Net sees the file. :func:`weights_only_loads` makes nnU-Net's own
  ``torch.load`` calls weights-only with the same allowlist while we call into it (no second, unchecked read).
* :func:`check_network_classes` checks the network class of a plans configuration (``dynamic_network_architectures.*``
  or ``nnunet_mmssl.*``, and a ``torch.nn.Module``) and its ``_kw_requires_import`` entries (the ``torch.nn``
  convolutions, normalisations, non-linearities and dropouts of :data:`ALLOWED_LAYER_CLASSES`) by name, before
  anything is imported.
* :func:`check_model_folder` does all of it for a folder (plans, names from ``dataset.json`` that our commands use in
  paths, every checkpoint); ``nnUNetv2_mmssl_check_model`` is its command.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence

#: packages whose classes plans may name as the network
NETWORK_PACKAGES: tuple[str, ...] = ("dynamic_network_architectures", "nnunet_mmssl")

#: ``torch.nn`` classes that ``_kw_requires_import`` entries (conv_op, norm_op, nonlin, dropout_op) may name
ALLOWED_LAYER_CLASSES: tuple[str, ...] = (
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "SyncBatchNorm", "GroupNorm", "LayerNorm", "LocalResponseNorm",
    "LeakyReLU", "ReLU", "ReLU6", "PReLU", "RReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Hardswish",
    "Hardtanh", "Tanh", "Sigmoid", "Softplus", "Identity",
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
)

#: numpy dtype classes whose scalars a checkpoint may hold (nnU-Net logs np.float64 / np.float32 values)
_NUMPY_DTYPE_CLASSES: tuple[str, ...] = (
    "BoolDType", "Float16DType", "Float32DType", "Float64DType", "LongDoubleDType", "Int8DType", "Int16DType",
    "Int32DType", "Int64DType", "IntDType", "LongDType", "LongLongDType", "ByteDType", "ShortDType", "UInt8DType",
    "UInt16DType", "UInt32DType", "UInt64DType", "UIntDType", "ULongDType", "ULongLongDType", "UByteDType",
    "UShortDType",
)

_IDENTIFIER_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class UnsafeModelError(ValueError):
    """A model folder file that our commands refuse to open (a checkpoint holding other objects than weights, a
    network class outside the allowlist, a name that would become a path); the message names the file and the value.
    """


def checkpoint_safe_globals() -> list:
    """The allowlist given to ``torch.load(weights_only=True)``: what nnU-Net's checkpoints hold besides tensors and
    plain containers (numpy scalars and dtypes; ``numpy.core`` and ``numpy._core`` spellings, so that checkpoints
    written with numpy 1 and 2 both load)."""
    import numpy as np
    import torch

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):  # torch >= 2.6: aliases allowed
        allowed: list = [np.dtype, (scalar, "numpy.core.multiarray.scalar"),
                         (scalar, "numpy._core.multiarray.scalar")]
    else:
        allowed = [np.dtype, scalar]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in _NUMPY_DTYPE_CLASSES if hasattr(dtypes, name)]
    return allowed


def safe_globals_context():
    """``torch.serialization.safe_globals`` of the allowlist (torch < 2.5 has none: numpy scalars are refused)."""
    import torch

    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals(checkpoint_safe_globals()) if safe_globals is not None else contextlib.nullcontext()


def _offending(error: BaseException) -> str:
    """The type or operation ``torch.load(weights_only=True)`` refused, from its message."""
    text = str(error)
    for pattern in (r"GLOBAL ([^\s]+)", r"but got <class '([^']+)'>", r"(Unsupported operand \d+)",
                    r"WeightsUnpickler error:\s*([^\n]+)"):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return " ".join(text.split())[:200]


def load_checkpoint_safely(filename: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """``torch.load(filename, weights_only=True)`` with :func:`checkpoint_safe_globals`; nothing in it runs.

    Args:
        filename: the checkpoint.
        map_location: as for ``torch.load``.
        mmap: memory-map the tensors (a zip checkpoint only; a legacy file is read whole).

    Returns:
        The checkpoint dictionary.

    Raises:
        UnsafeModelError: the file holds anything else (naming the file and the refused type), is not a checkpoint
            dictionary, or cannot be read as one.
    """
    import torch

    filename = os.fspath(filename)
    try:
        with safe_globals_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                checkpoint = torch.load(filename, map_location=map_location, weights_only=True, mmap=mmap)
            except RuntimeError as error:
                if not (mmap and "mmap" in str(error)):
                    raise
                checkpoint = torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeModelError(
            f"{filename}: refused to open, it holds {_offending(error)}, which is not part of an nnU-Net checkpoint "
            f"(only tensors, plain containers and numpy scalars are read, so that no code in it can run). Use a "
            f"checkpoint from a source you trust, or check the folder with nnUNetv2_mmssl_check_model.") from None
    except (OSError, EOFError, RuntimeError, KeyError, ValueError, AttributeError, IndexError, TypeError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise UnsafeModelError(f"{filename}: cannot be read as a checkpoint ({type(error).__name__}: "
                               f"{' '.join(str(error).split())[:200]}). Copy it again (it may be truncated) or "
                               f"retrain.") from None
    if not isinstance(checkpoint, dict):
        raise UnsafeModelError(f"{filename}: holds a {type(checkpoint).__name__}, not an nnU-Net checkpoint "
                               f"dictionary (network_weights, init_args, trainer_name, ...). Pass a checkpoint_*.pth "
                               f"written by nnUNetv2_train.")
    return checkpoint


def check_checkpoint(filename: str | os.PathLike) -> None:
    """Refuse ``filename`` unless it opens with :func:`load_checkpoint_safely` (tensors memory-mapped, not read)."""
    load_checkpoint_safely(filename, mmap=True)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """While inside, every ``torch.load`` is weights-only with :func:`checkpoint_safe_globals` (also nnU-Net's, which
    pass ``weights_only=False``: ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides it). Use around calls into nnU-Net that
    read a checkpoint already checked with :func:`check_checkpoint`."""
    variable = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(variable)
    os.environ[variable] = "1"
    try:
        with safe_globals_context():
            yield
    finally:
        if previous is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = previous


# ---------------------------------------------------------------------------------------------- network classes
def _allowed_layer_names() -> set[str]:
    import torch

    names = set()
    for name in ALLOWED_LAYER_CLASSES:
        cls = getattr(torch.nn, name, None)
        if cls is not None:
            names.update({f"torch.nn.{name}", f"{cls.__module__}.{cls.__qualname__}"})
    return names


def check_network_classes(class_name: object, arch_kwargs: Mapping, requires_import: Iterable,
                          source: str) -> None:
    """Refuse a plans network entry that would import or build anything but an allowed network and torch layers.

    Checked by name before anything is imported: the network class must be in :data:`NETWORK_PACKAGES`, each
    ``_kw_requires_import`` entry a ``torch.nn`` class of :data:`ALLOWED_LAYER_CLASSES` (or null). The network
    class's module (inside those packages) is then imported and the class must be a ``torch.nn.Module``.

    Args:
        class_name: ``network_class_name`` of the plans configuration.
        arch_kwargs: its ``arch_kwargs``.
        requires_import: its ``_kw_requires_import``.
        source: where the entry comes from (a ``plans.json`` path and configuration), for the message.

    Raises:
        UnsafeModelError: naming ``source`` and the refused name.
    """
    allowed_packages = " or ".join(f"{p}.*" for p in NETWORK_PACKAGES)
    if not isinstance(class_name, str) or not _IDENTIFIER_PATH.fullmatch(class_name) \
            or class_name.split(".")[0] not in NETWORK_PACKAGES:
        raise UnsafeModelError(f"{source}: network class {class_name!r} is refused; only {allowed_packages} classes "
                               f"are built from plans (nothing was imported). Use the plans.json written by "
                               f"nnU-Net or our trainers.")
    layers = _allowed_layer_names()
    for key in requires_import or ():
        value = arch_kwargs.get(key) if isinstance(arch_kwargs, Mapping) else None
        if value is None:
            continue
        if not isinstance(value, str) or value not in layers:
            raise UnsafeModelError(f"{source}: {key} {value!r} is refused; only torch.nn convolution, normalisation, "
                                   f"non-linearity and dropout classes (e.g. torch.nn.LeakyReLU) are imported from "
                                   f"plans (nothing was imported). Use the plans.json written by nnU-Net or our "
                                   f"trainers.")
    import pydoc

    import torch

    located = pydoc.locate(class_name)
    if located is not None and not (isinstance(located, type) and issubclass(located, torch.nn.Module)):
        raise UnsafeModelError(f"{source}: network class {class_name!r} is a {type(located).__name__}, not a "
                               f"torch.nn.Module subclass; it is not built. Use the plans.json written by nnU-Net or "
                               f"our trainers.")


def check_configuration_manager(configuration_manager, source: str = "plans") -> None:
    """:func:`check_network_classes` of an nnU-Net ``ConfigurationManager``."""
    check_network_classes(configuration_manager.network_arch_class_name,
                          configuration_manager.network_arch_init_kwargs,
                          configuration_manager.network_arch_init_kwargs_req_import, source)


def check_plans_networks(plans: Mapping, source: str) -> None:
    """:func:`check_network_classes` for every configuration of ``plans`` that names a network."""
    for name, configuration in (plans.get("configurations") or {}).items():
        architecture = configuration.get("architecture") if isinstance(configuration, Mapping) else None
        if architecture is None:
            continue
        if not isinstance(architecture, Mapping):
            raise UnsafeModelError(f"{source} configuration {name!r}: 'architecture' is not an object.")
        check_network_classes(architecture.get("network_class_name"), architecture.get("arch_kwargs") or {},
                              architecture.get("_kw_requires_import") or (), f"{source} configuration {name!r}")


# ---------------------------------------------------------------------------------------------- names and folders
def check_names_in_model(dataset_json: Mapping, plans: Mapping | None, folder: str) -> None:
    """Refuse channel and modality names of a model folder that would not be plain file names.

    Our commands put them into paths (``--each-head`` folders, per-modality input folders).

    Raises:
        UnsafeModelError: naming the file and the name.
    """
    from nnunet_mmssl.names import check_safe_name

    dataset_file = os.path.join(folder, "dataset.json")
    try:
        for name in (dataset_json.get("channel_names") or {}).values():
            check_safe_name(name, "channel name", dataset_file)
        block = dataset_json.get("mmssl") if isinstance(dataset_json.get("mmssl"), Mapping) else {}
        for name in block.get("modalities") or ():
            check_safe_name(name, "modality name", dataset_file)
        plans_block = (plans or {}).get("mmssl") if isinstance((plans or {}).get("mmssl"), Mapping) else {}
        for name in plans_block.get("modalities") or ():
            check_safe_name(name, "modality name", os.path.join(folder, "plans.json"))
    except ValueError as error:
        raise UnsafeModelError(str(error)) from None


def read_model_json(folder: str, name: str) -> dict:
    """``folder/name`` parsed as a JSON object.

    Raises:
        FileNotFoundError: the file is missing; UnsafeModelError: not a JSON object.
    """
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; {folder} is not a complete model folder. Give the folder "
                                f"TRAINER__PLANS__CONFIGURATION that nnUNetv2_train wrote.")
    try:
        with open(path, encoding="utf-8") as stream:
            content = json.load(stream)
    except (ValueError, UnicodeDecodeError) as error:
        raise UnsafeModelError(f"{path}: not valid JSON ({' '.join(str(error).split())}). Copy the model folder "
                               f"again.") from None
    if not isinstance(content, dict):
        raise UnsafeModelError(f"{path}: holds a {type(content).__name__}, not a JSON object. Copy the model folder "
                               f"again.")
    return content


def model_checkpoints(folder: str, folds: Sequence[int | str] | None = None,
                      checkpoint_name: str | None = None) -> list[str]:
    """The checkpoint files of a model folder: ``fold_<f>/<checkpoint_name>`` for the given folds (default: every
    ``fold_*`` folder that has it), every ``*.pth`` of the fold folders when ``checkpoint_name`` is None."""
    if folds is None:
        fold_folders = sorted(d for d in os.listdir(folder) if d.startswith("fold_")
                              and os.path.isdir(os.path.join(folder, d)))
    else:
        fold_folders = [f"fold_{f}" for f in folds]
    files = []
    for fold_folder in fold_folders:
        path = os.path.join(folder, fold_folder)
        if checkpoint_name is not None:
            if folds is not None or os.path.isfile(os.path.join(path, checkpoint_name)):
                files.append(os.path.join(path, checkpoint_name))
        elif os.path.isdir(path):
            files += [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".pth")]
    return files


def check_model_folder(folder: str, folds: Sequence[int | str] | None = None, checkpoint_name: str | None = None,
                       names: bool = True, progress=None) -> list[str]:
    """Check a model folder before nnU-Net opens it: plans networks, names (``names``), and checkpoints.

    Args:
        folder: the model folder (``plans.json``, ``dataset.json``, ``fold_X/``).
        folds: folds whose checkpoint is checked (default: every ``fold_*``).
        checkpoint_name: the checkpoint file name (default: every ``*.pth`` of the fold folders).
        names: also check channel and modality names (see :func:`check_names_in_model`).
        progress: called with one line per file checked (e.g. ``print``); None = silent.

    Returns:
        The files checked.

    Raises:
        UnsafeModelError, FileNotFoundError: the first problem, naming the file.
    """
    report = progress or (lambda line: None)
    plans = read_model_json(folder, "plans.json")
    check_plans_networks(plans, os.path.join(folder, "plans.json"))
    report(f"OK {os.path.join(folder, 'plans.json')}: network classes allowed")
    dataset_json = read_model_json(folder, "dataset.json")
    if names:
        check_names_in_model(dataset_json, plans, folder)
        report(f"OK {os.path.join(folder, 'dataset.json')}: channel and modality names are plain file names")
    checked = [os.path.join(folder, "plans.json"), os.path.join(folder, "dataset.json")]
    for file in model_checkpoints(folder, folds, checkpoint_name):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} does not exist. Pass folds (-f) and a checkpoint (-chk) that exist.")
        check_checkpoint(file)
        report(f"OK {file}: weights only")
        checked.append(file)
    return checked

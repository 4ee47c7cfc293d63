"""Warm start: ``nnUNetv2_train ... -tr <ours> -pretrained_weights checkpoint_final.pth`` from nnU-Net's own model.

Most users already have a supervised nnU-Net model of their dataset (``nnUNetTrainer`` on ``PlainConvUNet`` or
``ResidualEncoderUNet`` plans). nnU-Net's ``load_pretrained_weights`` requires every key of the network in the
checkpoint, which none of our multi-branch networks satisfies; :func:`warm_start` maps the checkpoint onto our
network instead, **by module structure** (no hard-coded key names):

* **Units.** Every ``PlainConvEncoder`` / ``ResidualEncoder`` of our network (``encoders[k]`` of the multi-branch
  networks, SMML's per-modality encoders, DBDC's and the plain U-Nets' ``encoder``) is loaded from the checkpoint's
  ``encoder``, every ``UNetDecoder`` / ``UNetResDecoder`` (``decoders[k]``, SMML's ``branches[b].decoder``) from its
  ``decoder``; a tensor of the same name in the checkpoint takes precedence, so a checkpoint of the same network (the
  supervised twin, e.g. ``MemCifSupervisedTrainer`` for ``MemCifSSLTrainer``) loads whole, fusion blocks included.
* **Channel subsets.** A branch that reads a subset of the input channels (``modality_groups[k]``; SMML's encoder k
  reads channel k) takes the first convolution's weights of those channels, ``W[:, channels]``, in the group's order.
  The kept slice is **not rescaled**: nnU-Net's norm follows that convolution (InstanceNorm in every nnU-Net plan,
  DBDC's banks normalise with batch statistics in training), and a normalisation divides any positive factor out, so
  ``C_total / C_subset`` would change the forward pass only through the norm's epsilon -- but it would enlarge the
  weights, and under a scale-invariant norm a larger weight gets a proportionally smaller effective learning rate
  (gradient / weight), slowing exactly the layer that must adapt to the missing channels. What the dropped channels
  contributed is a different direction, not a scale, and no factor restores it.
* **DBDC's norm banks.** Each modality's norm of a :class:`~nnunet_mmssl.building_blocks.norm_bank.ModalityNormBank`
  (``...norm.norms.k.weight``) takes the single norm's affine parameters (``...norm.weight``); running statistics the
  checkpoint does not hold (nnU-Net's InstanceNorm keeps none) stay at their initial values (mean 0, variance 1) and
  are listed.
* **Narrow encoders.** An encoder narrower than the decoder it feeds by design (SMML's per-modality encoders,
  ``1/sqrt(K)`` of nnU-Net's width) takes the checkpoint's tensors in order up to its first tensor of another shape
  (with the tiny test plans its first stage; with real plans usually nothing) and keeps the rest at initialisation.
* **Segmentation layers** of another class count (a checkpoint of other labels) stay at initialisation, as nnU-Net's
  own ``load_pretrained_weights`` never loads them; with the same labels they are loaded (same plans, same dataset:
  the warm start is meant to start from the converged supervised model).
* **Left at initialisation and listed:** everything else of the network (MEM/CIF and their projections, MMF/MAE, SMML's
  fusions, DBDC's projector) and the trainer's own modules (SMML's refinement networks, DBDC's prototype bank). A
  trainer with a teacher made from its student (Mean Teacher) gets a new teacher: a copy of the warm-started student.

Every loaded tensor must fit: a parameter of an encoder/decoder missing from the checkpoint, a shape other than the
rules above allow, or a checkpoint tensor of a loaded encoder/decoder that nothing takes (an extra convolution) stops
the run with one line naming the first such tensor and both shapes (:class:`WarmStartError`, a user error of
``nnUNetv2_train``), before any weight changes. The log gets a table of what was loaded, sliced and left at
initialisation, grouped by module.

**Mechanism.** nnU-Net's ``maybe_load_checkpoint`` calls ``nnunetv2.run.run_training.load_pretrained_weights(
trainer.network, FILE)``; no trainer method sees ``FILE``. Our trainers register themselves here when constructed
(:func:`register_trainer`, from ``SafeLoadingMixin.__init__``) and replace that module attribute by a wrapper
(:func:`nnunet_mmssl.trainers.checkpoint_io.install_pretrained_weights_check`) which checks ``FILE`` (weights only),
finds the registered trainer whose network it was given (:func:`trainer_of_network`) and calls :func:`warm_start`;
for any other network (nnU-Net's own trainers) it calls nnU-Net's function unchanged. The same installation makes
``--c`` together with ``-pretrained_weights`` (nnU-Net refuses it with a traceback) one line for our trainers.
"""

from __future__ import annotations

import os
import re
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.building_blocks.unet_residual_decoder import UNetResDecoder
from torch import nn

from nnunet_mmssl.safe_load import load_checkpoint_safely

ENCODER_TYPES: tuple[type, ...] = (PlainConvEncoder, ResidualEncoder)
DECODER_TYPES: tuple[type, ...] = (UNetDecoder, UNetResDecoder)
#: the checkpoint's module every encoder / decoder of ours is loaded from (nnU-Net's U-Nets' attribute names)
SOURCE_ROOTS = {"encoder": "encoder", "decoder": "decoder"}

_BANK = re.compile(r"^(.*)\.norms\.\d+\.([^.]+)$")


class WarmStartError(ValueError):
    """A ``-pretrained_weights`` checkpoint that does not fit the network (other plans or topology), or ``--c``
    together with ``-pretrained_weights``; the message is one line naming the file, the tensor and both shapes."""


# ---------------------------------------------------------------------------------------------- trainer registry
_TRAINERS: weakref.WeakSet = weakref.WeakSet()


def register_trainer(trainer) -> None:
    """Remember ``trainer`` so that :func:`trainer_of_network` finds it from its network (weakly: no leak)."""
    _TRAINERS.add(trainer)


def is_registered(trainer) -> bool:
    return trainer in _TRAINERS


def bare_module(network: nn.Module) -> nn.Module:
    """``network`` without its DDP and ``torch.compile`` wrappers."""
    module = getattr(network, "module", network) if isinstance(
        network, torch.nn.parallel.DistributedDataParallel) else network
    return getattr(module, "_orig_mod", module)


def trainer_of_network(network: nn.Module):
    """The registered trainer of ours whose ``network`` (unwrapped) is ``network`` (unwrapped); None if none."""
    target = bare_module(network)
    for trainer in list(_TRAINERS):
        own = getattr(trainer, "network", None)
        if own is not None and bare_module(own) is target:
            return trainer
    return None


# ---------------------------------------------------------------------------------------------- the mapping
@dataclass
class WarmStartPlan:
    """What :func:`plan_warm_start` decided for every tensor of the network (first names of shared tensors).

    Attributes:
        loaded: network key -> checkpoint key (copied whole).
        sliced: network key -> (checkpoint key, input channels kept).
        initial: network key -> reason it stays at initialisation.
        units: network key -> the encoder/decoder (or top-level module) it belongs to, for the table.
        banked: network keys of per-modality norms loaded from a single norm.
        roots: network key -> the checkpoint module it was taken from (``encoder``, ``decoders.0``, ...).
        unused: checkpoint keys nothing took (outside the encoders/decoders that were loaded).
    """

    loaded: dict[str, str] = field(default_factory=OrderedDict)
    sliced: dict[str, tuple[str, list[int]]] = field(default_factory=OrderedDict)
    initial: dict[str, str] = field(default_factory=OrderedDict)
    units: dict[str, str] = field(default_factory=dict)
    banked: set[str] = field(default_factory=set)
    roots: dict[str, str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in tensor.shape) + ")"


def _units(network: nn.Module) -> OrderedDict[str, str]:
    """Module path -> ``"encoder"`` / ``"decoder"`` for every nnU-Net encoder and decoder inside ``network``."""
    units: OrderedDict[str, str] = OrderedDict()
    for name, module in network.named_modules():
        if isinstance(module, ENCODER_TYPES):
            units[name] = "encoder"
        elif isinstance(module, DECODER_TYPES):
            units[name] = "decoder"
    return units


def _unit_of(key: str, units: Mapping[str, str]) -> str | None:
    best = None
    for name in units:
        if (name == "" or key.startswith(name + ".")) and (best is None or len(name) > len(best)):
            best = name
    return best


def _widths(module: nn.Module) -> list[int] | None:
    channels = getattr(module, "output_channels", None)
    return [int(c) for c in channels] if channels is not None else None


def _narrow_encoders(network: nn.Module, units: Mapping[str, str]) -> dict[str, str]:
    """Encoders whose stage widths differ from those of every decoder of the network (narrow by design), each with
    the reason the table gives for its tensors left at initialisation."""
    decoder_widths = []
    for name, kind in units.items():
        if kind == "decoder":
            description = getattr(network.get_submodule(name), "encoder", None)
            widths = _widths(description) if description is not None else None
            if widths is not None:
                decoder_widths.append(widths)
    return {name: f"narrow encoder (widths {_widths(network.get_submodule(name))}, the decoder's "
                  f"{decoder_widths[0]}): from its first tensor of another shape on"
            for name, kind in units.items() if kind == "encoder" and decoder_widths
            and _widths(network.get_submodule(name)) not in decoder_widths}


def unit_channels(network: nn.Module, unit: str, input_channels: int) -> list[int] | None:
    """The input channels encoder ``unit`` reads, in the order it reads them; None if it cannot be told.

    ``encoders[k]`` of a module with ``modality_groups`` (our multi-branch networks) reads ``modality_groups[k]``; in a
    list of one-channel encoders with one encoder per input channel (SMML), encoder k reads channel k.
    """
    owner_path, _, index = unit.rpartition(".")
    if not index.isdigit():
        return None
    container_path, _, _ = owner_path.rpartition(".")
    container = network.get_submodule(owner_path) if owner_path else network
    owner = network.get_submodule(container_path) if container_path else network
    groups = getattr(owner, "modality_groups", None)
    if groups is not None and len(groups) == len(container):
        return [int(c) for c in groups[int(index)]]
    if len(container) == input_channels and all(isinstance(m, ENCODER_TYPES) for m in container):
        return [int(index)]
    return None


def _candidates(key: str, unit: str | None, kind: str | None) -> list[tuple[str, bool]]:
    """Checkpoint keys a network key may come from, best first, each with ``True`` if it is a bank translation."""
    names = [key]
    if unit is not None:
        rel = key[len(unit) + 1:] if unit else key
        names.append(f"{SOURCE_ROOTS[kind]}.{rel}")
    result = [(n, False) for n in names]
    for name in names:
        match = _BANK.match(name)
        if match:
            result.append((f"{match.group(1)}.{match.group(2)}", True))
    return result


def _error(filename: str, message: str) -> WarmStartError:
    return WarmStartError(f"{filename}, {message}: the checkpoint was trained on other plans or another network "
                          f"topology. Pass the checkpoint_final.pth of nnUNetTrainer (or of this trainer's supervised "
                          f"twin) trained with the same plans (-p) and configuration.")


def plan_warm_start(network: nn.Module, source: Mapping[str, torch.Tensor], input_channels: int,
                    filename: str = "checkpoint") -> WarmStartPlan:
    """Decide, for every tensor of ``network``, where it comes from in ``source`` (nothing is changed).

    Args:
        network: the bare network (no DDP/compile wrapper).
        source: the checkpoint's ``network_weights``.
        input_channels: the network's input channels (all modalities).
        filename: for the messages.

    Raises:
        WarmStartError: the first tensor that does not fit (see the module docstring), naming both shapes.
    """
    plan = WarmStartPlan()
    units = _units(network)
    narrow = _narrow_encoders(network, units)
    stopped: set[str] = set()
    consumed_roots: dict[str, tuple[str, set[str]]] = {}  # checkpoint prefix -> (unit kind, units loading it)
    used: set[str] = set()
    seen: dict[int, str] = {}
    target = network.state_dict(keep_vars=True)
    buffers = {name for name, _ in network.named_buffers(remove_duplicate=False)}
    for key, tensor in target.items():
        if id(tensor) in seen:
            continue
        seen[id(tensor)] = key
        unit = _unit_of(key, units)
        kind = units.get(unit) if unit is not None else None
        plan.units[key] = unit if unit is not None else ""
        if unit in stopped:
            plan.initial[key] = narrow[unit]
            continue
        found = next(((name, banked) for name, banked in _candidates(key, unit, kind) if name in source), None)
        if found is None:
            if unit is None:
                plan.initial[key] = "not in the checkpoint"
            elif key in buffers:
                plan.initial[key] = "statistics the checkpoint's norm does not keep"
            else:
                tried = _candidates(key, unit, kind)[-1][0]
                raise _error(filename, f"the network's {key} {_shape(tensor)} has no counterpart in the checkpoint "
                                       f"(looked for {tried}, absent)")
            continue
        name, banked = found
        value = source[name]
        if unit is not None:
            root = f"{unit}." if name.startswith(f"{unit}.") else f"{SOURCE_ROOTS[kind]}."
            consumed_roots.setdefault(root, (kind, set()))[1].add(unit)
            plan.roots[key] = root.rstrip(".")
        if tuple(value.shape) == tuple(tensor.shape):
            plan.loaded[key] = name
            if banked:
                plan.banked.add(key)
            used.add(name)
            continue
        rel = key[len(unit) + 1:] if unit else key
        if kind == "encoder" and value.ndim == tensor.ndim >= 2 and value.shape[0] == tensor.shape[0] \
                and value.shape[2:] == tensor.shape[2:] and value.shape[1] == input_channels:
            channels = unit_channels(network, unit, input_channels)
            if channels is not None and len(channels) == tensor.shape[1]:
                plan.sliced[key] = (name, channels)
                used.add(name)
                continue
        if ".seg_layers." in f".{rel}" and value.shape[1:] == tensor.shape[1:]:
            plan.initial[key] = (f"segmentation layer: the checkpoint has {value.shape[0]} outputs, this network "
                                 f"{tensor.shape[0]}")
            used.add(name)
            continue
        if unit in narrow:
            stopped.add(unit)
            plan.initial[key] = narrow[unit]
            continue
        raise _error(filename, f"tensor {name} has shape {_shape(value)} in the checkpoint but the network's {key} "
                               f"has {_shape(tensor)}")
    _check_roots_used(plan, source, consumed_roots, stopped, used, filename)
    _group_other_modules(plan)
    return plan


def _group_other_modules(plan: WarmStartPlan) -> None:
    """Give each tensor outside the encoders/decoders the highest module of the network whose tensors all share its
    status (``mems``, ``branches.0.fusions``), for the table."""
    status = {key: "loaded" if key in plan.loaded else "sliced" if key in plan.sliced else "initial"
              for key in plan.units}
    for key, unit in plan.units.items():
        if unit:
            continue
        parts = key.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth]) + "."
            if all(s == status[key] for k, s in status.items() if k.startswith(prefix)):
                plan.units[key] = prefix[:-1]
                break
        else:
            plan.units[key] = key.rsplit(".", 1)[0] if "." in key else key


def _alias_groups(source: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    groups = {}
    for name, value in source.items():
        try:
            groups[name] = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                            tuple(value.stride()))
        except (RuntimeError, NotImplementedError):
            groups[name] = (name,)
    return groups


def _check_roots_used(plan: WarmStartPlan, source: Mapping[str, torch.Tensor],
                      roots: Mapping[str, tuple[str, set[str]]], stopped: set[str], used: set[str],
                      filename: str) -> None:
    """Every checkpoint tensor under a root that an encoder/decoder was loaded from whole must have been taken (an
    extra convolution in the checkpoint is another topology); the rest of the checkpoint is recorded as unused."""
    alias = _alias_groups(source)
    used_groups = {alias[name] for name in used}
    checked = []
    for root, (kind, loaders) in roots.items():
        if loaders <= stopped:  # only narrow encoders took from it, each up to its first other shape
            continue
        checked.append(root)
        for name, value in source.items():
            if not name.startswith(root) or alias[name] in used_groups:
                continue
            if kind == "decoder" and name.startswith(root + "encoder."):
                continue  # nnU-Net's decoder holds its encoder: the encoder's own tensors again
            raise _error(filename, f"tensor {name} {_shape(value)} of the checkpoint has no counterpart in the "
                                   f"network (absent)")
    plan.unused = [name for name in source if alias[name] not in used_groups
                   and not any(name.startswith(root) for root in checked)]
    plan.unused = [name for name in plan.unused if not name.startswith("decoder.encoder.")]


def apply_warm_start(network: nn.Module, source: Mapping[str, torch.Tensor], plan: WarmStartPlan) -> None:
    """Copy the planned tensors into ``network`` (in place: parameters keep their identity for the optimizer)."""
    target = network.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, name in plan.loaded.items():
            target[key].copy_(source[name])
        for key, (name, channels) in plan.sliced.items():
            target[key].copy_(source[name][:, channels])


# ---------------------------------------------------------------------------------------------- the table
def _trainer_modules(trainer, network: nn.Module) -> list[tuple[str, int]]:
    """(attribute, tensor count) of the trainer's own modules with weights (not its network or loss)."""
    result = []
    skip = {id(network)}
    for name, value in sorted(vars(trainer).items()):
        if name in ("network", "loss") or not isinstance(value, nn.Module):
            continue
        module = bare_module(value)
        if id(module) in skip:
            continue
        skip.add(id(module))
        count = len({id(t) for t in module.state_dict(keep_vars=True).values()})
        if count:
            result.append((name, count))
    return result


def table_lines(filename: str, checkpoint: Mapping, plan: WarmStartPlan, trainer_notes: list[str]) -> list[str]:
    """The log table: groups of tensors loaded / sliced / left at initialisation, by module."""
    total = len(plan.units)
    source = checkpoint.get("trainer_name", "an unknown trainer")
    lines = [(f"Warm start from {filename} (checkpoint of {source}): {len(plan.loaded)} loaded, {len(plan.sliced)} "
              f"sliced, {len(plan.initial)} left at initialisation of the network's {total} tensors"),
             f"  {'status':<8} {'tensors':>7}  {'network module':<40} source / reason"]
    groups: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
    for key in plan.loaded:
        root = plan.roots.get(key, plan.units[key])
        note = f"<- {root}" + (" (every modality's norm <- the one norm)" if key in plan.banked else "")
        groups.setdefault(("loaded", plan.units[key], note), []).append(key)
    for (status, unit, note), keys in groups.items():
        lines.append(f"  {status:<8} {len(keys):>7}  {unit:<40} {note}")
    for key, (name, channels) in plan.sliced.items():
        lines.append(f"  {'sliced':<8} {1:>7}  {key:<40} <- {name}[:, {channels}] (input channels {channels}, "
                     f"not rescaled)")
    initial: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
    for key, reason in plan.initial.items():
        initial.setdefault((plan.units[key], reason), []).append(key)
    for (unit, reason), keys in initial.items():
        leaves = sorted({k.rsplit(".", 1)[-1] for k in keys})
        lines.append(f"  {'initial':<8} {len(keys):>7}  {unit:<40} {reason} ({', '.join(leaves)})")
    if plan.unused:
        tops = sorted({n.split(".")[0] for n in plan.unused})
        lines.append(f"  {'unused':<8} {len(plan.unused):>7}  {'(checkpoint) ' + ', '.join(tops):<40} not taken by "
                     f"this network")
    lines += [f"  trainer  {note}" for note in trainer_notes]
    return lines


# ---------------------------------------------------------------------------------------------- entry point
def warm_start(trainer, filename: str | os.PathLike) -> WarmStartPlan:
    """Initialise ``trainer``'s network from the checkpoint ``filename`` (see the module docstring) and log the table.

    Args:
        trainer: one of our trainers, initialised (nnU-Net initialises it before loading pretrained weights).
        filename: an nnU-Net checkpoint (``checkpoint_final.pth``).

    Returns:
        The plan that was applied.

    Raises:
        UnsafeModelError: the file holds anything but weights (nothing of it runs).
        WarmStartError: the checkpoint does not fit; the network is unchanged.
    """
    filename = os.fspath(filename)
    checkpoint = load_checkpoint_safely(filename)
    source = checkpoint.get("network_weights")
    if not isinstance(source, Mapping) or not source:
        raise WarmStartError(f"{filename}, has no 'network_weights' entry: not a checkpoint written by "
                             f"nnUNetv2_train. Pass a fold's checkpoint_final.pth.")
    network = bare_module(trainer.network)
    plan = plan_warm_start(network, source, int(trainer.num_input_channels), filename)
    apply_warm_start(network, source, plan)
    notes = []
    teacher = getattr(trainer, "teacher", None)
    if teacher is not None and callable(getattr(trainer, "make_teacher", None)):
        trainer.teacher = trainer.make_teacher()
        notes.append("teacher: a copy of the warm-started student")
    for name, count in _trainer_modules(trainer, network):
        notes.append(f"{name}: {count} tensors left at initialisation (trained by this trainer only)")
    for line in table_lines(filename, checkpoint, plan, notes):
        trainer.print_to_log_file(line)
    return plan

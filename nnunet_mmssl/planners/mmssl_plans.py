"""The ``mmssl`` block of an nnU-Net plans file and the architecture entries derived from it.

``nnUNetv2_mmssl_plan_and_preprocess`` runs nnU-Net's own fingerprint, planner and preprocessing on the labelled
cases (so nnU-Net's trainers see exactly the plans they always see), then adds one top-level key to the plans::

    "mmssl": {"version": 1, "modality_groups": [[0], [1]], "channel_names": {"0": "FLAIR", "1": "T1"},
              "unlabeled_folder_suffix": "_unlabeled", "num_unlabeled": 6}

Our trainers turn the configuration's ``PlainConvUNet`` or ``ResidualEncoderUNet`` architecture into their own network
entry with :func:`multi_branch_architecture` (class path + the planned kwargs + the base's kind + modality groups +
method switches) in their copy of the plans; nnU-Net saves that copy as the model folder's ``plans.json``, so
``nnUNetv2_predict`` rebuilds exactly the trained network from the plans alone. All functions
here are pure: they return new dicts.
"""

import copy
from collections.abc import Mapping, Sequence

from nnunet_mmssl.architectures.encoders import BASE_KWARG, SUPPORTED_BASES, architecture_kind, base_kind

MMSSL_KEY = "mmssl"
MMSSL_PLANS_VERSION = 1
UNLABELED_FOLDER_SUFFIX = "_unlabeled"
PLAIN_UNET_CLASS = SUPPORTED_BASES["plain"]
RESENC_UNET_CLASS = SUPPORTED_BASES["resenc"]


def default_modality_groups(num_channels: int, num_groups: int = 2) -> list[list[int]]:
    """Split channels into ``num_groups`` consecutive groups (2 groups: first half / second half).

    Raises:
        ValueError: if there are fewer channels than groups.
    """
    if num_channels < num_groups:
        raise ValueError(f"A {num_groups}-branch network needs at least {num_groups} input channels (modalities); "
                         f"this dataset has {num_channels}. Use a dataset with several modalities.")
    bounds = [i * num_channels // num_groups for i in range(num_groups + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(num_groups)]


def parse_modality_groups(specs: Sequence[str], channel_names: Mapping[str, str]) -> list[list[int]]:
    """Parse groups given as comma-separated channel indices or channel names, one string per group.

    Example: ``["FLAIR,T1ce", "T2,T1"]`` or ``["0,1", "2,3"]`` with ``channel_names = {"0": "FLAIR", ...}``.

    The groups must partition the channels: every channel in exactly one group (a network branch per group; a
    channel in two groups or in none would make the network and the data disagree at training time).

    Raises:
        ValueError: naming an unknown channel and the known ones, a channel given twice, or channels left out.
    """
    by_name = {str(v): int(k) for k, v in channel_names.items()}
    known = f"Known channels: {dict(channel_names)}"
    groups = []
    where: dict[int, str] = {}
    for spec in specs:
        group = []
        for token in (t.strip() for t in spec.split(",")):
            if token.isdigit() and str(int(token)) in channel_names:
                channel = int(token)
            elif token in by_name:
                channel = by_name[token]
            else:
                raise ValueError(f"Unknown channel {token!r} in modality group {spec!r}. {known} (give indices or "
                                 f"names).")
            if channel in where:
                raise ValueError(f"--modality-groups {' '.join(specs)}: channel {channel} "
                                 f"({channel_names[str(channel)]!r}) is in group {where[channel]!r} and again in "
                                 f"{spec!r}. Give every channel in exactly one group. {known}.")
            where[channel] = spec
            group.append(channel)
        groups.append(group)
    unused = [int(k) for k in channel_names if int(k) not in where]
    if unused:
        raise ValueError(f"--modality-groups {' '.join(specs)} leave(s) channel(s) "
                         f"{', '.join(f'{c} ({channel_names[str(c)]!r})' for c in sorted(unused))} in no group. Give "
                         f"every channel in exactly one group. {known}.")
    return groups


def add_mmssl_block(plans: Mapping, dataset_json: Mapping, modality_groups: Sequence[Sequence[int]] | None = None,
                    num_unlabeled: int | None = None) -> dict:
    """Return a copy of ``plans`` with the ``mmssl`` block (modality groups etc.) set."""
    channel_names = dict(dataset_json["channel_names"])
    if modality_groups:
        groups = [list(map(int, g)) for g in modality_groups]
    elif len(channel_names) == 1:  # one channel (e.g. an unregistered dataset): no branches to split into
        groups = [[0]]
    else:
        groups = default_modality_groups(len(channel_names))
    new_plans = copy.deepcopy(dict(plans))
    new_plans[MMSSL_KEY] = {
        "version": MMSSL_PLANS_VERSION,
        "modality_groups": groups,
        "channel_names": channel_names,
        "unlabeled_folder_suffix": UNLABELED_FOLDER_SUFFIX,
        "num_unlabeled": num_unlabeled,
    }
    return new_plans


def get_mmssl_block(plans: Mapping) -> dict | None:
    """The ``mmssl`` block of a plans dict, or None for plans made by stock nnU-Net."""
    return plans.get(MMSSL_KEY)


def unlabeled_data_identifier(data_identifier: str, plans: Mapping | None = None) -> str:
    """Folder name of the preprocessed unlabelled cases, a sibling of nnU-Net's ``data_identifier`` folder."""
    block = get_mmssl_block(plans) if plans is not None else None
    suffix = block.get("unlabeled_folder_suffix", UNLABELED_FOLDER_SUFFIX) if block else UNLABELED_FOLDER_SUFFIX
    return data_identifier + suffix


def multi_branch_architecture(base_architecture: Mapping, network_class_name: str,
                              modality_groups: Sequence[Sequence[int]], extra_kwargs: Mapping | None = None) -> dict:
    """Turn a configuration's ``PlainConvUNet`` or ``ResidualEncoderUNet`` entry into one for a multi-branch network.

    The base's arch kwargs are kept as planned (for the residual encoder: ``n_blocks_per_stage``, ``stem_channels``
    etc.) and its kind is recorded as ``base`` (``"plain"`` or ``"resenc"``,
    :data:`~nnunet_mmssl.architectures.encoders.SUPPORTED_BASES`), so every branch encoder is the planned one.

    Args:
        base_architecture: the plans' ``configurations[c]["architecture"]`` (``network_class_name``,
            ``arch_kwargs``, ``_kw_requires_import``).
        network_class_name: dotted path of our network class.
        modality_groups: channel indices per branch.
        extra_kwargs: method switches (e.g. ``use_mem``) added to the arch kwargs.

    Returns:
        A new architecture entry; the input is not modified.

    Raises:
        ValueError: if the base is neither of the supported U-Nets (nor an entry of ours for the same class),
            naming the class and the supported ones.
    """
    base_class = base_architecture["network_class_name"]
    arch_kwargs = copy.deepcopy(dict(base_architecture["arch_kwargs"]))
    if base_class == network_class_name:
        kind = architecture_kind(arch_kwargs)
    else:
        kind = base_kind(base_class)
    arch_kwargs[BASE_KWARG] = kind
    arch_kwargs["modality_groups"] = [list(map(int, g)) for g in modality_groups]
    arch_kwargs.update(copy.deepcopy(dict(extra_kwargs or {})))
    return {
        "network_class_name": network_class_name,
        "arch_kwargs": arch_kwargs,
        "_kw_requires_import": list(base_architecture["_kw_requires_import"]),
    }

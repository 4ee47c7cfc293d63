"""The per-case modality data model of *unregistered* datasets (DBDC; CT of some patients, MR of others).

A registered dataset (the default) has one nnU-Net input channel per modality and every case carries all of them.
An unregistered dataset has ONE input channel; each case is one image of one modality, and ``dataset.json``'s
``mmssl`` block records which::

    "channel_names": {"0": "CT+MR"},           # "CT" alone for one modality, so stock nnU-Net normalises it right
    "mmssl": {
        "layout": "unregistered",
        "modalities": ["CT", "MR"],              # order = index of the modality in the network's banks
        "intensity_schemes": {"CT": "CTNormalization", "MR": "ZScoreNormalization"},
        "case_modality": {"DS_000": "CT", "DS_001": "MR", ...},   # every case: labelled, unlabelled and test
        ...                                      # converter's record (sources, seed, split, label maps)
    }

Normalisation is per case by its modality: ``CTNormalization`` (nnU-Net's CT scheme, with an intensity fingerprint of
that modality's labelled cases only) or any other nnU-Net scheme; the default is CT for a modality named ``CT``
(case-insensitive) and z-score per case for everything else. The plans' ``mmssl`` block copies this layout and adds
each modality's intensity fingerprint (:mod:`nnunet_mmssl.planners.modality_normalization`).

Everything here is pure and validates its input with errors naming the value and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

UNREGISTERED = "unregistered"
REGISTERED = "registered"
LAYOUT_KEY = "layout"

#: nnU-Net normalisation schemes (class names in ``nnunetv2.preprocessing.normalization``) a modality may use
INTENSITY_SCHEMES: tuple[str, ...] = ("CTNormalization", "ZScoreNormalization", "NoNormalization",
                                      "RescaleTo01Normalization")


class ModalityLayoutError(ValueError):
    """A ``dataset.json`` / plans ``mmssl`` block whose modality layout is inconsistent (message names the fix)."""


def default_intensity_scheme(modality: str) -> str:
    """``CTNormalization`` for a modality named CT (any case), ``ZScoreNormalization`` otherwise."""
    return "CTNormalization" if modality.strip().lower() == "ct" else "ZScoreNormalization"


def channel_name_for(modalities: Sequence[str]) -> str:
    """The single channel's name: the modality itself for one modality (stock nnU-Net then normalises it as that
    modality), else the names joined by ``+``."""
    return "+".join(modalities)


@dataclass(frozen=True)
class ModalityLayout:
    """Modalities of an unregistered dataset, their intensity schemes and the modality of every case."""

    modalities: tuple[str, ...]
    intensity_schemes: Mapping[str, str]
    case_modality: Mapping[str, str] = field(default_factory=dict)

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def index(self, modality: str) -> int:
        """Bank index of a modality name.

        Raises:
            ModalityLayoutError: unknown name (lists the known ones).
        """
        try:
            return self.modalities.index(modality)
        except ValueError:
            raise ModalityLayoutError(f"Unknown modality {modality!r}: this dataset/model has "
                                      f"{list(self.modalities)} (names are case-sensitive).") from None

    def modality_of(self, case_id: str) -> str:
        """Modality name of a case.

        Raises:
            ModalityLayoutError: the case is not recorded.
        """
        try:
            return self.case_modality[case_id]
        except KeyError:
            raise ModalityLayoutError(f"Case {case_id!r} has no modality in dataset.json's mmssl.case_modality. "
                                      f"Add it (\"{case_id}\": one of {list(self.modalities)}) or convert the "
                                      f"dataset with nnUNetv2_mmssl_convert --source-modality.") from None

    def cases_of(self, modality: str, case_ids: Sequence[str]) -> list[str]:
        """The cases of ``case_ids`` that have ``modality`` (order kept)."""
        self.index(modality)
        return [c for c in case_ids if self.modality_of(c) == modality]

    def to_block(self) -> dict:
        """The keys this layout contributes to an ``mmssl`` block."""
        return {LAYOUT_KEY: UNREGISTERED, "modalities": list(self.modalities),
                "intensity_schemes": {m: self.intensity_schemes[m] for m in self.modalities},
                "case_modality": dict(sorted(self.case_modality.items()))}


def make_layout(modalities: Sequence[str], case_modality: Mapping[str, str] | None = None,
                intensity_schemes: Mapping[str, str] | None = None) -> ModalityLayout:
    """Validated layout; schemes not given default by :func:`default_intensity_scheme`.

    Raises:
        ModalityLayoutError: empty or duplicate modalities, an unknown scheme, a scheme for an unknown modality, or a
            case of an unknown modality.
    """
    names = [str(m) for m in modalities]
    if not names:
        raise ModalityLayoutError("An unregistered dataset needs at least one modality.")
    duplicates = sorted({m for m in names if names.count(m) > 1})
    if duplicates:
        raise ModalityLayoutError(f"Modality names must be unique, {duplicates} repeat.")
    for m in names:
        if not m or "+" in m or m != m.strip():
            raise ModalityLayoutError(f"Modality name {m!r} must be non-empty, without '+' or surrounding spaces.")
    given = dict(intensity_schemes or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ModalityLayoutError(f"Intensity scheme given for unknown modality {unknown}; modalities are {names}.")
    schemes = {m: given.get(m, default_intensity_scheme(m)) for m in names}
    for m, scheme in schemes.items():
        if scheme not in INTENSITY_SCHEMES:
            raise ModalityLayoutError(f"Intensity scheme {scheme!r} of modality {m!r} is not one of "
                                      f"{list(INTENSITY_SCHEMES)}.")
    cases = dict(case_modality or {})
    bad = {c: m for c, m in cases.items() if m not in names}
    if bad:
        first = next(iter(bad.items()))
        raise ModalityLayoutError(f"{len(bad)} case(s) have a modality that is not in {names}, e.g. {first[0]!r}: "
                                  f"{first[1]!r}.")
    return ModalityLayout(tuple(names), schemes, cases)


def is_unregistered(block: Mapping | None) -> bool:
    """Whether an ``mmssl`` block (of dataset.json or the plans) describes an unregistered dataset."""
    return bool(block) and block.get(LAYOUT_KEY, REGISTERED) == UNREGISTERED


def read_layout(block: Mapping | None, where: str = "dataset.json") -> ModalityLayout | None:
    """The layout of an ``mmssl`` block, or None for a registered dataset (no block, or ``layout`` registered).

    Raises:
        ModalityLayoutError: an unregistered block without ``modalities``, or an invalid one (naming ``where``).
    """
    if not is_unregistered(block):
        return None
    if not block.get("modalities"):
        raise ModalityLayoutError(f"{where}: mmssl.layout is 'unregistered' but mmssl.modalities is missing. Convert "
                                  f"with nnUNetv2_mmssl_convert --source-modality, or add the list of modalities.")
    try:
        return make_layout(block["modalities"], block.get("case_modality"), block.get("intensity_schemes"))
    except ModalityLayoutError as e:
        raise ModalityLayoutError(f"{where}: {e}") from None


def check_single_channel(dataset_json: Mapping, layout: ModalityLayout, where: str = "dataset.json") -> None:
    """An unregistered dataset has exactly one input channel.

    Raises:
        ModalityLayoutError: otherwise.
    """
    channels = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    if len(channels) != 1:
        raise ModalityLayoutError(f"{where}: an unregistered dataset (modalities {list(layout.modalities)}, one "
                                  f"image per case) has one input channel, but channel_names is {dict(channels)}.")

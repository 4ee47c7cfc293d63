"""Prediction with modalities missing: nnU-Net's predictor for a patient who lacks some input channels.

A missing modality is an explicit set of channels (``--missing``: names from ``dataset.json``'s ``channel_names``, or
indices), never a guess from the images. The input folder may simply lack those channels' files (a real patient has
no file, not a file of zeros); a file of a missing channel that is there anyway is skipped, never read. What an absent
channel becomes is the method's business:

* every network sees the absent channels as **0 after nnU-Net's normalisation** (for z-score and CT normalisation 0
  is the mean intensity: the uninformative value, and what :class:`~nnunet_mmssl.trainers.smml.ModalityDropoutTrainer`
  trains with);
* a network with ``set_missing_modalities(channels)`` (SMML's :class:`~nnunet_mmssl.architectures.smml.SMMLNet`) is
  told which channels are absent as well, and masks those modalities' encoders at every scale.

How preprocessing copes with an absent file: nnU-Net's preprocessing needs an image per channel, so each absent
channel is given the file of the case's first present channel as a placeholder. The placeholder cannot move the crop:
nnU-Net crops to the union of the channels' nonzero masks, and the union with a copy of a present channel is the union
of the present channels. Its normalised values are then overwritten with 0 just before the network
(:meth:`MissingModalityPredictor.predict_logits_from_preprocessed_data`, after normalisation and resampling).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_mmssl.safe_load import check_model_folder, weights_only_loads


class MissingModalityError(ValueError):
    """An unknown channel in ``--missing``, or every channel declared missing; the message lists the channels."""


def channel_list(channel_names: Mapping[str, str]) -> str:
    """``"0 (T1), 1 (T2)"``: the channels of ``dataset.json`` for messages."""
    return ", ".join(f"{k} ({v})" for k, v in sorted(channel_names.items(), key=lambda kv: int(kv[0])))


def resolve_missing_channels(specs: Iterable[str | int], channel_names: Mapping[str, str]) -> tuple[int, ...]:
    """Map ``--missing`` values (channel names or indices) to sorted, unique channel indices.

    A value is first matched against the names exactly, then as an index, then against the names ignoring case (if
    that is unambiguous).

    Args:
        specs: channel names (e.g. ``"T1"``) or indices (``1`` or ``"1"``).
        channel_names: ``dataset.json``'s ``channel_names`` (``{"0": "FLAIR", ...}``).

    Returns:
        The missing channel indices, sorted (empty if ``specs`` is empty).

    Raises:
        MissingModalityError: an unknown name or an index out of range (naming it and listing the channels), or every
            channel missing.
    """
    count = len(channel_names)
    by_name = {str(v): int(k) for k, v in channel_names.items()}
    by_lower: dict[str, list[int]] = {}
    for name, index in by_name.items():
        by_lower.setdefault(name.lower(), []).append(index)
    missing = set()
    for spec in specs:
        text = str(spec).strip()
        if text in by_name:
            missing.add(by_name[text])
        elif text.isdigit() and int(text) < count:
            missing.add(int(text))
        elif len(by_lower.get(text.lower(), [])) == 1:
            missing.add(by_lower[text.lower()][0])
        else:
            raise MissingModalityError(f"Unknown channel {spec!r} in --missing. The model's channels are "
                                       f"{channel_list(channel_names)}: give names or indices.")
    if missing and len(missing) == count:
        raise MissingModalityError(f"--missing {' '.join(map(str, specs))} declares every channel missing "
                                   f"({channel_list(channel_names)}); at least one must be present. Drop one from "
                                   f"--missing.")
    return tuple(sorted(missing))


def placeholder_lists(present_files: Sequence[Sequence[str]], num_channels: int,
                      missing: Sequence[int]) -> list[list[str]]:
    """Full channel file lists for nnU-Net's preprocessing: each missing channel gets the case's first present file.

    Args:
        present_files: per case, the present channels' files in channel order.
        num_channels: K.
        missing: missing channel indices.

    Returns:
        Per case, K files (channel order).
    """
    present = [c for c in range(num_channels) if c not in set(missing)]
    result = []
    for files in present_files:
        if len(files) != len(present):
            raise MissingModalityError(f"expected the files of the present channels {present}, got {list(files)}")
        by_channel = dict(zip(present, files, strict=True))
        result.append([by_channel.get(c, files[0]) for c in range(num_channels)])
    return result


class MissingModalityPredictor(nnUNetPredictor):
    """nnU-Net's predictor, with :meth:`set_missing_channels` (see the module docstring).

    With no channel missing it behaves exactly like ``nnUNetPredictor``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: missing channel indices (sorted); empty = every channel present
        self.missing_channels: tuple[int, ...] = ()

    # ------------------------------------------------------------------ configuration
    def set_missing_channels(self, channels: Iterable[str | int] | None) -> tuple[int, ...]:
        """Predict as if these channels (names or indices) were absent; None or empty = all present.

        Call after ``initialize_from_trained_model_folder`` / ``manual_initialization`` (the names come from the
        model's ``dataset.json``).

        Returns:
            The missing channel indices.

        Raises:
            MissingModalityError: see :func:`resolve_missing_channels`.
            RuntimeError: the predictor is not initialised yet.
        """
        if getattr(self, "dataset_json", None) is None or getattr(self, "network", None) is None:
            raise RuntimeError("initialise the predictor (initialize_from_trained_model_folder) before "
                               "set_missing_channels")
        self.missing_channels = resolve_missing_channels(list(channels or []), self.dataset_json["channel_names"])
        self._apply_network_mask()
        return self.missing_channels

    def _apply_network_mask(self) -> None:
        network = getattr(self, "network", None)
        network = getattr(network, "_orig_mod", network)
        if network is not None and hasattr(network, "set_missing_modalities"):
            network.set_missing_modalities(list(self.missing_channels) or None)

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds=None,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        """nnU-Net's initialisation, after the folder passed :func:`~nnunet_mmssl.safe_load.check_model_folder`
        (plans networks allowed by name, the folds' checkpoints weights-only); nnU-Net's own reads of the
        checkpoints then run weights-only too. Names are checked where a command turns them into paths.

        Raises:
            UnsafeModelError: naming the refused file and type or class.
        """
        if isinstance(use_folds, str | int):
            use_folds = [use_folds]
        check_model_folder(model_training_output_dir, use_folds, checkpoint_name, names=False)
        with weights_only_loads():
            super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        self._apply_network_mask()

    def manual_initialization(self, *args, **kwargs):
        super().manual_initialization(*args, **kwargs)
        self._apply_network_mask()

    @property
    def present_channels(self) -> tuple[int, ...]:
        """The channel indices given to the model."""
        return tuple(c for c in range(len(self.dataset_json["channel_names"])) if c not in self.missing_channels)

    # ------------------------------------------------------------------ input files
    def _manage_input_and_output_lists(self, list_of_lists_or_source_folder, *args, **kwargs):
        if self.missing_channels:
            list_of_lists_or_source_folder = self._lists_with_placeholders(list_of_lists_or_source_folder)
        return super()._manage_input_and_output_lists(list_of_lists_or_source_folder, *args, **kwargs)

    def _lists_with_placeholders(self, source: str | Sequence[Sequence[str | None]]) -> list[list[str]]:
        """Channel file lists for nnU-Net's preprocessing from a folder (absent files allowed for the missing
        channels) or from lists (K entries, those of missing channels ignored, or the present channels' files)."""
        num_channels = len(self.dataset_json["channel_names"])
        if isinstance(source, str | os.PathLike):
            from nnunet_mmssl.dataloading.unlabeled_preprocessing import find_cases

            cases = find_cases(os.fspath(source), self.dataset_json, "Input case", ignore_other_endings=True,
                               absent_channels=self.missing_channels)
            present_files = [cases[c] for c in sorted(cases)]
        else:
            present_files = []
            for files in source:
                files = list(files)
                if len(files) == num_channels:
                    files = [f for c, f in enumerate(files) if c not in self.missing_channels]
                present_files.append(files)
        return placeholder_lists(present_files, num_channels, self.missing_channels)

    # ------------------------------------------------------------------ the network's input
    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's prediction of a preprocessed (normalised, resampled) case with the missing channels set to 0.

        Args:
            data: (C, *S) the preprocessed case (image channels first; a cascade's one-hot channels after them).
        """
        if self.missing_channels:
            data = data.clone()
            data[list(self.missing_channels)] = 0
        return super().predict_logits_from_preprocessed_data(data)

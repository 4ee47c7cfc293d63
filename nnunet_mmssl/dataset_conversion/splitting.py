"""Splitting cases into labelled training, unlabelled and held-out test cases, reproducibly from a seed.

Labelled cases are shuffled with ``np.random.RandomState``: the first ``num_test`` become test cases, then
``num_labeled`` of the remaining ones become labelled training cases, and the rest join the unlabelled pool together
with every case without a label. The unregistered mode splits each modality on its own
(:func:`split_by_modality`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from nnunet_mmssl.dataset_conversion.finding import SourceCase
from nnunet_mmssl.dataset_conversion.request import ConversionError

Count = int | float | None
"""A requested number of cases: an int count, a float fraction, or None (the default of the argument)."""


def resolve_num_labeled(num_labeled: int | float | None, available: int) -> int:
    """Number of labelled training cases out of ``available`` labelled non-test cases.

    Args:
        num_labeled: an int count (>= 1), a float fraction in (0, 1] (rounded half up, at least 1), or None (all).
        available: labelled cases left after the test cases are taken.

    Returns:
        The count.

    Raises:
        ConversionError: invalid value, or more requested than available, or zero available.
    """
    if available <= 0:
        raise ConversionError("zero labelled training cases would remain: no labelled case is left after the test "
                              "cases are taken")
    if num_labeled is None:
        return available
    if isinstance(num_labeled, bool):
        raise ConversionError(f"num_labeled must be an int count or a float fraction, got {num_labeled!r}")
    if isinstance(num_labeled, (int, np.integer)):
        if num_labeled < 1:
            raise ConversionError(f"num_labeled={num_labeled}: at least one labelled training case is needed")
        if num_labeled > available:
            raise ConversionError(f"num_labeled={num_labeled} but only {available} labelled cases are left for "
                                  f"training")
        return int(num_labeled)
    if isinstance(num_labeled, (float, np.floating)):
        if not (0.0 < num_labeled <= 1.0):
            raise ConversionError(f"num_labeled={num_labeled}: a float is a fraction in (0, 1] of the labelled "
                                  f"non-test cases; use an int for a count")
        return min(available, max(1, int(math.floor(num_labeled * available + 0.5))))
    raise ConversionError(f"num_labeled must be an int, a float or None, got {num_labeled!r}")


def split_cases(cases: Sequence[SourceCase], num_labeled: int | float | None, num_test: int,
                seed: int) -> dict[str, list[int]]:
    """Split case indices into ``labeled`` / ``unlabeled`` / ``test``.

    Labelled cases are shuffled with ``np.random.RandomState(seed)``; the first ``num_test`` go to ``test``, then
    :func:`resolve_num_labeled` of the rest go to ``labeled``; the remaining labelled cases and all cases without a
    label go to ``unlabeled``. Each list is sorted.

    Args:
        cases: the cases (from :func:`discover_cases`).
        num_labeled: see :func:`resolve_num_labeled`.
        num_test: number of held-out labelled test cases (>= 0).
        seed: the shuffle seed.

    Returns:
        ``{"labeled": [...], "unlabeled": [...], "test": [...]}`` of indices into ``cases``.

    Raises:
        ConversionError: impossible request (numbers named in the message).
    """
    if isinstance(num_test, bool) or not isinstance(num_test, (int, np.integer)) or num_test < 0:
        raise ConversionError(f"num_test must be an int >= 0, got {num_test!r}")
    _check_seed(seed)
    return _split(cases, num_labeled, num_test, np.random.RandomState(int(seed)))


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ConversionError(f"seed must be an int in [0, 2**32), got {seed!r}")


def _split(cases: Sequence[SourceCase], num_labeled: int | float | None, num_test: int,
           random_state: np.random.RandomState) -> dict[str, list[int]]:
    """The body of :func:`split_cases` with a given random state (``num_test`` already validated)."""
    labeled = [i for i, c in enumerate(cases) if c.label_file is not None]
    without_label = [i for i, c in enumerate(cases) if c.label_file is None]
    n = len(labeled)
    if n == 0:
        raise ConversionError(f"none of the {len(cases)} cases has a label file, so there would be zero labelled "
                              f"training cases (check the label glob(s))")
    if num_test >= n:
        raise ConversionError(f"num_test={num_test} but only {n} cases have a label; at least one labelled case "
                              f"must remain for training")
    requested = None
    if isinstance(num_labeled, (int, np.integer)) and not isinstance(num_labeled, bool):
        requested = int(num_labeled)
    if requested is not None and requested + num_test > n:
        raise ConversionError(f"requested num_test={num_test} + num_labeled={requested} = {num_test + requested} "
                              f"labelled cases, but only {n} cases have a label")
    order = random_state.permutation(n)
    shuffled = [labeled[k] for k in order]
    test, rest = shuffled[:num_test], shuffled[num_test:]
    n_train = resolve_num_labeled(num_labeled, len(rest))
    return {"labeled": sorted(rest[:n_train]), "unlabeled": sorted(rest[n_train:] + without_label),
            "test": sorted(test)}


def resolve_num_test(num_test: int | float, available: int) -> int:
    """Number of held-out test cases out of ``available`` labelled cases.

    Args:
        num_test: an int count (>= 0) or a float fraction in [0, 1) of the labelled cases (rounded half up).
        available: the labelled cases.

    Returns:
        The count (not checked against ``available``; :func:`split_cases` does that).

    Raises:
        ConversionError: invalid value.
    """
    if isinstance(num_test, bool):
        raise ConversionError(f"num_test must be an int count or a float fraction, got {num_test!r}")
    if isinstance(num_test, (int, np.integer)):
        if num_test < 0:
            raise ConversionError(f"num_test must be >= 0, got {num_test!r}")
        return int(num_test)
    if isinstance(num_test, (float, np.floating)):
        if not 0.0 <= num_test < 1.0:
            raise ConversionError(f"num_test={num_test}: a float is a fraction in [0, 1) of the labelled cases; use "
                                  f"an int for a count")
        return int(math.floor(num_test * available + 0.5))
    raise ConversionError(f"num_test must be an int or a float, got {num_test!r}")


def modality_seed(seed: int, modality: str) -> list[int]:
    """Seed of one modality's shuffle: ``[seed, crc32(modality name)]``.

    Derived from the name (not the position), so adding, removing or reordering modalities or sources never changes
    another modality's shuffle.
    """
    return [int(seed), zlib.crc32(modality.encode("utf-8"))]


def split_by_modality(cases: Sequence[SourceCase], case_modalities: Sequence[str], modalities: Sequence[str],
                      num_labeled: Mapping[str, Count], num_test: Mapping[str, int | float],
                      seed: int) -> tuple[dict[str, list[int]], dict[str, dict[str, list[int]]]]:
    """Split each modality's cases on its own (:func:`split_cases` rules, the seed of :func:`modality_seed`).

    Args:
        cases: all cases.
        case_modalities: the modality of each case (same length as ``cases``).
        modalities: the modality names, in order.
        num_labeled: per modality, see :func:`resolve_num_labeled`.
        num_test: per modality, see :func:`resolve_num_test`.
        seed: the base seed.

    Returns:
        ``(split, per_modality)``: the split of all cases (indices into ``cases``, each list sorted) and the same per
        modality.

    Raises:
        ConversionError: an impossible request for a modality (a modality without a labelled case included), named
            in the message.
    """
    _check_seed(seed)
    split: dict[str, list[int]] = {"labeled": [], "unlabeled": [], "test": []}
    per_modality: dict[str, dict[str, list[int]]] = {}
    for m in modalities:
        index = [i for i, cm in enumerate(case_modalities) if cm == m]
        subset = [cases[i] for i in index]
        try:
            available = sum(c.label_file is not None for c in subset)
            count = resolve_num_test(num_test[m], available)
            part = _split(subset, num_labeled[m], count, np.random.RandomState(modality_seed(seed, m)))
        except ConversionError as error:
            raise ConversionError(f"modality {m!r} ({len(subset)} cases): {error}") from None
        per_modality[m] = {g: [index[k] for k in part[g]] for g in split}
        for g in split:
            split[g].extend(per_modality[m][g])
    return {g: sorted(v) for g, v in split.items()}, per_modality

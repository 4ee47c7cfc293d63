"""Which cases each run of a label-efficiency study labels, hides and is tested on.

Per seed one permutation of the labelled pool; a run of size ``n`` labels the first ``n`` cases of its seed's
permutation, so the subsets are nested across sizes. The pool cases a run does not label join that run's unlabelled
stream (their labels hidden); the test set is the same for every run. Each (size, seed) is one fold of nnU-Net's
``splits_final.json`` (appended after the folds already there; an identical entry is reused).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class RunSplit:
    """The cases of one (size, seed) run.

    Attributes:
        size: number of labelled cases.
        seed: the permutation's seed.
        labeled: the labelled training cases (sorted).
        hidden: pool cases not labelled in this run (sorted); they are in :attr:`unlabeled`, never in :attr:`labeled`.
        unlabeled: the run's unlabelled stream: the dataset's unlabelled cases plus :attr:`hidden` (sorted).
    """

    size: int
    seed: int
    labeled: tuple[str, ...]
    hidden: tuple[str, ...]
    unlabeled: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"n{self.size}_seed{self.seed}"


def parse_labeled(specs: Sequence[str | int], pool_size: int) -> list[int]:
    """Turn ``--labeled`` values (counts ``"4"`` or fractions of the pool ``"10%"``) into sorted unique counts.

    A fraction is rounded to the nearest count (halves up).

    Raises:
        ValueError: a value that is not a count or percentage, or that gives 0 cases or more than the pool holds.
    """
    if pool_size < 1:
        raise ValueError("The labelled pool (imagesTr/labelsTr) is empty: the study needs labelled cases to choose "
                         "from. Convert the dataset with nnUNetv2_mmssl_convert --num-labeled N.")
    counts = set()
    for spec in specs:
        text = str(spec).strip()
        try:
            if text.endswith("%"):
                percent = float(text[:-1])
                if not math.isfinite(percent):
                    raise ValueError
                count = int(math.floor(percent * pool_size / 100 + 0.5))
                what = f"{text} of the {pool_size} pool cases is {count} case(s)"
            else:
                count = int(text)
                what = f"{count} case(s)"
        except ValueError:
            raise ValueError(f"--labeled {text!r}: not a count (e.g. 4) or a fraction of the pool (e.g. 10%)") from None
        if count < 1:
            raise ValueError(f"--labeled {text}: {what}; a run needs at least 1 labelled case. Use a larger value.")
        if count > pool_size:
            raise ValueError(f"--labeled {text}: {what}, but the pool (imagesTr/labelsTr) holds only {pool_size}. Use "
                             f"at most {pool_size} (or 100%).")
        counts.add(count)
    if not counts:
        raise ValueError("--labeled: give at least one count or fraction, e.g. --labeled 1 2 4")
    return sorted(counts)


def seed_permutation(pool: Iterable[str], seed: int) -> list[str]:
    """The pool's cases in the order of ``seed`` (independent of the order ``pool`` is given in)."""
    cases = sorted(pool)
    order = np.random.default_rng(seed).permutation(len(cases))
    return [cases[i] for i in order]


def plan_runs(pool: Iterable[str], unlabeled: Iterable[str], test: Iterable[str], sizes: Sequence[int],
              seeds: Sequence[int]) -> list[RunSplit]:
    """One :class:`RunSplit` per (size, seed), sizes nested within each seed.

    Args:
        pool: labelled pool (imagesTr/labelsTr identifiers).
        unlabeled: the dataset's unlabelled cases (imagesUnlabeled identifiers), in every run's stream.
        test: test cases (imagesTs); must not overlap the pool or the unlabelled cases.
        sizes: labelled counts (each at most the pool size).
        seeds: permutation seeds.

    Raises:
        ValueError: an identifier in two of pool / unlabelled / test, or a size larger than the pool.
    """
    pool, unlabeled, test = sorted(set(pool)), sorted(set(unlabeled)), sorted(set(test))
    for (name_a, a), (name_b, b) in (((("labelled pool", pool), ("test set", test))),
                                     (("labelled pool", pool), ("unlabelled cases", unlabeled)),
                                     (("unlabelled cases", unlabeled), ("test set", test))):
        common = sorted(set(a) & set(b))
        if common:
            raise ValueError(f"Case(s) {common[:5]} are both in the {name_a} and the {name_b}; each case must be in "
                             f"one of imagesTr, imagesUnlabeled, imagesTs only. Reconvert the dataset.")
    for size in sizes:
        if not 1 <= size <= len(pool):
            raise ValueError(f"{size} labelled cases requested, the pool holds {len(pool)}")
    runs = []
    for seed in seeds:
        order = seed_permutation(pool, seed)
        for size in sorted(set(sizes)):
            labeled = sorted(order[:size])
            hidden = sorted(order[size:])
            runs.append(RunSplit(size, seed, tuple(labeled), tuple(hidden), tuple(sorted(unlabeled + hidden))))
    _refuse_repeated_subsets(runs, len(pool))
    return runs


def _refuse_repeated_subsets(runs: Sequence[RunSplit], pool_size: int) -> None:
    """Two seeds that label the same cases at a size would be one run counted twice (same fold, same model).

    Raises:
        ValueError: naming the seeds and the size, unless the pool has fewer distinct subsets of that size than there
            are seeds (then repeats cannot be avoided and are allowed).
    """
    for size in sorted({r.size for r in runs}):
        mine = [r for r in runs if r.size == size]
        seen: dict[tuple[str, ...], int] = {}
        for run in mine:
            if run.labeled in seen and math.comb(pool_size, size) >= len(mine):
                raise ValueError(f"seeds {seen[run.labeled]} and {run.seed} label the same {size} case(s) "
                                 f"{list(run.labeled)}: the same run twice, not two samples. Use other seeds "
                                 f"(--seeds), e.g. drop seed {run.seed}.")
            seen.setdefault(run.labeled, run.seed)


def assign_folds(splits: list[dict], runs: Sequence[RunSplit]) -> tuple[list[dict], dict[str, int]]:
    """Add one ``splits_final.json`` entry per run (training = validation = its labelled cases).

    Validation on the labelled cases keeps every other label out of the run (the study scores the test set; nnU-Net's
    final validation is skipped). An entry equal to an existing one is reused, so the user's folds keep their indices
    and a rerun finds the same fold numbers.

    Returns:
        (the new list of splits -- ``splits`` itself is not modified --, run name -> fold index)
    """
    new = [dict(s) for s in splits]
    folds = {}
    for run in runs:
        entry = {"train": list(run.labeled), "val": list(run.labeled)}
        for k, existing in enumerate(new):
            if sorted(existing.get("train", [])) == entry["train"] and sorted(existing.get("val", [])) == entry["val"]:
                folds[run.name] = k
                break
        else:
            new.append(entry)
            folds[run.name] = len(new) - 1
    return new, folds

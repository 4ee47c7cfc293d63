"""Which cases each run of a label-efficiency study labels, hides and is tested on.

Per seed one permutation of the labelled pool; a run of size ``n`` labels the first ``n`` cases of its seed's
permutation, so the subsets are nested across sizes. The pool cases a run does not label join that run's unlabelled
stream (their labels hidden); the test set is the same for every run. Each (size, seed) is one fold of nnU-Net's
``splits_final.json`` (appended after the folds already there; an identical entry is reused).

With a cross-validated test set (:func:`plan_cv_runs`, ``--cv K``) the seed's permutation is dealt round robin into
``K`` test folds; the run of fold ``f`` is tested on fold ``f``'s cases and labels the first ``n`` of the *other*
cases in the permutation's order (nested across sizes within a seed and fold). Its test cases are in neither its
labelled cases nor its unlabelled stream, so every pool case is tested once per seed, by a model that never saw it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

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
        test: with ``--cv``, the pool cases this run is tested on (sorted; in none of the lists above); empty for the
            fixed test set (imagesTs).
        cv_fold: with ``--cv``, the index of the test fold (0 .. ``cv_folds`` - 1); None for the fixed test set.
        cv_folds: with ``--cv``, the number of test folds ``K``; None for the fixed test set.
    """

    size: int
    seed: int
    labeled: tuple[str, ...]
    hidden: tuple[str, ...]
    unlabeled: tuple[str, ...]
    test: tuple[str, ...] = ()
    cv_fold: int | None = None
    cv_folds: int | None = None

    @property
    def name(self) -> str:
        """``n<size>_seed<seed>``, with ``--cv`` followed by ``_cv<fold>of<K>``."""
        return f"n{self.size}_seed{self.seed}" + ("" if self.cv_fold is None else f"_{self.test_name}")

    @property
    def test_name(self) -> str:
        """The test set's name: ``cv<fold>of<K>`` (``--cv``; shared by every size of a seed and fold, prefixed by
        the seed where it names a folder), or ``imagesTs``."""
        return "imagesTs" if self.cv_fold is None else f"cv{self.cv_fold}of{self.cv_folds}"


def parse_labeled(specs: Sequence[str | int], pool_size: int,
                  pool_name: str = "the pool (imagesTr/labelsTr)") -> list[int]:
    """Turn ``--labeled`` values (counts ``"4"`` or fractions of the pool ``"10%"``) into sorted unique counts.

    A fraction is rounded to the nearest count (halves up). ``pool_name`` is how messages call the cases counted by
    ``pool_size`` (with ``--cv``: the cases outside the largest test fold).

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
            raise ValueError(f"--labeled {text}: {what}, but {pool_name} holds only {pool_size}. Use at most "
                             f"{pool_size} (or 100%).")
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
    _refuse_overlaps(pool, unlabeled, test)
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
    _refuse_repeated_subsets(runs, lambda size: math.comb(len(pool), size))
    return runs


def _refuse_overlaps(pool: Sequence[str], unlabeled: Sequence[str], test: Sequence[str]) -> None:
    for (name_a, a), (name_b, b) in (((("labelled pool", pool), ("test set", test))),
                                     (("labelled pool", pool), ("unlabelled cases", unlabeled)),
                                     (("unlabelled cases", unlabeled), ("test set", test))):
        common = sorted(set(a) & set(b))
        if common:
            raise ValueError(f"Case(s) {common[:5]} are both in the {name_a} and the {name_b}; each case must be in "
                             f"one of imagesTr, imagesUnlabeled, imagesTs only. Reconvert the dataset.")


def check_cv(folds: int, pool_size: int) -> int:
    """The number of cases outside the largest of ``folds`` test folds of a pool of ``pool_size`` (the most a run
    of ``--cv folds`` can label).

    Raises:
        ValueError: fewer than 2 folds, or more folds than pool cases.
    """
    if folds < 2:
        raise ValueError(f"--cv {folds}: a cross-validated test set needs at least 2 folds. Use --cv 2 or more, or "
                         f"leave --cv out to test on imagesTs.")
    if folds > pool_size:
        raise ValueError(f"--cv {folds}: more folds than the {pool_size} cases of the labelled pool (imagesTr/"
                         f"labelsTr), so a fold would be empty. Use --cv {pool_size} or fewer.")
    return pool_size - math.ceil(pool_size / folds)


def cv_test_folds(pool: Iterable[str], folds: int, seed: int) -> list[tuple[str, ...]]:
    """The ``folds`` test folds of ``seed``: its permutation (:func:`seed_permutation`) dealt round robin (sizes
    differ by at most one, the first folds the larger), each fold sorted."""
    order = seed_permutation(pool, seed)
    return [tuple(sorted(order[f::folds])) for f in range(folds)]


def plan_cv_runs(pool: Iterable[str], unlabeled: Iterable[str], sizes: Sequence[int], seeds: Sequence[int],
                 folds: int) -> list[RunSplit]:
    """One :class:`RunSplit` per (seed, test fold, size) of a ``folds``-fold cross-validated test set.

    In fold ``f`` of a seed the test set is :func:`cv_test_folds`'s ``f``-th fold; the run of size ``n`` labels the
    first ``n`` of the other pool cases in the seed's permutation order (nested across sizes); the other pool cases
    not labelled and the dataset's unlabelled cases are its unlabelled stream. The test cases are in neither: test
    images are not used as unlabelled data.

    Args:
        pool: labelled pool (imagesTr/labelsTr identifiers).
        unlabeled: the dataset's unlabelled cases (imagesUnlabeled identifiers), in every run's stream.
        sizes: labelled counts (each at most the pool size minus the largest fold).
        seeds: permutation seeds.
        folds: ``K`` (2 .. pool size).

    Raises:
        ValueError: a bad ``folds`` (:func:`check_cv`), a pool case among the unlabelled ones, a size larger than
            the cases outside the largest fold, or a run repeated across seeds where avoidable.
    """
    pool, unlabeled = sorted(set(pool)), sorted(set(unlabeled))
    _refuse_overlaps(pool, unlabeled, [])
    most = check_cv(folds, len(pool))
    for size in sizes:
        if not 1 <= size <= most:
            raise ValueError(f"{size} labelled cases requested; with --cv {folds} a run may label at most {most} "
                             f"(the pool's {len(pool)} cases minus its largest test fold)")
    runs = []
    for seed in seeds:
        order = seed_permutation(pool, seed)
        for fold, test in enumerate(cv_test_folds(pool, folds, seed)):
            train = [c for c in order if c not in set(test)]
            for size in sorted(set(sizes)):
                labeled, hidden = sorted(train[:size]), sorted(train[size:])
                runs.append(RunSplit(size, seed, tuple(labeled), tuple(hidden), tuple(sorted(unlabeled + hidden)),
                                     test, fold, folds))
    smallest = len(pool) // folds
    _refuse_repeated_subsets(runs, lambda size: math.comb(len(pool), smallest) * math.comb(len(pool) - smallest, size))
    return runs


def _refuse_repeated_subsets(runs: Sequence[RunSplit], choices: Callable[[int], int]) -> None:
    """Two seeds that label the same cases (and, with ``--cv``, test on the same cases) at a size would be one run
    counted twice (same fold, same model).

    Args:
        runs: the runs.
        choices: size -> how many distinct runs of that size there are (about, with ``--cv``).

    Raises:
        ValueError: naming the seeds and the size, unless there are fewer distinct runs of that size than runs
            (then repeats cannot be avoided and are allowed).
    """
    for size in sorted({r.size for r in runs}):
        mine = [r for r in runs if r.size == size]
        seen: dict[tuple, int] = {}
        for run in mine:
            key = (run.labeled, run.test)
            if key in seen and choices(size) >= len(mine):
                tested = f" and test on {list(run.test)}" if run.test else ""
                raise ValueError(f"seeds {seen[key]} and {run.seed} label the same {size} case(s) "
                                 f"{list(run.labeled)}{tested}: the same run twice, not two samples. Use other seeds "
                                 f"(--seeds), e.g. drop seed {run.seed}.")
            seen.setdefault(key, run.seed)


#: key of a ``--cv`` run's ``splits_final.json`` entry listing its test cases (nnU-Net reads only train and val):
#: two runs labelling the same cases but tested on different ones have different unlabelled streams, so they need
#: two folds
TEST_KEY = "mmssl_study_test"


def assign_folds(splits: list[dict], runs: Sequence[RunSplit]) -> tuple[list[dict], dict[str, int]]:
    """Add one ``splits_final.json`` entry per run (training = validation = its labelled cases).

    Validation on the labelled cases keeps every other label out of the run (the study scores the test set; nnU-Net's
    final validation is skipped). An entry equal to an existing one is reused, so the user's folds keep their indices
    and a rerun finds the same fold numbers. A ``--cv`` run's entry also lists its test cases (:data:`TEST_KEY`).

    Returns:
        (the new list of splits -- ``splits`` itself is not modified --, run name -> fold index)
    """
    new = [dict(s) for s in splits]
    folds = {}
    for run in runs:
        entry = {"train": list(run.labeled), "val": list(run.labeled)}
        if run.cv_fold is not None:
            entry[TEST_KEY] = list(run.test)
        for k, existing in enumerate(new):
            if all(sorted(existing.get(key, [])) == entry.get(key, []) for key in ("train", "val", TEST_KEY)):
                folds[run.name] = k
                break
        else:
            new.append(entry)
            folds[run.name] = len(new) - 1
    return new, folds

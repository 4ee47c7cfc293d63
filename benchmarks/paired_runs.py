#!/usr/bin/env python
"""Paired Dice differences between study result files kept in different folders, with the study's bootstrap.

    python benchmarks/paired_runs.py --arm A=FOLDER --arm B=FOLDER [...] --pair A=B [...] [--size N]

Each ``--arm LABEL=FOLDER`` reads every ``*.json`` result file that ``nnUNetv2_mmssl_study`` wrote into FOLDER (e.g.
``benchmarks/results/brats_cv_study/runs/nnUNetTrainer``) under the name LABEL, so two sets of runs of the *same*
trainer (a re-run, an archived first run) can be compared, or an arm paired with the reference runs it was actually
run beside. Each ``--pair A=B`` prints A − B per size and metric over the (seed, test case) pairs both hold, with
:func:`nnunet_mmssl.study.report.paired_differences` (95 % interval resampling seeds and test cases).
"""

import argparse
import glob
import json
import os
import sys
from collections.abc import Sequence


def read_arm(label: str, folder: str) -> list[dict]:
    """The result files of ``folder``, their ``trainer`` set to ``label``.

    Raises:
        FileNotFoundError: for a folder without result files.
        ValueError: for a file that is not a study result (no trainer, size, seed or per_case).
    """
    files = sorted(glob.glob(os.path.join(folder, "*.json")))
    if not files:
        raise FileNotFoundError(f"--arm {label}={folder}: no result files (*.json) there; give a study's "
                                f"runs/<trainer> folder")
    results = []
    for path in files:
        with open(path) as handle:
            result = json.load(handle)
        missing = [key for key in ("size", "seed", "per_case") if key not in result]
        if missing:
            raise ValueError(f"{path} is not a study result file (no {', '.join(missing)})")
        results.append({**result, "trainer": label})
    return results


def _split(text: str, option: str) -> tuple[str, str]:
    left, sep, right = text.partition("=")
    if not sep or not left or not right:
        raise ValueError(f"{option} {text!r}: write LABEL=VALUE")
    return left, right


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", action="append", required=True, metavar="LABEL=FOLDER")
    parser.add_argument("--pair", action="append", required=True, metavar="A=B")
    parser.add_argument("--size", type=int, default=None, help="only this number of labelled cases")
    parser.add_argument("--metric", default="dice", help="dice (default), hd95 or sensitivity")
    parser.add_argument("--bootstrap", type=int, default=10000)
    args = parser.parse_args(argv)
    from nnunet_mmssl.study.report import paired_differences

    try:
        results = []
        labels = set()
        for arm in args.arm:
            label, folder = _split(arm, "--arm")
            labels.add(label)
            results += read_arm(label, folder)
        pairs = [_split(pair, "--pair") for pair in args.pair]
        unknown = sorted({name for pair in pairs for name in pair} - labels)
        if unknown:
            raise ValueError(f"--pair names {', '.join(unknown)}, not an --arm label ({', '.join(sorted(labels))})")
    except (FileNotFoundError, ValueError) as error:
        print(f"paired_runs: {error}", file=sys.stderr)
        return 2
    if args.size is not None:
        results = [r for r in results if int(r["size"]) == args.size]
    for d in paired_differences(results, pairs, n_resamples=args.bootstrap):
        if d["metric"] != args.metric:
            continue
        print(f"{d['ssl']} - {d['supervised']}  {d['size']} labelled: {d['mean_difference']:+.3f} "
              f"[{d['low']:+.3f}, {d['high']:+.3f}] ({d['n_pairs']} pairs: {d['n_rows']} seeds x "
              f"{d['n_cols']} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Score the pseudo-labels of a study's self-training arm against the hidden truth of the pool cases.

``nnUNetv2_mmssl_study --cv K --selftrain T`` pseudo-labels each run's unlabelled stream: the labelled pool cases the
run does not label (their labels hidden from training, but they exist) and the dataset's unlabelled cases (no labels).
For the hidden pool cases this script compares the pseudo-label (nnU-Net's preprocessed space, ``<case>_seg.b2nd`` in
the run's data folder) with the true label of the same preprocessed space (``<plans data identifier>/<case>_seg.b2nd``)
and prints, per run and overall: Dice of the pseudo-foreground (ignored voxels counted as background), the share of
the voxels inside the brain (label >= 0) that carry the ignore label, and the share of the wrongly labelled voxels the
ignore label caught.

    python benchmarks/pseudolabel_quality.py STUDY_FOLDER PREPROCESSED_DATA_FOLDER [--trainer nnUNetTrainer]

Binary (whole-tumour) datasets only: label 1 is the foreground, the manifest names the ignore label.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np


def case_scores(pseudo: np.ndarray, truth: np.ndarray, ignore: int) -> dict[str, float]:
    """Dice of the pseudo foreground (label 1; ignored voxels as background) against the truth's (> 0) inside the
    brain (truth >= 0), the ignored share of the voxels inside, and the Dice over the voxels the student's loss sees
    (inside and not ignored). The teacher's argmax under the ignore label is not stored, so how many of its errors the
    ignore label caught cannot be read from the data folder."""
    inside = truth >= 0
    ignored = (pseudo == ignore) & inside
    seen = inside & ~ignored
    predicted = (pseudo == 1) & inside
    actual = (truth > 0) & inside

    def dice(mask: np.ndarray) -> float:
        denominator = (predicted & mask).sum() + (actual & mask).sum()
        return float(2 * (predicted & actual & mask).sum() / denominator) if denominator else float("nan")

    return {"dice": dice(inside), "ignored": float(ignored.sum() / max(int(inside.sum()), 1)),
            "dice_seen": dice(seen)}


def main(argv: list[str] | None = None) -> int:
    import blosc2

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study")
    parser.add_argument("preprocessed_data", help="nnU-Net's preprocessed data folder of the study's plans and "
                                                  "configuration (e.g. .../Dataset501_X/nnUNetPlans_2d)")
    parser.add_argument("--trainer", default="nnUNetTrainer")
    args = parser.parse_args(argv)
    manifests = sorted(glob.glob(os.path.join(args.study, "selftrain", args.trainer, "fold_*.selftrain.json")))
    if not manifests:
        print(f"{args.study}/selftrain/{args.trainer}: no self-training manifests", file=sys.stderr)
        return 2
    rows = []
    for manifest_file in manifests:
        with open(manifest_file) as handle:
            manifest = json.load(handle)
        folder = manifest_file[:-len(".selftrain.json")]
        for case in manifest["pseudo_labelled_cases"]:
            truth_file = os.path.join(args.preprocessed_data, case + "_seg.b2nd")
            if not os.path.isfile(truth_file):
                continue  # an unlabelled case of the dataset: no truth
            pseudo = np.asarray(blosc2.open(os.path.join(folder, case + "_seg.b2nd"))[:])
            truth = np.asarray(blosc2.open(truth_file)[:])
            rows.append({"run": os.path.basename(folder), "case": case,
                         **case_scores(pseudo, truth, int(manifest["ignore_label"]))})
    if not rows:
        print("no pseudo-labelled case has a label in the preprocessed data folder", file=sys.stderr)
        return 2
    for key in ("dice", "ignored", "dice_seen"):
        values = np.array([r[key] for r in rows])
        print(f"{key:13s} median {np.nanmedian(values):.3f}  range {np.nanmin(values):.3f}-{np.nanmax(values):.3f}"
              f"  ({len(values)} pseudo-labelled hidden pool cases over {len(manifests)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

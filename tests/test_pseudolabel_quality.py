"""benchmarks/pseudolabel_quality.py: the pseudo-label scores, hand-computed."""

import importlib.util
import os

import numpy as np

_SPEC = importlib.util.spec_from_file_location(
    "pseudolabel_quality", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "pseudolabel_quality.py"))
quality = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(quality)


def test_case_scores_by_hand():
    # 10 voxels: 2 outside the brain (truth -1), 8 inside; ignore label 2
    truth = np.array([-1, -1, 1, 1, 1, 0, 0, 0, 0, 1])
    pseudo = np.array([1, 2, 1, 1, 0, 1, 2, 0, 0, 2])
    scores = quality.case_scores(pseudo, truth, ignore=2)
    # inside: predicted fg at 2, 3, 5; actual fg at 2, 3, 4, 9 -> 2 * 2 / (3 + 4)
    assert scores["dice"] == 4 / 7
    # ignored inside: voxels 6 and 9 of 8 (voxel 1 is outside)
    assert scores["ignored"] == 2 / 8
    # seen (inside, not ignored): 2, 3, 4, 5, 7, 8 -> predicted 2, 3, 5; actual 2, 3, 4 -> 2 * 2 / (3 + 3)
    assert scores["dice_seen"] == 4 / 6

"""One converted, planned and preprocessed two-modality phantom per test session, copied by every slow test that
needs such a dataset (tests/conftest.py's ``planned_phantom``): conversion and planning once instead of once per test.

Built through our console scripts, as a user would: ``nnUNetv2_mmssl_convert`` (MRA, MRB; 5 labelled cases: 3
training + 2 test; 3 unlabelled; 12 x 32 x 32 at 2 x 1 x 1 mm) -> ``nnUNetv2_mmssl_plan_and_preprocess -c 2d
3d_fullres``. Tests never write into the built folders: ``copy_into`` gives each its own copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from console_harness import console_environment, run_console

DATASET_ID = 901
DATASET = "Dataset901_ITest"


def build(root: Path) -> Path:
    """Convert and plan the phantom under ``root`` (``raw/``, ``preprocessed/``); returns ``root``."""
    from nnunet_mmssl.dataset_conversion.phantom import make_phantom_cases

    env = console_environment(root, "no_trainers.py", "")
    src = make_phantom_cases(root / "phantom", num_labeled=5, num_unlabeled=3, shape=(12, 32, 32),
                             spacing=(2.0, 1.0, 1.0), seed=3)
    run_console(["nnUNetv2_mmssl_convert", "-i", str(src / "labeled"), str(src / "unlabeled"), "--modality",
                 "MRA=MRA.nii.gz", "--modality", "MRB=MRB.nii.gz", "--label", "seg.nii.gz", "--num-labeled", "3",
                 "--num-test", "2", "-d", str(DATASET_ID), "-n", "ITest", "-o", env["nnUNet_raw"]], env)
    run_console(["nnUNetv2_mmssl_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-np", "1"],
                env)
    return root


def copy_into(built: Path, root: Path) -> None:
    """``built``'s ``raw/`` and ``preprocessed/`` copied under ``root`` (a test's own folder)."""
    for sub in ("raw", "preprocessed"):
        shutil.copytree(built / sub, root / sub)

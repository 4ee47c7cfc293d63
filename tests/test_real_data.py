"""The README's commands on the real BraTS data in ../shared/data (skipped when it is absent; slow)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _readme_convert_command() -> list[str]:
    """The README's real-data ``nnUNetv2_mmssl_convert`` command, as a user would paste it."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^ *(nnUNetv2_mmssl_convert -i \.\./shared/data/.*?)\n *# ->", text, re.M | re.S)
    assert match, "the README must show the real-data conversion command"
    return shlex.split(match.group(1).replace("\\\n", " "))


def test_readme_conversion_of_the_real_data(shared_data, tmp_path):
    command = _readme_convert_command()
    command = [str(shared_data / a[len("../shared/data/"):]) if a.startswith("../shared/data/") else a
               for a in command]
    result = subprocess.run(command + ["-o", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    dataset = tmp_path / "Dataset501_BraTSFlairT1"
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "FLAIR", "1": "T1"}
    assert dataset_json["numTraining"] == 3 and dataset_json["numUnlabeled"] == 9
    assert len(list((dataset / "labelsTr").glob("*.nii.gz"))) == 3
    assert len(list((dataset / "labelsTs").glob("*.nii.gz"))) == 2
    unlabelled = sorted(p.name for p in (dataset / "imagesUnlabeled").glob("*.nii.gz"))
    assert len(unlabelled) == 18 and all(n.endswith(("_0000.nii.gz", "_0001.nii.gz")) for n in unlabelled)
    # all four naming schemes of the unlabelled source were matched
    split = json.dumps(json.loads((dataset / "mmssl_split.json").read_text()))
    for case in ("BraTS-GLI-00001-000", "BraTS-MET-00110-000", "TCGA-DU-7294", "TCGA-FG-6692"):
        assert case in split


def test_real_data_run_trains_predicts_and_scores(shared_data, tmp_path):
    """benchmarks/real_data_run.py, tiny budget: convert -> plan (3 mm) -> nnUNetv2_train -> predict -> evaluate."""
    env = dict(os.environ, nnUNet_n_proc_DA="1")
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "real_data_run.py"), "--data", str(shared_data), "--workdir",
         str(out), "-c", "2d", "--spacing", "3", "3", "3", "--batch-size", "2", "--epochs", "1", "--iterations", "2",
         "--val-iterations", "1", "-tr", "nnUNetTrainer", "MemCifSSLTrainer"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["results"]) == {"nnUNetTrainer", "MemCifSSLTrainer"}
    assert set(summary["results"]["MemCifSSLTrainer"]["evaluation"]) == {"fused", "head_0_FLAIR", "head_1_T1"}
    for trainer, row in summary["results"].items():
        assert row["epochs"] == 1 and row["seconds_per_epoch"] > 0
        for evaluation in row["evaluation"].values():
            assert evaluation["n_cases"] == 2
            dice = next(iter(evaluation["mean"].values()))["dice"]
            assert 0.0 <= dice <= 1.0, (trainer, dice)
    assert "MemCifSSLTrainer" in summary["table"] and "s/epoch" in summary["table"]

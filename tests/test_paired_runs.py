"""benchmarks/paired_runs.py: result files from different folders paired by (seed, test case), hand-computed."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "paired_runs.py")


def write_arm(folder: Path, trainer: str, dice: dict) -> None:
    """dice: {(seed, case): value}; one result file per seed (one fold holding both cases)."""
    folder.mkdir(parents=True)
    for seed in sorted({s for s, _ in dice}):
        per_case = {case: {"dice": value, "hd95": 1.0, "sensitivity": 0.5}
                    for (s, case), value in dice.items() if s == seed}
        (folder / f"n1_seed{seed}.json").write_text(json.dumps({
            "trainer": trainer, "size": 1, "seed": seed, "fold": seed, "per_case": per_case}))


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120)


def test_same_trainer_from_two_folders_paired_by_seed_and_case(tmp_path):
    first = {(0, "a"): 0.8, (0, "b"): 0.6, (1, "a"): 0.7, (1, "b"): 0.5}
    again = {(0, "a"): 0.7, (0, "b"): 0.6, (1, "a"): 0.4, (1, "b"): 0.5, (1, "c"): 0.9}  # c: only in one arm
    write_arm(tmp_path / "first", "nnUNetTrainer", first)
    write_arm(tmp_path / "again", "nnUNetTrainer", again)
    done = run("--arm", f"again={tmp_path / 'again'}", "--arm", f"first={tmp_path / 'first'}",
               "--pair", "again=first", "--bootstrap", "200")
    assert done.returncode == 0, done.stderr
    # (0.7-0.8 + 0 + 0.4-0.7 + 0) / 4 = -0.1 over the 4 common (seed, case) pairs
    assert done.stdout.startswith("again - first  1 labelled: -0.100 [")
    assert "(4 pairs: 2 seeds x 2 cases)" in done.stdout


def test_bad_arguments_are_refused_naming_them(tmp_path):
    write_arm(tmp_path / "first", "nnUNetTrainer", {(0, "a"): 0.8})
    (tmp_path / "empty").mkdir()
    done = run("--arm", f"first={tmp_path / 'first'}", "--pair", "first=other")
    assert done.returncode == 2 and "--pair names other, not an --arm label (first)" in done.stderr
    done = run("--arm", f"e={tmp_path / 'empty'}", "--pair", "e=e")
    assert done.returncode == 2 and "no result files" in done.stderr and "empty" in done.stderr
    (tmp_path / "first" / "junk.json").write_text("{}")
    done = run("--arm", f"first={tmp_path / 'first'}", "--pair", "first=first")
    assert done.returncode == 2 and "junk.json is not a study result file" in done.stderr
    done = run("--arm", "nolabel", "--pair", "a=b")
    assert done.returncode == 2 and "write LABEL=VALUE" in done.stderr

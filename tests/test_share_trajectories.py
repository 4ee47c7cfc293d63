"""benchmarks/share_trajectories.py: the share statistics of a run's logging, by hand-computed values, and the
command on real checkpoint files (read without running code from them)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import share_trajectories as st  # noqa: E402


def test_summary_by_hand():
    # epoch 1 is NaN (skipped), epoch 3 is 0 (skipped); the last 3 finite epochs are 2, 4 and 5 with shares
    # 0.1, 0.4, 0.2: geometric (0.1*0.4*0.2)^(1/3) = 0.2, arithmetic 0.7/3
    logging = {"unsup_grad_shares": [0.05, float("nan"), 0.1, 0.0, 0.4, 0.2],
               "unsup_weights": [1.0, 1.5, 2.0, 2.0, 3.0, 2.5], "unsup_share_targets": [0.2] * 6}
    s = st.share_summary(logging, last=3)
    assert s["epochs"] == 3 and s["shares"] == [0.1, 0.4, 0.2]
    assert s["geometric"] == pytest.approx(0.2)
    assert s["arithmetic"] == pytest.approx(0.7 / 3)
    assert s["ratio"] == pytest.approx(0.7 / 3 / 0.2)
    logs = [math.log(0.1), math.log(0.4), math.log(0.2)]  # mean log(0.2)
    assert s["scatter"] == pytest.approx(math.sqrt(sum((x - math.log(0.2)) ** 2 for x in logs) / 2))
    # slope of log share over epochs 2, 4, 5 (mean 11/3): least squares by hand
    xs = [2, 4, 5]
    mx = 11 / 3
    slope = sum((x - mx) * (y - math.log(0.2)) for x, y in zip(xs, logs)) / sum((x - mx) ** 2 for x in xs)
    assert s["slope"] == pytest.approx(slope) and s["slope"] > 0
    assert s["target"] == 0.2 and s["weight"] == 2.5


def test_summary_without_shares_or_with_too_few_epochs():
    assert st.share_summary({}) is None
    assert st.share_summary({"unsup_grad_shares": [float("nan"), 0.3]}) is None  # one finite epoch
    with pytest.raises(ValueError, match="--last 1"):
        st.share_summary({"unsup_grad_shares": [0.1, 0.2]}, last=1)
    s = st.share_summary({"unsup_grad_shares": [0.1, 0.1, 0.1]})
    assert s["target"] is None and s["weight"] is None and s["scatter"] == 0 and s["slope"] == pytest.approx(0)


def test_command_reads_checkpoints_and_draws(tmp_path):
    run = tmp_path / "Dataset501_X" / "MemCifSSLTrainer_share0p2__nnUNetPlans__2d" / "fold_5"
    run.mkdir(parents=True)
    torch.save({"logging": {"unsup_grad_shares": [0.1, 0.4, 0.2], "unsup_weights": [1.0, 2.0, 3.0],
                            "unsup_share_targets": [0.2] * 3}}, run / "checkpoint_final.pth")
    plain = tmp_path / "Dataset501_X" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_5"
    plain.mkdir(parents=True)
    torch.save({"logging": {"train_losses": [1.0]}}, plain / "checkpoint_final.pth")  # nnU-Net's: no share
    png = tmp_path / "shares.png"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "share_trajectories.py"), str(tmp_path),
                           "--png", str(png)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "fold_5" in line]
    assert len(lines) == 1 and lines[0].startswith("MemCifSSLTrainer_share0p2__nnUNetPlans__2d/fold_5")
    assert lines[0].split()[1:4] == ["0.2", "0.2000", f"{0.7 / 3:.4f}"]
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "share_trajectories.py"),
                              str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nope does not exist" in missing.stderr


def test_legend_names_the_whole_fold():
    # the legend once cut the last 6 characters of the run name: fold_10 read "old_10", fold_all "ld_all"
    for fold in ("fold_3", "fold_10", "fold_all"):
        assert st.legend_label(f"MemCifSSLTrainer_share0p2__study__nnUNetPlans_bs4__2d/{fold}") == \
            f"MemCifSSLTrainer_share0p2 {fold}"
    assert st.legend_label("checkpoint_final.pth") == "checkpoint_final.pth"


def test_failed_png_write_leaves_nothing(tmp_path):
    # a short write (full disk): the error surfaces, no PNG is published and no partial file stays behind
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunet_mmssl.study.report import save_png

    fig, _ = plt.subplots()

    def short_write(name, **_):
        with open(name, "wb") as handle:
            handle.write(b"\x89PNG")
        raise OSError(28, "No space left on device")

    fig.savefig = short_write
    with pytest.raises(OSError, match="No space"):
        save_png(fig, str(tmp_path / "shares.png"))
    assert list(tmp_path.iterdir()) == []

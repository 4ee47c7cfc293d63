"""benchmarks/missing_subsets_run.py: the side-by-side table of trainers over modality subsets."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import missing_subsets_run as run  # noqa: E402


def _summary(dice_both, dice_a, dice_b):
    subsets = [{"key": "11_A+B", "present_names": ["A", "B"], "foreground_mean": {"dice": dice_both, "hd95": 3.0}},
               {"key": "10_A", "present_names": ["A"], "foreground_mean": {"dice": dice_a, "hd95": None}},
               {"key": "01_B", "present_names": ["B"], "foreground_mean": {"dice": dice_b, "hd95": 9.0}}]
    mean = (dice_both + dice_a + dice_b) / 3
    return {"subsets": subsets, "average_foreground_mean": {"dice": mean, "hd95": 6.0}, "n_cases": 2}


def test_rows_per_trainer_columns_per_subset_and_mean():
    summaries = {"SMMLTrainer": _summary(0.8, 0.7, 0.6), "nnUNetTrainer": _summary(0.82, 0.1, 0.3)}
    stds = {"SMMLTrainer": {"11_A+B": {"dice": 0.05, "hd95": 1.0}}}
    table = run.comparison_table(summaries, stds, "dice").splitlines()
    assert table[0].split() == ["trainer", "A+B", "A", "B", "mean"]
    assert table[2].split() == ["SMMLTrainer", "80.0±5.0", "70.0", "60.0", "70.0"]
    assert table[3].split() == ["nnUNetTrainer", "82.0", "10.0", "30.0", "40.7"]
    hd95 = run.comparison_table(summaries, {}, "hd95").splitlines()
    assert hd95[2].split() == ["SMMLTrainer", "3.0", "n/a", "9.0", "6.0"]


def test_model_folder_is_real_data_runs():
    folder = run.model_folder("/r", "SMMLTrainer", "nnUNetPlans_bs4", "2d")
    assert folder == "/r/Dataset501_BraTSFlairT1/SMMLTrainer__budget__nnUNetPlans_bs4__2d"
    assert run.model_folder("/r", "X", "P", "2d", "ms_lesion_4mod") == "/r/Dataset504_MSLesion4Mod/X__budget__P__2d"

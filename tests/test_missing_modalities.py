"""Prediction with modalities missing (``--missing``) and the evaluation over every modality subset (issue: SMML,
items 3 and 4; METHODS.md section 4, SMML's Table 1).

Fast tests: channel resolution, the input-folder check, the zeroing after normalisation (values, through nnU-Net's
own preprocessing), SMML's mask hook, every trainer's network ignoring an absent channel, the subset enumeration, the
table layout, resume and the heat map (with a stand-in predictor). One slow test runs both console scripts end to end
on a tiny SMML model folder.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

sys.path.insert(0, os.path.dirname(__file__))

from nnunet_mmssl.dataloading.image_checks import ImageFileError, check_input_folder  # noqa: E402
from nnunet_mmssl.dataloading.unlabeled_preprocessing import UnlabeledDataError, find_cases  # noqa: E402
from nnunet_mmssl.evaluation.missing_modalities import (  # noqa: E402
    HEATMAP_NAME,
    SCORES_NAME,
    SUBSETS_FOLDER,
    SUMMARY_NAME,
    TABLE_NAME,
    evaluate_missing_modalities,
    format_missing_table,
    modality_subsets,
    subset_key,
)
from nnunet_mmssl.inference.missing import (  # noqa: E402
    MissingModalityError,
    MissingModalityPredictor,
    resolve_missing_channels,
)

CHANNELS3 = {"0": "T1", "1": "T2", "2": "FLAIR"}
from plans_fixtures import RESAMPLING  # noqa: E402


def write(path: Path, array: np.ndarray, dtype=np.float32) -> Path:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=dtype))
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def dataset_json(channels: dict) -> dict:
    return {"channel_names": dict(channels), "labels": {"background": 0, "lesion": 1}, "numTraining": 2,
            "file_ending": ".nii.gz"}


# ------------------------------------------------------------------------------------------------------------------
# channel resolution
# ------------------------------------------------------------------------------------------------------------------

def test_resolve_missing_channels_by_name_and_index():
    assert resolve_missing_channels(["T2"], CHANNELS3) == (1,)
    assert resolve_missing_channels(["FLAIR", "0"], CHANNELS3) == (0, 2)
    assert resolve_missing_channels([2, "flair", "T1"], CHANNELS3) == (0, 2)  # int, case-insensitive, duplicates
    assert resolve_missing_channels([], CHANNELS3) == ()


@pytest.mark.parametrize("specs, expected", [
    (["T3"], ["'T3'", "0 (T1), 1 (T2), 2 (FLAIR)"]),
    (["3"], ["'3'", "0 (T1), 1 (T2), 2 (FLAIR)"]),
    (["T1", "T2", "FLAIR"], ["every channel missing", "at least one must be present"]),
    (["0", "1", "flair"], ["every channel missing"]),
])
def test_resolve_missing_channels_errors(specs, expected):
    with pytest.raises(MissingModalityError) as info:
        resolve_missing_channels(specs, CHANNELS3)
    for text in expected:
        assert text in str(info.value)


def test_single_channel_model_cannot_drop_its_channel():
    with pytest.raises(MissingModalityError, match="every channel missing"):
        resolve_missing_channels(["CT"], {"0": "CT"})


# ------------------------------------------------------------------------------------------------------------------
# the input folder check
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def three_channel_folder(tmp_path) -> Path:
    """case0 with all three channels, case1 without its T2 file (channel 1)."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for case, channels in (("case0", (0, 1, 2)), ("case1", (0, 2))):
        for c in channels:
            write(folder / f"{case}_{c:04d}.nii.gz", rng.normal(100, 10, (3, 8, 8)))
    return folder


def test_input_check_accepts_exactly_the_declared_absent_files(three_channel_folder):
    folder = three_channel_folder
    js = dataset_json(CHANNELS3)
    with pytest.raises(UnlabeledDataError) as info:
        check_input_folder(folder, js)
    assert "'case1'" in str(info.value) and "case1_0001.nii.gz" in str(info.value) and "--missing" in str(info.value)
    cases = check_input_folder(folder, js, absent_channels=(1,))
    assert cases == {"case0": [str(folder / "case0_0000.nii.gz"), str(folder / "case0_0002.nii.gz")],
                     "case1": [str(folder / "case1_0000.nii.gz"), str(folder / "case1_0002.nii.gz")]}
    # another absent file is still an error, naming the file
    (folder / "case0_0002.nii.gz").unlink()
    with pytest.raises(UnlabeledDataError) as info:
        check_input_folder(folder, js, absent_channels=(1,))
    assert "'case0'" in str(info.value) and "case0_0002.nii.gz" in str(info.value)
    assert "lacks channel(s) [2]" in str(info.value)
    # a case with nothing but a file of an absent channel lacks the present ones
    assert find_cases(str(folder), js, absent_channels=(1, 2))["case1"] == [str(folder / "case1_0000.nii.gz")]


def test_a_declared_missing_file_is_never_read(three_channel_folder):
    folder = three_channel_folder
    for path in folder.glob("case1_*"):
        path.unlink()
    (folder / "case0_0001.nii.gz").write_bytes(b"<html>not an image</html>")
    js = dataset_json(CHANNELS3)
    with pytest.raises(ImageFileError, match="case0_0001.nii.gz"):
        check_input_folder(folder, js, absent_channels=(2,))
    assert list(check_input_folder(folder, js, absent_channels=(1,))) == ["case0"]


# ------------------------------------------------------------------------------------------------------------------
# zeroing after normalisation, through nnU-Net's preprocessing
# ------------------------------------------------------------------------------------------------------------------

CT_PROPERTIES = {"max": 1000.0, "mean": 100.0, "median": 100.0, "min": 0.0, "percentile_00_5": 0.0,
                 "percentile_99_5": 400.0, "std": 10.0}


def _ct_plans(num_channels: int) -> dict:
    from plans_fixtures import ARCH_2D

    return {"dataset_name": "Dataset990_Missing", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": [3, 16, 16],
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {str(c): CT_PROPERTIES for c in range(num_channels)},
            "configurations": {"2d": {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
                                      "batch_size": 2, "patch_size": [16, 16], "median_image_size_in_voxels": [16, 16],
                                      "spacing": [1.0, 1.0],
                                      "normalization_schemes": ["CTNormalization"] * num_channels,
                                      "use_mask_for_norm": [False] * num_channels, "batch_dice": True,
                                      "architecture": copy.deepcopy(ARCH_2D), **RESAMPLING}}}


def _block(value: float, lo: int, hi: int, shape=(3, 16, 16)) -> np.ndarray:
    array = np.zeros(shape, dtype=np.float32)
    array[:, lo:hi, lo:hi] = value + np.arange(hi - lo, dtype=np.float32)[None, None, :]
    return array


def test_absent_channel_is_zero_after_normalisation(tmp_path, monkeypatch):
    """CT normalisation maps raw 0 to (0 - 100) / 10 = -10, so zeroing before it would show; the present channels
    keep nnU-Net's normalised values, and the crop to the nonzero region is that of the present channels -- the
    same whether the absent channel's file is missing or there (it is never read)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    t1, flair = _block(150.0, 4, 12), _block(250.0, 5, 11)
    t2_everywhere = np.full((3, 16, 16), 300.0, dtype=np.float32)  # would widen the crop if it were read
    without, with_file = tmp_path / "without", tmp_path / "with"
    for folder in (without, with_file):
        folder.mkdir()
        write(folder / "p_0000.nii.gz", t1)
        write(folder / "p_0002.nii.gz", flair)
    write(with_file / "p_0001.nii.gz", t2_everywhere)

    seen = []

    def record(self, data):
        seen.append(data.clone())
        return torch.zeros((2, *data.shape[1:]))

    monkeypatch.setattr(nnUNetPredictor, "predict_logits_from_preprocessed_data", record)
    plans = PlansManager(_ct_plans(3))
    predictor = MissingModalityPredictor(use_mirroring=False, perform_everything_on_device=False,
                                         device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(torch.nn.Identity(), plans, plans.get_configuration("2d"), [{}],
                                    dataset_json(CHANNELS3), "nnUNetTrainer", None)
    assert predictor.set_missing_channels(["T2"]) == (1,)
    for folder in (without, with_file):
        predictor.predict_from_files_sequential(str(folder), None)
    assert len(seen) == 2
    expected_t1 = (np.clip(t1[:, 4:12, 4:12], 0, 400) - 100) / 10
    expected_flair = (np.clip(flair[:, 4:12, 4:12], 0, 400) - 100) / 10
    for data in seen:
        assert tuple(data.shape) == (3, 3, 8, 8)  # cropped to T1's nonzero box, the union of the present channels
        assert torch.count_nonzero(data[1]) == 0
        np.testing.assert_allclose(data[0].numpy(), expected_t1, atol=1e-4)
        np.testing.assert_allclose(data[2].numpy(), expected_flair, atol=1e-4)
    # without --missing the same predictor reads the file and feeds the real T2
    predictor.set_missing_channels(None)
    predictor.predict_from_files_sequential(str(with_file), None)
    assert tuple(seen[-1].shape) == (3, 3, 16, 16) and torch.allclose(seen[-1][1], torch.tensor(20.0))


def test_zeroing_does_not_touch_the_callers_tensor():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(_ct_plans(3))
    predictor = MissingModalityPredictor(use_mirroring=False, perform_everything_on_device=False,
                                         device=torch.device("cpu"), allow_tqdm=False)

    class Sum(torch.nn.Module):  # logits = per-pixel sum of the channels it is given, twice
        def forward(self, x):
            return torch.cat([x.sum(1, keepdim=True), -x.sum(1, keepdim=True)], 1)

    predictor.manual_initialization(Sum(), plans, plans.get_configuration("2d"), [{}], dataset_json(CHANNELS3),
                                    "nnUNetTrainer", None)
    predictor.set_missing_channels([0, "FLAIR"])
    data = torch.rand(3, 2, 16, 16) + 1
    original = data.clone()
    logits = predictor.predict_logits_from_preprocessed_data(data)
    assert torch.equal(data, original)
    torch.testing.assert_close(logits[0].float(), data[1], atol=0.05, rtol=0)  # only T2 reached the network


# ------------------------------------------------------------------------------------------------------------------
# every trainer of ours and stock nnU-Net: model folders with random weights
# ------------------------------------------------------------------------------------------------------------------

TRAINER_NAMES = ["nnUNetTrainer", "MemCifSSLTrainer", "MMFMCMLTrainer", "MeanTeacherTrainer",
                 "PlainSupervisedTrainer", "SMMLTrainer", "ModalityDropoutTrainer"]


@pytest.fixture(scope="module")
def harness():
    import trainer_harness

    trainer_harness.set_folders(tempfile.mkdtemp(prefix="missing-test-"))
    return trainer_harness


def model_folder(harness, trainer_name: str, folder: Path, seed: int = 0) -> Path:
    """A model folder of ``trainer_name`` on the fixture plans (2 channels A, B; 2d), fold_0 with random weights
    (nnU-Net's initialisation plus noise)."""
    from plans_fixtures import DATASET_JSON

    import nnunet_mmssl.trainers as trainers

    plans = harness.plans()
    plans["foreground_intensity_properties_per_channel"] = {"0": CT_PROPERTIES, "1": CT_PROPERTIES}
    plans["configurations"]["2d"].update(RESAMPLING, median_image_size_in_voxels=[16, 16])
    if trainer_name == "nnUNetTrainer":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as trainer_class
    else:
        trainer_class = getattr(trainers, trainer_name)
    torch.manual_seed(seed)
    trainer = trainer_class(plans, "2d", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.initialize()
    network = getattr(trainer, "network_module", None) or trainer.network
    with torch.no_grad():  # as after training: norm biases away from 0 (an untrained encoder maps a zero image to 0)
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(trainer.plans_manager.plans))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    torch.save({"trainer_name": trainer_name, "init_args": {"configuration": "2d"},
                "network_weights": network.state_dict(), "inference_allowed_mirroring_axes": (0, 1)},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


def loaded_predictor(folder: Path) -> MissingModalityPredictor:
    predictor = MissingModalityPredictor(use_mirroring=False, perform_everything_on_device=False,
                                         device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), [0], "checkpoint_final.pth")
    return predictor


@pytest.mark.parametrize("trainer_name", TRAINER_NAMES)
def test_every_trainer_ignores_the_absent_channel(harness, trainer_name, tmp_path):
    """The absent channel's preprocessed values do not reach the prediction; the present one still does."""
    predictor = loaded_predictor(model_folder(harness, trainer_name, tmp_path / trainer_name))
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(2, 1, 16, 16, generator=generator)
    other_b = data.clone()
    other_b[1] = torch.randn(1, 16, 16, generator=generator) * 3
    other_a = data.clone()
    other_a[0] = torch.randn(1, 16, 16, generator=generator) * 3
    full = predictor.predict_logits_from_preprocessed_data(data)
    assert not torch.allclose(full, predictor.predict_logits_from_preprocessed_data(other_b))  # B matters when there
    predictor.set_missing_channels(["B"])
    without_b = predictor.predict_logits_from_preprocessed_data(data)
    assert torch.equal(without_b, predictor.predict_logits_from_preprocessed_data(other_b))
    assert not torch.allclose(without_b, predictor.predict_logits_from_preprocessed_data(other_a))
    assert not torch.allclose(without_b, full)


def test_smml_network_is_told_the_missing_channels(harness, tmp_path, monkeypatch):
    from nnunet_mmssl.architectures.smml import SMMLNet

    calls = []
    original = SMMLNet.set_missing_modalities
    monkeypatch.setattr(SMMLNet, "set_missing_modalities",
                        lambda self, channels: (calls.append(channels), original(self, channels))[1])
    folder = model_folder(harness, "SMMLTrainer", tmp_path / "smml")
    predictor = loaded_predictor(folder)
    assert calls == [None]  # initialised with every modality present
    predictor.set_missing_channels(["B"])
    network = predictor.network
    assert calls[-1] == [1] and network.inference_mask.tolist() == [True, False]
    # the mask, not only the zeroed input: the same zeroed input without the mask predicts differently
    data = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    masked = predictor.predict_logits_from_preprocessed_data(data)
    zeroed = data.clone()
    zeroed[1] = 0
    network.set_missing_modalities(None)
    with torch.no_grad():
        assert not torch.allclose(masked, predictor.predict_sliding_window_return_logits(zeroed))
    predictor.set_missing_channels([])
    assert calls[-1] is None and network.inference_mask is None
    # a predictor told before it loads a model applies the mask when it does
    early = MissingModalityPredictor(device=torch.device("cpu"), allow_tqdm=False)
    early.missing_channels = (0,)
    early.initialize_from_trained_model_folder(str(folder), [0], "checkpoint_final.pth")
    assert early.network.inference_mask.tolist() == [False, True]


def test_predict_cli_missing_options(harness, tmp_path, capsys, monkeypatch):
    """``--missing``: unknown or all channels are one-line errors; a declared absent file is accepted, another is not;
    the predictor gets the channels."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_mmssl.cli.predict import PROG, main

    folder = model_folder(harness, "SMMLTrainer", tmp_path / "results" / "SMMLTrainer__nnUNetPlans__2d")
    inputs = tmp_path / "in"
    inputs.mkdir()
    write(inputs / "c_0000.nii.gz", _block(150.0, 4, 12))
    seen = {}

    def fake(self, source, output_folder, **kwargs):
        seen["missing"] = self.missing_channels
        seen["mask"] = self.network.inference_mask.tolist()
        write(Path(output_folder, "c.nii.gz"), np.zeros((4, 12, 12)), dtype=np.uint8)  # read back by predict

    monkeypatch.setattr(nnUNetPredictor, "predict_from_files", fake)
    base = ["-i", str(inputs), "-m", str(folder), "-f", "0", "-device", "cpu"]
    for missing, expected in ((["C"], ["'C'", "0 (A), 1 (B)"]), (["A", "1"], ["every channel missing"]),
                              ([], ["'c'", "lacks channel(s) [1]", "c_0001.nii.gz", "--missing"]),
                              (["A"], ["'c'", "lacks channel(s) [1]", "c_0001.nii.gz"])):
        code = main([*base, "-o", str(tmp_path / "bad"), *(["--missing", *missing] if missing else [])])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        line = [entry for entry in err.splitlines() if entry.startswith(f"{PROG}: error:")]
        assert len(line) == 1 and all(text in line[0] for text in expected), err
        assert not (tmp_path / "bad").exists()
    assert main([*base, "-o", str(tmp_path / "out"), "--missing", "B"]) == 0
    assert seen == {"missing": (1,), "mask": [True, False]}
    assert (tmp_path / "out" / "c.nii.gz").is_file()
    assert "Missing channels ['B']: set to 0 after normalisation; SMMLNet masks their encoders" in \
        capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------------
# the evaluation over every subset (a stand-in predictor writes the predictions)
# ------------------------------------------------------------------------------------------------------------------

def test_modality_subsets():
    subsets = modality_subsets(4)
    assert len(subsets) == 15 and len(set(subsets)) == 15 and all(subsets)
    assert subsets[:4] == [(0,), (1,), (2,), (3,)] and subsets[-1] == (0, 1, 2, 3)
    assert [len(s) for s in subsets] == [1] * 4 + [2] * 6 + [3] * 4 + [4]
    assert modality_subsets(2) == [(0,), (1,), (0, 1)]
    with pytest.raises(ValueError):
        modality_subsets(0)
    assert subset_key((1, 2), {"0": "FLAIR", "1": "T1ce", "2": "T 1", "3": "T2"}) == "0110_T1ce-T_1"


CHANNELS2 = {"0": "A", "1": "B"}


@pytest.fixture
def labelled(tmp_path) -> Path:
    """Reference segmentations of two cases (labels 1 and 2)."""
    folder = tmp_path / "labels"
    folder.mkdir()
    for k in range(2):
        seg = np.zeros((3, 12, 12), dtype=np.uint8)
        seg[:, 2:6, 2:6] = 1
        seg[:, 7:10, 7:10 - k] = 2
        write(folder / f"case{k}.nii.gz", seg, dtype=np.uint8)
    return folder


class StandIn:
    """Writes each case's prediction: the reference where channel A is present, else the reference without label 2
    where B alone is present. Counts calls per missing set; can fail on a given one."""

    def __init__(self, labels: Path, fail_on: tuple[int, ...] | None = None):
        self.labels, self.fail_on, self.calls = labels, fail_on, []

    def __call__(self, missing, output_folder):
        self.calls.append(tuple(missing))
        for k in range(2):
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(self.labels / f"case{k}.nii.gz")))
            if 0 in missing:
                seg[seg == 2] = 0
            write(Path(output_folder) / f"case{k}.nii.gz", seg, dtype=np.uint8)
            if self.fail_on == tuple(missing):
                raise RuntimeError("killed mid-way")


def run_eval(predict, labelled, out, **kwargs):
    return evaluate_missing_modalities(predict, str(labelled), str(out), CHANNELS2, ["case0", "case1"],
                                       labels={"one": 1, "two": 2}, progress=False, **kwargs)


def test_evaluation_scores_every_subset_and_writes_the_table(labelled, tmp_path):
    out = tmp_path / "eval"
    predict = StandIn(labelled)
    summary = run_eval(predict, labelled, out)
    assert predict.calls == [(1,), (0,), ()]
    assert [s["key"] for s in summary["subsets"]] == ["10_A", "01_B", "11_A-B"]
    dice = [[s["mean"][r]["dice"] for r in ("one", "two")] for s in summary["subsets"]]
    assert dice == [[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    assert summary["average_over_subsets"]["two"]["dice"] == pytest.approx(2 / 3)
    assert [s["foreground_mean"]["dice"] for s in summary["subsets"]] == [1.0, 0.5, 1.0]
    assert summary["average_foreground_mean"]["dice"] == pytest.approx(2.5 / 3)
    table = format_missing_table(summary, "dice").splitlines()
    assert table[0].startswith("Dice (%) per modality subset (\u25cf present, \u25cb absent); 2 case(s)")
    rows = [line.split() for line in table[1:] if not set(line) <= {"-", " "}]
    assert rows == [["1", "2", "3", "Avg"],
                    ["A", "\u25cf", "\u25cb", "\u25cf"],
                    ["B", "\u25cb", "\u25cf", "\u25cf"],
                    ["one", "100.0", "100.0", "100.0", "100.0"],
                    ["two", "100.0", "0.0", "100.0", "66.7"],
                    ["mean", "100.0", "50.0", "100.0", "83.3"]]
    written = json.loads((out / SUMMARY_NAME).read_text())
    assert written["subsets"][1]["present_names"] == ["B"] and written["channels"] == ["A", "B"]
    assert (out / TABLE_NAME).read_text().startswith("\n".join(table))
    assert "HD95 (mm)" in (out / TABLE_NAME).read_text()
    png = (out / HEATMAP_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    scores = json.loads((out / SUBSETS_FOLDER / "01_B" / SCORES_NAME).read_text())
    assert scores["missing_names"] == ["A"] and scores["scores"]["n_cases"] == 2


def test_evaluation_resumes(labelled, tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(RuntimeError, match="killed mid-way"):
        run_eval(StandIn(labelled, fail_on=(0,)), labelled, out)
    subsets = out / SUBSETS_FOLDER
    assert sorted(p.name for p in subsets.iterdir()) == ["10_A"]  # the killed subset left nothing behind
    (subsets / ".01_B.partial-old").mkdir()  # as if a run had been SIGKILLed
    (subsets / ".01_B.partial-old" / "predictions").mkdir()
    predict = StandIn(labelled)
    summary = run_eval(predict, labelled, out)
    assert predict.calls == [(0,), ()] and summary["skipped"] == ["10_A"]
    assert not [p for p in subsets.iterdir() if p.name.startswith(".")]
    # everything done: nothing is predicted again
    predict = StandIn(labelled)
    assert run_eval(predict, labelled, out)["skipped"] == ["10_A", "01_B", "11_A-B"] and predict.calls == []
    # half-written: no scores, or a prediction missing -> redone; the others kept
    (subsets / "01_B" / SCORES_NAME).unlink()
    (subsets / "11_A-B" / "predictions" / "case1.nii.gz").unlink()
    predict = StandIn(labelled)
    summary = run_eval(predict, labelled, out)
    assert predict.calls == [(0,), ()] and summary["skipped"] == ["10_A"]
    assert [s["mean"]["two"]["dice"] for s in summary["subsets"]] == [1.0, 0.0, 1.0]


def test_evaluation_refuses_another_runs_folder(labelled, tmp_path):
    out = tmp_path / "eval"
    run_eval(StandIn(labelled), labelled, out, settings={"model_folder": "/models/a"})
    with pytest.raises(ValueError, match=r"another run \(different \['model_folder'\]"):
        run_eval(StandIn(labelled), labelled, out, settings={"model_folder": "/models/b"})
    predict = StandIn(labelled)
    summary = run_eval(predict, labelled, out, settings={"model_folder": "/models/b"}, overwrite=True)
    assert len(predict.calls) == 3 and summary["skipped"] == []


def test_evaluate_missing_cli_errors(harness, tmp_path, labelled, capsys):
    from nnunet_mmssl.cli.evaluate_missing import PROG, definitions_from_dataset_json, main

    folder = model_folder(harness, "SMMLTrainer", tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        for c in range(2):
            write(images / f"case{k}_{c:04d}.nii.gz", _block(150.0, 3, 9, (3, 12, 12)))
    (labelled / "case1.nii.gz").rename(labelled / "case7.nii.gz")
    code = main(["-i", str(images), "-ref", str(labelled), "-o", str(tmp_path / "o"), "-m", str(folder), "-f", "0",
                 "-device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = [entry for entry in err.splitlines() if entry.startswith(f"{PROG}: error:")]
    assert len(line) == 1 and "['case1']" in line[0] and "['case7']" in line[0] and str(labelled) in line[0]
    assert definitions_from_dataset_json({"labels": {"background": 0, "WT": [1, 2, 3], "ET": 3}}) == \
        (None, {"WT": [1, 2, 3], "ET": [3]})
    assert definitions_from_dataset_json({"labels": {"background": 0, "a": 1, "ignore": 9}}) == ({"a": 1}, None)


# ------------------------------------------------------------------------------------------------------------------
# end to end: both console scripts on a tiny SMML model folder
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_smml(harness, tmp_path, labelled, capsys):
    from nnunet_mmssl.cli.evaluate_missing import main as evaluate_main
    from nnunet_mmssl.cli.predict import main as predict_main

    folder = model_folder(harness, "SMMLTrainer", tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for k in range(2):
        for c in range(2):
            write(images / f"case{k}_{c:04d}.nii.gz", _block(150.0 + 50 * c, 2, 10, (3, 12, 12))
                  + rng.normal(0, 5, (3, 12, 12)) * (c + 1))
    out = tmp_path / "eval"
    args = ["-i", str(images), "-ref", str(labelled), "-o", str(out), "-m", str(folder), "-f", "0", "-device", "cpu",
            "--disable_tta", "-npp", "0", "-l", "1", "2"]
    assert evaluate_main(args) == 0
    printed = capsys.readouterr().out
    assert "Dice (%) per modality subset" in printed
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert [s["key"] for s in summary["subsets"]] == ["10_A", "01_B", "11_A-B"]
    assert (out / HEATMAP_NAME).is_file()
    # a patient without B's file, through nnUNetv2_mmssl_predict (worker processes), equals the subset "A only"
    only_a = tmp_path / "only_a"
    only_a.mkdir()
    for k in range(2):
        os.link(images / f"case{k}_0000.nii.gz", only_a / f"case{k}_0000.nii.gz")
    pred = tmp_path / "pred"
    assert predict_main(["-i", str(only_a), "-o", str(pred), "-m", str(folder), "-f", "0", "-device", "cpu",
                         "--disable_tta", "--missing", "B", "-npp", "1", "-nps", "1"]) == 0
    differs = False
    for k in range(2):
        mine = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"case{k}.nii.gz")))
        subset = sitk.GetArrayFromImage(sitk.ReadImage(str(out / SUBSETS_FOLDER / "10_A" / "predictions"
                                                           / f"case{k}.nii.gz")))
        full = sitk.GetArrayFromImage(sitk.ReadImage(str(out / SUBSETS_FOLDER / "11_A-B" / "predictions"
                                                         / f"case{k}.nii.gz")))
        np.testing.assert_array_equal(mine, subset)
        differs = differs or not np.array_equal(mine, full)
    assert differs, "the prediction without B equals the one with B: the mask had no effect"
    # rerun: every subset kept
    assert evaluate_main(args) == 0
    assert "3 subset(s) already complete, kept" in capsys.readouterr().out

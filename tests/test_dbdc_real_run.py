"""Fast tests of benchmarks/dbdc_real_run.py's pure logic: case selection (real data; skipped without it), staging,
command building, per-modality scores and the result table. No conversion, training or prediction."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "dbdc_real_run.py"
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("dbdc_real_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def shared_data():
    data = Path(os.environ.get("MMSSL_SHARED_DATA", DATA))
    if not (data / "brats2018_flair_t1").is_dir() or not (data / "brats_4seq_unlabeled").is_dir():
        pytest.skip(f"real data not found under {data} (brats2018_flair_t1/, brats_4seq_unlabeled/)")
    return data


def test_select_cases_takes_each_modality_from_other_patients(run, shared_data):
    staged = run.select_cases(str(shared_data), [0, 1, 2], [5, 6])
    flair, t1 = staged["FLAIR"], staged["T1"]
    labelled_flair = [e for e in flair if e["label"]]
    labelled_t1 = [e for e in t1 if e["label"]]
    assert [e["case"] for e in labelled_flair] == ["case_0", "case_1", "case_2"]
    assert [e["case"] for e in labelled_t1] == ["case_5", "case_6"]
    assert all(os.path.basename(e["image"]) == "FLAIR.nii.gz" for e in labelled_flair)
    assert all(os.path.basename(e["image"]) == "T1.nii.gz" for e in labelled_t1)
    assert all(os.path.basename(e["label"]) == "GT_W.nii.gz" for e in labelled_flair + labelled_t1)
    # unlabelled: the FLAIR and the T1 (never the T1ce) of each 4-sequence case, four naming schemes
    unlabelled = sorted(d for d in os.listdir(shared_data / "brats_4seq_unlabeled")
                        if (shared_data / "brats_4seq_unlabeled" / d).is_dir())
    for entries, words in ((flair, ("t2f", "flair", "fla")), (t1, ("t1n", "t1.nii", "_t1_"))):
        rest = [e for e in entries if e["label"] is None]
        assert [e["case"] for e in rest] == unlabelled
        for entry in rest:
            name = os.path.basename(entry["image"]).lower()
            assert any(w in name for w in words) and "t1c" not in name, name
    with pytest.raises(ValueError, match=r"cases \[2\] are in both"):
        run.select_cases(str(shared_data), [0, 1, 2], [2, 5])
    with pytest.raises(FileNotFoundError, match="case_99"):
        run.select_cases(str(shared_data), [99], [5])


def test_select_cases_rejects_repeats_without_reading_data(run, tmp_path):
    with pytest.raises(ValueError, match="--flair-cases"):
        run.select_cases(str(tmp_path), [0, 0], [5])
    with pytest.raises(ValueError, match="--t1-cases"):
        run.select_cases(str(tmp_path), [0], [])


def test_stage_sources_links_one_image_per_case(run, tmp_path):
    files = {}
    for name in ("a_flair.nii.gz", "a_label.nii.gz", "b_t1.nii.gz", "u_fla.nii.gz"):
        files[name] = tmp_path / name
        files[name].write_text(name)
    staged = {"FLAIR": [{"case": "case_0", "image": str(files["a_flair.nii.gz"]),
                         "label": str(files["a_label.nii.gz"])},
                        {"case": "U1", "image": str(files["u_fla.nii.gz"]), "label": None}],
              "T1": [{"case": "case_5", "image": str(files["b_t1.nii.gz"]), "label": str(files["a_label.nii.gz"])}]}
    sources = run.stage_sources(staged, str(tmp_path / "stage"))
    assert sources == [str(tmp_path / "stage" / "FLAIR"), str(tmp_path / "stage" / "T1")]
    assert (tmp_path / "stage" / "FLAIR" / "case_0" / "image.nii.gz").read_text() == "a_flair.nii.gz"
    assert (tmp_path / "stage" / "FLAIR" / "case_0" / "label.nii.gz").read_text() == "a_label.nii.gz"
    assert sorted(os.listdir(tmp_path / "stage" / "FLAIR" / "U1")) == ["image.nii.gz"]
    assert (tmp_path / "stage" / "T1" / "case_5" / "image.nii.gz").read_text() == "b_t1.nii.gz"
    # staging again (a rerun) keeps the links and repoints a changed one
    staged["T1"][0]["image"] = str(files["u_fla.nii.gz"])
    run.stage_sources(staged, str(tmp_path / "stage"))
    assert (tmp_path / "stage" / "T1" / "case_5" / "image.nii.gz").read_text() == "u_fla.nii.gz"


def test_commands(run):
    convert = run.convert_command(["/s/FLAIR", "/s/T1"], 2, 7, "/raw")
    assert convert[:4] == ["nnUNetv2_mmssl_convert", "-i", "/s/FLAIR", "/s/T1"]
    i = convert.index("--source-modality")
    assert convert[i + 1:i + 3] == ["FLAIR", "T1"]
    for option, value in (("--image", "image.nii.gz"), ("--label", "label.nii.gz"), ("--num-test", "2"),
                          ("--seed", "7"), ("-d", str(run.DATASET_ID)), ("-o", "/raw")):
        assert convert[convert.index(option) + 1] == value
    assert "--num-labeled" not in convert  # every labelled non-test case is labelled
    train = run.train_command("DBDCTrainer", "2d", "nnUNetPlans_bs4", "cpu")
    assert train == ["nnUNetv2_train", str(run.DATASET_ID), "2d", "all", "-tr", "DBDCTrainer__budget", "-p",
                     "nnUNetPlans_bs4", "-device", "cpu"]
    predict = run.predict_command("nnUNetTrainer", "/raw/D", "/out", "2d", "P", "cpu")
    assert predict[0] == "nnUNetv2_mmssl_predict"
    assert predict[predict.index("--modalities-from") + 1] == os.path.join("/raw/D", "dataset.json")
    assert predict[predict.index("-i") + 1] == os.path.join("/raw/D", "imagesTs")
    assert predict[predict.index("-tr") + 1] == "nnUNetTrainer__budget"


def _evaluation(cases):
    return {"mean": {"1": {}}, "metric_per_case": [
        {"case": case, "metrics": {"1": {"dice": dice, "hd95": hd95}}} for case, dice, hd95 in cases]}


def test_modality_scores_hand_values(run):
    evaluation = _evaluation([("a", 0.8, 10.0), ("b", 0.6, 20.0), ("c", 0.3, None), ("d", 0.1, 40.0)])
    scores = run.modality_scores(evaluation, {"a": "FLAIR", "b": "FLAIR", "c": "T1", "d": "T1"})
    flair, t1 = scores["modalities"]["FLAIR"], scores["modalities"]["T1"]
    assert list(scores["modalities"]) == ["FLAIR", "T1"]
    assert flair["n_cases"] == 2 and flair["dice"] == pytest.approx([0.7, 0.1])
    assert flair["hd95"] == pytest.approx([15.0, 5.0])
    assert t1["dice"] == pytest.approx([0.2, 0.1])
    assert t1["hd95"] == pytest.approx([40.0, 0.0])  # the undefined HD95 (None) is left out
    # each modality counts once in the mean, whatever its number of cases
    assert scores["mean_over_modalities"]["dice"] == pytest.approx(0.45)
    assert scores["mean_over_modalities"]["hd95"] == pytest.approx(27.5)
    uneven = run.modality_scores(_evaluation([("a", 0.8, 1.0), ("b", 0.6, 1.0), ("c", 0.2, 1.0)]),
                                 {"a": "FLAIR", "b": "FLAIR", "c": "T1"})
    assert uneven["mean_over_modalities"]["dice"] == pytest.approx(0.45)
    with pytest.raises(ValueError, match="test case d has no modality"):
        run.modality_scores(evaluation, {"a": "FLAIR", "b": "FLAIR", "c": "T1"})


def test_prototype_share_from_the_log(run):
    logging = {"epoch_start_timestamps": [0.0, 10.0, 14.0, 20.0], "epoch_end_timestamps": [8.0, 14.0, 19.0, 24.0],
               "prototype_seconds": [4.0, 1.0, 2.5, 1.0]}
    # shares 0.5 (first epoch, left out), 0.25, 0.5, 0.25 -> median 0.25
    assert run.prototype_share(logging) == pytest.approx(0.25)
    assert run.prototype_share({"epoch_start_timestamps": [0.0], "epoch_end_timestamps": [1.0]}) is None


def test_result_table(run):
    def result(spe, dice_flair, dice_t1, share=None):
        return {"seconds_per_epoch": spe, "prototype_share": share, "scores": {
            "modalities": {"FLAIR": {"n_cases": 2, "dice": [dice_flair, 0.05], "hd95": [12.0, 3.0]},
                           "T1": {"n_cases": 2, "dice": [dice_t1, 0.1], "hd95": [None, None]}},
            "mean_over_modalities": {"dice": (dice_flair + dice_t1) / 2, "hd95": 12.0}}}

    results = {"nnUNetTrainer": result(4.0, 0.5, 0.3), "PooledUNetTrainer": result(5.0, 0.6, 0.2),
               "DBDCTrainer": result(20.0, 0.7, 0.4, share=0.125)}
    lines = run.result_table(results).splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:] if line and not line.startswith(" ")}
    assert rows["DBDCTrainer"][-4:] == ["20.0", "5.00", "4.00", "12.5"]  # s/epoch, x nnU, x Pooled, proto %
    assert rows["nnUNetTrainer"][-4:] == ["4.0", "1.00", "0.80", "-"]
    dbdc = lines.index(next(line for line in lines if line.startswith("DBDCTrainer")))
    assert "0.700±0.050" in lines[dbdc] and "12.0±3.0" in lines[dbdc]
    assert lines[dbdc + 1].split()[:2] == ["T1", "2"] and "n/a" in lines[dbdc + 1]
    assert lines[dbdc + 2].split()[:5] == ["mean", "over", "modalities", "0.550", "12.0"]
    # without the reference trainers the ratio columns say so
    alone = run.result_table({"DBDCTrainer": results["DBDCTrainer"]}).splitlines()[2].split()
    assert alone[-4:] == ["20.0", "-", "-", "12.5"]


def test_skips_cleanly_without_data(run, tmp_path, capsys):
    assert run.main(["--data", str(tmp_path / "absent"), "--workdir", str(tmp_path / "w")]) == 0
    assert "skipped" in capsys.readouterr().out
    assert not (tmp_path / "w").exists()

"""The per-modality loaders (``nnunet_mmssl.dataloading.per_modality``) and the per-modality validation summary
(``nnunet_mmssl.evaluation.per_modality``) that DBDC uses, on hand-made inputs (no nnU-Net training)."""

import json
import math
import os
import pickle

import pytest

from nnunet_mmssl.dataloading.per_modality import (
    DBDCDataError,
    ModalityBatches,
    augmentation_processes,
    case_modality_index,
    finish_loaders,
    identifiers_by_modality,
    labelled_loaders_per_modality,
    unlabeled_loaders_per_modality,
    workers_per_loader,
)
from nnunet_mmssl.evaluation.per_modality import write_summary_per_modality
from nnunet_mmssl.planners.modality_normalization import MODALITY_PROPERTY


class Loader:
    """An endless loader of numbered batches that records whether it was shut down."""

    def __init__(self, name):
        self.name, self.count, self.finished = name, 0, False

    def __next__(self):
        self.count += 1
        return {"data": f"{self.name}{self.count}"}

    def _finish(self):
        self.finished = True


def test_modality_batches_all_draws_one_batch_of_every_modality():
    a, b = Loader("a"), Loader("b")
    batches = ModalityBatches([a, b], "all")
    assert next(batches) == {"modality_batches": [{"data": "a1"}, {"data": "b1"}]}
    assert next(batches) == {"modality_batches": [{"data": "a2"}, {"data": "b2"}]}


def test_modality_batches_cycle_takes_modalities_in_turn_skipping_missing_ones():
    a, c = Loader("a"), Loader("c")
    batches = ModalityBatches([a, None, c], "cycle")
    assert [next(batches) for _ in range(3)] == [{"data": "a1", "modality": 0}, {"data": "c1", "modality": 2},
                                                 {"data": "a2", "modality": 0}]
    batches._finish()
    assert a.finished and c.finished


def test_modality_batches_refuses_no_loader_and_unknown_mode():
    with pytest.raises(DBDCDataError, match="No modality has cases"):
        ModalityBatches([None, None], "cycle")
    with pytest.raises(ValueError, match="some"):
        ModalityBatches([Loader("a")], "some")


def test_finish_loaders_skips_none_and_loaders_without_finish():
    a = Loader("a")
    finish_loaders([None, iter([]), a])
    assert a.finished


@pytest.mark.parametrize("allowed, loaders, expected", [(0, 2, 0), (1, 4, 1), (8, 2, 4), (7, 2, 3), (12, 4, 3)])
def test_workers_per_loader(allowed, loaders, expected):
    assert workers_per_loader(allowed, loaders) == expected


def test_augmentation_processes_sets_and_restores_the_variable(monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "6")
    with augmentation_processes(2):
        assert os.environ["nnUNet_n_proc_DA"] == "2"
    assert os.environ["nnUNet_n_proc_DA"] == "6"
    monkeypatch.delenv("nnUNet_n_proc_DA")
    with pytest.raises(RuntimeError), augmentation_processes(3):  # restored on an error too
        assert os.environ["nnUNet_n_proc_DA"] == "3"
        raise RuntimeError
    assert "nnUNet_n_proc_DA" not in os.environ


def test_case_modality_index_reads_the_case_properties(tmp_path):
    for case, properties in {"ct1": {MODALITY_PROPERTY: "CT"}, "mr1": {MODALITY_PROPERTY: "MR"}, "none": {},
                             "pet": {MODALITY_PROPERTY: "PET"}}.items():
        with open(tmp_path / f"{case}.pkl", "wb") as handle:
            pickle.dump(properties, handle)
    assert case_modality_index(str(tmp_path), "mr1", ["CT", "MR"]) == 1
    assert case_modality_index(str(tmp_path), "ct1", ["CT", "MR"]) == 0
    with pytest.raises(DBDCDataError, match="'none' .* has no modality .*nnUNetv2_mmssl_plan_and_preprocess"):
        case_modality_index(str(tmp_path), "none", ["CT", "MR"])
    with pytest.raises(DBDCDataError, match="modality 'PET', not one of the plans' \\['CT', 'MR'\\]"):
        case_modality_index(str(tmp_path), "pet", ["CT", "MR"])


def test_labelled_loaders_per_modality_shuts_down_a_validation_loader_without_cases():
    built = {k: (Loader(f"tr{k}"), Loader(f"val{k}")) for k in range(2)}
    messages = []
    train, val = labelled_loaders_per_modality(built.__getitem__, ["CT", "MR"], lambda k: k == 0, 3, messages.append)
    assert train == [built[0][0], built[1][0]] and val == [built[0][1], None]
    assert built[1][1].finished and not built[0][1].finished
    assert messages == [("Modality 'MR' has no validation case in fold 3: its validation Dice (and MAW's error term) "
                         "is NaN.")]


class Dataset:
    def __init__(self, source_folder, identifiers):
        self.source_folder, self.identifiers = source_folder, identifiers


def test_unlabeled_loaders_per_modality_one_started_stream_per_modality_none_where_empty():
    by_modality = identifiers_by_modality(["u3", "u1", "u2"], {"u1": 0, "u2": 2, "u3": 0}.__getitem__, 3)
    assert by_modality == [["u3", "u1"], [], ["u2"]]
    subsets, messages = [], []

    def make(subset):
        subsets.append(subset)
        return Loader(",".join(subset.identifiers))

    loaders = unlabeled_loaders_per_modality(Dataset("/pp", ["u3", "u1", "u2"]), by_modality, ["CT", "MR", "PET"],
                                             make, messages.append)
    assert [(s.source_folder, s.identifiers) for s in subsets] == [("/pp", ["u3", "u1"]), ("/pp", ["u2"])]
    assert loaders[1] is None and [loaders[0].name, loaders[2].name] == ["u3,u1", "u2"]
    assert loaders[0].count == 1 and loaders[2].count == 1  # each started once
    assert messages == ["WARNING: modality 'MR' has no unlabelled case: its dual consistency term is skipped.",
                        "Unlabelled streams: CT: 2 cases, MR: 0 cases, PET: 1 cases"]


def _case(name, dice_1, iou_1, dice_2, iou_2):
    return {"reference_file": f"/gt/{name}.nii.gz", "metrics": {"1": {"Dice": dice_1, "IoU": iou_1},
                                                                "2": {"Dice": dice_2, "IoU": iou_2}}}


def test_write_summary_per_modality_means_per_modality_and_label(tmp_path):
    summary = {"metric_per_case": [_case("ct_a", 0.8, 0.6, 0.4, 0.2), _case("mr_a", 0.5, 0.3, float("nan"), 0.1),
                                   _case("ct_b", 0.6, 0.4, 0.2, 0.0), _case("mr_b", 0.7, 0.5, 0.9, 0.8)]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    messages = []
    result = write_summary_per_modality(str(tmp_path), ["MR", "PET", "CT"], lambda case: case[:2].upper(),
                                        ".nii.gz", messages.append)
    expected = {"MR": {"num_cases": 2, "mean": {"1": {"Dice": 0.6, "IoU": 0.4}, "2": {"Dice": 0.9, "IoU": 0.45}}},
                "CT": {"num_cases": 2, "mean": {"1": {"Dice": 0.7, "IoU": 0.5}, "2": {"Dice": 0.3, "IoU": 0.1}}}}
    written = json.loads((tmp_path / "summary_per_modality.json").read_text())
    assert list(written) == ["MR", "CT"]  # the modalities' order, one without a case left out
    for got in (result, written):
        for name, entry in expected.items():
            assert got[name]["num_cases"] == entry["num_cases"]
            for label, metrics in entry["mean"].items():
                for metric, value in metrics.items():
                    assert math.isclose(got[name]["mean"][label][metric], value), (name, label, metric)
    assert messages == ["Validation MR: 2 cases, mean Dice 0.7500", "Validation CT: 2 cases, mean Dice 0.5000"]


def test_write_summary_per_modality_without_summary_writes_nothing(tmp_path):
    assert write_summary_per_modality(str(tmp_path), ["CT"], lambda case: "CT", ".nii.gz", print) == {}
    assert os.listdir(tmp_path) == []

"""Hand-computed behaviour of the missing-modality predictor that mutation testing
(``benchmarks/mutation/mutate.py``) showed untested by the fast tests: which channels the network is told are
missing, which channels are present, and which files stand in for the absent ones."""

import torch

from nnunet_mmssl.inference.missing import MissingModalityPredictor, placeholder_lists


class _Recorder(torch.nn.Module):
    """A network that records what ``set_missing_modalities`` was told."""

    def __init__(self):
        super().__init__()
        self.told = []

    def set_missing_modalities(self, channels):
        self.told.append(channels)


def _predictor(network: torch.nn.Module) -> MissingModalityPredictor:
    predictor = MissingModalityPredictor(use_mirroring=False, perform_everything_on_device=False,
                                         device=torch.device("cpu"), allow_tqdm=False)
    predictor.dataset_json = {"channel_names": {"0": "A", "1": "B", "2": "C"}}
    predictor.network = network
    return predictor


def test_the_network_is_told_the_missing_channels_and_none_for_all_present():
    # survivors: `network is not None` -> `is None`, `and hasattr` -> `or`, `list(missing) or None` -> `and None`
    recorder = _Recorder()
    predictor = _predictor(recorder)
    predictor.set_missing_channels(["C", 0])
    predictor.set_missing_channels([])
    assert recorder.told == [[0, 2], None]
    compiled = torch.nn.Module()  # torch.compile's wrapper: the mask goes to the wrapped network
    compiled._orig_mod = _Recorder()
    _predictor(compiled).set_missing_channels(["B"])
    assert compiled._orig_mod.told == [[1]]
    plain = _predictor(torch.nn.Identity())  # a network without set_missing_modalities is left alone
    assert plain.set_missing_channels(["B"]) == (1,)


def test_present_channels_are_the_complement_in_order():
    # survivor: `c not in self.missing_channels` -> `c in ...`
    predictor = _predictor(_Recorder())
    assert predictor.present_channels == (0, 1, 2)
    predictor.set_missing_channels(["B"])
    assert predictor.present_channels == (0, 2)


def test_a_missing_channel_gets_the_cases_first_present_file():
    # survivor: files[0] -> files[1] (docstring: each missing channel gets the case's first present file)
    assert placeholder_lists([["a0.nii", "a2.nii"], ["b0.nii", "b2.nii"]], 3, [1]) == [
        ["a0.nii", "a0.nii", "a2.nii"], ["b0.nii", "b0.nii", "b2.nii"]]
    assert placeholder_lists([["c1.nii", "c2.nii"]], 3, [0]) == [["c1.nii", "c1.nii", "c2.nii"]]


def test_full_lists_drop_the_missing_channels_files_before_the_placeholders():
    # survivor: `c not in self.missing_channels` -> `c in ...` in _lists_with_placeholders
    predictor = _predictor(_Recorder())
    predictor.set_missing_channels(["A"])
    full = [["x0.nii", "x1.nii", "x2.nii"]]  # K entries: the missing channel's entry is ignored
    assert predictor._lists_with_placeholders(full) == [["x1.nii", "x1.nii", "x2.nii"]]
    assert predictor._lists_with_placeholders([["y1.nii", "y2.nii"]]) == [["y1.nii", "y1.nii", "y2.nii"]]


def test_a_folder_with_other_files_gives_the_cases_lists(tmp_path):
    # survivor: find_cases(..., ignore_other_endings=True -> False) (a notes file next to the images is refused)
    for name in ("p_0000.nii.gz", "p_0002.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")  # only the names are listed here, nothing is read
    predictor = _predictor(_Recorder())
    predictor.dataset_json["file_ending"] = ".nii.gz"
    predictor.set_missing_channels(["B"])
    first, third = str(tmp_path / "p_0000.nii.gz"), str(tmp_path / "p_0002.nii.gz")
    assert predictor._lists_with_placeholders(str(tmp_path)) == [[first, first, third]]

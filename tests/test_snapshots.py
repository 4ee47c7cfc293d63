"""``nnUNetv2_mmssl_pseudolabel --snapshots``: a PNG montage per ranked case and an index.html in ranking order."""

import csv
import json
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mmssl.semisup.snapshots import DPI, choose_slices, png_size, write_snapshots

SHAPE = (5, 24, 24)
#: ranking order of the fake pseudo-label output (not alphabetical, not the order the files are listed)
RANKED = ["case_b", "case_c", "case_a"]


def _write(array, path):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def _fake_output(tmp_path, shape=SHAPE):
    """A folder as nnUNetv2_mmssl_pseudolabel writes it (labels, entropy maps, ranking.csv, pseudolabel.json)."""
    images, out = tmp_path / "images", tmp_path / "out"
    for sub in (images, out / "labels", out / "uncertainty"):
        os.makedirs(sub)
    rng = np.random.default_rng(0)
    rows = []
    for rank, case in enumerate(RANKED, start=1):
        for c in range(2):
            _write(rng.normal(100.0 * (c + 1), 10.0, shape).astype(np.float32), images / f"{case}_{c:04d}.nii.gz")
        label = np.zeros(shape, np.uint8)
        label[..., 6:14, 6:14] = 1
        entropy = np.zeros(shape, np.float32)
        entropy[..., 5:15, 5:15] = 0.3 * rank
        _write(label, out / "labels" / f"{case}.nii.gz")
        _write(entropy, out / "uncertainty" / f"{case}_entropy.nii.gz")
        rows.append({"rank": rank, "case": case, "score": f"{1.0 / rank:.6g}", "label": f"labels/{case}.nii.gz",
                     "entropy_map": f"uncertainty/{case}_entropy.nii.gz"})
    with open(out / "ranking.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in reversed(rows):  # the file's row order is not trusted: the rank column is
            writer.writerow(row)
    (out / "pseudolabel.json").write_text(json.dumps({"input_folder": str(images), "sigmoid_regions": False}))
    return out, images


def _html_order(index: str) -> list[tuple[str, str]]:
    return re.findall(r'<tr id="([^"]+)">.*?<img src="([^"]+)"', index)


def test_pngs_exist_for_every_ranked_case_and_html_lists_them_in_ranking_order(tmp_path):
    import matplotlib.image

    out, _ = _fake_output(tmp_path)
    written = write_snapshots(str(out))
    assert [w["case"] for w in written] == RANKED
    folder = out / "snapshots"
    assert sorted(os.listdir(folder)) == ["001_case_b.png", "002_case_c.png", "003_case_a.png", "index.html"]
    for entry in written:
        # 3 slices of 3.4 in + 0.6 in title, 8 in wide, at DPI: read back from the file (header and pixels)
        assert png_size(entry["png"]) == entry["size"] == (8 * DPI, int(round((0.6 + 3 * 3.4) * DPI)))
        pixels = matplotlib.image.imread(entry["png"])
        assert pixels.shape[:2] == (entry["size"][1], entry["size"][0])
        assert pixels[..., :3].std() > 0.05  # a picture, not a blank page
    index = (folder / "index.html").read_text()
    assert _html_order(index) == [(c, f"{k:03d}_{c}.png") for k, c in enumerate(RANKED, start=1)]
    assert "<td>1</td><td>case_b</td><td>1</td>" in index
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary folder left


def test_two_dimensional_cases_get_one_slice_and_a_rerun_replaces_the_folder(tmp_path):
    out, _ = _fake_output(tmp_path, shape=(24, 24))
    first = write_snapshots(str(out))
    assert {w["size"] for w in first} == {(8 * DPI, 4 * DPI)}  # one slice: 0.6 + 3.4 in high
    (out / "snapshots" / "stale.png").write_bytes(b"x")
    write_snapshots(str(out))
    assert "stale.png" not in os.listdir(out / "snapshots")


def test_slices_hold_the_foreground_and_the_most_uncertain_region():
    label = np.zeros((9, 4, 4), np.uint8)
    label[2, 1:3, 1:3] = 1
    label[3, 1, 1] = 1
    entropy = np.zeros((9, 4, 4), np.float32)
    entropy[7] = 0.1
    entropy[3, 0, 0] = 0.5
    assert choose_slices(label, entropy, 3) == [2, 4, 7]  # most foreground 2, most entropy 7 (sum 1.6), between 4
    assert choose_slices(label, entropy, 2) == [2, 7]
    assert choose_slices(label[:1], entropy[:1], 3) == [0]
    assert choose_slices(np.zeros_like(label), np.zeros_like(entropy), 1) == [4]  # nothing: the middle


def test_missing_map_is_an_error_and_publishes_nothing(tmp_path):
    out, _ = _fake_output(tmp_path)
    os.remove(out / "uncertainty" / "case_c_entropy.nii.gz")
    with pytest.raises(ValueError, match="case_c_entropy.nii.gz, not found"):
        write_snapshots(str(out))
    assert not (out / "snapshots").exists() and not [p for p in os.listdir(out) if p.startswith(".")]


def test_cli_snapshots_option(tmp_path, monkeypatch, capsys):
    """The console script draws the snapshots of what the pipeline wrote, only with --snapshots; errors: one line."""
    import nnunet_mmssl.cli.pseudolabel as cli

    model = tmp_path / "model"
    os.makedirs(model)
    for name in ("plans.json", "dataset.json"):
        (model / name).write_text("{}")

    def fake_pipeline(model_folder, input_folder, output_folder, **kwargs):
        out, _ = _fake_output(tmp_path / ("source_" + os.path.basename(output_folder)))
        os.replace(out, output_folder)
        return [{"case": c} for c in RANKED]

    monkeypatch.setattr(cli, "pseudolabel", fake_pipeline)
    assert cli.main(["-m", str(model), "-o", str(tmp_path / "plain"), "-device", "cpu"]) == 0
    assert not (tmp_path / "plain" / "snapshots").exists()
    assert cli.main(["-m", str(model), "-o", str(tmp_path / "pics"), "-device", "cpu", "--snapshots"]) == 0
    assert len([f for f in os.listdir(tmp_path / "pics" / "snapshots") if f.endswith(".png")]) == 3
    assert "snapshots/index.html" in capsys.readouterr().out
    bad = tmp_path / "pics"
    os.remove(bad / "labels" / "case_a.nii.gz")
    monkeypatch.setattr(cli, "pseudolabel", lambda *a, **k: [{"case": c} for c in RANKED])
    assert cli.main(["-m", str(model), "-o", str(bad), "-device", "cpu", "--snapshots"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "case_a.nii.gz, not found" in err and "Traceback" not in err

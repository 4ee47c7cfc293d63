"""Hand-computed checks of nnunet_mmssl.evaluation.metrics (CPU, tiny arrays)."""

import itertools
import math

import numpy as np
import pytest

from nnunet_mmssl.evaluation import compute_binary_metrics, image_diagonal_mm, surface_distances, surface_voxels


def _percentile95_linear(sorted_values):
    """numpy's default ('linear') percentile, written out: position 0.95 * (n - 1), linear interpolation."""
    pos = 0.95 * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def test_squares_offset_by_one_voxel_dice_and_sensitivity():
    # Two 4x4 squares, the prediction shifted one column: overlap 4x3 = 12 voxels, 4 FP, 4 FN.
    # Dice = 2*12 / (2*12 + 4 + 4) = 24/32 = 0.75; sensitivity = 12/16 = 0.75.
    ref = np.zeros((8, 8), bool)
    ref[2:6, 2:6] = True
    pred = np.zeros((8, 8), bool)
    pred[2:6, 3:7] = True
    m = compute_binary_metrics(pred, ref, (1.0, 1.0))
    assert (m["tp"], m["fp"], m["fn"], m["n_ref"], m["n_pred"]) == (12, 4, 4, 16, 16)
    assert m["dice"] == pytest.approx(0.75)
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["convention"] is None


def test_lines_with_anisotropic_spacing_hd95_and_asd():
    # Spacing (2.0, 0.5): one row step = 2.0 mm, one column step = 0.5 mm.
    # ref  = row 1, columns 1..4 (4 voxels); pred = row 2, columns 1..6 (6 voxels). One-voxel-thick lines erode to
    # nothing, so every voxel is a surface voxel.
    # ref -> pred: (1,c) -> (2,c) for c = 1..4: 4 x 2.0 mm.
    # pred -> ref: c = 1..4: 4 x 2.0 mm; c = 5: nearest ref (1,4): sqrt(2.0^2 + 0.5^2) = sqrt(4.25);
    #              c = 6: nearest ref (1,4): sqrt(2.0^2 + 1.0^2) = sqrt(5).
    # Union (10 values) = [2]*8 + [sqrt(4.25), sqrt(5)].
    # ASD = (8*2 + sqrt(4.25) + sqrt(5)) / 10 = 2.02976...
    # HD95 (linear): position 0.95*9 = 8.55 -> sqrt(4.25) + 0.55*(sqrt(5) - sqrt(4.25)) = 2.15754...
    ref = np.zeros((5, 8), bool)
    ref[1, 1:5] = True
    pred = np.zeros((5, 8), bool)
    pred[2, 1:7] = True
    m = compute_binary_metrics(pred, ref, (2.0, 0.5))
    assert m["asd"] == pytest.approx((16 + math.sqrt(4.25) + math.sqrt(5)) / 10)
    assert m["hd95"] == pytest.approx(math.sqrt(4.25) + 0.55 * (math.sqrt(5) - math.sqrt(4.25)))
    assert m["dice"] == 0.0 and m["sensitivity"] == 0.0 and m["convention"] is None

    # Same masks, spacing swapped to (0.5, 2.0): row step 0.5 mm, column step 2.0 mm.
    # Union = [0.5]*8 + [sqrt(0.5^2 + 2^2), sqrt(0.5^2 + 4^2)] = [0.5]*8 + [sqrt(4.25), sqrt(16.25)].
    m2 = compute_binary_metrics(pred, ref, (0.5, 2.0))
    assert m2["asd"] == pytest.approx((4 + math.sqrt(4.25) + math.sqrt(16.25)) / 10)
    assert m2["hd95"] == pytest.approx(math.sqrt(4.25) + 0.55 * (math.sqrt(16.25) - math.sqrt(4.25)))


def test_3d_nested_cubes():
    # ref = 3x3x3 cube, pred = concentric 5x5x5 cube, spacing 1 mm.
    # Dice: TP = 27, FP = 125 - 27 = 98, FN = 0 -> 54 / 152; sensitivity 1.
    # Face-connectivity erosion keeps only the centre of the 3-cube (26 surface voxels) and the inner 3-cube of the
    # 5-cube (98 surface voxels).
    # ref -> pred: every 3-cube shell voxel is one step from the 5-cube shell: 26 x 1.
    # pred -> ref: a 5-cube shell voxel with k coordinates at +-2 is sqrt(k) from the 3-cube shell:
    #   k=1: 3 axes * 2 signs * 9 = 54 voxels; k=2: 3 * 4 * 3 = 36; k=3: 8.
    # Union (124 values): 80 x 1, 36 x sqrt(2), 8 x sqrt(3).
    # ASD = (80 + 36 sqrt(2) + 8 sqrt(3)) / 124; HD95: position 0.95*123 = 116.85 lies in the sqrt(3) block
    # (indices 116..123), so HD95 = sqrt(3).
    ref = np.zeros((7, 7, 7), bool)
    ref[2:5, 2:5, 2:5] = True
    pred = np.zeros((7, 7, 7), bool)
    pred[1:6, 1:6, 1:6] = True
    assert surface_voxels(ref).sum() == 26 and surface_voxels(pred).sum() == 98
    m = compute_binary_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(54 / 152)
    assert m["sensitivity"] == pytest.approx(1.0)
    assert m["asd"] == pytest.approx((80 + 36 * math.sqrt(2) + 8 * math.sqrt(3)) / 124)
    assert m["hd95"] == pytest.approx(math.sqrt(3))


@pytest.mark.parametrize("axis, expected", [(0, 3.0), (1, 1.0), (2, 0.5)])
def test_3d_single_voxel_shift_uses_spacing_of_the_shifted_axis(axis, expected):
    # Single voxels one step apart along `axis`: both directed distances equal that axis' spacing.
    spacing = (3.0, 1.0, 0.5)
    ref = np.zeros((5, 5, 5), bool)
    ref[2, 2, 2] = True
    pred = np.roll(ref, 1, axis=axis)
    m = compute_binary_metrics(pred, ref, spacing)
    assert m["hd95"] == pytest.approx(expected)
    assert m["asd"] == pytest.approx(expected)


def test_identical_masks():
    ref = np.zeros((6, 7, 8), bool)
    ref[1:4, 2:6, 3:5] = True
    m = compute_binary_metrics(ref.copy(), ref, (1.5, 0.7, 0.7))
    assert m["dice"] == 1.0 and m["sensitivity"] == 1.0
    assert m["hd95"] == 0.0 and m["asd"] == 0.0
    assert m["fp"] == 0 and m["fn"] == 0 and m["convention"] is None


def test_empty_mask_conventions():
    shape, spacing = (4, 6), (2.0, 0.5)
    diagonal = math.sqrt((4 * 2.0) ** 2 + (6 * 0.5) ** 2)  # sqrt(64 + 9) = sqrt(73)
    assert image_diagonal_mm(shape, spacing) == pytest.approx(math.sqrt(73))
    empty = np.zeros(shape, bool)
    some = empty.copy()
    some[1, 2] = True

    both = compute_binary_metrics(empty, empty, spacing)
    assert both["convention"] == "both_empty"
    assert both["dice"] == 1.0 and math.isnan(both["sensitivity"]) and both["hd95"] == 0.0 and both["asd"] == 0.0

    ref_empty = compute_binary_metrics(some, empty, spacing)
    assert ref_empty["convention"] == "ref_empty"
    assert ref_empty["dice"] == 0.0 and math.isnan(ref_empty["sensitivity"])
    assert ref_empty["hd95"] == pytest.approx(diagonal) and ref_empty["asd"] == pytest.approx(diagonal)
    assert (ref_empty["n_pred"], ref_empty["fp"]) == (1, 1)

    pred_empty = compute_binary_metrics(empty, some, spacing)
    assert pred_empty["convention"] == "pred_empty"
    assert pred_empty["dice"] == 0.0 and pred_empty["sensitivity"] == 0.0
    assert pred_empty["hd95"] == pytest.approx(diagonal) and pred_empty["asd"] == pytest.approx(diagonal)
    assert (pred_empty["n_ref"], pred_empty["fn"]) == (1, 1)


def test_result_keys_and_types():
    ref = np.zeros((4, 4), np.uint8)
    ref[1:3, 1:3] = 1
    m = compute_binary_metrics(ref, ref, [1, 1])  # non-bool input is cast (nonzero = foreground)
    assert list(m) == ["dice", "sensitivity", "hd95", "asd", "n_ref", "n_pred", "tp", "fp", "fn", "convention"]
    assert all(isinstance(m[k], float) for k in ("dice", "sensitivity", "hd95", "asd"))
    assert all(type(m[k]) is int for k in ("n_ref", "n_pred", "tp", "fp", "fn"))


def test_shape_and_spacing_errors():
    a = np.zeros((4, 5), bool)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\).*resample"):
        compute_binary_metrics(a, np.zeros((5, 4), bool), (1.0, 1.0))
    with pytest.raises(ValueError, match=r"3 entries.*\(4, 5\)"):
        compute_binary_metrics(a, a, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        compute_binary_metrics(a, a, (1.0, -1.0))
    with pytest.raises(ValueError, match="empty mask"):
        surface_distances(a, a, (1.0, 1.0))


def test_surface_uses_face_connectivity_and_image_border():
    plus = np.zeros((5, 5), bool)
    plus[2, 1:4] = True
    plus[1:4, 2] = True
    surface = surface_voxels(plus)
    # The centre has all 4 face neighbours inside the mask: not a surface voxel (it would be with 8-connectivity).
    assert not surface[2, 2] and surface.sum() == 4
    full = np.ones((4, 4), bool)
    # Erosion uses border_value=0: the whole image frame is surface, the inner 2x2 block is not.
    assert surface_voxels(full).sum() == 12


def test_cropping_and_border_are_equivalent_to_zero_padding():
    rng = np.random.default_rng(0)
    ref = rng.random((6, 7, 5)) > 0.5
    pred = rng.random((6, 7, 5)) > 0.5
    spacing = (2.5, 0.8, 1.1)
    m = compute_binary_metrics(pred, ref, spacing)
    mp = compute_binary_metrics(np.pad(pred, 3), np.pad(ref, 3), spacing)
    for key in ("dice", "sensitivity", "hd95", "asd", "tp", "fp", "fn"):
        assert m[key] == pytest.approx(mp[key])


def _brute_force_surface(mask):
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask), strict=True):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            neighbour = [i + 1 for i in idx]
            neighbour[axis] += step
            if not padded[tuple(neighbour)]:
                out[idx] = True
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_against_brute_force_pairwise_distances(seed):
    rng = np.random.default_rng(seed)
    shape, spacing = (5, 6, 7), (3.0, 0.9, 0.6)
    ref = rng.random(shape) > 0.6
    pred = rng.random(shape) > 0.6
    surf_ref, surf_pred = _brute_force_surface(ref), _brute_force_surface(pred)
    assert np.array_equal(surf_ref, surface_voxels(ref))
    pts_ref = np.argwhere(surf_ref) * np.array(spacing)
    pts_pred = np.argwhere(surf_pred) * np.array(spacing)
    pairwise = np.linalg.norm(pts_pred[:, None, :] - pts_ref[None, :, :], axis=-1)
    union = np.sort(np.concatenate([pairwise.min(axis=1), pairwise.min(axis=0)]))
    m = compute_binary_metrics(pred, ref, spacing)
    assert m["hd95"] == pytest.approx(_percentile95_linear(union))
    assert m["asd"] == pytest.approx(union.mean())
    d_pred_ref, d_ref_pred = surface_distances(pred, ref, spacing)
    assert np.allclose(np.sort(d_pred_ref), np.sort(pairwise.min(axis=1)))
    assert np.allclose(np.sort(d_ref_pred), np.sort(pairwise.min(axis=0)))

"""DBDC building blocks: Sinkhorn-Knopp, the prototype bank, the MPCL terms (eqs. 4-12) and MAW (eqs. 13-16)."""

import math
import os
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nnunet_mmssl.diagnostics import debug_checks
from nnunet_mmssl.losses.prototypes import (
    MPCLLoss,
    PrototypeBank,
    modality_contrast_loss,
    mpcl_loss,
    prototype_contrast_loss,
    prototype_distance_loss,
    prototype_similarity,
    pseg_loss,
    sinkhorn_knopp,
)
from nnunet_mmssl.semisup.modality_weighting import ModalityWeighting, modality_adaptive_weights


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (eqs. 5-6)


def test_sinkhorn_hand_computed_one_iteration():
    # epsilon 1, scores = ln [[2, 1], [1, 1]]: exp(scores - ln 2) = [[1, .5], [.5, .5]], total 2.5
    #   -> Q = [[.4, .2], [.2, .2]]
    # rows to 1/C = 1/2: row 0 sums .6 -> [1/3, 1/6]; row 1 sums .4 -> [1/4, 1/4]
    # columns to 1/N = 1/2: col 0 sums 7/12 -> [2/7, 3/14]; col 1 sums 5/12 -> [1/5, 3/10]
    # times N = 2: [[4/7, 2/5], [3/7, 3/5]]
    scores = torch.log(torch.tensor([[2.0, 1.0], [1.0, 1.0]]))
    q = sinkhorn_knopp(scores, epsilon=1.0, iterations=1)
    torch.testing.assert_close(q, torch.tensor([[4 / 7, 2 / 5], [3 / 7, 3 / 5]]))


def test_sinkhorn_equipartition_columns_and_no_grad():
    generator = torch.Generator().manual_seed(0)
    scores = (torch.rand(4, 1000, generator=generator) * 2 - 1).requires_grad_()
    q = sinkhorn_knopp(scores, epsilon=0.05, iterations=200)
    assert not q.requires_grad and q.grad_fn is None
    torch.testing.assert_close(q.sum(dim=0), torch.ones(1000))
    torch.testing.assert_close(q.sum(dim=1), torch.full((4,), 250.0), rtol=1e-3, atol=0)
    assert (q >= 0).all()
    # 3 iterations (the default) are not yet equipartitioned but every column is one assignment
    q3 = sinkhorn_knopp(scores)
    torch.testing.assert_close(q3.sum(dim=0), torch.ones(1000))


def test_sinkhorn_half_input_empty_and_bad_shape():
    scores = torch.tensor([[0.9, -0.2, 0.1], [0.1, 0.7, -1.0]], dtype=torch.float16)
    q = sinkhorn_knopp(scores)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    torch.testing.assert_close(q, sinkhorn_knopp(scores.float()))
    empty = sinkhorn_knopp(torch.zeros(3, 0))
    assert empty.shape == (3, 0)
    with pytest.raises(ValueError, match="C, N"):
        sinkhorn_knopp(torch.zeros(3))


# ----------------------------------------------------------------------------------------------------------------
# Prototype bank (eq. 7)


def test_bank_prototypes_are_a_seeded_unit_buffer():
    bank = PrototypeBank(3, 4, dim=8, seed=1)
    assert list(bank.parameters()) == []
    assert "prototypes" in dict(bank.named_buffers()) and "prototypes" in bank.state_dict()
    assert bank.prototypes.shape == (3, 4, 8) and not bank.prototypes.requires_grad
    torch.testing.assert_close(bank.prototypes.norm(dim=-1), torch.ones(3, 4))
    torch.testing.assert_close(PrototypeBank(3, 4, dim=8, seed=1).prototypes, bank.prototypes)
    assert not torch.allclose(PrototypeBank(3, 4, dim=8, seed=2).prototypes, bank.prototypes)
    assert bank.to(torch.float64).prototypes.dtype == torch.float64


def _symmetric_case():
    """K = 2, C = 2, D = 2; modality 0 prototypes e_x, e_y.

    Correct voxels a = (1, 0) and c = (.6, .8) of class 0, b = (0, 1) and e = (.8, .6) of class 1; f = (0, 1) labelled
    0 but wrongly predicted. The correct voxels are symmetric under swapping the axes and the classes, so every row
    of exp(scores / eps) has the same sum: Sinkhorn's row scaling is uniform and its column scaling makes each column
    the softmax of the column's scores over the two classes, after any number of iterations.
    """
    embeddings = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 0])
    correct = torch.tensor([True, True, True, True, False])
    return embeddings, labels, correct


def test_bank_update_hand_computed():
    eps = 0.2
    bank = PrototypeBank(2, 2, dim=2, momentum=0.5, sinkhorn_epsilon=eps)
    bank.prototypes[0] = torch.eye(2)
    other = bank.prototypes[1].clone()
    embeddings, labels, correct = _symmetric_case()
    counts = bank.update(embeddings, labels, correct, modality=0)
    assert counts.tolist() == [2, 2]
    # class 0: a scores (1, 0) -> weight sigmoid((1 - 0) / eps); c scores (.6, .8) -> weight sigmoid((.6 - .8) / eps)
    w_a, w_c = _sigmoid(1 / eps), _sigmoid(-0.2 / eps)
    mean0 = (w_a * torch.tensor([1.0, 0.0]) + w_c * torch.tensor([0.6, 0.8])) / (w_a + w_c)
    expected0 = F.normalize(0.5 * torch.tensor([1.0, 0.0]) + 0.5 * mean0, dim=0)
    expected1 = expected0.flip(0)  # class 1 mirrors class 0
    torch.testing.assert_close(bank.prototypes[0], torch.stack([expected0, expected1]))
    # not the plain mean of the class's correct voxels (the Sinkhorn weights matter)
    plain = F.normalize(0.5 * torch.tensor([1.0, 0.0]) + 0.5 * torch.tensor([0.8, 0.4]), dim=0)
    assert not torch.allclose(bank.prototypes[0, 0], plain, atol=1e-3)
    torch.testing.assert_close(bank.prototypes[1], other)  # the other modality is untouched
    torch.testing.assert_close(bank.prototypes.norm(dim=-1), torch.ones(2, 2))


def test_bank_update_ignores_wrong_voxels_and_keeps_absent_classes():
    bank = PrototypeBank(1, 3, dim=4, momentum=0.5)
    before = bank.prototypes.clone()
    embeddings = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(3)), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    correct = torch.tensor([True, True, True, False, False, False])
    counts = bank.update(embeddings, labels, correct, modality=0)
    assert counts.tolist() == [2, 1, 0]
    torch.testing.assert_close(bank.prototypes[0, 2], before[0, 2])  # class 2: no correct voxel
    assert not torch.allclose(bank.prototypes[0, :2], before[0, :2])
    # class 1 has one correct voxel: the weighted mean is that voxel, whatever its Sinkhorn weight
    torch.testing.assert_close(bank.prototypes[0, 1], F.normalize(0.5 * before[0, 1] + 0.5 * embeddings[2], dim=0))
    # wrong voxels (even many of them) change nothing
    again = PrototypeBank(1, 3, dim=4, momentum=0.5)
    again.update(embeddings, labels, torch.zeros(6, dtype=torch.bool), modality=0)
    torch.testing.assert_close(again.prototypes, before)


def test_bank_update_half_embeddings_no_grad_and_errors():
    bank = PrototypeBank(2, 2, dim=2, momentum=0.5, sinkhorn_epsilon=0.2)
    bank.prototypes[0] = torch.eye(2)
    reference = PrototypeBank(2, 2, dim=2, momentum=0.5, sinkhorn_epsilon=0.2)
    reference.prototypes[0] = torch.eye(2)
    embeddings, labels, correct = _symmetric_case()
    live = embeddings.clone().requires_grad_()
    bank.update(live.half(), labels, correct, modality=0)
    reference.update(embeddings, labels, correct, modality=0)
    assert bank.prototypes.dtype == torch.float32 and not bank.prototypes.requires_grad
    torch.testing.assert_close(bank.prototypes, reference.prototypes, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="modality 2"):
        bank.update(embeddings, labels, correct, modality=2)
    with debug_checks(), pytest.raises(ValueError, match=r"\[0, 2\)"):  # the label range: a synchronising check
        bank.update(embeddings, labels + 1, torch.ones(5, dtype=torch.bool), modality=0)
    with pytest.raises(RuntimeError, match="out of bounds"):  # without it, the kernel that uses the label fails
        bank.update(embeddings, labels + 1, torch.ones(5, dtype=torch.bool), modality=0)


def test_bank_state_dict_round_trip(tmp_path):
    bank = PrototypeBank(2, 3, dim=4, momentum=0.9, seed=0)
    embeddings = F.normalize(torch.randn(10, 4, generator=torch.Generator().manual_seed(5)), dim=1)
    bank.update(embeddings, torch.arange(10) % 3, torch.ones(10, dtype=torch.bool), modality=1)
    torch.save(bank.state_dict(), tmp_path / "bank.pth")
    restored = PrototypeBank(2, 3, dim=4, momentum=0.9, seed=7)
    restored.load_state_dict(torch.load(tmp_path / "bank.pth", weights_only=True))
    torch.testing.assert_close(restored.prototypes, bank.prototypes, rtol=0, atol=0)


def _ddp_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    bank = PrototypeBank(1, 3, dim=4, momentum=0.5, seed=0)
    generator = torch.Generator().manual_seed(10 + rank)
    embeddings = F.normalize(torch.randn(8, 4, generator=generator), dim=1)
    labels = torch.full((8,), rank)  # rank 0 sees only class 0, rank 1 only class 1; class 2 nowhere
    counts = bank.update(embeddings, labels, torch.ones(8, dtype=torch.bool), modality=0)
    torch.save({"prototypes": bank.prototypes, "counts": counts}, os.path.join(root, f"rank{rank}.pth"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_bank_update_is_identical_across_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in range(2)]
    initial = PrototypeBank(1, 3, dim=4, seed=0).prototypes
    torch.testing.assert_close(results[0]["prototypes"], results[1]["prototypes"], rtol=0, atol=0)
    assert results[0]["counts"].tolist() == [8, 8, 0]
    assert not torch.allclose(results[0]["prototypes"][0, :2], initial[0, :2])  # each rank learned the other's class
    torch.testing.assert_close(results[0]["prototypes"][0, 2], initial[0, 2])


# ----------------------------------------------------------------------------------------------------------------
# MPCL terms (eqs. 8-12)

#: modality 0: p_0 = (1, 0), p_1 = (0, 1); modality 1: p_0 = (.6, .8), p_1 = (-.8, .6)
PROTOTYPES = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-0.8, 0.6]]])


def _tiny(spatial_ndim: int, with_ignored: bool = False):
    """One sample of modality 0: u = (1, 0) of class 0 and v = (.6, .8) of class 1 [and an ignored w, label 255]."""
    vectors = [[1.0, 0.0], [0.6, 0.8]] + ([[0.0, -1.0]] if with_ignored else [])
    labels = [0, 1] + ([255] if with_ignored else [])
    n = len(vectors)
    shape = (n,) + (1,) * (spatial_ndim - 1)
    embeddings = torch.tensor(vectors).T.reshape(1, 2, *shape)
    label_map = torch.tensor(labels).reshape(1, *shape)
    valid = (label_map != 255) if with_ignored else None
    return embeddings, label_map, valid


# u: cos to (p_0, p_1) of modality 0 = (1, 0); v: (.6, .8)
EXPECTED_PD = ((1 - 1.0) ** 2 + (1 - 0.8) ** 2) / 2  # 0.02
EXPECTED_PC = (math.log(1 + math.exp(-10)) + math.log(1 + math.exp(-2))) / 2  # logits /0.1: u (10, 0), v (6, 8)
# u (class 0): -cos(u, (1, 0)) + cos(u, (.6, .8)) = -1 + .6; v (class 1): -cos(v, (0, 1)) + cos(v, (-.8, .6)) = -.8 + 0
EXPECTED_MC = (-0.4 - 0.8) / 2
# CE on the raw cosines: u -log softmax(1, 0)[0] = log(1 + e^-1); v -log softmax(.6, .8)[1] = log(1 + e^-.2)
_CE = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-0.2))) / 2
# softmax: u (s(1), s(-1)), v (s(-.2), s(.2)); batch Dice per class, smooth 1e-5:
#   class 0: 2 s(1) / (s(1) + s(-.2) + 1); class 1: 2 s(.2) / (s(-1) + s(.2) + 1)
_D0 = (2 * _sigmoid(1) + 1e-5) / (_sigmoid(1) + _sigmoid(-0.2) + 1 + 1e-5)
_D1 = (2 * _sigmoid(0.2) + 1e-5) / (_sigmoid(-1) + _sigmoid(0.2) + 1 + 1e-5)
EXPECTED_PSEG = 0.5 * (1 - (_D0 + _D1) / 2) + 0.5 * _CE


@pytest.mark.parametrize("spatial_ndim", [2, 3])
@pytest.mark.parametrize("with_ignored", [False, True])
def test_mpcl_terms_hand_computed(spatial_ndim, with_ignored):
    embeddings, labels, valid = _tiny(spatial_ndim, with_ignored)
    modality = torch.tensor([0])
    similarity = prototype_similarity(embeddings, PROTOTYPES, modality)
    assert similarity.shape == (1, 2, *embeddings.shape[2:])
    assert pseg_loss(similarity, labels, valid).item() == pytest.approx(EXPECTED_PSEG, abs=1e-6)
    assert modality_contrast_loss(embeddings, labels, PROTOTYPES, modality, valid).item() == pytest.approx(
        EXPECTED_MC, abs=1e-6)
    assert prototype_contrast_loss(similarity, labels, valid, 0.1).item() == pytest.approx(EXPECTED_PC, abs=1e-6)
    assert prototype_distance_loss(similarity, labels, valid).item() == pytest.approx(EXPECTED_PD, abs=1e-6)
    loss, values = mpcl_loss(embeddings, labels, PROTOTYPES, modality, valid)
    expected = (EXPECTED_PSEG + EXPECTED_MC + EXPECTED_PC + EXPECTED_PD) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert values["pd"].item() == pytest.approx(EXPECTED_PD, abs=1e-6) and not values["pd"].requires_grad
    subset, parts = mpcl_loss(embeddings, labels, PROTOTYPES, modality, valid, terms=("pseg", "pd"))
    assert set(parts) == {"pseg", "pd"}
    assert subset.item() == pytest.approx((EXPECTED_PSEG + EXPECTED_PD) / 2, abs=1e-6)
    module_loss, _ = MPCLLoss(temperature=0.1)(embeddings, labels, PROTOTYPES, modality, valid)
    torch.testing.assert_close(module_loss, loss)


def test_pseg_dice_averages_over_present_classes_only():
    # C = 3 cosine maps, class 2 absent from the labels: u = (1, 0, -1) of class 0, v = (.6, .8, -1) of class 1
    similarity = torch.tensor([[1.0, 0.6], [0.0, 0.8], [-1.0, -1.0]]).reshape(1, 3, 2, 1)
    labels = torch.tensor([0, 1]).reshape(1, 2, 1)
    z_u, z_v = math.exp(1) + 1 + math.exp(-1), math.exp(0.6) + math.exp(0.8) + math.exp(-1)
    pu = [math.exp(1) / z_u, 1 / z_u]  # softmax of u, classes 0 and 1
    pv = [math.exp(0.6) / z_v, math.exp(0.8) / z_v]
    ce = ((math.log(z_u) - 1) + (math.log(z_v) - 0.8)) / 2
    dice0 = (2 * pu[0] + 1e-5) / (pu[0] + pv[0] + 1 + 1e-5)
    dice1 = (2 * pv[1] + 1e-5) / (pu[1] + pv[1] + 1 + 1e-5)
    expected = 0.5 * (1 - (dice0 + dice1) / 2) + 0.5 * ce  # class 2 (absent) is not averaged in
    assert pseg_loss(similarity, labels).item() == pytest.approx(expected, abs=1e-6)


def test_valid_mask_excludes_voxels():
    embeddings, labels, valid = _tiny(2, with_ignored=True)
    labels = labels.clone()
    labels[labels == 255] = 0  # an in-range label on the excluded voxel: it must still not count
    without_mask, _ = mpcl_loss(embeddings, labels, PROTOTYPES, torch.tensor([0]))
    with_mask, _ = mpcl_loss(embeddings, labels, PROTOTYPES, torch.tensor([0]), valid)
    assert with_mask.item() == pytest.approx((EXPECTED_PSEG + EXPECTED_MC + EXPECTED_PC + EXPECTED_PD) / 4, abs=1e-6)
    assert abs(without_mask.item() - with_mask.item()) > 1e-3
    # an out-of-range label must be masked, not silently used: named by the (synchronising) debug check, else the
    # loss kernel fails on it
    with debug_checks(), pytest.raises(ValueError, match="valid"):
        mpcl_loss(*_tiny(2, with_ignored=True)[:2], PROTOTYPES, torch.tensor([0]))
    with pytest.raises(IndexError, match="out of bounds"):
        mpcl_loss(*_tiny(2, with_ignored=True)[:2], PROTOTYPES, torch.tensor([0]))


def test_similarity_uses_each_samples_own_modality():
    embeddings = F.normalize(torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    similarity = prototype_similarity(embeddings, PROTOTYPES, torch.tensor([1, 0]))
    torch.testing.assert_close(similarity[0], torch.einsum("cd,dhw->chw", PROTOTYPES[1], embeddings[0]))
    torch.testing.assert_close(similarity[1], torch.einsum("cd,dhw->chw", PROTOTYPES[0], embeddings[1]))


def test_modality_contrast_with_one_modality_is_minus_the_own_cosine():
    embeddings, labels, _ = _tiny(2)
    mc = modality_contrast_loss(embeddings, labels, PROTOTYPES[:1], torch.tensor([0]))
    # exactly (same float32 sum): the "other modalities" term is 0 for K = 1
    assert torch.equal(mc, -torch.tensor([1.0, 0.8]).sum() / 2)


@pytest.mark.parametrize("conv", [torch.nn.Conv2d, torch.nn.Conv3d])
@pytest.mark.parametrize("term", ["pseg", "mc", "pc", "pd"])
def test_gradient_reaches_projector_and_never_the_prototypes(conv, term):
    torch.manual_seed(0)
    spatial = (5, 4) if conv is torch.nn.Conv2d else (3, 4, 2)
    projector = conv(3, 8, kernel_size=1)
    features = torch.randn(2, 3, *spatial, requires_grad=True)
    labels = torch.randint(0, 3, (2, *spatial))
    bank = PrototypeBank(2, 3, dim=8)
    live_prototypes = bank.prototypes.clone().requires_grad_()
    for prototypes in (bank.prototypes, live_prototypes):
        projector.zero_grad()
        features.grad = None
        embeddings = F.normalize(projector(features), dim=1)
        loss, _ = mpcl_loss(embeddings, labels, prototypes, torch.tensor([0, 1]), terms=(term,))
        loss.backward()
        assert projector.weight.grad.abs().sum() > 0 and features.grad.abs().sum() > 0
    assert live_prototypes.grad is None
    assert bank.prototypes.grad is None and not bank.prototypes.requires_grad


def test_empty_valid_mask_gives_attached_zero():
    embeddings = F.normalize(torch.randn(1, 2, 2, 2), dim=1).requires_grad_()
    loss, values = mpcl_loss(embeddings, torch.zeros(1, 2, 2, dtype=torch.long), PROTOTYPES, torch.tensor([0]),
                             valid=torch.zeros(1, 2, 2, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad and all(v.item() == 0.0 for v in values.values())
    loss.backward()
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_half_embeddings_match_float32():
    generator = torch.Generator().manual_seed(1)
    embeddings = F.normalize(torch.randn(2, 8, 4, 4, 4, generator=generator), dim=1)
    labels = torch.randint(0, 3, (2, 4, 4, 4), generator=generator)
    bank = PrototypeBank(2, 3, dim=8)
    full, _ = mpcl_loss(embeddings, labels, bank.prototypes, torch.tensor([1, 0]))
    live = embeddings.half().requires_grad_()
    half, _ = mpcl_loss(live, labels, bank.prototypes, torch.tensor([1, 0]))
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), abs=2e-3)
    half.backward()
    assert live.grad.dtype == torch.float16 and torch.isfinite(live.grad).all() and live.grad.abs().sum() > 0


def test_autocast_does_not_lower_the_cosines():
    generator = torch.Generator().manual_seed(2)
    embeddings = F.normalize(torch.randn(2, 8, 3, 5, generator=generator), dim=1)
    labels = torch.randint(0, 3, (2, 3, 5), generator=generator)
    bank = PrototypeBank(2, 3, dim=8)
    reference = prototype_similarity(embeddings, bank.prototypes, torch.tensor([0, 1]))
    mc_reference = modality_contrast_loss(embeddings, labels, bank.prototypes, torch.tensor([0, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        similarity = prototype_similarity(embeddings, bank.prototypes, torch.tensor([0, 1]))
        mc = modality_contrast_loss(embeddings, labels, bank.prototypes, torch.tensor([0, 1]))
    assert similarity.dtype == torch.float32
    torch.testing.assert_close(similarity, reference)
    torch.testing.assert_close(mc, mc_reference)


def test_mpcl_rejects_bad_terms_and_modalities():
    embeddings, labels, _ = _tiny(2)
    with pytest.raises(ValueError, match="subset"):
        mpcl_loss(embeddings, labels, PROTOTYPES, torch.tensor([0]), terms=("pseg", "xx"))
    with pytest.raises(ValueError, match="subset"):
        mpcl_loss(embeddings, labels, PROTOTYPES, torch.tensor([0]), terms=())
    with debug_checks(), pytest.raises(ValueError, match=r"\[0, 2\)"):  # index ranges: synchronising checks
        mpcl_loss(embeddings, labels, PROTOTYPES, torch.tensor([2]))
    with pytest.raises(IndexError):  # without them, the first kernel indexing with the modality fails
        mpcl_loss(embeddings, labels, PROTOTYPES, torch.tensor([2]))


# ----------------------------------------------------------------------------------------------------------------
# MAW (eqs. 13-16)


def test_maw_hand_computed():
    history = [[0.9, 0.5, 0.1],  # outside the window of tau = 3 changes (the last 4 rows)
               [0.2, 0.5, 0.5],
               [0.4, 0.25, 0.5],
               [0.2, 0.5, 0.5],
               [0.8, 0.25, 0.5]]
    # modality 0, window .2 .4 .2 .8: r = ln 2 (up), ln .5 (down), ln 4 (up)
    #   d+ = ln 2 + ln 4 = 3 ln 2, d- = |ln .5| = ln 2, S = 3, P = 1.6 / 4 = .4 -> w0 = 3^-.2 * .6
    # modality 1, window .5 .25 .5 .25: r = ln .5 (down), ln 2 (up), ln .5 (down)
    #   d+ = ln 2, d- = 2 ln 2, S = .5, P = 1.5 / 4 = .375 -> w1 = .5^-.2 * .625
    # modality 2, window .5 .5 .5 .5: no change, d+ = d- = 0 (Delta = 0 counts as down), S = 1e-8 / 1e-8 = 1,
    #   P = .5 -> w2 = .5
    w0, w1, w2 = 3 ** -0.2 * 0.6, 0.5 ** -0.2 * 0.625, 0.5
    expected = np.array([w0, w1, w2]) * 3 / (w0 + w1 + w2)
    weights = modality_adaptive_weights(history, tau=3, beta=0.2)
    assert weights.dtype == np.float64
    np.testing.assert_allclose(weights, expected, rtol=1e-7)
    assert weights.sum() == pytest.approx(3.0)
    assert weights[1] > weights[0]  # the modality that learns slower and scores lower gets more weight


def test_maw_fewer_than_two_epochs_and_all_perfect_give_ones():
    np.testing.assert_array_equal(modality_adaptive_weights(np.zeros((0, 3))), np.ones(3))
    np.testing.assert_array_equal(modality_adaptive_weights([[0.4, 0.8, 0.1]]), np.ones(3))
    np.testing.assert_array_equal(modality_adaptive_weights([[1.0, 1.0], [1.0, 1.0]]), np.ones(2))


def test_maw_zero_dice_uses_the_floor():
    # modality 0: 0 -> .5, r = ln(.5 / 1e-3) = ln 500 (up), d- = 0, S = (ln 500 + 1e-8) / 1e-8, P = .25
    # modality 1: 0 -> 0, r = ln 1 = 0 with Delta = 0 (down side), S = 1e-8 / 1e-8 = 1, P = 0 -> w1 = 1
    w0 = ((math.log(500) + 1e-8) / 1e-8) ** -0.2 * 0.75
    weights = modality_adaptive_weights([[0.0, 0.0], [0.5, 0.0]])
    assert np.isfinite(weights).all()
    np.testing.assert_allclose(weights, np.array([w0, 1.0]) * 2 / (w0 + 1.0), rtol=1e-7)


def test_maw_nan_entries_are_dropped():
    nan = float("nan")
    history = [[0.4, nan, 0.5],
               [nan, nan, 0.5],
               [0.2, nan, 0.5],
               [0.8, nan, 0.5]]
    # modality 0 keeps .4 .2 .8: r = ln .5 (down), ln 4 (up): d+ = 2 ln 2, d- = ln 2, S = 2, P = 1.4 / 3
    # modality 1 has no value: the mean of the others' raw weights; modality 2: S = 1, P = .5
    w0 = 2 ** -0.2 * (1 - 1.4 / 3)
    w2 = 0.5
    raw = np.array([w0, (w0 + w2) / 2, w2])
    np.testing.assert_allclose(modality_adaptive_weights(history), raw * 3 / raw.sum(), rtol=1e-7)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        modality_adaptive_weights([[0.5, 1.5], [0.5, 0.5]])


def test_maw_normalised_to_k():
    history = np.random.default_rng(0).uniform(0.05, 0.95, size=(40, 4))
    weights = modality_adaptive_weights(history)
    assert weights.shape == (4,) and (weights > 0).all()
    assert weights.sum() == pytest.approx(4.0)


def test_modality_weighting_state_round_trip(tmp_path):
    maw = ModalityWeighting(["CT", "T2"], tau=3)
    np.testing.assert_array_equal(maw.weights(), np.ones(2))
    for row in ([0.2, 0.5], [0.4, float("nan")], [0.3, 0.6], [0.7, 0.55]):
        maw.record(row)
    torch.save({"maw": maw.state_dict()}, tmp_path / "ckpt.pth")
    restored = ModalityWeighting(["CT", "T2"])
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=True)["maw"])
    np.testing.assert_array_equal(restored.weights(), maw.weights())
    assert not np.allclose(maw.weights(), 1.0)
    for m in (maw, restored):
        m.record([0.75, 0.6])
    np.testing.assert_array_equal(restored.weights(), maw.weights())
    with pytest.raises(ValueError, match="2 Dice values"):
        maw.record([0.5])
    with pytest.raises(ValueError, match="same dataset"):
        ModalityWeighting(["CT", "T1"]).load_state_dict(maw.state_dict())

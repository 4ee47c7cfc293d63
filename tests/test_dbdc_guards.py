"""Guards of DBDC's results (issue #24): tests written against the paper's claims with asymmetric settings, so that a
single-line change that alters what the model learns or predicts fails here.

* eq. 7: the prototype EMA with alpha = 0.99 (not the symmetric 0.5), written to the updated modality only;
* eqs. 8-12: MPCL reads the sample's own modality's prototypes; eq. 12's sum over 4 in every Table III row; no
  ``L_mc`` with K = 1;
* eqs. 17-19: the consistency target is the pseudo-label of the clean pass, not of the perturbed prediction;
* MLMB: one running-statistics update per step (momentum 0.01), shared batch statistics of a modality's labelled,
  image- and feature-perturbed samples (disclosed);
* prediction: the prototypes and projector take no part (disclosed); ``--modality`` applies the modality's scheme,
  its intensity fingerprint and its norm bank.
"""

import copy
import math
import sys
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import trainer_harness  # noqa: E402
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor  # noqa: E402

import nnunet_mmssl.trainers.dbdc as dbdc_module  # noqa: E402
from nnunet_mmssl.building_blocks.norm_bank import ModalityNormBank  # noqa: E402
from nnunet_mmssl.cli.predict import select_modality  # noqa: E402
from nnunet_mmssl.losses.prototypes import PrototypeBank, mpcl_loss  # noqa: E402
from nnunet_mmssl.trainers.dbdc import DBDCTrainer  # noqa: E402
from nnunet_mmssl.trainers.dbdc_variants import DBDCTrainer_lossIpcFpc  # noqa: E402

MODALITIES = ["CT", "MR"]
UNREGISTERED_JSON = {"channel_names": {"0": "CT+MR"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                     "file_ending": ".nii.gz"}
CT_FINGERPRINT = {"mean": 40.0, "std": 20.0, "percentile_00_5": -10.0, "percentile_99_5": 90.0, "min": -50.0,
                  "max": 200.0, "median": 35.0}
DATASET_FINGERPRINT = {"mean": 0.0, "std": 1.0, "percentile_00_5": -1000.0, "percentile_99_5": 1000.0,
                       "min": -1000.0, "max": 1000.0, "median": 0.0}


@pytest.fixture(scope="module", autouse=True)
def folders():
    trainer_harness.set_folders(tempfile.mkdtemp(prefix="dbdc-guards-"))


def unregistered_plans() -> dict:
    plans = trainer_harness.plans()
    plans["configurations"]["2d"].update(use_mask_for_norm=[False], normalization_schemes=["ZScoreNormalization"])
    plans["foreground_intensity_properties_per_channel"] = {"0": dict(DATASET_FINGERPRINT)}
    plans["mmssl"] = {"layout": "unregistered", "modalities": list(MODALITIES),
                      "intensity_schemes": {"CT": "CTNormalization", "MR": "ZScoreNormalization"},
                      "modality_intensity_properties": {"CT": dict(CT_FINGERPRINT, source="fingerprint"),
                                                        "MR": dict(DATASET_FINGERPRINT, source="none")}}
    return plans


def make(trainer_class=DBDCTrainer, seed: int = 0, registered: bool = False, **settings):
    torch.manual_seed(seed)
    if registered:
        trainer = trainer_class(trainer_harness.plans(), "2d", 0, copy.deepcopy(trainer_harness.DATASET_JSON),
                                torch.device("cpu"))
    else:
        trainer = trainer_class(unregistered_plans(), "2d", 0, copy.deepcopy(UNREGISTERED_JSON), torch.device("cpu"))
    for name, value in settings.items():
        setattr(trainer, name, value)
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.initialize()
    return trainer


def inputs(trainer, seed: int = 0) -> list:
    """K (labelled data, deep-supervision targets, unlabelled data); modality k's images shifted by 3k."""
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    result = []
    for k in range(trainer.num_modalities):
        data = torch.randn((trainer.batch_size, 1, *patch), generator=generator) * (1 + k) + 3 * k
        full = (torch.rand((trainer.batch_size, 1, *patch), generator=generator) > 0.6).float()
        target = [F.interpolate(full, scale_factor=s, mode="nearest-exact") if s[0] != 1 else full for s in scales]
        unlabeled = torch.randn((trainer.unlabeled_batch_size_per_rank(), 1, *patch), generator=generator) * (1 + k) \
            + 3 * k
        result.append((data, target, unlabeled))
    return result


def _banks(network) -> list[ModalityNormBank]:
    seen, banks = set(), []
    for module in network.modules():
        if isinstance(module, ModalityNormBank) and id(module) not in seen:
            seen.add(id(module))
            banks.append(module)
    return banks


# ----------------------------------------------------------------------------------------------------------------
# eq. 7: the prototype EMA


def test_prototype_ema_uses_alpha_on_the_old_prototype_and_writes_only_its_modality():
    bank = PrototypeBank(2, 2, dim=2, momentum=0.99)
    start = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]])
    bank.prototypes.copy_(start)
    # three correct voxels of modality 1, all class 0, one embedding e = (0, 1): the class mean is e whatever the
    # Sinkhorn weights are
    embeddings = torch.tensor([[0.0, 1.0]] * 3)
    counts = bank.update(embeddings, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool), modality=1)
    assert counts.tolist() == [3, 0]
    expected = torch.tensor([-0.99, 0.01]) / math.hypot(0.99, 0.01)  # 0.99 * old + 0.01 * mean, renormalised
    torch.testing.assert_close(bank.prototypes[1, 0], expected)
    torch.testing.assert_close(bank.prototypes[1, 1], start[1, 1])  # class absent: kept
    torch.testing.assert_close(bank.prototypes[0], start[0])  # the other modality: untouched


def test_trainer_queues_each_modalitys_voxels_for_its_own_prototypes(monkeypatch):
    trainer = make()
    calls = []
    real = trainer.prototype_bank.update

    def spy(embeddings, classes, correct, modality):
        calls.append(int(modality))
        return real(embeddings, classes, correct, modality)

    monkeypatch.setattr(trainer.prototype_bank, "update", spy)
    per_modality = inputs(trainer)
    queued = []
    real_queue = trainer._queue_prototype_update

    def queue_spy(embeddings, logits, classes, valid, k):
        queued.append((embeddings.detach().clone(), k))
        return real_queue(embeddings, logits, classes, valid, k)

    monkeypatch.setattr(trainer, "_queue_prototype_update", queue_spy)
    trainer.network.train()
    with torch.no_grad():
        trainer.compute_losses(per_modality)
    assert [k for _, k in queued] == [0, 1]
    # the labelled embeddings of modality k are the ones queued with k: compare with the embeddings of the same
    # labelled batch (first slice of the step's concatenation)
    b = trainer.batch_size
    assert queued[0][0].shape[0] == b and queued[1][0].shape[0] == b
    trainer.after_optimizer_step()
    assert calls == [0, 1]


# ----------------------------------------------------------------------------------------------------------------
# eqs. 8-12: MPCL reads the sample's own modality


def test_mpcl_reads_each_samples_own_modality_prototypes():
    # modality 0: p_0 = (1, 0), p_1 = (0, 1); modality 1: p_0 = (0, 1), p_1 = (-1, 0); every voxel e = (1, 0), class 0
    prototypes = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [-1.0, 0.0]]])
    embeddings = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1).expand(2, 2, 2, 2).contiguous()
    labels = torch.zeros(2, 2, 2, dtype=torch.long)
    # L_pd = (1 - cos(e, p^k_0))^2: 0 for modality 0, 1 for modality 1
    for modality, expected in (([0, 0], 0.0), ([1, 1], 1.0), ([0, 1], 0.5)):
        loss, _ = mpcl_loss(embeddings, labels, prototypes, torch.tensor(modality), terms=("pd",))
        assert loss.item() == pytest.approx(expected, abs=1e-6)
    # L_mc = -cos(e, own p_0) + cos(e, other p_0): modality 0 -> -1 + 0, modality 1 -> 0 + 1
    for modality, expected in (([0, 0], -1.0), ([1, 1], 1.0)):
        loss, _ = mpcl_loss(embeddings, labels, prototypes, torch.tensor(modality), terms=("mc",))
        assert loss.item() == pytest.approx(expected, abs=1e-6)
    # L_pc (tau 0.1) over the own modality's 2 prototypes: cosines (1, 0) / (0, -1)
    pc0 = math.log(1 + math.exp(-10))
    pc1 = math.log(1 + math.exp(-10))  # logits (0, -10): the positive is the larger one too
    loss, _ = mpcl_loss(embeddings, labels, prototypes, torch.tensor([0, 0]), terms=("pc",), temperature=0.1)
    assert loss.item() == pytest.approx(pc0, abs=1e-6)
    loss, _ = mpcl_loss(embeddings, labels, prototypes, torch.tensor([1, 1]), terms=("pc",), temperature=0.1)
    assert loss.item() == pytest.approx(pc1, abs=1e-6)


def test_trainer_passes_each_slices_own_modality_to_mpcl(monkeypatch):
    trainer = make()
    seen = []
    real = dbdc_module.mpcl_loss

    def spy(embeddings, classes, prototypes, modality, **kwargs):
        seen.append(sorted(set(torch.as_tensor(modality).tolist())))
        return real(embeddings, classes, prototypes, modality, **kwargs)

    monkeypatch.setattr(dbdc_module, "mpcl_loss", spy)
    trainer.network.train()
    with torch.no_grad():
        trainer.compute_losses(inputs(trainer))
    # per modality: labelled, image-perturbed, feature-perturbed
    assert seen == [[0], [0], [0], [1], [1], [1]]


# ----------------------------------------------------------------------------------------------------------------
# eq. 12 and Table III; K = 1


def _mpcl_terms_of(trainer, terms):
    torch.manual_seed(0)
    classes = torch.randint(0, 2, (2, 4, 4))
    modality = torch.tensor([0, trainer.num_modalities - 1])
    # embeddings near their own class prototype (so that every term is far from 0)
    own = trainer.prototype_bank.prototypes[modality[:, None, None], classes].movedim(-1, 1)
    embeddings = F.normalize(own + 0.05 * torch.randn_like(own), dim=1)
    values = {t: mpcl_loss(embeddings, classes, trainer.prototype_bank.prototypes, modality, terms=(t,))[0].item()
              for t in terms}
    return trainer._mpcl(embeddings, classes, modality).item(), values


def test_mpcl_is_the_sum_over_four_in_every_table_iii_row():
    trainer = make(DBDCTrainer_lossIpcFpc)  # Table III row: L_pseg only
    assert trainer.mpcl_terms == ("pseg",)
    got, values = _mpcl_terms_of(trainer, ("pseg",))
    assert got == pytest.approx(values["pseg"] / 4, rel=1e-6)
    trainer.mpcl_terms = ("pseg", "mc", "pc")
    got, values = _mpcl_terms_of(trainer, trainer.mpcl_terms)
    assert got == pytest.approx(sum(values.values()) / 4, rel=1e-6)
    trainer.mpcl_terms = ("pseg", "mc", "pc", "pd")
    got, values = _mpcl_terms_of(trainer, trainer.mpcl_terms)
    assert got == pytest.approx(sum(values.values()) / 4, rel=1e-6)


def test_single_modality_has_no_modality_contrast():
    trainer = make(registered=True)
    assert trainer.num_modalities == 1 and "mc" in trainer.mpcl_terms
    assert trainer.active_mpcl_terms() == ("pseg", "pc", "pd")
    got, values = _mpcl_terms_of(trainer, ("pseg", "mc", "pc", "pd"))
    assert values["mc"] < -0.5  # L_mc alone would not vanish with K = 1: -cos(own prototype)
    assert got == pytest.approx((values["pseg"] + values["pc"] + values["pd"]) / 4, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# eqs. 17-19: the consistency target comes from the clean pass; MLMB's running statistics


def test_consistency_target_is_the_clean_pass_pseudo_label(monkeypatch):
    trainer = make(image_noise_std=3.0, feature_dropout=0.9)
    per_modality = inputs(trainer, seed=1)
    net = trainer.network
    net.train()
    # the clean pass, alone (train mode, running statistics restored afterwards)
    state = copy.deepcopy(net.state_dict())
    clean = torch.cat([u for _, _, u in per_modality])
    modality = torch.cat([torch.full((u.shape[0],), k) for k, (_, _, u) in enumerate(per_modality)])
    with torch.no_grad():
        expected = net(clean, modality=modality)[0].argmax(1)
    net.load_state_dict(state)
    recorded = []
    real = trainer.consistency_loss

    def spy(logits, target):
        recorded.append((logits.detach().argmax(1), target))
        return real(logits, target)

    monkeypatch.setattr(trainer, "consistency_loss", spy)
    torch.manual_seed(0)
    with torch.no_grad():
        trainer.compute_losses(per_modality)
    assert len(recorded) == 4  # ipc and fpc of both modalities
    n = per_modality[0][2].shape[0]
    targets = {0: expected[:n], 1: expected[n:]}
    for index, (_, target) in enumerate(recorded):
        k = index // 2
        assert torch.equal(target, targets[k])
    # the check has teeth: the perturbed predictions differ from the clean pseudo-labels
    assert any(not torch.equal(perturbed, targets[i // 2]) for i, (perturbed, _) in enumerate(recorded))


def test_running_statistics_are_updated_once_per_step_from_the_main_pass(monkeypatch):
    trainer = make()
    net = trainer.network
    net.train()
    monkeypatch.setattr(trainer, "perturb_images", lambda x: 1.5 * x - 0.25)  # deterministic image perturbation
    per_modality = inputs(trainer, seed=2)
    first = net.encoder.stages[0][0].convs[0]
    bank = first.norm
    assert isinstance(bank, ModalityNormBank) and bank.norms[0].momentum == 0.01
    for norm in bank.norms:
        assert float(norm.running_mean.abs().max()) == 0 and int(norm.num_batches_tracked) == 0
    with torch.no_grad():
        trainer.compute_losses(per_modality)
        for k, (data, _, unlabeled) in enumerate(per_modality):
            # the main pass's samples of modality k: labelled, image-perturbed, feature-perturbed (the last acts after
            # the bottleneck: the first norm sees the clean image); one batch statistic over all of them (disclosed)
            x = torch.cat([data, 1.5 * unlabeled - 0.25, unlabeled])
            features = first.conv(x).double()
            mean = features.mean(dim=(0, 2, 3))
            var = features.var(dim=(0, 2, 3), unbiased=True)
            norm = bank.norms[k]
            assert int(norm.num_batches_tracked) == 1
            torch.testing.assert_close(norm.running_mean.double(), 0.01 * mean, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(norm.running_var.double(), 0.99 + 0.01 * var, rtol=1e-4, atol=1e-6)
    for b in _banks(net):
        for norm in b.norms:
            assert int(norm.num_batches_tracked) == 1


# ----------------------------------------------------------------------------------------------------------------
# prediction


def test_prediction_does_not_depend_on_the_prototypes_or_the_projector():
    trainer = make()
    net = trainer.network
    net.eval()
    net.set_inference_modality("MR")
    torch.manual_seed(3)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = net(x)
        trainer.prototype_bank.prototypes.copy_(F.normalize(torch.randn_like(trainer.prototype_bank.prototypes),
                                                            dim=-1))
        for parameter in net.projector.parameters():
            parameter.add_(torch.randn_like(parameter))
        after = net(x)
    assert not net.return_embeddings
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    # the prototypes are not part of the network's weights (what the predictor loads)
    assert not any("prototype" in key for key in net.state_dict())


@pytest.mark.parametrize("modality", MODALITIES)
def test_predict_applies_the_modalitys_scheme_fingerprint_and_bank(modality, capsys):
    trainer = make()
    net = trainer.network
    net.eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # distinguishable banks: each modality's affine parameters differ
        for bank in _banks(net):
            for norm in bank.norms:
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator))
    predictor = SimpleNamespace(plans_manager=trainer.plans_manager,
                                configuration_manager=trainer.configuration_manager, network=net)
    assert select_modality(predictor, modality, "MODEL") == modality
    k = MODALITIES.index(modality)
    # scheme and fingerprint: nnU-Net's preprocessing normalises with what the predictor now holds
    image = np.array([[[-30.0, 0.0], [50.0, 150.0]]], dtype=np.float32)
    normalised = DefaultPreprocessor()._normalize(
        image.copy(), np.zeros_like(image, dtype=np.int8)[None], predictor.configuration_manager,
        predictor.plans_manager.foreground_intensity_properties_per_channel)
    if modality == "CT":  # clip to the CT fingerprint's [0.5, 99.5] percentiles, its mean and sd
        expected = (np.clip(image, -10.0, 90.0) - 40.0) / 20.0
    else:  # per-image z-score
        expected = (image - image.mean()) / image.std()
    np.testing.assert_allclose(normalised, expected, rtol=1e-5, atol=1e-6)
    # bank: the network's output is that of the modality's own bank, not the other's
    x = torch.randn(1, 1, 16, 16, generator=generator)
    with torch.no_grad():
        selected = net(x)[0]
        own = net(x, modality=k)[0]
        other = net(x, modality=1 - k)[0]
    assert torch.equal(selected, own)
    assert not torch.allclose(selected, other)

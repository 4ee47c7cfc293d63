"""DBDCTrainer and its variants, built and initialised by nnU-Net's own code on tiny 2D plans, driven step by step
with fixed synthetic batches (no data files): the step's streams, the objective sum_k w_k (L_sup + lambda L_dc),
the prototype update (after the optimizer step, only from correctly predicted voxels, no gradient), the variants'
settings, K = 1, and the checkpoint round trip of norm-bank statistics, prototypes and the MAW history.
"""

import copy
import math
import sys
import tempfile

import numpy as np
import pytest
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import trainer_harness  # noqa: E402
from plans_fixtures import DATASET_JSON  # noqa: E402

from nnunet_mmssl.architectures.dbdc import DBDCUNet, ModalityGuardedUNet  # noqa: E402
from nnunet_mmssl.building_blocks.norm_bank import ModalityNormBank  # noqa: E402
from nnunet_mmssl.trainers import dbdc_variants as variants  # noqa: E402
from nnunet_mmssl.trainers.base import SSLTrainerBase  # noqa: E402
from nnunet_mmssl.trainers.dbdc import DBDCDataError, DBDCTrainer  # noqa: E402

MODALITIES = ["CT", "MR"]
UNREGISTERED_JSON = {"channel_names": {"0": "CT+MR"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                     "file_ending": ".nii.gz"}


@pytest.fixture(scope="module", autouse=True)
def folders():
    trainer_harness.set_folders(tempfile.mkdtemp(prefix="dbdc-trainer-"))


def unregistered_plans() -> dict:
    plans = trainer_harness.plans()
    plans["configurations"]["2d"].update(use_mask_for_norm=[False], normalization_schemes=["ZScoreNormalization"])
    plans["mmssl"] = {"layout": "unregistered", "modalities": list(MODALITIES),
                      "intensity_schemes": {"CT": "CTNormalization", "MR": "ZScoreNormalization"}}
    return plans


def make(trainer_class=DBDCTrainer, seed: int = 0, initialize: bool = True, registered: bool = False):
    torch.manual_seed(seed)
    if registered:
        trainer = trainer_class(trainer_harness.plans(), "2d", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    else:
        trainer = trainer_class(unregistered_plans(), "2d", 0, copy.deepcopy(UNREGISTERED_JSON), torch.device("cpu"))
    trainer.print_to_log_file = lambda *args, **kwargs: None
    if initialize:
        trainer.initialize()
    return trainer


class CountingIterator:
    """An unlabelled loader that counts how often it is read."""

    def __init__(self, batch: dict):
        self.batch = batch
        self.reads = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.reads += 1
        return self.batch


def _target(trainer, full: torch.Tensor) -> list[torch.Tensor]:
    scales = trainer._get_deep_supervision_scales()
    return [torch.nn.functional.interpolate(full, scale_factor=s, mode="nearest-exact") if s[0] != 1 else full
            for s in scales]


def modality_batches(trainer, seed: int, targets: list[torch.Tensor] | None = None):
    """K (labelled, unlabelled) pairs, one per modality; modality k's images shifted by 2k."""
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    pairs = []
    for k in range(trainer.num_modalities):
        data = torch.randn((trainer.batch_size, 1, *patch), generator=generator) + 2 * k
        full = (torch.rand((trainer.batch_size, 1, *patch), generator=generator) > 0.6).float() \
            if targets is None else targets[k]
        unlabeled = torch.randn((trainer.unlabeled_batch_size_per_rank(), 1, *patch), generator=generator) + 2 * k
        pairs.append(({"data": data, "target": _target(trainer, full)}, {"data": unlabeled}))
    return pairs


def step(trainer, pairs, seed: int = 0) -> tuple[dict, list[CountingIterator]]:
    loaders = [CountingIterator(u) for _, u in pairs]
    trainer.dataloader_unlabeled = loaders if trainer.use_unlabeled else None
    torch.manual_seed(seed)
    return trainer.train_step({"modality_batches": [lab for lab, _ in pairs]}), loaders


def per_modality_inputs(pairs, unlabelled: bool = True):
    return [(lab["data"], lab["target"], u["data"] if unlabelled else None) for lab, u in pairs]


def losses_with_weights(trainer, inputs, weights, seed: int = 0) -> tuple[float, float]:
    trainer.modality_weights = np.asarray(weights, dtype=np.float64)
    torch.manual_seed(seed)
    with torch.no_grad():
        sup, unsup = trainer.compute_losses(inputs)
    return float(sup), float(unsup)


# ----------------------------------------------------------------------------------------------------------------
# one step


def test_step_reads_k_labelled_and_k_unlabelled_batches_in_one_pass():
    trainer = make()
    assert trainer.modalities == MODALITIES and isinstance(trainer.network, DBDCUNet)
    pairs = modality_batches(trainer, seed=1)
    calls, runs = [], []

    def record(_module, args, kwargs):
        calls.append((args[0].detach().clone(), kwargs.get("modality"), kwargs.get("perturb_features")))
        runs.append(kwargs.get("modality_runs"))

    hook = trainer.network.register_forward_pre_hook(record, with_kwargs=True)
    trainer.on_train_epoch_start()
    out, loaders = step(trainer, pairs)
    hook.remove()
    assert [loader.reads for loader in loaders] == [1, 1]
    b, bu = trainer.batch_size, trainer.unlabeled_batch_size_per_rank()
    assert len(calls) == 2  # no-grad pseudo-label pass, then one pass for everything
    clean, modality_u, perturb_u = calls[0]
    torch.testing.assert_close(clean, torch.cat([u["data"] for _, u in pairs]))
    assert modality_u.tolist() == [0] * bu + [1] * bu and perturb_u is None
    x, modality, perturb = calls[1]
    run = b + 2 * bu  # labelled, image-perturbed, feature-perturbed unlabelled: one contiguous run per modality
    assert x.shape[0] == 2 * run
    assert modality.tolist() == [0] * run + [1] * run
    assert perturb.tolist() == ([False] * (b + bu) + [True] * bu) * 2
    assert runs == [((0, bu), (1, bu)), ((0, run), (1, run))]  # the banks' fused per-modality path
    for k, (labelled, unlabelled) in enumerate(pairs):
        start = k * run
        torch.testing.assert_close(x[start:start + b], labelled["data"])
        image_perturbed = x[start + b:start + b + bu]
        assert not torch.allclose(image_perturbed, unlabelled["data"])
        assert (image_perturbed - unlabelled["data"]).abs().mean() < 0.5  # noise + scaling, not another image
        torch.testing.assert_close(x[start + b + bu:start + run], unlabelled["data"])
    assert math.isfinite(float(out["objective"])) and float(out["unsup_loss"]) > 0


def test_step_with_modality_runs_equals_the_one_hot_step(monkeypatch):
    """The host-known runs the step passes change the banks' kernels, not the step: losses, updated weights and
    running statistics equal those of the same step on the one-hot path."""
    import nnunet_mmssl.trainers.dbdc as dbdc_module

    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(dbdc_module, "modality_runs", lambda counts, batch: None)
        trainer = make(seed=3)
        trainer.on_train_epoch_start()
        out, _ = step(trainer, modality_batches(trainer, seed=4), seed=5)
        results.append((out, {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}))
    (fused_out, fused_state), (hot_out, hot_state) = results
    for key in ("objective", "unsup_loss"):
        assert float(fused_out[key]) == pytest.approx(float(hot_out[key]), rel=1e-4, abs=1e-6)
    assert fused_state.keys() == hot_state.keys()
    for key in fused_state:
        torch.testing.assert_close(fused_state[key], hot_state[key], rtol=1e-3, atol=1e-5, msg=key)
    assert any("running_mean" in k and float(v.abs().sum()) > 0 for k, v in fused_state.items())


def test_objective_is_the_weighted_sum_over_modalities():
    trainer = make()
    trainer.network.train()
    inputs = per_modality_inputs(modality_batches(trainer, seed=2))
    sup0, unsup0 = losses_with_weights(trainer, inputs, [1.0, 0.0])
    sup1, unsup1 = losses_with_weights(trainer, inputs, [0.0, 1.0])
    assert min(sup0, sup1, unsup0, unsup1) > 0 and not math.isclose(sup0, sup1, rel_tol=1e-3)
    sup, unsup = losses_with_weights(trainer, inputs, [0.4, 1.6])
    assert sup == pytest.approx(0.4 * sup0 + 1.6 * sup1, rel=1e-5)
    assert unsup == pytest.approx(0.4 * unsup0 + 1.6 * unsup1, rel=1e-5)
    assert losses_with_weights(trainer, inputs, [1.0, 1.0]) == pytest.approx((sup0 + sup1, unsup0 + unsup1),
                                                                             rel=1e-5)

    # the step: objective = sup + lambda(t) unsup, lambda = lambda_max exp(-5 (1 - t/T)^2) over the whole run
    trainer.unsupervised_weight = 2.0
    trainer.num_epochs = 10
    trainer.current_epoch = 3
    trainer.on_train_epoch_start()
    trainer.modality_weights = np.array([0.4, 1.6])
    out, _ = step(trainer, modality_batches(trainer, seed=3))
    expected_lambda = 2.0 * math.exp(-5 * (1 - 3 / 10) ** 2)
    assert float(out["unsup_weight"]) == pytest.approx(expected_lambda)
    assert float(out["objective"]) == pytest.approx(float(out["sup_loss"]) + expected_lambda *
                                                    float(out["unsup_loss"]), rel=1e-5)


def test_no_maw_variant_ignores_modality_weights():
    trainer = make(variants.DBDCTrainer_noMAW)
    trainer.network.train()
    inputs = per_modality_inputs(modality_batches(trainer, seed=2))
    assert losses_with_weights(trainer, inputs, [0.0, 2.0]) == pytest.approx(
        losses_with_weights(trainer, inputs, [1.0, 1.0]), rel=1e-6)


def test_prototypes_update_after_the_step_only_from_correct_voxels():
    trainer = make()
    with torch.no_grad():  # every voxel predicted background
        for layer in trainer.network.decoder.seg_layers:
            layer.bias.copy_(torch.tensor([100.0, 0.0]))
    patch = trainer.configuration_manager.patch_size
    # modality 0: all background (all correct); modality 1: right half foreground (wrong), left half background
    mr = torch.zeros((trainer.batch_size, 1, *patch))
    mr[..., patch[-1] // 2:] = 1
    targets = [torch.zeros((trainer.batch_size, 1, *patch)), mr]
    pairs = modality_batches(trainer, seed=4, targets=targets)
    before = trainer.prototype_bank.prototypes.clone()
    assert not before.requires_grad
    at_optimizer_step = []
    optimizer_step = trainer.optimizer.step

    def spy(*args, **kwargs):
        at_optimizer_step.append(trainer.prototype_bank.prototypes.clone())
        return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = spy
    trainer.on_train_epoch_start()
    step(trainer, pairs)
    after = trainer.prototype_bank.prototypes
    assert len(at_optimizer_step) == 1 and torch.equal(at_optimizer_step[0], before)  # not during the step
    assert not torch.allclose(after[0, 0], before[0, 0])  # modality 0, background: updated
    torch.testing.assert_close(after[0, 0].norm(), torch.tensor(1.0))
    torch.testing.assert_close(after[0, 1], before[0, 1])  # no foreground voxel in modality 0
    assert not torch.allclose(after[1, 0], before[1, 0])  # modality 1's own background prototype
    torch.testing.assert_close(after[1, 1], before[1, 1])  # modality 1's foreground: none predicted correctly
    assert trainer._pending_prototype_updates == []


def test_no_gradient_reaches_the_prototypes():
    trainer = make()
    trainer.network.train()
    inputs = per_modality_inputs(modality_batches(trainer, seed=5))
    sup, unsup = trainer.compute_losses(inputs)
    (sup + unsup).backward()
    bank = trainer.prototype_bank
    assert list(bank.parameters()) == [] and not bank.prototypes.requires_grad and bank.prototypes.grad is None
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(bank.prototypes) not in optimised
    # the MPCL terms do train the projector
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.network.projector.parameters())
    for embeddings, _, _, _ in trainer._pending_prototype_updates:
        assert not embeddings.requires_grad


# ----------------------------------------------------------------------------------------------------------------
# variants


def _banks(network) -> list[ModalityNormBank]:
    return [m for m in network.modules() if isinstance(m, ModalityNormBank)]


@pytest.mark.parametrize("name, expected", [
    ("DBDCTrainer", dict(use_prototypes=True, use_maw=True, use_unlabeled=True, consistency_terms=("ipc", "fpc"),
                         mpcl_terms=("pseg", "mc", "pc", "pd"), norm_bank_scope="all")),
    ("DBDCTrainer_noMLPB_noMAW", dict(use_prototypes=False, use_maw=False, consistency_terms=("ipc", "fpc"))),
    ("DBDCTrainer_noMAW", dict(use_prototypes=True, use_maw=False)),
    ("DBDCTrainer_lossNone", dict(use_unlabeled=False, consistency_terms=(), mpcl_terms=("pseg",))),
    ("DBDCTrainer_lossIpc", dict(use_unlabeled=True, consistency_terms=("ipc",), mpcl_terms=("pseg",))),
    ("DBDCTrainer_lossIpcFpc", dict(consistency_terms=("ipc", "fpc"), mpcl_terms=("pseg",))),
    ("DBDCTrainer_lossIpcFpcMc", dict(consistency_terms=("ipc", "fpc"), mpcl_terms=("pseg", "mc"))),
    ("DBDCTrainer_lossIpcFpcMcPc", dict(consistency_terms=("ipc", "fpc"), mpcl_terms=("pseg", "mc", "pc"))),
    ("DBDCTrainer_mlmbNone", dict(norm_bank_scope="none")),
    ("DBDCTrainer_mlmbEncoder", dict(norm_bank_scope="encoder")),
    ("DBDCTrainer_mlmbEncoderBottleneck", dict(norm_bank_scope="encoder+bottleneck")),
    ("DBDCSupervisedTrainer", dict(use_unlabeled=False, use_prototypes=True, use_maw=True)),
])
def test_variant_settings_reach_the_network(name, expected):
    cls = DBDCTrainer if name == "DBDCTrainer" else getattr(variants, name)
    trainer = make(cls)
    for attribute, value in expected.items():
        assert getattr(trainer, attribute) == value, attribute
    network = trainer.network
    assert isinstance(network, DBDCUNet)
    # the network is data in the plans: nnU-Net's plans of this trainer carry the variant's settings
    kwargs = trainer.configuration_manager.network_arch_init_kwargs
    assert kwargs["norm_bank_scope"] == trainer.norm_bank_scope and kwargs["modalities"] == MODALITIES
    assert kwargs["use_projector"] == trainer.use_prototypes
    assert (network.projector is not None) == trainer.use_prototypes
    assert (trainer.prototype_bank is not None) == trainer.use_prototypes
    per_modality = {"none": 0, "encoder": 2, "encoder+bottleneck": 3, "all": 5}[trainer.norm_bank_scope]
    assert sum(b.num_modalities == 2 for b in _banks(network)) == per_modality
    assert network.norm_bank_counts == {"banks": per_modality, "shared": 5 - per_modality}


@pytest.mark.parametrize("cls", [variants.DBDCSupervisedTrainer, variants.DBDCTrainer_lossNone])
def test_supervised_variants_use_no_unlabelled_data(cls):
    trainer = make(cls)
    pairs = modality_batches(trainer, seed=6)
    calls = []
    hook = trainer.network.register_forward_pre_hook(lambda _m, args, _k: calls.append(args[0].shape[0]),
                                                     with_kwargs=True)
    trainer.on_train_epoch_start()
    out, _ = step(trainer, pairs)  # no unlabelled loader at all
    hook.remove()
    assert trainer.dataloader_unlabeled is None
    assert calls == [2 * trainer.batch_size]  # labelled batches only, no pseudo-label pass
    assert float(out["unsup_loss"]) == 0 and float(out["unsup_weight"]) == 0
    assert float(out["objective"]) == pytest.approx(float(out["sup_loss"]))


def test_pooled_unet_trainer_is_a_plain_network():
    trainer = make(variants.PooledUNetTrainer)
    assert not isinstance(trainer, SSLTrainerBase)
    network = trainer.network
    assert isinstance(network, ModalityGuardedUNet) and not isinstance(network, DBDCUNet)
    assert not _banks(network) and not hasattr(network, "projector")
    assert network.modalities == MODALITIES and network.guard_enabled is False
    assert trainer.configuration_manager.network_arch_class_name.endswith("ModalityGuardedUNet")
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in network.modules())  # nnU-Net's planned norm
    network.eval()
    with torch.no_grad():  # training data are normalised per case: the trainer's network needs no modality
        assert network(torch.randn(1, 1, 16, 16))[0].shape == (1, 2, 16, 16)


# ----------------------------------------------------------------------------------------------------------------
# K = 1 and checkpoints


def test_single_modality_dataset_trains():
    trainer = make(registered=True)
    assert trainer.modalities == ["A+B"] and trainer.num_modalities == 1
    assert trainer.network.norm_bank_counts == {"banks": 0, "shared": 5}
    assert trainer.prototype_bank.prototypes.shape == (1, 2, 64)
    before = trainer.prototype_bank.prototypes.clone()
    generator = torch.Generator().manual_seed(7)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn((trainer.batch_size, 2, *patch), generator=generator)
    target = _target(trainer, (torch.rand((trainer.batch_size, 1, *patch), generator=generator) > 0.6).float())
    unlabeled = torch.randn((trainer.unlabeled_batch_size_per_rank(), 2, *patch), generator=generator)
    trainer.on_train_epoch_start()
    out, loaders = step(trainer, [({"data": data, "target": target}, {"data": unlabeled})])
    assert loaders[0].reads == 1
    assert math.isfinite(float(out["objective"])) and float(out["unsup_loss"]) > 0
    assert not torch.allclose(trainer.prototype_bank.prototypes, before)
    trainer.network.eval()
    with torch.no_grad():  # one modality: predicts without being told
        assert trainer.network(data[:1])[0].shape == (1, 2, *patch)


def test_checkpoint_restores_bank_statistics_prototypes_and_maw_history(tmp_path):
    trainer = make(seed=0)
    trainer.on_train_epoch_start()
    for seed in (10, 11):
        step(trainer, modality_batches(trainer, seed=seed), seed=seed)
    trainer.maw.record([0.5, 0.25])
    trainer.maw.record([0.625, 0.375])
    trainer.modality_weights = np.array([0.75, 1.25])
    bank = _banks(trainer.network)[0]
    assert not torch.allclose(bank.norms[0].running_mean, bank.norms[1].running_mean)
    checkpoint = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(checkpoint)

    resumed = make(seed=5, initialize=False)
    resumed.load_checkpoint(checkpoint)
    expected, actual = trainer.network.state_dict(), resumed.network.state_dict()
    statistics = [k for k in expected if "running_" in k or "num_batches_tracked" in k]
    assert statistics and expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    assert torch.equal(resumed.prototype_bank.prototypes, trainer.prototype_bank.prototypes)
    assert resumed.maw.history == [[0.5, 0.25], [0.625, 0.375]]
    assert resumed.maw.state_dict() == trainer.maw.state_dict()
    assert resumed.modality_weights.tolist() == [0.75, 1.25]


# ----------------------------------------------------------------------------------------------------------------
# MAW from the per-modality validation Dice


def _val(modality: int, tp: float, fp: float, fn: float) -> dict:
    return {"loss": np.float64(0.5), "tp_hard": np.array([tp]), "fp_hard": np.array([fp]), "fn_hard": np.array([fn]),
            "modality": modality}


@pytest.mark.parametrize("cls", [DBDCTrainer, variants.DBDCTrainer_noMAW])
def test_validation_dice_per_modality_feeds_maw(cls):
    trainer = make(cls)
    trainer.num_epochs = 10  # MAW window tau = min(20, max(2, 10 // 5)) = 2 epochs
    assert trainer.maw.tau == 2
    # modality 0: tp 3 + 1, fp 1 + 0, fn 1 + 1 -> Dice 8 / 11; modality 1: tp 2, fp 2, fn 0 -> Dice 4 / 6
    outputs = [_val(0, 3, 1, 1), _val(1, 2, 2, 0), _val(0, 1, 0, 1)]
    torch.testing.assert_close(trainer.per_modality_dice(outputs), np.array([8 / 11, 2 / 3]), check_dtype=False)
    assert np.isnan(trainer.per_modality_dice([_val(0, 1, 0, 0)])[1])  # no validation batch of modality 1
    epochs = [outputs, [_val(0, 5, 1, 1), _val(1, 2, 1, 1)], [_val(0, 6, 1, 0), _val(1, 2, 1, 1)]]
    for epoch, val_outputs in enumerate(epochs):
        trainer.current_epoch = epoch
        trainer.on_validation_epoch_end(val_outputs)
        if epoch < 2:  # the window is not full yet
            assert trainer.modality_weights.tolist() == [1.0, 1.0]
    assert trainer.maw.history[0] == pytest.approx([8 / 11, 2 / 3])
    assert len(trainer.maw.history) == 3
    assert trainer.logger.get_value("modality_val_dice", step=0) == pytest.approx([8 / 11, 2 / 3])
    if cls is DBDCTrainer:
        weights = trainer.modality_weights
        assert weights.sum() == pytest.approx(2.0) and not np.allclose(weights, 1.0)
        np.testing.assert_allclose(weights, trainer.maw.weights())
    else:  # the history is kept (and saved), the weights stay equal
        assert trainer.modality_weights.tolist() == [1.0, 1.0]


def test_dbdc_needs_nnunets_plain_or_resenc_unet_plans():
    plans = unregistered_plans()
    plans["configurations"]["2d"]["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.unet.ResidualUNet"
    with pytest.raises(ValueError, match="DBDCTrainer: .*PlainConvUNet or .*ResidualEncoderUNet plans, but this "
                                         "configuration uses dynamic_network_architectures.architectures.unet."
                                         "ResidualUNet"):
        DBDCTrainer(plans, "2d", 0, copy.deepcopy(UNREGISTERED_JSON), torch.device("cpu"))
    trainer = make()
    with pytest.raises(DBDCDataError, match="modalities \\['T1', 'T2'\\]"):
        trainer.load_checkpoint_extra_state({**trainer.checkpoint_extra_state(), "modalities": ["T1", "T2"]})

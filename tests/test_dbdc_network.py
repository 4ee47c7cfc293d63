"""DBDC's network: the modality norm bank (MLMB, eqs. 1-3), its replacement in nnU-Net's U-Net, DBDCUNet's outputs
(deep supervision, projector embeddings, feature perturbation), modality selection and the modality guard.

Networks are built from the fixture plans' architecture (nnU-Net's PlainConvUNet kwargs) through nnU-Net's own
``get_network_from_plans``, in 2D and 3D.
"""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from plans_fixtures import ARCH_2D  # noqa: E402

from nnunet_mmssl.architectures.dbdc import DBDCUNet, ModalityGuardedUNet  # noqa: E402
from nnunet_mmssl.building_blocks.norm_bank import (  # noqa: E402
    ModalityContext,
    ModalityNormBank,
    ModalityNotSetError,
    modality_runs,
    replace_norms_with_banks,
    running_statistics_frozen,
)
from nnunet_mmssl.diagnostics import debug_checks  # noqa: E402

DBDC = "nnunet_mmssl.architectures.dbdc.DBDCUNet"
GUARDED = "nnunet_mmssl.architectures.dbdc.ModalityGuardedUNet"
MODALITIES = ["CT", "MR"]


def _arch(dim: int, n_stages: int = 3) -> dict:
    """The fixture architecture (3 stages) or a 4-stage one (3 decoder stages), in 2D or 3D."""
    arch = copy.deepcopy(ARCH_2D)
    kwargs = arch["arch_kwargs"]
    features = [4, 8, 16, 16][:n_stages]
    kwargs.update(n_stages=n_stages, features_per_stage=features, kernel_sizes=[[3] * dim] * n_stages,
                  strides=[[1] * dim] + [[2] * dim] * (n_stages - 1), n_conv_per_stage=[1] * n_stages,
                  n_conv_per_stage_decoder=[1] * (n_stages - 1),
                  conv_op=f"torch.nn.modules.conv.Conv{dim}d",
                  norm_op=f"torch.nn.modules.instancenorm.InstanceNorm{dim}d")
    return arch


def _build(dim: int = 2, n_stages: int = 3, cls: str = DBDC, deep_supervision: bool = True, seed: int = 0,
           num_classes: int = 3, **extra) -> nn.Module:
    arch = _arch(dim, n_stages)
    kwargs = {**arch["arch_kwargs"], **extra}
    torch.manual_seed(seed)
    return get_network_from_plans(cls, kwargs, arch["_kw_requires_import"], 1, num_classes, allow_init=True,
                                  deep_supervision=deep_supervision)


def _shape(dim: int, size: int = 16) -> tuple[int, ...]:
    return (size,) * dim


def _randomise_affine(bank: ModalityNormBank, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in bank.norms:
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator))


# ----------------------------------------------------------------------------------------------------------------
# ModalityNormBank


@pytest.mark.parametrize("dim", [2, 3])
def test_bank_mixed_batch_equals_per_modality_batches(dim):
    context = ModalityContext()
    bank = ModalityNormBank(3, 4, dim, context)
    _randomise_affine(bank, 1)
    bank.train()
    reference = copy.deepcopy(bank)  # the same norms, fed one modality at a time
    reference._context = context
    generator = torch.Generator().manual_seed(0)
    # per-modality offsets, so the batch statistics of each modality differ from the mixed batch's
    modality = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    x = torch.randn((7, 4, *_shape(dim, 5)), generator=generator) + modality.view(-1, *[1] * (dim + 1)) * 3.0
    x.requires_grad_(True)
    context.set(modality)  # not sorted, on the device: the one-hot path
    out = bank(x)
    weights = torch.randn(out.shape, generator=generator)
    (out * weights).sum().backward()
    for k in range(3):
        pick = modality == k
        part = x.detach()[pick].requires_grad_(True)
        context.set(k)  # one modality known on the host: nn.BatchNorm itself
        expected = reference(part)
        (expected * weights[pick]).sum().backward()
        torch.testing.assert_close(out[pick], expected)
        torch.testing.assert_close(x.grad[pick], part.grad)
        for mine, theirs in zip(bank.norms[k].parameters(), reference.norms[k].parameters(), strict=True):
            torch.testing.assert_close(mine.grad, theirs.grad)
        torch.testing.assert_close(bank.norms[k].running_mean, reference.norms[k].running_mean)
        torch.testing.assert_close(bank.norms[k].running_var, reference.norms[k].running_var)
        assert int(bank.norms[k].num_batches_tracked) == int(reference.norms[k].num_batches_tracked) == 1
    # a norm shared by all modalities would have given something else
    shared = F.batch_norm(x, None, None, bank.norms[0].weight, bank.norms[0].bias, training=True)
    assert not torch.allclose(out, shared, atol=1e-3)


@pytest.mark.parametrize("kind", ["batch", "instance"])
def test_bank_modality_vector_equals_the_modalitys_own_norm(kind):
    """A whole batch of one modality given as a tensor (device path) or an int (that modality's nn norm): equal
    outputs in training and eval, and the absent modality's statistics untouched; half precision close."""
    context = ModalityContext()
    bank = ModalityNormBank(2, 3, 2, context, kind=kind, momentum=0.3)
    _randomise_affine(bank, 2)
    native = copy.deepcopy(bank)
    native._context = context
    x = torch.randn((5, 3, 4, 6), generator=torch.Generator().manual_seed(1)) * 2 + 1
    for train in (True, False):
        bank.train(train)
        native.train(train)
        context.set(torch.ones(5, dtype=torch.long))
        out = bank(x)
        context.set(1)
        torch.testing.assert_close(out, native(x))
    for mine, theirs in zip(bank.buffers(), native.buffers(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
    if kind == "batch":
        assert not torch.equal(bank.norms[1].running_mean, torch.zeros(3))
        assert torch.equal(bank.norms[0].running_mean, torch.zeros(3))
        assert int(bank.norms[0].num_batches_tracked) == 0
    context.set(torch.ones(5, dtype=torch.long))
    bank.train()
    half = bank(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), bank(x), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("dim", [2, 3])
def test_bank_runs_path_equals_the_one_hot_path(dim, monkeypatch):
    """Host-known contiguous runs: the fused per-run batch norm gives the one-hot path's outputs, input and parameter
    gradients, running statistics (momentum 0.01; a modality absent from the batch untouched) and batch counts; the
    one-hot statistics are not computed at all; frozen statistics stay frozen."""
    context = ModalityContext()
    bank = ModalityNormBank(3, 4, dim, context)  # momentum 0.01, DBDC's
    _randomise_affine(bank, 4)
    bank.train()
    one_hot = copy.deepcopy(bank)
    one_hot._context = context
    generator = torch.Generator().manual_seed(5)
    modality = torch.tensor([2, 2, 2, 0, 0])  # modality 1 absent; runs out of index order
    x = torch.randn((5, 4, *_shape(dim, 5)), generator=generator) * 1.5 + modality.view(-1, *[1] * (dim + 1)) * 3.0
    weights = torch.randn(x.shape, generator=generator)
    x_runs, x_hot = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    context.set(modality)
    expected = one_hot(x_hot)
    (expected * weights).sum().backward()
    monkeypatch.setattr(ModalityNormBank, "_batch_statistics", lambda *a: pytest.fail("one-hot path taken"))
    context.set(modality, runs=((2, 3), (0, 2)))
    out = bank(x_runs)
    (out * weights).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_runs.grad, x_hot.grad, rtol=1e-4, atol=1e-5)
    for mine, theirs in zip(bank.parameters(), one_hot.parameters(), strict=True):  # absent modality: None vs 0
        torch.testing.assert_close(torch.zeros_like(theirs) if mine.grad is None else mine.grad, theirs.grad,
                                   rtol=1e-4, atol=1e-5)
    assert bank.norms[2].weight.grad.abs().sum() > 0
    for mine, theirs in zip(bank.buffers(), one_hot.buffers(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    # 0.99 * 0 + 0.01 * the run's mean: modality 2's channels moved, modality 1's did not
    torch.testing.assert_close(bank.norms[2].running_mean, 0.01 * x[:3].mean(dim=(0, *range(2, dim + 2))))
    assert [int(n.num_batches_tracked) for n in bank.norms] == [1, 0, 1]
    assert torch.equal(bank.norms[1].running_mean, torch.zeros(4))
    before = [b.clone() for b in bank.buffers()]
    with running_statistics_frozen(bank):
        bank(x)
    assert all(torch.equal(a, b) for a, b in zip(before, bank.buffers(), strict=True))


def test_modality_runs_merge_drop_and_refuse():
    assert modality_runs([(0, 2), (0, 3), (1, 0), (1, 4)], 9) == ((0, 5), (1, 4))
    assert modality_runs([(1, 2), (0, 1)], 3) == ((1, 2), (0, 1))
    assert modality_runs([(0, 2), (1, 1), (0, 1)], 4) is None  # modality 0 twice: its statistics must pool
    with pytest.raises(ValueError, match="cover 3 samples of a batch of 4"):
        modality_runs([(0, 2), (1, 1)], 4)


def test_network_checks_runs_against_the_modality_vector_with_debug_checks():
    network = _build(2, modalities=MODALITIES).train()
    x = torch.randn(3, 1, 16, 16)
    with debug_checks(), pytest.raises(ValueError, match="do not describe the modality vector"):
        network(x, modality=torch.tensor([0, 1, 1]), modality_runs=((0, 2), (1, 1)))
    with debug_checks():
        network(x, modality=torch.tensor([0, 1, 1]), modality_runs=((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="do not cover a batch of 3"):  # checked without debug checks too
        network(x, modality=torch.tensor([0, 1, 1]), modality_runs=((0, 1), (1, 1)))


def test_bank_running_statistics_per_modality():
    context = ModalityContext()
    bank = ModalityNormBank(2, 3, 2, context, momentum=0.5).train()
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3)) + 5.0
    context.set(torch.zeros(4, dtype=torch.long))
    bank(x)
    # momentum 0.5 from 0: running_mean = 0.5 * batch mean (about 5 per channel)
    torch.testing.assert_close(bank.norms[0].running_mean, 0.5 * x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bank.norms[1].running_mean, torch.zeros(3))
    torch.testing.assert_close(bank.norms[1].running_var, torch.ones(3))
    assert int(bank.norms[0].num_batches_tracked) == 1 and int(bank.norms[1].num_batches_tracked) == 0


def test_bank_needs_a_modality_and_a_matching_length():
    context = ModalityContext()
    bank = ModalityNormBank(2, 3, 2, context)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ModalityNotSetError):
        bank(x)
    context.set(torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        bank(x)
    single = ModalityNormBank(1, 3, 2, ModalityContext()).eval()  # one norm: no modality needed
    torch.testing.assert_close(single(x), single.norms[0](x))


# ----------------------------------------------------------------------------------------------------------------
# replacing nnU-Net's norms


def _norms_outside_banks(module: nn.Module) -> list[nn.Module]:
    found = []
    for child in module.children():
        if isinstance(child, ModalityNormBank):
            continue
        if isinstance(child, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            found.append(child)
        found += _norms_outside_banks(child)
    return found


def _banks(module: nn.Module) -> list[ModalityNormBank]:
    return [m for m in module.modules() if isinstance(m, ModalityNormBank)]


@pytest.mark.parametrize("scope, banks, shared", [("none", 0, 5), ("encoder", 2, 3), ("encoder+bottleneck", 3, 2),
                                                  ("all", 5, 0)])
def test_replace_scopes_count_one_bank_per_norm(scope, banks, shared):
    # fixture U-Net: encoder stages 0, 1 (one conv each), bottleneck stage 2, decoder stages 0, 1: five norms
    net = _build(norm_bank_scope=scope, modalities=MODALITIES)
    assert net.norm_bank_counts == {"banks": banks, "shared": shared}
    made = _banks(net)
    assert len(made) == banks + shared  # a bank reachable twice (.norm and all_modules) is listed once
    assert sum(b.num_modalities == 2 for b in made) == banks
    assert sum(b.num_modalities == 1 for b in made) == shared
    assert not _norms_outside_banks(net)
    assert all(isinstance(n, nn.BatchNorm2d) for b in made for n in b.norms)
    # where the banks are: the encoder's non-bottleneck stages first, then the bottleneck, then the decoder
    per_part = [sum(b.num_modalities for b in _banks(stage)) for stage in (*net.encoder.stages, *net.decoder.stages)]
    expected = {"none": [1, 1, 1, 1, 1], "encoder": [2, 2, 1, 1, 1], "encoder+bottleneck": [2, 2, 2, 1, 1],
                "all": [2, 2, 2, 2, 2]}[scope]
    assert per_part == expected


@pytest.mark.parametrize("scope", ["none", "encoder", "all"])
def test_each_conv_block_norm_is_one_bank_used_in_forward(scope):
    net = _build(norm_bank_scope=scope, modalities=MODALITIES).train()
    blocks = [m for m in net.modules() if isinstance(m, ConvDropoutNormReLU)]
    assert blocks
    for block in blocks:
        assert isinstance(block.norm, ModalityNormBank)
        assert any(m is block.norm for m in block.all_modules)  # the bank forward runs is the bank .norm names
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = net(x, modality=torch.tensor([0, 0, 1, 1]))
    sum(o.square().mean() for o in out).backward()
    for bank in _banks(net):
        for name, parameter in bank.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"unused bank parameter {name}"


def test_replace_rejects_unknown_scope():
    net = PlainConvUNet(1, 3, [4, 8, 16], nn.Conv2d, 3, [1, 2, 2], 1, 2, 1, norm_op=nn.InstanceNorm2d,
                        norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU)
    with pytest.raises(ValueError, match="'decoder'"):
        replace_norms_with_banks(net.encoder.stages, net.decoder.stages, 2, 2, ModalityContext(), scope="decoder")


# ----------------------------------------------------------------------------------------------------------------
# statistics are buffers: state dict, .to(), round trip


def _train_statistics(net: DBDCUNet, dim: int) -> None:
    net.train()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(3):
            ct = torch.randn((2, 1, *_shape(dim)), generator=generator) * 3 + 2
            mr = torch.randn((2, 1, *_shape(dim)), generator=generator) * 0.5 - 1
            net(torch.cat([ct, mr]), modality=torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize("dim", [2, 3])
def test_statistics_are_buffers_and_round_trip(dim):
    net = _build(dim, modalities=MODALITIES)
    stat_keys = [k for k, _ in net.named_buffers() if k.endswith("running_mean")]  # each tensor once
    assert len(stat_keys) == 5 * 2  # five banks of two norms
    assert all(".norms.0." in k or ".norms.1." in k for k in stat_keys)
    assert set(stat_keys) <= set(net.state_dict())
    _train_statistics(net, dim)
    first = _banks(net)[0]
    assert not torch.allclose(first.norms[0].running_mean, first.norms[1].running_mean)

    fresh = _build(dim, modalities=MODALITIES, seed=7)
    fresh.load_state_dict(net.state_dict(), strict=True)
    net.eval()
    fresh.eval()
    x = torch.randn((2, 1, *_shape(dim)), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        for k in range(2):
            for a, b in zip(net(x, modality=k), fresh(x, modality=k), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        # eval uses each modality's own statistics: the same image gives different logits per modality
        assert not torch.allclose(net(x, modality=0)[0], net(x, modality=1)[0], atol=1e-3)

    moved = copy.deepcopy(net).to(torch.float64)
    assert all(b.dtype == torch.float64 for n, b in moved.named_buffers() if "running" in n)
    torch.testing.assert_close(moved.state_dict()[stat_keys[0]], net.state_dict()[stat_keys[0]].double())
    with torch.no_grad():  # a deep copy has its own modality context and works
        torch.testing.assert_close(moved(x.double(), modality=1)[0].float(), net(x, modality=1)[0])


# ----------------------------------------------------------------------------------------------------------------
# DBDCUNet outputs


def test_modality_not_set_error_names_the_option():
    net = _build(modalities=MODALITIES).eval()
    with pytest.raises(ModalityNotSetError, match="--modality CT\\|MR"):
        net(torch.randn(1, 1, 16, 16))
    assert isinstance(ModalityNotSetError("x"), ValueError)
    single = _build(modalities=["CT"]).eval()  # one modality: nothing to choose
    assert single(torch.randn(1, 1, 16, 16))[0].shape == (1, 3, 16, 16)


@pytest.mark.parametrize("dim", [2, 3])
def test_deep_supervision_and_embeddings(dim):
    net = _build(dim, n_stages=4, modalities=MODALITIES)
    assert isinstance(net, DBDCUNet) and net.projector_scales == 3 and net.projector[0].in_channels == 4 + 8 + 16
    x = torch.randn((2, 1, *_shape(dim)), generator=torch.Generator().manual_seed(0))
    modality = torch.tensor([0, 1])
    out = net(x, modality=modality)
    assert [tuple(o.shape) for o in out] == [(2, 3, *_shape(dim, s)) for s in (16, 8, 4)]

    features = []
    hooks = [stage.register_forward_hook(lambda _m, _i, o: features.append(o)) for stage in net.decoder.stages]
    net.return_embeddings = True
    try:
        logits, embeddings = net(x, modality=modality)
    finally:
        net.return_embeddings = False
        for hook in hooks:
            hook.remove()
    assert len(logits) == 3 and embeddings.shape == (2, 64, *_shape(dim))
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2, *_shape(dim)))
    # embeddings = projector(concat of the three decoder scales, upsampled to full resolution), L2-normalised
    full = features[-1].shape[2:]
    mode = "bilinear" if dim == 2 else "trilinear"
    concat = torch.cat([features[2], F.interpolate(features[1], size=full, mode=mode, align_corners=False),
                        F.interpolate(features[0], size=full, mode=mode, align_corners=False)], 1)
    torch.testing.assert_close(embeddings, F.normalize(net.projector(concat), dim=1))

    net.deep_supervision = False
    single = net(x, modality=modality)
    assert torch.is_tensor(single) and single.shape == (2, 3, *_shape(dim))
    plain = _build(dim, n_stages=4, modalities=MODALITIES, use_projector=False)
    assert plain.projector is None
    plain.return_embeddings = True
    with pytest.raises(RuntimeError, match="use_projector"):
        plain(x, modality=modality)


def test_feature_dropout_only_when_asked():
    # instance-norm banks: samples do not interact, so a perturbed sample cannot change another one
    net = _build(n_stages=4, modalities=MODALITIES, norm_bank_kind="instance", feature_dropout=0.5).train()
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    modality = torch.tensor([0, 1, 1])
    with torch.no_grad():
        torch.manual_seed(1)
        clean = net(x, modality=modality)[0]
        torch.manual_seed(2)  # no mask: no dropout, whatever the RNG (train mode)
        torch.testing.assert_close(net(x, modality=modality)[0], clean)
        torch.testing.assert_close(net(x, modality=modality, perturb_features=torch.zeros(3, dtype=torch.bool))[0],
                                   clean)
        torch.manual_seed(3)
        perturbed = net(x, modality=modality, perturb_features=torch.tensor([True, False, True]))[0]
    torch.testing.assert_close(perturbed[1], clean[1])
    assert not torch.allclose(perturbed[0], clean[0]) and not torch.allclose(perturbed[2], clean[2])

    # the bottleneck's channels: masked samples 0 or scaled by 1 / (1 - p), the others untouched
    bottleneck = torch.rand(2, 16, 2, 2) + 1.0
    torch.manual_seed(4)
    dropped = net._perturb(bottleneck, torch.tensor([True, False]))
    torch.testing.assert_close(dropped[1], bottleneck[1])
    ratio = dropped[0] / bottleneck[0]
    per_channel = ratio.flatten(1)
    assert torch.all((per_channel == 0).all(1) | torch.isclose(per_channel, torch.tensor(2.0)).all(1))
    assert 0 < int((per_channel == 0).all(1).sum()) < 16

    net.eval()  # evaluation/prediction never asks: deterministic
    with torch.no_grad():
        torch.manual_seed(5)
        a = net(x, modality=modality)[0]
        torch.manual_seed(6)
        torch.testing.assert_close(net(x, modality=modality)[0], a)


def test_set_inference_modality():
    net = _build(modalities=MODALITIES).eval()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    _train_statistics(net, 2)
    net.eval()
    with torch.no_grad():
        explicit = net(x, modality=torch.tensor([1, 1]))[0]
        net.set_inference_modality("MR")
        assert net.inference_modality == 1
        torch.testing.assert_close(net(x)[0], explicit)
        net.set_inference_modality(0)
        torch.testing.assert_close(net(x)[0], net(x, modality=0)[0])
        torch.testing.assert_close(net(x, modality=1)[0], explicit)  # an explicit modality wins
    with pytest.raises(ValueError, match="'T2'.*\\['CT', 'MR'\\]"):
        net.set_inference_modality("T2")
    with pytest.raises(ValueError, match="index 2 out of range"):
        net.set_inference_modality(2)
    with pytest.raises(ValueError, match="out of range"):  # an index on the host: always checked
        net(x, modality=3)
    with debug_checks(), pytest.raises(ValueError, match="out of range"):  # on the device: a synchronising check
        net(x, modality=torch.tensor([0, 3]))
    net.set_inference_modality(None)
    with pytest.raises(ModalityNotSetError):
        net(x)
    with pytest.raises(ValueError, match="unique"):
        _build(modalities=["CT", "CT"])


def test_modality_guarded_unet():
    guarded = _build(cls=GUARDED, modalities=MODALITIES, seed=3)
    assert isinstance(guarded, ModalityGuardedUNet) and not _banks(guarded)
    plain = _build(cls="dynamic_network_architectures.architectures.unet.PlainConvUNet", seed=3)
    plain.load_state_dict(guarded.state_dict(), strict=True)  # nnU-Net's plain U-Net, same weights
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    guarded.eval()
    plain.eval()
    with torch.no_grad():
        with pytest.raises(ModalityNotSetError, match="--modality"):
            guarded(x)
        torch.testing.assert_close(guarded(x, modality=1)[0], plain(x)[0])
        guarded.set_inference_modality("CT")
        torch.testing.assert_close(guarded(x)[0], plain(x)[0])
        guarded.set_inference_modality(None)
        guarded.guard_enabled = False  # the trainer's switch
        torch.testing.assert_close(guarded(x)[0], plain(x)[0])
        guarded.guard_enabled = True
        guarded.train()  # training batches are already normalised per case: no guard
        assert guarded(x)[0].shape == (2, 3, 16, 16)


@pytest.mark.parametrize("dim", [2, 3])
def test_instance_banks_with_equal_affine_are_nnunets_unet(dim):
    # all convolutions shared and nnU-Net's decoder order: with instance-norm banks whose K norms hold the plain
    # network's affine parameters, every modality gets exactly nnU-Net's PlainConvUNet output
    plain = _build(dim, n_stages=4, cls="dynamic_network_architectures.architectures.unet.PlainConvUNet", seed=1)
    net = _build(dim, n_stages=4, modalities=MODALITIES, norm_bank_kind="instance", seed=2)
    plain_state = plain.state_dict()
    state = {key: plain_state[key.replace(".norms.0.", ".").replace(".norms.1.", ".")]
             for key in net.state_dict() if not key.startswith("projector")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and all(key.startswith("projector") for key in missing)
    plain.eval()
    net.eval()
    x = torch.randn((2, 1, *_shape(dim)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain(x)
        for modality in (0, 1, torch.tensor([1, 0])):
            for a, b in zip(net(x, modality=modality), expected, strict=True):
                torch.testing.assert_close(a, b)

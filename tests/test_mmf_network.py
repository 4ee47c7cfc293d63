import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_mmssl.architectures.mmf_mae import MMFMAEUNet
from nnunet_mmssl.architectures.multi_branch import MultiBranchUNet

DIMS = [(nn.Conv2d, nn.InstanceNorm2d, (16, 16)), (nn.Conv3d, nn.InstanceNorm3d, (8, 16, 16))]
SWITCHES = [(True, True), (True, False), (False, True), (False, False)]


def make_net(conv_op=nn.Conv2d, norm_op=nn.InstanceNorm2d, deep_supervision=True, cls=MMFMAEUNet,
             groups=((0,), (1,)), channels=2, **kwargs):
    torch.manual_seed(0)
    return cls(channels, 3, [list(g) for g in groups], n_stages=3, features_per_stage=[4, 8, 16], conv_op=conv_op,
               kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=1, n_conv_per_stage_decoder=1, conv_bias=True,
               norm_op=norm_op, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
               nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision, **kwargs)


@pytest.mark.parametrize("conv_op,norm_op,spatial", DIMS)
@pytest.mark.parametrize("use_mmf,use_mae", SWITCHES)
def test_output_shapes_with_and_without_deep_supervision(conv_op, norm_op, spatial, use_mmf, use_mae):
    net = make_net(conv_op, norm_op, use_mmf=use_mmf, use_mae=use_mae)
    x = torch.randn(2, 2, *spatial)
    out = net(x)
    assert isinstance(out, list) and len(out) == 2
    assert out[0].shape == (2, 3, *spatial) and out[1].shape == (2, 3, *[s // 2 for s in spatial])
    net.return_heads = True
    heads = net(x)
    assert len(heads) == 2 and all(h[0].shape == (2, 3, *spatial) for h in heads)
    net.return_heads = False
    net.deep_supervision = False
    single = net(x)
    assert single.shape == (2, 3, *spatial)
    torch.testing.assert_close(single, out[0])


@pytest.mark.parametrize("conv_op,norm_op,spatial", DIMS)
def test_state_dict_identical_with_and_without_deep_supervision(conv_op, norm_op, spatial):
    with_ds = make_net(conv_op, norm_op, deep_supervision=True)
    without = make_net(conv_op, norm_op, deep_supervision=False)
    assert list(with_ds.state_dict()) == list(without.state_dict())
    without.load_state_dict(with_ds.state_dict(), strict=True)


def test_modules_follow_the_switches_and_the_encoder_recipe():
    net = make_net()
    assert len(net.mmf) == 2  # every stage but the bottleneck
    assert [m.channels for m in net.mmf] == [4, 8]
    assert net.mae.channels == 16 and net.mae.num_modalities == 2
    plain = make_net(use_mmf=False, use_mae=False)
    assert not hasattr(plain, "mmf") and not hasattr(plain, "mae")


@pytest.mark.parametrize("use_mmf,use_mae", SWITCHES)
def test_head_0_sees_modality_1_iff_fusion_is_on(use_mmf, use_mae):
    net = make_net(deep_supervision=False, use_mmf=use_mmf, use_mae=use_mae).eval()
    net.return_heads = True
    x = torch.randn(1, 2, 16, 16)
    x2 = x.clone()
    x2[:, 1] = torch.randn(16, 16)
    with torch.no_grad():
        a, b = net(x), net(x2)
    assert not torch.allclose(a[1], b[1])
    assert torch.allclose(a[0], b[0]) is not (use_mmf or use_mae)


@pytest.mark.parametrize("conv_op,norm_op,spatial", DIMS)
def test_without_mmf_and_mae_equals_multi_branch_unet(conv_op, norm_op, spatial):
    ours = make_net(conv_op, norm_op, use_mmf=False, use_mae=False)
    torch.manual_seed(1)
    for p in ours.parameters():  # make the test sensitive to every weight
        p.data.normal_()
    base = make_net(conv_op, norm_op, cls=MultiBranchUNet)
    base.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 2, *spatial)
    ours.return_heads = base.return_heads = True
    with torch.no_grad():
        for h_ours, h_base in zip(ours(x), base(x)):
            for o, b in zip(h_ours, h_base):
                torch.testing.assert_close(o, b)
    assert ours.compute_conv_feature_map_size(list(spatial)) == base.compute_conv_feature_map_size(list(spatial))


def test_encoders_continue_from_fused_features_and_decoders_get_them_as_skips():
    net = make_net(use_mae=False)
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        skips = net.encode(x)
        a0 = net.encoders[0].stages[0](x[:, :1])
        b0 = net.encoders[1].stages[0](x[:, 1:])
        fused0 = net.mmf[0](a0, b0)
        torch.testing.assert_close(skips[0][0], a0 + fused0)
        torch.testing.assert_close(skips[1][0], b0 + fused0)
        a1 = net.encoders[0].stages[1](a0 + fused0)
        b1 = net.encoders[1].stages[1](b0 + fused0)
        fused1 = net.mmf[1](a1, b1)
        torch.testing.assert_close(skips[0][1], a1 + fused1)
        torch.testing.assert_close(skips[0][2], net.encoders[0].stages[2](a1 + fused1))  # bottleneck: no MMF


@pytest.mark.parametrize("conv_op,norm_op,spatial", DIMS)
def test_network_mmf_is_eq3_with_plain_convolutions(conv_op, norm_op, spatial):
    """What encoder k adds to its stage-s output is sigmoid(conv2(conv1(cat(f_s_a, f_s_b)))), with functional
    convolutions on the module's weights, and that gate is not held above ~0.49 by a norm + LeakyReLU."""
    net = make_net(conv_op, norm_op, use_mae=False)
    net.apply(net.initialize)  # as get_network_from_plans does
    conv = F.conv2d if conv_op is nn.Conv2d else F.conv3d
    x = torch.randn(2, 2, *spatial)
    with torch.no_grad():
        skips = net.encode(x)
        a, b = net.encoders[0].stages[0](x[:, :1]), net.encoders[1].stages[0](x[:, 1:])
        for s in range(2):
            fused = skips[0][s] - a
            torch.testing.assert_close(skips[1][s] - b, fused)
            mmf = net.mmf[s]
            hidden = conv(torch.cat((a, b), dim=1), mmf.conv1.weight, mmf.conv1.bias, padding=1)
            torch.testing.assert_close(fused, torch.sigmoid(conv(hidden, mmf.conv2.weight, mmf.conv2.bias, padding=1)))
            assert fused.min() < 0.2 and fused.max() > 0.8
            a, b = net.encoders[0].stages[s + 1](skips[0][s]), net.encoders[1].stages[s + 1](skips[1][s])


def test_mae_reweights_the_bottlenecks_the_decoders_read():
    net = make_net(use_mmf=False)
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        skips = net.encode(x)
        fused = net.fuse(skips)
        weights = net.mae.modality_weights([skips[0][-1], skips[1][-1]])
        for k in range(2):
            torch.testing.assert_close(fused[k][-1], skips[k][-1] * weights[:, k, :, None, None])
            assert all(f is s for f, s in zip(fused[k][:-1], skips[k][:-1]))


def test_gradient_reaches_both_encoders_from_one_head():
    net = make_net(deep_supervision=False)
    net.return_heads = True
    heads = net(torch.randn(2, 2, 16, 16))
    heads[0].sum().backward()
    for encoder in net.encoders:
        assert sum(p.grad.abs().sum() for p in encoder.parameters() if p.grad is not None) > 0
    assert all(p.grad is not None for p in net.mmf.parameters())


@pytest.mark.parametrize("groups,channels", [(((0,), (1,), (2,)), 3), (((0, 1),), 2)])
def test_exactly_two_groups_required(groups, channels):
    with pytest.raises(ValueError, match="exactly two modality groups"):
        make_net(groups=groups, channels=channels)


def test_multichannel_groups_and_descriptor_option():
    net = make_net(groups=((0, 2), (1, 3)), channels=4, mae_descriptor="shared")
    assert net.mae.descriptor == "shared"
    assert net(torch.randn(1, 4, 16, 16))[0].shape == (1, 3, 16, 16)


def test_feature_map_size_grows_with_each_component():
    sizes = {s: make_net(use_mmf=s[0], use_mae=s[1]).compute_conv_feature_map_size([16, 16]) for s in SWITCHES}
    assert sizes[(False, False)] < sizes[(True, False)] < sizes[(True, True)]
    assert sizes[(False, False)] < sizes[(False, True)] < sizes[(True, True)]
    mmf_only = sizes[(True, False)] - sizes[(False, False)]
    net = make_net()
    # per stage: MMF block (concat 2C, two conv blocks C each, sigmoid C) + two residual sums (2C)
    assert mmf_only == sum(7 * c * v for c, v in zip([4, 8], [16 * 16, 8 * 8]))
    assert net.stage_sizes([16, 16]) == [[16, 16], [8, 8], [4, 4]]

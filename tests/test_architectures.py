import pytest
import torch
from torch import nn

from nnunet_mmssl.architectures import MemCifUNet, MultiBranchUNet, mean_of_heads


def make_net(conv_op, norm_op, deep_supervision=True, cls=MemCifUNet, groups=((0,), (1,)), channels=2, **kwargs):
    torch.manual_seed(0)
    return cls(channels, 3, [list(g) for g in groups], n_stages=3, features_per_stage=[4, 8, 16], conv_op=conv_op,
               kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=1, n_conv_per_stage_decoder=1, conv_bias=True,
               norm_op=norm_op, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
               nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision, **kwargs)


DIMS = [(nn.Conv2d, nn.InstanceNorm2d, (16, 16)), (nn.Conv3d, nn.InstanceNorm3d, (8, 16, 16))]


@pytest.mark.parametrize("conv_op,norm_op,spatial", DIMS)
@pytest.mark.parametrize("use_mem,use_cif", [(True, True), (False, True), (True, False), (False, False)])
def test_output_shapes_under_deep_supervision(conv_op, norm_op, spatial, use_mem, use_cif):
    net = make_net(conv_op, norm_op, use_mem=use_mem, use_cif=use_cif)
    x = torch.randn(2, 2, *spatial)
    out = net(x)
    assert isinstance(out, list) and len(out) == 2
    assert out[0].shape == (2, 3, *spatial)
    assert out[1].shape == (2, 3, *[s // 2 for s in spatial])
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


@pytest.mark.parametrize("conv_op,norm_op,spatial", DIMS)
def test_forward_is_mean_of_heads_and_inference_heads(conv_op, norm_op, spatial):
    net = make_net(conv_op, norm_op, deep_supervision=False).eval()
    x = torch.randn(1, 2, *spatial)
    with torch.no_grad():
        net.return_heads = True
        heads = net(x)
        net.return_heads = False
        torch.testing.assert_close(net(x), (heads[0] + heads[1]) / 2)
        net.inference_heads = (1,)
        torch.testing.assert_close(net(x), heads[1])


def test_branches_see_only_their_modality_without_fusion():
    net = make_net(nn.Conv2d, nn.InstanceNorm2d, deep_supervision=False, use_mem=False, use_cif=False).eval()
    x = torch.randn(1, 2, 16, 16)
    x2 = x.clone()
    x2[:, 1] = torch.randn(16, 16)
    net.return_heads = True
    with torch.no_grad():
        a, b = net(x), net(x2)
    torch.testing.assert_close(a[0], b[0])  # head 0 reads channel 0 only
    assert not torch.allclose(a[1], b[1])


def test_cif_lets_each_head_see_the_other_modality():
    net = make_net(nn.Conv2d, nn.InstanceNorm2d, deep_supervision=False, use_mem=False, use_cif=True).eval()
    x = torch.randn(1, 2, 16, 16)
    x2 = x.clone()
    x2[:, 1] = torch.randn(16, 16)
    net.return_heads = True
    with torch.no_grad():
        assert not torch.allclose(net(x)[0], net(x2)[0])


def test_gradient_reaches_both_encoders_from_one_head():
    net = make_net(nn.Conv2d, nn.InstanceNorm2d, deep_supervision=False)
    with torch.no_grad():
        for mem in net.mems:
            mem.gamma.fill_(0.1)
    net.return_heads = True
    heads = net(torch.randn(2, 2, 16, 16))
    heads[0].sum().backward()
    for encoder in net.encoders:
        grads = [p.grad for p in encoder.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0
    assert net.mems[0].gamma.grad is not None


def test_multichannel_groups_and_validation():
    net = make_net(nn.Conv2d, nn.InstanceNorm2d, groups=((0, 2), (1, 3)), channels=4, cls=MultiBranchUNet)
    assert net(torch.randn(1, 4, 16, 16))[0].shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 4"):
        net(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"name channel\(s\) \[5\]"):
        make_net(nn.Conv2d, nn.InstanceNorm2d, groups=((0,), (5,)))
    with pytest.raises(ValueError, match="use a channel twice"):
        make_net(nn.Conv2d, nn.InstanceNorm2d, groups=((0,), (0,)))


def test_feature_map_size_counts_both_branches():
    plain = make_net(nn.Conv2d, nn.InstanceNorm2d, cls=MultiBranchUNet)
    full = make_net(nn.Conv2d, nn.InstanceNorm2d)
    size = plain.compute_conv_feature_map_size([16, 16])
    one_branch = plain.encoders[0].compute_conv_feature_map_size([16, 16]) + \
        plain.decoders[0].compute_conv_feature_map_size([16, 16])
    assert size == 2 * one_branch
    assert full.compute_conv_feature_map_size([16, 16]) > size


def test_mean_of_heads_lists():
    a = [torch.ones(1, 2, 4, 4), torch.ones(1, 2, 2, 2)]
    b = [torch.zeros(1, 2, 4, 4), torch.full((1, 2, 2, 2), 3.0)]
    out = mean_of_heads([a, b])
    assert torch.all(out[0] == 0.5) and torch.all(out[1] == 2.0)


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x


class _RecordingFusion(nn.Module):
    """Stands in for CIF: records its inputs and returns an order-sensitive function of them."""

    def forward(self, features):
        self.inputs = [f.clone() for f in features]
        return 10 * features[0] - features[1]


@pytest.mark.parametrize("conv_op,norm_op,spatial", DIMS)
def test_memcif_fuse_wiring(conv_op, norm_op, spatial):
    """CIF gets MEM_0(bottleneck_0), MEM_1(bottleneck_1) in branch order; decoder k gets its own skips and
    proj_k(cat(MEM_k(bottleneck_k), fused)), computed here with functional convolutions on proj_k's weights."""
    net = make_net(conv_op, norm_op)
    net.mems = nn.ModuleList([_Scale(2.0), _Scale(3.0)])
    net.cif = _RecordingFusion()
    conv = torch.nn.functional.conv2d if conv_op is nn.Conv2d else torch.nn.functional.conv3d
    torch.manual_seed(2)
    skips = [[torch.randn(1, c, *[s // f for s in spatial]) for c, f in ((4, 1), (8, 2), (16, 4))] for _ in range(2)]
    with torch.no_grad():
        fused_skips = net.fuse(skips)
    enhanced = [2.0 * skips[0][-1], 3.0 * skips[1][-1]]
    for seen, expected in zip(net.cif.inputs, enhanced):
        torch.testing.assert_close(seen, expected)
    fused = 10 * enhanced[0] - enhanced[1]
    for k in range(2):
        assert all(f is s for f, s in zip(fused_skips[k][:-1], skips[k][:-1]))  # skips from its own encoder
        proj = net.cif_projections[k]
        expected = conv(torch.cat((enhanced[k], fused), dim=1), proj.weight, proj.bias)
        torch.testing.assert_close(fused_skips[k][-1], expected)
    assert not torch.allclose(fused_skips[0][-1], fused_skips[1][-1])

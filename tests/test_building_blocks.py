import pytest
import torch
from torch import nn

from nnunet_mmssl.building_blocks import (
    ChannelSelfAttention,
    ComplementaryInformationFusion,
    SqueezeExcitation,
    build_mem,
)

CONV_OPS = [(nn.Conv2d, nn.InstanceNorm2d, (6, 5)), (nn.Conv3d, nn.InstanceNorm3d, (4, 5, 3))]


@pytest.mark.parametrize("conv_op,norm_op,spatial", CONV_OPS)
def test_channel_attention_matches_hand_computation(conv_op, norm_op, spatial):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *spatial)
    mem = ChannelSelfAttention(3)
    # gamma starts at 0: identity
    assert torch.equal(mem(x), x)
    with torch.no_grad():
        mem.gamma.fill_(0.5)
    f = x.reshape(2, 3, -1)
    energy = f @ f.transpose(1, 2)
    affinity = torch.softmax(energy.max(-1, keepdim=True).values - energy, dim=-1)
    expected = x + 0.5 * (affinity @ f).reshape(x.shape)
    torch.testing.assert_close(mem(x), expected)
    assert torch.allclose(affinity.sum(-1), torch.ones(2, 3))


def test_channel_attention_tiny_example_by_hand():
    # two channels, two positions: F = [[1, 0], [0, 2]] -> E = diag(1, 4); rowmax(E) - E = [[0, 1], [4, 0]]
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    mem = ChannelSelfAttention(2)
    a = torch.softmax(torch.tensor([[0.0, 1.0], [4.0, 0.0]]), dim=-1)
    expected_fa = a @ x[0]
    torch.testing.assert_close(mem.attention(x)[0], expected_fa)


def test_channel_attention_gradient_reaches_gamma_and_input():
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    mem = ChannelSelfAttention(4)
    mem(x).square().mean().backward()
    assert mem.gamma.grad is not None and mem.gamma.grad.abs() > 0
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("conv_op,norm_op,spatial", CONV_OPS)
def test_se_and_builder(conv_op, norm_op, spatial):
    x = torch.randn(2, 8, *spatial)
    se = build_mem("se", 8)
    assert isinstance(se, SqueezeExcitation)
    assert se(x).shape == x.shape
    with pytest.raises(ValueError, match="Unknown mem_type 'bogus'"):
        build_mem("bogus", 8)


@pytest.mark.parametrize("conv_op,norm_op,spatial", CONV_OPS)
def test_cif_shapes_range_and_gradients(conv_op, norm_op, spatial):
    torch.manual_seed(0)
    cif = ComplementaryInformationFusion(conv_op, 4, num_inputs=2, norm_op=norm_op,
                                         norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU)
    a = torch.randn(2, 4, *spatial, requires_grad=True)
    b = torch.randn(2, 4, *spatial, requires_grad=True)
    out = cif([a, b])
    assert out.shape == a.shape
    assert (out > 0).all() and (out < 1).all()
    out.sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="expects 2 feature maps, got 1"):
        cif([a])


def test_channel_attention_affinity_in_float32_under_autocast():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 32, 32) * 30  # large energies: float16/bfloat16 affinities would be far off
    mem = ChannelSelfAttention(4)
    reference = mem.attention(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = mem.attention(x)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference)

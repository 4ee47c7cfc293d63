import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_mmssl.architectures.multi_branch import MultiBranchUNet
from nnunet_mmssl.building_blocks.multistage_fusion import ModalityAwareEnhancement, MultiModalFusion

DIMS = [(nn.Conv2d, nn.InstanceNorm2d, (6, 6)), (nn.Conv3d, nn.InstanceNorm3d, (4, 6, 6))]
NORM = {"eps": 1e-5, "affine": True}


def make_mmf(conv_op, channels=4):
    torch.manual_seed(0)
    mmf = MultiModalFusion(conv_op, channels, num_inputs=2, kernel_size=3)
    mmf.apply(MultiBranchUNet.initialize)  # nnU-Net's He init, as get_network_from_plans applies it
    return mmf


def make_mae(conv_op, norm_op, channels=4, **kwargs):
    torch.manual_seed(0)
    return ModalityAwareEnhancement(conv_op, channels, conv_bias=True, norm_op=norm_op, norm_op_kwargs=NORM,
                                    nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, **kwargs)


@pytest.mark.parametrize("conv_op,norm_op,spatial", DIMS)
def test_mmf_shape_range_and_gradient_to_both_inputs(conv_op, norm_op, spatial):
    mmf = make_mmf(conv_op)
    f_a = torch.randn(2, 4, *spatial, requires_grad=True)
    f_b = torch.randn(2, 4, *spatial, requires_grad=True)
    fused = mmf(f_a, f_b)
    assert fused.shape == (2, 4, *spatial)
    assert torch.all(fused > 0) and torch.all(fused < 1)
    fused.sum().backward()
    assert f_a.grad.abs().sum() > 0 and f_b.grad.abs().sum() > 0


@pytest.mark.parametrize("conv_op,norm_op,spatial", DIMS)
def test_mmf_is_eq3_sigmoid_of_two_plain_convolutions(conv_op, norm_op, spatial):
    """eq. 3 computed with functional convolutions on the module's weights: no norm, no nonlinearity inside."""
    mmf = make_mmf(conv_op)
    assert sorted(name for name, _ in mmf.named_parameters()) == \
        ["conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight"]
    assert tuple(mmf.conv1.weight.shape) == (4, 8, *[3] * len(spatial))
    assert tuple(mmf.conv2.weight.shape) == (4, 4, *[3] * len(spatial))
    conv = F.conv2d if conv_op is nn.Conv2d else F.conv3d
    f_a, f_b = torch.randn(2, 4, *spatial), torch.randn(2, 4, *spatial)
    with torch.no_grad():
        hidden = conv(torch.cat((f_a, f_b), dim=1), mmf.conv1.weight, mmf.conv1.bias, padding=1)
        expected = torch.sigmoid(conv(hidden, mmf.conv2.weight, mmf.conv2.bias, padding=1))
        fused = mmf(f_a, f_b)
        torch.testing.assert_close(fused, expected)
        assert not torch.allclose(mmf(f_b, f_a), expected)  # order matters: each modality has its own channels
    # the gate spans (0, 1); a LeakyReLU before the sigmoid would keep it above ~0.49
    assert fused.min() < 0.2 and fused.max() > 0.8


def test_mmf_errors_and_feature_map_size():
    mmf = make_mmf(nn.Conv2d)
    with pytest.raises(ValueError, match="expects 2 feature maps, got 1"):
        mmf(torch.randn(1, 4, 5, 5))
    # concat (8) + conv1 (4) + conv2 (4) + sigmoid (4) channels, 25 voxels
    assert mmf.compute_conv_feature_map_size([5, 5]) == 20 * 25


@pytest.mark.parametrize("conv_op,norm_op,spatial", DIMS)
@pytest.mark.parametrize("descriptor", ["per_modality", "shared"])
def test_mae_shapes_weights_and_gradients(conv_op, norm_op, spatial, descriptor):
    mae = make_mae(conv_op, norm_op, descriptor=descriptor)
    f_a = torch.randn(2, 4, *spatial, requires_grad=True)
    f_b = torch.randn(2, 4, *spatial, requires_grad=True)
    weights = mae.modality_weights([f_a, f_b])
    assert weights.shape == (2, 2, 4)
    assert torch.all(weights > 0) and torch.all(weights < 1)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, 4))
    out = mae([f_a, f_b])
    assert isinstance(out, list) and len(out) == 2 and all(o.shape == (2, 4, *spatial) for o in out)
    view = (2, 4) + (1,) * len(spatial)
    torch.testing.assert_close(out[0], f_a * weights[:, 0].reshape(view))
    torch.testing.assert_close(out[1], f_b * weights[:, 1].reshape(view))
    out[0].sum().backward()  # branch a's output depends on modality b through the softmax
    assert f_a.grad.abs().sum() > 0 and f_b.grad.abs().sum() > 0
    assert all(p.grad is not None for p in mae.fc2.parameters())


def test_mae_hand_computed_per_modality():
    # zero conv weights -> psi1(F) + psi2(F) = relu(bias1) + relu(bias2), a constant map per channel; fc layers are
    # identities, so the logits are relu(s_k): s_a = (1, 2), s_b = (0, 0) -> W_a = sigmoid(s_a), W_b = 1 - W_a.
    mae = ModalityAwareEnhancement(nn.Conv2d, 2, min_hidden=2, conv_bias=True, norm_op=None, nonlin=nn.ReLU)
    with torch.no_grad():
        for module in (*mae.psi1, *mae.psi2, *mae.fc1, *mae.fc2):
            first = module[0] if isinstance(module, nn.Sequential) else module
            first.weight.zero_()
            first.bias.zero_()
        for k, bias in enumerate(([0.5, 1.0], [0.0, 0.0])):
            mae.psi1[k][0].bias.copy_(torch.tensor(bias))
            mae.psi2[k][0].bias.copy_(torch.tensor(bias))
        for fc in (*mae.fc1, *mae.fc2):
            fc.weight.copy_(torch.eye(2))
    f_a, f_b = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    w_a = torch.tensor([math.e / (1 + math.e), math.e ** 2 / (1 + math.e ** 2)])
    expected = torch.stack((w_a, 1 - w_a))[None]
    torch.testing.assert_close(mae.modality_weights([f_a, f_b]), expected)
    out = mae([f_a, f_b])
    torch.testing.assert_close(out[0], f_a * w_a.reshape(1, 2, 1, 1))
    torch.testing.assert_close(out[1], f_b * (1 - w_a).reshape(1, 2, 1, 1))


def test_mae_shared_descriptor_with_equal_heads_weighs_modalities_equally():
    mae = make_mae(nn.Conv2d, nn.InstanceNorm2d, descriptor="shared")
    assert len(mae.psi1) == len(mae.psi2) == len(mae.fc1) == 1 and len(mae.fc2) == 2
    with torch.no_grad():
        mae.fc2[1].load_state_dict(mae.fc2[0].state_dict())
    weights = mae.modality_weights([torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)])
    torch.testing.assert_close(weights, torch.full((2, 2, 4), 0.5))


def test_mae_psi2_dilation_and_kernel_options():
    dilated = make_mae(nn.Conv3d, nn.InstanceNorm3d)
    conv = dilated.psi2[0][0]
    assert conv.kernel_size == (3, 3, 3) and conv.dilation == (2, 2, 2) and conv.padding == (2, 2, 2)
    wide = make_mae(nn.Conv3d, nn.InstanceNorm3d, psi2_kernel_size=5)  # a given kernel is taken literally
    assert wide.psi2[0][0].kernel_size == (5, 5, 5) and wide.psi2[0][0].dilation == (1, 1, 1)
    assert wide.psi2[0][0].padding == (2, 2, 2)
    both = make_mae(nn.Conv2d, nn.InstanceNorm2d, psi2_kernel_size=5, psi2_dilation=2)  # explicit values win
    assert both.psi2[0][0].kernel_size == (5, 5) and both.psi2[0][0].dilation == (2, 2)
    assert both.psi2[0][0].padding == (4, 4)
    assert wide([torch.randn(1, 4, 3, 3, 3)] * 2)[0].shape == (1, 4, 3, 3, 3)
    assert make_mae(nn.Conv2d, nn.InstanceNorm2d, reduction=16).hidden == 8  # max(4 // 16, 8)
    assert make_mae(nn.Conv2d, nn.InstanceNorm2d, channels=320, reduction=16).hidden == 20


def test_mae_errors():
    with pytest.raises(ValueError, match="Unknown MAE descriptor 'x'"):
        make_mae(nn.Conv2d, nn.InstanceNorm2d, descriptor="x")
    with pytest.raises(ValueError, match="at least 2 modalities"):
        make_mae(nn.Conv2d, nn.InstanceNorm2d, num_modalities=1)
    mae = make_mae(nn.Conv2d, nn.InstanceNorm2d)
    with pytest.raises(ValueError, match="expects 2 feature maps, got 3"):
        mae([torch.randn(1, 4, 3, 3)] * 3)
    with pytest.raises(ValueError, match=r"shape \(B, 4, \*S\)"):
        mae([torch.randn(1, 4, 3, 3), torch.randn(1, 5, 3, 3)])

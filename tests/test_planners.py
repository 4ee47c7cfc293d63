import copy

import pytest

from nnunet_mmssl.planners import (
    add_mmssl_block,
    default_modality_groups,
    multi_branch_architecture,
    parse_modality_groups,
    unlabeled_data_identifier,
)
from nnunet_mmssl.planners.mmssl_plans import PLAIN_UNET_CLASS

CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
BASE_ARCH = {"network_class_name": PLAIN_UNET_CLASS,
             "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.Conv2d"},
             "_kw_requires_import": ["conv_op"]}


def test_default_groups():
    assert default_modality_groups(2) == [[0], [1]]
    assert default_modality_groups(4) == [[0, 1], [2, 3]]
    assert default_modality_groups(3) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="at least 2 input channels"):
        default_modality_groups(1)


def test_parse_groups_by_name_and_index():
    assert parse_modality_groups(["FLAIR,T1", "T2,T1ce"], CHANNELS) == [[3, 0], [2, 1]]
    assert parse_modality_groups(["0,1", "2,3"], CHANNELS) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="Unknown channel 'PD'"):
        parse_modality_groups(["PD", "T1"], CHANNELS)


def test_add_block_does_not_mutate_and_records_groups():
    plans = {"configurations": {}, "dataset_name": "X"}
    before = copy.deepcopy(plans)
    new = add_mmssl_block(plans, {"channel_names": CHANNELS}, None, num_unlabeled=5)
    assert plans == before
    assert new["mmssl"]["modality_groups"] == [[0, 1], [2, 3]]
    assert new["mmssl"]["num_unlabeled"] == 5
    assert unlabeled_data_identifier("nnUNetPlans_2d", new) == "nnUNetPlans_2d_unlabeled"


def test_multi_branch_architecture():
    before = copy.deepcopy(BASE_ARCH)
    arch = multi_branch_architecture(BASE_ARCH, "a.b.Net", [[0], [1]], {"use_mem": False})
    assert BASE_ARCH == before
    assert arch["network_class_name"] == "a.b.Net"
    assert arch["arch_kwargs"]["modality_groups"] == [[0], [1]]
    assert arch["arch_kwargs"]["use_mem"] is False
    assert arch["arch_kwargs"]["n_stages"] == 3
    # idempotent on our own entry
    again = multi_branch_architecture(arch, "a.b.Net", [[0], [1]], {"use_mem": False})
    assert again == arch
    assert arch["arch_kwargs"]["base"] == "plain"
    # nnU-Net's residual-encoder U-Net is a supported base (tests/test_resenc.py); any other class is refused by name
    resenc = {**BASE_ARCH, "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"}
    assert multi_branch_architecture(resenc, "a.b.Net", [[0], [1]])["arch_kwargs"]["base"] == "resenc"
    with pytest.raises(ValueError, match=r"PlainConvUNet or .*ResidualEncoderUNet plans, but .* uses x\.OtherUNet"):
        multi_branch_architecture({**BASE_ARCH, "network_class_name": "x.OtherUNet"}, "a.b.Net", [[0], [1]])

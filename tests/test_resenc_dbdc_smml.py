"""DBDC (+ variants), the pooled U-Net and SMML (+ variants) on nnU-Net's residual-encoder (ResEnc) plans.

Tiny ResEnc plans of nnU-Net's ``ResidualEncoderUNet`` (its ``nnUNetPlannerResEncM/L/XL`` write this entry: a stem,
``n_blocks_per_stage`` residual blocks per stage) in 2d and 3d_fullres. Every trainer is built and initialised by
nnU-Net's own code, takes two steps on synthetic batches and predicts through nnU-Net's predictor from a model folder
(plans.json + checkpoint) -- the network rebuilt from the folder's plans is the trained one, and predicts as it
does. Plus: DBDC's norm banks replace every norm of nnU-Net's residual U-Net (stem, both convolutions of every block,
the skip path's 1x1 projection, the decoder), SMML's modality encoders are nnU-Net's residual encoders with the
planned blocks per stage and the narrowed widths, other classes are refused naming them, one graph under
torch.compile, one host synchronisation per step.
"""

import copy
import math
import os
import sys
import tempfile

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trainer_harness  # noqa: E402
from plans_fixtures import DATASET_JSON  # noqa: E402

import nnunet_mmssl.trainers as trainers  # noqa: E402
from nnunet_mmssl.architectures.dbdc import (  # noqa: E402
    DBDCResEncUNet,
    DBDCUNet,
    ModalityGuardedResEncUNet,
    ModalityGuardedUNet,
)
from nnunet_mmssl.architectures.smml import SMMLNet, random_modality_masks, scaled_widths  # noqa: E402
from nnunet_mmssl.building_blocks.norm_bank import _NORM_TYPES, ModalityNormBank  # noqa: E402
from nnunet_mmssl.diagnostics import count_host_syncs  # noqa: E402
from nnunet_mmssl.inference.missing import MissingModalityPredictor  # noqa: E402

RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
FEATURES = [8, 16, 32]
BLOCKS = [1, 2, 2]  # stage 0: one block without projection; stages 1, 2: a strided projecting block, then a plain one
PATCHES = {"2d": [16, 16], "3d_fullres": [8, 8, 8]}


def resenc_architecture(configuration: str) -> dict:
    """nnU-Net's ResEnc planner's architecture entry, tiny (as ``nnUNetPlannerResEncM`` writes it)."""
    dim = len(PATCHES[configuration])
    return {"network_class_name": RESENC_CLASS,
            "arch_kwargs": {"n_stages": 3, "features_per_stage": list(FEATURES),
                            "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": [[3] * dim] * 3,
                            "strides": [[1] * dim, [2] * dim, [2] * dim], "n_blocks_per_stage": list(BLOCKS),
                            "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


UNREGISTERED_JSON = {"channel_names": {"0": "CT+MR"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                     "file_ending": ".nii.gz"}
DBDC_NAMES = ["DBDCTrainer", "DBDCTrainer_noMLPB_noMAW", "DBDCTrainer_noMAW", "DBDCTrainer_lossNone",
              "DBDCTrainer_lossIpc", "DBDCTrainer_lossIpcFpc", "DBDCTrainer_lossIpcFpcMc", "DBDCTrainer_lossIpcFpcMcPc",
              "DBDCTrainer_mlmbNone", "DBDCTrainer_mlmbEncoder", "DBDCTrainer_mlmbEncoderBottleneck",
              "DBDCSupervisedTrainer"]
SMML_NAMES = ["SMMLTrainer", "SMMLTrainer_single", "SMMLTrainer_singleSRN", "SMMLTrainer_dual", "SMMLTrainer_dualPBC",
              "SMMLTrainer_dualFRC", "SMMLTrainer_dualPBCFRC", "SMMLSSLTrainer"]
ALL_NAMES = DBDC_NAMES + ["PooledUNetTrainer"] + SMML_NAMES
#: every trainer of these networks, 2d and 3d_fullres (each case is 1-2 s at the tiny patches above)
CASES = [(name, configuration) for name in ALL_NAMES for configuration in ("2d", "3d_fullres")]


def _unregistered(name: str) -> bool:
    return name.startswith(("DBDC", "Pooled"))


@pytest.fixture(scope="module", autouse=True)
def folders():
    root = tempfile.mkdtemp(prefix="resenc-dbdc-smml-")
    trainer_harness.set_folders(root)  # the 2d preprocessed folder; the 3d one here
    folder = os.path.join(root, "preprocessed", "Dataset999_X", "nnUNetPlans_3d_fullres")
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "case_0000.b2nd"), "a").close()
    return root


def resenc_plans(configuration: str, unregistered: bool) -> dict:
    plans = trainer_harness.plans()
    configurations = plans["configurations"]
    if configuration == "3d_fullres":
        configurations["3d_fullres"] = dict(configurations["2d"], data_identifier="nnUNetPlans_3d_fullres",
                                            patch_size=PATCHES["3d_fullres"], spacing=[1.0, 1.0, 1.0])
    configurations[configuration]["architecture"] = resenc_architecture(configuration)
    if unregistered:
        configurations[configuration].update(use_mask_for_norm=[False], normalization_schemes=["ZScoreNormalization"])
        plans["mmssl"] = {"layout": "unregistered", "modalities": ["CT", "MR"],
                          "intensity_schemes": {"CT": "CTNormalization", "MR": "ZScoreNormalization"}}
    return plans


def make(name: str, configuration: str = "2d", initialize: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    unregistered = _unregistered(name)
    trainer = getattr(trainers, name)(resenc_plans(configuration, unregistered), configuration, 0,
                                      copy.deepcopy(UNREGISTERED_JSON if unregistered else DATASET_JSON),
                                      torch.device("cpu"))
    trainer.print_to_log_file = lambda *args, **kwargs: None
    if initialize:
        trainer.initialize()
    return trainer


def reference_resenc(configuration: str, input_channels: int = 1, num_classes: int = 2) -> ResidualEncoderUNet:
    """nnU-Net's own ResidualEncoderUNet of the same plans entry, as nnU-Net builds it."""
    architecture = resenc_architecture(configuration)
    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture["_kw_requires_import"], input_channels, num_classes, allow_init=True,
                                  deep_supervision=True)


def _labelled(trainer, generator: torch.Generator, channels: int, shift: float = 0.0) -> dict:
    patch = trainer.configuration_manager.patch_size
    data = torch.randn((trainer.batch_size, channels, *patch), generator=generator) + shift
    full = (torch.rand((trainer.batch_size, 1, *patch), generator=generator) > 0.6).float()
    target = [torch.nn.functional.interpolate(full, scale_factor=s, mode="nearest-exact") if s[0] != 1 else full
              for s in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": target}


def _batch(trainer, generator: torch.Generator) -> dict:
    """A step's batch, the unlabelled loaders set (DBDC: one labelled and one unlabelled batch per modality)."""
    patch = trainer.configuration_manager.patch_size
    channels = trainer.num_input_channels
    unlabelled = trainer.unlabeled_batch_size_per_rank() if hasattr(trainer, "use_unlabeled") else 0
    if isinstance(trainer, trainers.DBDCTrainer):
        loaders = [iter([{"data": torch.randn((unlabelled, 1, *patch), generator=generator) + 2 * k}])
                   for k in range(trainer.num_modalities)]
        trainer.dataloader_unlabeled = loaders if trainer.use_unlabeled else None
        return {"modality_batches": [_labelled(trainer, generator, 1, 2.0 * k) for k in range(trainer.num_modalities)]}
    if getattr(trainer, "use_unlabeled", False):
        trainer.dataloader_unlabeled = iter([{"data": torch.randn((unlabelled, channels, *patch),
                                                                  generator=generator)}])
    return _labelled(trainer, generator, channels)


def _bank_norms(module: torch.nn.Module) -> set[int]:
    return {id(n) for bank in module.modules() if isinstance(bank, ModalityNormBank) for n in bank.norms}


# ----------------------------------------------------------------------------------------------------------------
# every trainer: two steps, a model folder, nnU-Net's predictor


@pytest.mark.parametrize("name,configuration", CASES)
def test_trainer_trains_two_steps_and_predicts_from_the_model_folder(name, configuration, tmp_path):
    trainer = make(name, configuration)
    network = getattr(trainer, "network_module", trainer.network)  # nnUNetTrainer (pooled) has no network_module
    expected = {"DBDC": DBDCResEncUNet, "Pool": ModalityGuardedResEncUNet, "SMML": SMMLNet}[name[:4]]
    assert type(network) is expected
    architecture = trainer.configuration_manager.network_arch_init_kwargs
    assert architecture["base"] == "resenc" and architecture["n_blocks_per_stage"] == BLOCKS
    encoders = [network.encoder] if name[:4] != "SMML" else [e for b in network.branches for e in b.encoders]
    assert all(isinstance(e, ResidualEncoder) for e in encoders)

    generator = torch.Generator().manual_seed(1)
    trainer.on_train_epoch_start()
    first = trainer.train_step(_batch(trainer, generator))
    batch = _batch(trainer, generator)
    if configuration == "2d":
        with count_host_syncs() as syncs:
            second = trainer.train_step(batch)
        assert dict(syncs.by_op) == {"host_copy.cpu": 1}  # nnUNetTrainer's one copy of the logged loss
    else:
        second = trainer.train_step(batch)
    assert math.isfinite(float(first["loss"])) and math.isfinite(float(second["loss"]))
    # the second step trains the residual blocks (the first finds each block's last norm at zero, as nnU-Net inits)
    def trained(encoder) -> set[str]:
        return {n for n, p in encoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    if name[:4] != "SMML":
        assert trained(encoders[0]) == set(dict(encoders[0].named_parameters()))
    else:  # a masked-out modality's encoder gets no gradient from that sample: some encoder's blocks do
        assert any("stages.1.blocks.1.conv1.conv.weight" in trained(e) for e in encoders)
    if isinstance(network, DBDCResEncUNet):  # the stem's norm is a bank; with K = 2 its statistics moved, apart
        stem_bank = network.encoder.stem.convs[0].norm
        assert isinstance(stem_bank, ModalityNormBank)
        assert stem_bank.num_modalities == (1 if trainer.norm_bank_scope == "none" else 2)
        if stem_bank.num_modalities == 2:
            means = [n.running_mean for n in stem_bank.norms]
            assert not torch.equal(means[0], means[1]) and all(m.abs().sum() > 0 for m in means)

    # a model folder as nnU-Net writes it; nnU-Net's predictor rebuilds the network from its plans
    folder = tmp_path / "model"
    (folder / "fold_0").mkdir(parents=True)
    save_json(trainer.plans_manager.plans, str(folder / "plans.json"), sort_keys=False)
    save_json(trainer.dataset_json, str(folder / "dataset.json"), sort_keys=False)
    trainer.save_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"))
    # one window covers the case; without the Gaussian weights nnU-Net's float16 accumulation returns the logits
    predictor = MissingModalityPredictor(use_gaussian=False, use_mirroring=False, perform_everything_on_device=False,
                                         device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), [0], "checkpoint_final.pth")
    rebuilt = predictor.network
    assert type(rebuilt) is type(network)
    trained_state = network.state_dict()
    rebuilt_state = rebuilt.state_dict()
    assert rebuilt_state.keys() == trained_state.keys()
    assert all(rebuilt_state[k].shape == v.shape for k, v in trained_state.items())
    rebuilt.load_state_dict(predictor.list_of_parameters[0])  # the checkpoint's weights: the trained ones
    for key, value in trained_state.items():
        assert torch.equal(rebuilt_state[key], value), key

    patch = trainer.configuration_manager.patch_size
    x = torch.randn((1, trainer.num_input_channels, *patch), generator=torch.Generator().manual_seed(2))
    if _unregistered(name):
        rebuilt.set_inference_modality("MR")
        network.set_inference_modality("MR")
    trainer.set_deep_supervision_enabled(False)
    network.eval()
    rebuilt.eval()
    with torch.no_grad():
        own = network(x)
        assert torch.equal(rebuilt(x), own)  # the rebuilt network computes what the trained one does
    data = x[0] if configuration == "3d_fullres" else x[0].unsqueeze(1)  # nnU-Net's (C, Z, Y, X) of a 2d case
    predicted = predictor.predict_logits_from_preprocessed_data(data)
    own = own[0] if configuration == "3d_fullres" else own[0].unsqueeze(1)
    assert torch.equal(predicted, own.half())  # nnU-Net 2.8 accumulates the window's logits in float16


def _forced_autocast_step(name: str, dtype) -> tuple[float, bool]:
    """A fresh trainer (same weights, batch and draws), one ``train_step``; with ``dtype`` its forward and losses
    under forced CPU autocast with nnU-Net's GradScaler (as nnU-Net's step on CUDA). Returns (objective, stepped)."""
    trainer = make(name)
    if dtype is not None:
        trainer.grad_scaler = torch.amp.GradScaler("cpu")
        compute_losses = trainer.compute_losses

        def autocast_losses(*args, **kwargs):
            with torch.autocast("cpu", dtype=dtype):
                return compute_losses(*args, **kwargs)

        trainer.compute_losses = autocast_losses
    trainer.on_train_epoch_start()
    batch = _batch(trainer, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    output = trainer.train_step(batch)
    return float(output["objective"]), trainer._optimizer_stepped


@pytest.mark.parametrize("name", ["DBDCTrainer", pytest.param("SMMLTrainer", marks=pytest.mark.slow)])
def test_whole_step_under_forced_float16_autocast_is_finite_and_close_to_float32(name):
    """The residual blocks' additions in float16 (DBDC: on the banks' outputs): the GradScaler steps, the objective
    is within test_amp's whole-step tolerance of float32's."""
    reference, _ = _forced_autocast_step(name, None)
    objective, stepped = _forced_autocast_step(name, torch.float16)
    assert stepped and math.isfinite(objective)
    assert abs(objective - reference) <= 5e-3 * abs(reference), (objective, reference)


# ----------------------------------------------------------------------------------------------------------------
# DBDC's banks on the residual U-Net


def _norm_paths(network: torch.nn.Module) -> list[str]:
    """Module paths of nnU-Net's norms (one per norm: ConvDropoutNormReLU's ``all_modules`` alias skipped)."""
    seen, paths = set(), []
    for path, module in network.named_modules():
        if isinstance(module, _NORM_TYPES) and id(module) not in seen:
            seen.add(id(module))
            paths.append(path)
    return paths


def _part(path: str, n_stages: int) -> str:
    if path.startswith("decoder"):
        return "decoder"
    if path.startswith(f"encoder.stages.{n_stages - 1}."):
        return "bottleneck"
    return "encoder"  # the stem and the stages above the bottleneck


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_banks_replace_every_norm_of_nnunets_residual_unet(configuration):
    reference = reference_resenc(configuration)
    paths = _norm_paths(reference)
    stem = [p for p in paths if p.startswith("encoder.stem")]
    skip = [p for p in paths if ".skip." in p]
    assert len(stem) == 1 and len(skip) == 2  # the stem's norm and the two projecting blocks' skip norms exist
    trainer = make("DBDCTrainer", configuration, initialize=False)
    manager = trainer.plans_manager
    network = trainer.build_network_architecture(manager, trainer.configuration_manager, 1, 2, True)
    assert isinstance(network, DBDCResEncUNet)
    assert network.norm_bank_counts == {"banks": len(paths), "shared": 0}
    for path in paths:  # at nnU-Net's every norm position a bank of both modalities, used by the forward
        bank = network.get_submodule(path)
        assert isinstance(bank, ModalityNormBank) and bank.num_modalities == 2, path
    # no norm of nnU-Net's kind is left outside a bank
    loose = [p for p, m in network.named_modules() if isinstance(m, _NORM_TYPES) and id(m) not in _bank_norms(network)]
    assert loose == []
    # ConvDropoutNormReLU's alias in all_modules is the same bank (no unused copy)
    block = network.encoder.stages[1].blocks[0]
    assert block.conv1.all_modules[1] is block.conv1.norm and block.skip[1].all_modules[1] is block.skip[1].norm
    # nnU-Net's ResEnc initialisation, in every modality's norm: each block's last norm at zero, the others at one
    network = make("DBDCTrainer", configuration).network
    for module in network.modules():
        if isinstance(module, BasicBlockD):
            for norm in module.conv2.norm.norms:
                assert torch.count_nonzero(norm.weight) == 0 and torch.count_nonzero(norm.bias) == 0
            for norm in module.conv1.norm.norms:
                assert torch.equal(norm.weight, torch.ones_like(norm.weight))


@pytest.mark.parametrize("scope", ["none", "encoder", "encoder+bottleneck", "all"])
def test_bank_scopes_on_the_residual_unet(scope):
    reference = reference_resenc("2d")
    parts = [_part(p, 3) for p in _norm_paths(reference)]
    banked = {"none": (), "encoder": ("encoder",), "encoder+bottleneck": ("encoder", "bottleneck"),
              "all": ("encoder", "bottleneck", "decoder")}[scope]
    arch = resenc_architecture("2d")
    network = get_network_from_plans(
        "nnunet_mmssl.architectures.dbdc.DBDCResEncUNet",
        {**arch["arch_kwargs"], "modalities": ["CT", "MR"], "norm_bank_scope": scope}, arch["_kw_requires_import"],
        1, 2, allow_init=True, deep_supervision=True)
    expected_banks = sum(p in banked for p in parts)
    assert network.norm_bank_counts == {"banks": expected_banks, "shared": len(parts) - expected_banks}
    assert isinstance(network.encoder.stem.convs[0].norm, ModalityNormBank)
    assert network.encoder.stem.convs[0].norm.num_modalities == (2 if "encoder" in banked else 1)


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_instance_banks_with_equal_affine_are_nnunets_residual_unet(configuration):
    """Banks of nnU-Net's InstanceNorm holding nnU-Net's affine parameters for every modality make DBDCResEncUNet
    nnU-Net's ResidualEncoderUNet: the same convolutions at the same names, the same output."""
    reference = reference_resenc(configuration)
    arch = resenc_architecture(configuration)
    network = get_network_from_plans(
        "nnunet_mmssl.architectures.dbdc.DBDCResEncUNet",
        {**arch["arch_kwargs"], "modalities": ["CT", "MR"], "norm_bank_kind": "instance", "use_projector": False},
        arch["_kw_requires_import"], 1, 2, allow_init=True, deep_supervision=True)
    with torch.no_grad():  # affine parameters away from nnU-Net's init, so that a missed norm would show
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    mine = network.state_dict()
    ref = reference.state_dict()
    mapped = {}
    for key in mine:
        parts = key.split(".")
        source = ".".join(p for i, p in enumerate(parts) if not (p == "norms" or (i and parts[i - 1] == "norms")))
        mapped[key] = ref[source]
    assert len({id(v) for v in mapped.values()}) == len(ref)  # every tensor of nnU-Net's network is used
    network.load_state_dict(mapped)
    reference.eval()
    network.eval()
    x = torch.randn(2, 1, *PATCHES[configuration], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(x)
        for modality in (0, 1, torch.tensor([1, 0])):
            for a, b in zip(network(x, modality=modality), expected, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# SMML's narrowed residual encoders


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_smml_modality_encoders_are_narrowed_residual_encoders(configuration):
    trainer = make("SMMLTrainer", configuration, initialize=False)
    network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 2, 2, True)
    network.apply(network.initialize)  # as nnU-Net's get_network_from_plans does (allow_init)
    widths = scaled_widths(FEATURES, 1 / math.sqrt(2))
    assert widths == [4, 12, 24]
    reference = reference_resenc(configuration, input_channels=2)
    kernel = [3] * len(PATCHES[configuration])
    assert network.base == "resenc" and len(network.branches) == 2
    for branch in network.branches:
        assert branch.encoder_widths == widths and len(branch.encoders) == 2
        for encoder in branch.encoders:
            assert isinstance(encoder, ResidualEncoder) and encoder.output_channels == widths
            assert encoder.stem.convs[0].conv.in_channels == 1 and encoder.stem.convs[0].conv.out_channels == widths[0]
            assert [len(stage.blocks) for stage in encoder.stages] == BLOCKS
            for s, stage in enumerate(encoder.stages):
                first = stage.blocks[0]
                assert first.conv1.conv.out_channels == widths[s] and first.conv2.conv.out_channels == widths[s]
                assert list(first.conv1.conv.stride) == resenc_architecture(configuration)["arch_kwargs"]["strides"][s]
                assert list(first.conv1.conv.kernel_size) == kernel
                for block in stage.blocks:  # nnU-Net's ResEnc init: each block's last norm at zero
                    assert torch.count_nonzero(block.conv2.norm.weight) == 0
        # the decoder is nnU-Net's ResEnc decoder of the plans' full widths
        assert {k: v.shape for k, v in branch.decoder.state_dict().items()} == \
            {k: v.shape for k, v in reference.decoder.state_dict().items() if not k.startswith("encoder.")}
        assert [f.block[-1].out_channels for f in branch.fusions] == FEATURES


def test_plain_plans_keep_the_plain_networks():
    """Plain plans (and model folders written before ResEnc, without ``base``) build the networks as before."""
    plans = trainer_harness.plans()
    smml = trainers.SMMLTrainer(plans, "2d", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    kwargs = smml.configuration_manager.network_arch_init_kwargs
    assert kwargs["base"] == "plain" and "n_blocks_per_stage" not in kwargs
    old = copy.deepcopy(smml.plans_manager.plans)
    del old["configurations"]["2d"]["architecture"]["arch_kwargs"]["base"]  # a model folder of before
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(old)
    network = trainers.SMMLTrainer.build_network_architecture(manager, manager.get_configuration("2d"), 2, 2, True)
    assert network.base == "plain"
    assert all(type(e) is PlainConvEncoder for b in network.branches for e in b.encoders)
    dbdc_plans = resenc_plans("2d", unregistered=True)
    dbdc_plans["configurations"]["2d"]["architecture"] = trainer_harness.plans()["configurations"]["2d"]["architecture"]
    dbdc = trainers.DBDCTrainer(dbdc_plans, "2d", 0, copy.deepcopy(UNREGISTERED_JSON), torch.device("cpu"))
    assert dbdc.configuration_manager.network_arch_class_name.endswith(".DBDCUNet")
    pooled = trainers.PooledUNetTrainer(dbdc_plans, "2d", 0, copy.deepcopy(UNREGISTERED_JSON), torch.device("cpu"))
    assert type(pooled.build_network_architecture(pooled.plans_manager, pooled.configuration_manager, 1, 2,
                                                  True)) is ModalityGuardedUNet
    arch = copy.deepcopy(dbdc.configuration_manager.configuration["architecture"])
    del arch["arch_kwargs"]["base"]  # DBDC model folders of before
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                     2, allow_init=True, deep_supervision=True)
    assert type(network) is DBDCUNet and not any(isinstance(m, BasicBlockD) for m in network.modules())


# ----------------------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("name", ["DBDCTrainer", "PooledUNetTrainer", "SMMLTrainer"])
def test_other_network_classes_are_refused_naming_them(name):
    plans = resenc_plans("2d", _unregistered(name))
    plans["configurations"]["2d"]["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.unet.ResidualUNet"
    with pytest.raises(ValueError, match=f"^{name}: .*unet.PlainConvUNet or .*unet.ResidualEncoderUNet plans, but "
                                         f"this configuration uses dynamic_network_architectures.architectures.unet."
                                         f"ResidualUNet\\."):
        getattr(trainers, name)(plans, "2d", 0, copy.deepcopy(UNREGISTERED_JSON if _unregistered(name) else
                                                             DATASET_JSON), torch.device("cpu"))


def test_a_base_that_contradicts_the_class_is_refused():
    arch = resenc_architecture("2d")
    kwargs = {**arch["arch_kwargs"], "modalities": ["CT", "MR"], "base": "plain"}
    with pytest.raises(ValueError, match="DBDCResEncUNet is built on nnU-Net's resenc U-Net, but its arch kwargs say "
                                         "base='plain'"):
        get_network_from_plans("nnunet_mmssl.architectures.dbdc.DBDCResEncUNet", kwargs, arch["_kw_requires_import"],
                               1, 2)
    with pytest.raises(ValueError, match="base='unet' is not a supported encoder base"):
        SMMLNet(2, 2, 3, FEATURES, torch.nn.Conv2d, 3, [1, 2, 2], None, 1, n_blocks_per_stage=1, base="unet")


# ----------------------------------------------------------------------------------------------------------------
# torch.compile: one graph per new network


def _flat(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in _flat(item)]


def _one_graph_equal_to_eager(module, *args, **kwargs) -> None:
    """One trace, not two (CI's time budget): ``fullgraph=True`` raises on any graph break, and the counting eager
    backend sees exactly one graph -- what Dynamo's explain asserted on a second trace before."""
    torch._dynamo.reset()
    graphs = []

    def counting_eager(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(module, backend=counting_eager, fullgraph=True)
    state = copy.deepcopy(module.state_dict())
    torch.manual_seed(5)
    eager = _flat(module(*args, **kwargs))
    module.load_state_dict(state)
    torch.manual_seed(5)
    traced = _flat(compiled(*args, **kwargs))
    assert len(graphs) == 1
    assert len(traced) == len(eager) > 0
    for a, b in zip(eager, traced, strict=True):
        torch.testing.assert_close(b, a)


def _dbdc_training_call():
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    dbdc = make("DBDCTrainer").network
    dbdc.train()
    dbdc.return_embeddings = True
    return dbdc, (x,), {"modality": torch.tensor([0, 1, 1, 0]),
                        "perturb_features": torch.tensor([False, False, True, True])}


def test_dbdc_resenc_trains_as_one_graph():
    """DBDCResEncUNet's training forward -- a batch mixing both modalities (a modality vector on the device),
    feature dropout on some samples, embeddings returned -- is one graph without breaks (Dynamo's explain; equal to
    eager in the slow test below)."""
    torch._dynamo.reset()
    network, args, kwargs = _dbdc_training_call()
    explained = torch._dynamo.explain(network)(*args, **kwargs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_resenc_networks_predict_and_smml_trains_as_one_graph():
    """DBDCResEncUNet training and predicting one modality, the pooled guard on, SMML's masked branches (training)
    and its missing-modality prediction: one graph each, equal to eager."""
    torch._dynamo.reset()
    dbdc, args, kwargs = _dbdc_training_call()
    _one_graph_equal_to_eager(dbdc, *args, **kwargs)
    dbdc.return_embeddings = False
    x = args[0]
    dbdc.eval()
    dbdc.set_inference_modality("MR")
    _one_graph_equal_to_eager(dbdc, x)
    pooled = make("PooledUNetTrainer").network
    pooled.eval()
    pooled.guard_enabled = True
    pooled.set_inference_modality(0)
    _one_graph_equal_to_eager(pooled, x)
    smml = make("SMMLTrainer").network
    x2 = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    smml.train()
    smml.return_branches = True
    _one_graph_equal_to_eager(smml, x2, masks=random_modality_masks(4, 2, torch.Generator().manual_seed(0)))
    smml.return_branches = False
    smml.eval()
    smml.set_missing_modalities([1])
    _one_graph_equal_to_eager(smml, x2)

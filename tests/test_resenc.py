"""The multi-branch family on nnU-Net's residual-encoder (ResEnc) plans (issue #25).

Tiny ResEnc M-style plans (nnU-Net's ``nnUNetPlannerResEncM`` recipe: a stem, then 1, 3, 4 residual blocks per
stage, one convolution per decoder stage, conv bias, instance norm, LeakyReLU; tiny features and patches) in 2d and
3d_fullres: every trainer of the family trains two steps through nnU-Net's own code, its model folder (plans.json +
checkpoint) is rebuilt by nnU-Net's predictor exactly (same state-dict keys, shapes and values) and predicts what the
trained network computes; the branch encoders are nnU-Net's ``ResidualEncoder`` with the planned blocks per stage; a
branch is nnU-Net's ``ResidualEncoderUNet`` exactly; any other U-Net class is refused by name. The slow test runs
``nnUNetv2_mmssl_plan_and_preprocess -pl nnUNetPlannerResEncM`` -> ``nnUNetv2_train -tr MemCifSSLTrainer`` ->
``nnUNetv2_predict`` through the real console scripts.
"""

import copy
import json
import os
import sys
import tempfile

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trainer_harness  # noqa: E402
from plans_fixtures import DATASET_JSON  # noqa: E402

from nnunet_mmssl.architectures.encoders import SUPPORTED_BASES, base_kind, build_decoder, build_encoder  # noqa: E402
from nnunet_mmssl.architectures.mmf_mae import MMFMAEUNet  # noqa: E402
from nnunet_mmssl.architectures.multi_branch import MemCifUNet, MultiBranchUNet  # noqa: E402
from nnunet_mmssl.planners.memory import (  # noqa: E402
    find_planner_class,
    mmssl_planner_class,
    mmssl_plans_identifier,
    network_feature_map_size,
    planner_defaults,
    step_feature_map_size,
)
from nnunet_mmssl.planners.mmssl_plans import multi_branch_architecture  # noqa: E402

RESENC = SUPPORTED_BASES["resenc"]
#: the refusal of another U-Net class: the supported classes, then the refused one
REFUSED = (r"built from nnU-Net's \S+\.PlainConvUNet or \S+\.ResidualEncoderUNet plans, but this configuration uses "
           r"dynamic_network_architectures\.architectures\.unet\.ResidualUNet\.")
BLOCKS = [1, 3, 4]  # nnUNetPlannerResEncM's first three stages


def resenc_architecture(ndim: int) -> dict:
    """A ResEnc M-style architecture entry as nnU-Net's ResEnc planners write it, shrunk to tiny features."""
    conv = "torch.nn.modules.conv.Conv2d" if ndim == 2 else "torch.nn.modules.conv.Conv3d"
    norm = "torch.nn.modules.instancenorm.InstanceNorm2d" if ndim == 2 else \
        "torch.nn.modules.instancenorm.InstanceNorm3d"
    kernels = [[3, 3]] * 3 if ndim == 2 else [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    strides = [[1, 1], [2, 2], [2, 2]] if ndim == 2 else [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    return {"network_class_name": RESENC,
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": conv, "kernel_sizes": kernels,
                            "strides": strides, "n_blocks_per_stage": list(BLOCKS), "n_conv_per_stage_decoder": [1, 1],
                            "conv_bias": True, "norm_op": norm, "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


PATCH = {"2d": [16, 16], "3d_fullres": [4, 8, 8]}


def resenc_plans() -> dict:
    """trainer_harness's plans with ResEnc 2d and 3d_fullres configurations and nnU-Net's ResEncM plans name."""
    plans = trainer_harness.plans()
    plans["plans_name"] = "nnUNetResEncUNetMPlans"
    plans["experiment_planner_used"] = "nnUNetPlannerResEncM"
    plans["configurations"]["2d"]["architecture"] = resenc_architecture(2)
    plans["configurations"]["3d_fullres"] = {**copy.deepcopy(plans["configurations"]["2d"]),
                                             "data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [4, 8, 8],
                                             "spacing": [1.0, 1.0, 1.0], "architecture": resenc_architecture(3)}
    return plans


FAMILY = ["MemCifSSLTrainer", "MemCifSSLTrainer_noMEM", "MemCifSSLTrainer_noCIF", "MemCifSSLTrainer_plain",
          "MemCifSSLTrainer_printedConsistency", "MemCifSSLTrainer_share0p05", "MemCifSSLTrainer_share0p1",
          "MemCifSSLTrainer_share0p2", "MemCifSSLTrainer_demo", "MemCifSupervisedTrainer",
          "MemCifSupervisedTrainer_demo", "MMFMCMLTrainer", "MMFMCMLTrainer_baseline", "MMFMCMLTrainer_MMF",
          "MMFMCMLTrainer_MMF_MAE", "MMFMCMLTrainer_MMF_MCML", "MMFMCMLSupervisedTrainer", "MeanTeacherTrainer",
          "MeanTeacherTrainer_share0p05", "MeanTeacherTrainer_share0p1", "MeanTeacherTrainer_share0p2",
          "PlainSupervisedTrainer", "ModalityDropoutTrainer"]
#: every trainer of these networks in 3d too (each case is ~1 s: a 4x8x8 patch)
FAMILY_3D = FAMILY
#: trainers that use nnU-Net's own network from the plans
NNUNET_NETWORK = {"MeanTeacherTrainer", "MeanTeacherTrainer_share0p05", "MeanTeacherTrainer_share0p1",
                  "MeanTeacherTrainer_share0p2", "PlainSupervisedTrainer", "ModalityDropoutTrainer"}


@pytest.fixture(scope="module", autouse=True)
def folders():
    root = tempfile.mkdtemp(prefix="resenc-trainers-")
    trainer_harness.set_folders(root)
    os.makedirs(os.path.join(root, "preprocessed", "Dataset999_X", "nnUNetPlans_3d_fullres"), exist_ok=True)
    open(os.path.join(root, "preprocessed", "Dataset999_X", "nnUNetPlans_3d_fullres", "case_0000.b2nd"), "a").close()
    return root


def _encoders(network: nn.Module) -> list[nn.Module]:
    return list(network.encoders) if isinstance(network, MultiBranchUNet) else [network.encoder]


def _make_model_folder(trainer) -> str:
    """What nnU-Net leaves after training: plans.json and dataset.json beside fold_0/checkpoint_final.pth."""
    from batchgenerators.utilities.file_and_folder_operations import save_json

    os.makedirs(trainer.output_folder, exist_ok=True)
    save_json(trainer.plans_manager.plans, os.path.join(trainer.output_folder_base, "plans.json"), sort_keys=False)
    save_json(trainer.dataset_json, os.path.join(trainer.output_folder_base, "dataset.json"), sort_keys=False)
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    return trainer.output_folder_base


@pytest.mark.parametrize("name,configuration", [(name, "2d") for name in FAMILY] +
                         [(name, "3d_fullres") for name in FAMILY_3D])
def test_trainer_trains_and_predicts_on_resenc_plans(name, configuration):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    import nnunet_mmssl.trainers as trainers

    torch.manual_seed(0)
    trainer = getattr(trainers, name)(resenc_plans(), configuration, 0, copy.deepcopy(DATASET_JSON),
                                      torch.device("cpu"))
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.initialize()
    network = trainer.network_module
    arch = trainer.plans_manager.plans["configurations"][configuration]["architecture"]
    if name in NNUNET_NETWORK:  # nnU-Net's network, built as the plans say
        assert type(network) is ResidualEncoderUNet and arch["network_class_name"] == RESENC
    else:
        assert isinstance(network, MultiBranchUNet) and arch["arch_kwargs"]["base"] == "resenc"
        assert arch["arch_kwargs"]["n_blocks_per_stage"] == BLOCKS and "n_conv_per_stage" not in arch["arch_kwargs"]
    groups = [[0, 1]] if name in NNUNET_NETWORK else [[1], [0]]  # the fixture's mmssl block: [[1], [0]]
    for encoder, group in zip(_encoders(network), groups, strict=True):
        assert type(encoder) is ResidualEncoder
        assert [len(stage.blocks) for stage in encoder.stages] == BLOCKS
        assert encoder.stem.convs[0].conv.in_channels == len(group)
        assert type(encoder.stem.convs[0].conv) is (nn.Conv2d if configuration == "2d" else nn.Conv3d)

    before = {k: v.clone() for k, v in network.state_dict().items()}
    outputs = trainer_harness.run_steps(trainer, trainer_harness.batches(trainer, seed=1, count=2), seed=2)
    losses = [float(o["loss"]) for o in outputs]
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [k for k, v in network.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(".stages.2." in k for k in moved), "the deepest residual blocks must train"
    if name not in NNUNET_NETWORK and trainer.use_unlabeled:
        assert all(float(o["unsup_loss"]) > 0 for o in outputs)

    network.return_heads = False
    folder = _make_model_folder(trainer)
    # one tile, no Gaussian weights: the logits are the network's, through nnU-Net's half-precision accumulator
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=False, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(folder, (0,), "checkpoint_final.pth")
    rebuilt = predictor.network.state_dict()
    trained = network.state_dict()
    assert list(rebuilt) == list(trained)
    assert all(torch.equal(rebuilt[k], trained[k]) for k in trained)

    patch = PATCH[configuration]
    image = torch.randn(2, *([1] if configuration == "2d" else []), *patch, generator=torch.Generator().manual_seed(3))
    logits = predictor.predict_sliding_window_return_logits(image)
    network.eval()
    trainer.set_deep_supervision_enabled(False)
    with torch.no_grad():  # the trained network on the same patch (a 2d network sees the slice as a batch of one)
        if configuration == "3d_fullres":
            expected = network(image[None])[0]
        else:
            expected = network(image.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)
    assert logits.shape == (2, *image.shape[1:])  # two classes
    torch.testing.assert_close(logits.float(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_branch_is_nnunets_resenc_unet(ndim):
    """One group of all channels: the same weights (same seed, nnU-Net's init) and the same output as nnU-Net's own
    ResidualEncoderUNet; the residual blocks' last norms start at zero, as nnU-Net initialises them."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    base = resenc_architecture(ndim)
    ours = multi_branch_architecture(base, "nnunet_mmssl.architectures.multi_branch.MultiBranchUNet", [[0, 1]])
    torch.manual_seed(5)
    reference = get_network_from_plans(base["network_class_name"], base["arch_kwargs"], base["_kw_requires_import"],
                                       2, 3, deep_supervision=True)
    torch.manual_seed(5)
    network = get_network_from_plans(ours["network_class_name"], ours["arch_kwargs"], ours["_kw_requires_import"],
                                     2, 3, deep_supervision=True)
    theirs = reference.state_dict()
    mine = {k.replace("encoders.0.", "encoder.").replace("decoders.0.", "decoder."): v
            for k, v in network.state_dict().items()}
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    last_norms = [k for k in theirs if k.endswith("conv2.norm.weight")]
    assert last_norms and all(not mine[k].any() for k in last_norms)
    x = torch.randn(2, 2, *([8, 16, 16] if ndim == 3 else [16, 16]))
    for a, b in zip(network(x), reference(x), strict=True):
        torch.testing.assert_close(a, b)
    assert network.compute_conv_feature_map_size(list(x.shape[2:])) == \
        reference.compute_conv_feature_map_size(list(x.shape[2:]))


def test_mmf_runs_the_stem_and_feature_maps_count_every_branch():
    """MMF-MAE without MMF and MAE computes exactly the multi-branch baseline (stem run before stage 0); the
    multi-branch memory estimate is each branch's ResEnc U-Net's."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    base = resenc_architecture(2)

    def build(cls_path, extra, seed=0):
        entry = multi_branch_architecture(base, cls_path, [[0], [1]], extra)
        torch.manual_seed(seed)
        return get_network_from_plans(entry["network_class_name"], entry["arch_kwargs"], entry["_kw_requires_import"],
                                      2, 2, deep_supervision=False)

    mmf = build("nnunet_mmssl.architectures.mmf_mae.MMFMAEUNet", {"use_mmf": False, "use_mae": False})
    plain = build("nnunet_mmssl.architectures.multi_branch.MultiBranchUNet", {})
    assert isinstance(mmf, MMFMAEUNet)
    plain.load_state_dict(mmf.state_dict())
    x = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(mmf(x), plain(x))
    one_branch = get_network_from_plans(RESENC, base["arch_kwargs"], base["_kw_requires_import"], 1, 2,
                                        deep_supervision=False)
    assert plain.compute_conv_feature_map_size([16, 16]) == 2 * one_branch.compute_conv_feature_map_size([16, 16])
    memcif = build("nnunet_mmssl.architectures.multi_branch.MemCifUNet", {})
    assert isinstance(memcif, MemCifUNet)
    assert memcif.compute_conv_feature_map_size([16, 16]) > plain.compute_conv_feature_map_size([16, 16])


def test_step_estimates_on_resenc_plans():
    import nnunet_mmssl.trainers as trainers

    base = resenc_architecture(2)
    unet = network_feature_map_size(base, [16, 16], 2, 2)
    assert unet == ResidualEncoderUNet(2, 3, [4, 8, 16], nn.Conv2d, 3, [1, 2, 2], BLOCKS, 2, 1, conv_bias=True,
                                       norm_op=nn.InstanceNorm2d,
                                       deep_supervision=True).compute_conv_feature_map_size([16, 16])
    assert step_feature_map_size(trainers.MeanTeacherTrainer, base, [[0], [1]], [16, 16], 2, 2) == 2 * unet
    memcif = step_feature_map_size(trainers.MemCifSupervisedTrainer, base, [[0], [1]], [16, 16], 2, 2)
    assert step_feature_map_size(trainers.MemCifSSLTrainer, base, [[0], [1]], [16, 16], 2, 2) == 2 * memcif
    assert memcif > unet


def test_encoder_builder_and_refusals():
    kwargs = {**resenc_architecture(3)["arch_kwargs"], "conv_op": nn.Conv3d, "norm_op": nn.InstanceNorm3d,
              "nonlin": nn.LeakyReLU, "deep_supervision": True, "stem_channels": 6}
    encoder = build_encoder("resenc", 3, kwargs)
    assert type(encoder) is ResidualEncoder and encoder.stem.convs[0].conv.in_channels == 3
    assert encoder.stem.convs[0].conv.out_channels == 6 and encoder.return_skips
    decoder = build_decoder("resenc", encoder, 4, kwargs)
    outputs = decoder(encoder(torch.randn(1, 3, 4, 8, 8)))
    assert [tuple(o.shape) for o in outputs] == [(1, 4, 4, 8, 8), (1, 4, 4, 4, 4)]
    assert base_kind(SUPPORTED_BASES["plain"]) == "plain" and base_kind(RESENC) == "resenc"
    other = "dynamic_network_architectures.architectures.unet.ResidualUNet"
    with pytest.raises(ValueError, match=REFUSED):
        base_kind(other)
    stock = {**resenc_architecture(2), "network_class_name": other}
    with pytest.raises(ValueError, match=REFUSED):
        multi_branch_architecture(stock, "nnunet_mmssl.architectures.multi_branch.MemCifUNet", [[0], [1]])
    with pytest.raises(ValueError, match=r"base='dense'.*\['plain', 'resenc'\]"):
        MultiBranchUNet(2, 2, [[0], [1]], 3, [4, 8, 16], nn.Conv2d, 3, [1, 2, 2], n_blocks_per_stage=BLOCKS,
                        n_conv_per_stage_decoder=1, base="dense")
    with pytest.raises(ValueError, match="base 'resenc' needs n_blocks_per_stage"):
        MultiBranchUNet(2, 2, [[0], [1]], 3, [4, 8, 16], nn.Conv2d, 3, [1, 2, 2], n_conv_per_stage=2,
                        n_conv_per_stage_decoder=1, base="resenc")


def test_trainer_refuses_other_unet_classes_by_name():
    import nnunet_mmssl.trainers as trainers

    plans = resenc_plans()
    plans["configurations"]["2d"]["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.unet.ResidualUNet"
    with pytest.raises(ValueError, match=REFUSED):
        trainers.MemCifSSLTrainer(plans, "2d", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))


def test_plans_identifiers_and_planner_lookup():
    assert mmssl_plans_identifier("nnUNetPlans") == "nnUNetMMSSLPlans"
    assert mmssl_plans_identifier("nnUNetResEncUNetMPlans") == "nnUNetMMSSLResEncUNetMPlans"
    assert mmssl_plans_identifier("nnUNetResEncUNetPlans_80G") == "nnUNetMMSSLResEncUNetPlans_80G"
    assert mmssl_plans_identifier("myPlans") == "myPlans_MMSSL"
    resenc_l = find_planner_class("nnUNetPlannerResEncL")
    assert planner_defaults(resenc_l) == (24.0, "nnUNetResEncUNetLPlans")
    budgeted = mmssl_planner_class(resenc_l)
    assert budgeted.planner_base() is resenc_l and issubclass(budgeted, resenc_l)
    assert mmssl_planner_class(resenc_l) is budgeted
    with pytest.raises(ValueError, match="-pl nnUNetPlannerResEncQ: no nnU-Net experiment planner"):
        find_planner_class("nnUNetPlannerResEncQ")


def test_planner_of_another_unet_is_refused_before_planning(monkeypatch):
    """A planner whose U-Net is neither supported class stops with one line naming it (before nnU-Net plans)."""
    from dynamic_network_architectures.architectures.unet import ResidualUNet
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from nnunet_mmssl.planners import plan_and_preprocess as pp

    class OtherUNetPlanner(ExperimentPlanner):
        def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8, *args, **kwargs):
            self.UNet_class = ResidualUNet

    with pytest.raises(ValueError, match="^-pl OtherUNetPlanner: Our networks are " + REFUSED):
        pp._check_planner_network(OtherUNetPlanner, 999, None)
    with pytest.raises(ValueError, match=REFUSED):
        mmssl_planner_class(OtherUNetPlanner)(999, budget_trainers=["MemCifSSLTrainer"],
                                              resolve_trainer=lambda name: None)


def test_cli_unknown_planner_is_one_line(capsys):
    from nnunet_mmssl.cli.plan_and_preprocess import main

    assert main(["-d", "999", "-c", "2d", "-pl", "nnUNetPlannerResEncQ"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nnUNetPlannerResEncQ" in err[0] and "nnUNetPlannerResEncM" in err[0]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_resenc_plan_train_predict_through_nnunets_commands(tmp_path):
    import textwrap

    from console_harness import console_environment
    from console_harness import run_console as run

    from nnunet_mmssl.dataset_conversion.phantom import make_phantom_cases

    source = textwrap.dedent('''
        import torch
        from nnunet_mmssl.trainers import MemCifSSLTrainer


        class MemCifSSLTrainer_resencTest(MemCifSSLTrainer):
            def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
                super().__init__(plans, configuration, fold, dataset_json, device)
                self.num_epochs = 1
                self.num_iterations_per_epoch = 2
                self.num_val_iterations_per_epoch = 1

            def perform_actual_validation(self, save_probabilities=False):
                pass  # not asserted here (nnU-Net's final validation of our trainers: test_integration_nnunet)
    ''')
    env = console_environment(tmp_path, "resenc_trainers.py", source)
    src = make_phantom_cases(tmp_path / "phantom", num_labeled=4, num_unlabeled=2, shape=(8, 32, 32),
                             spacing=(2.0, 1.0, 1.0), seed=4)
    # the conversion in-process (its console script: tests/test_integration_nnunet.py); planning, training and
    # prediction through the console scripts
    from nnunet_mmssl.cli.convert import main as convert

    assert convert(["-i", str(src / "labeled"), str(src / "unlabeled"), "--modality", "MRA=MRA.nii.gz", "--modality",
                    "MRB=MRB.nii.gz", "--label", "seg.nii.gz", "--num-labeled", "3", "--num-test", "1", "-d", "925",
                    "-n", "ResEnc", "-o", env["nnUNet_raw"]]) == 0
    run(["nnUNetv2_mmssl_plan_and_preprocess", "-d", "925", "-c", "2d", "-np", "1", "-pl", "nnUNetPlannerResEncM"],
        env)
    pre = tmp_path / "preprocessed" / "Dataset925_ResEnc"
    stock = json.loads((pre / "nnUNetResEncUNetMPlans.json").read_text())
    ours = json.loads((pre / "nnUNetMMSSLResEncUNetMPlans.json").read_text())
    for plans in (stock, ours):
        assert plans["configurations"]["2d"]["architecture"]["network_class_name"] == RESENC
    assert ours["mmssl"]["memory"]["2d"]["planner"] == "nnUNetPlannerResEncM"
    assert ours["configurations"]["2d"]["data_identifier"] == stock["configurations"]["2d"]["data_identifier"]
    run(["nnUNetv2_train", "925", "2d", "0", "-tr", "MemCifSSLTrainer_resencTest", "-p", "nnUNetMMSSLResEncUNetMPlans",
         "-device", "cpu"], env)
    model = tmp_path / "results" / "Dataset925_ResEnc" / "MemCifSSLTrainer_resencTest__nnUNetMMSSLResEncUNetMPlans__2d"
    arch = json.loads((model / "plans.json").read_text())["configurations"]["2d"]["architecture"]
    assert arch["network_class_name"].endswith("MemCifUNet") and arch["arch_kwargs"]["base"] == "resenc"
    assert arch["arch_kwargs"]["n_blocks_per_stage"] == \
        list(ours["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_blocks_per_stage"])
    weights = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("encoders.1.stem.") for k in weights["network_weights"])
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(tmp_path / "raw" / "Dataset925_ResEnc" / "imagesTs"), "-o", str(out), "-d",
         "925", "-c", "2d", "-f", "0", "-tr", "MemCifSSLTrainer_resencTest", "-p", "nnUNetMMSSLResEncUNetMPlans",
         "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    assert len(list(out.glob("*.nii.gz"))) == 1

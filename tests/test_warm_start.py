"""``nnUNetv2_train ... -tr <ours> -pretrained_weights checkpoint_final.pth`` from nnU-Net's own trainer (warm start).

A real ``nnUNetTrainer`` checkpoint (tiny 2d plans, trained two steps here, written by nnU-Net's ``save_checkpoint``) is
loaded into every exported trainer through nnU-Net's ``maybe_load_checkpoint`` -- what ``nnUNetv2_train
-pretrained_weights`` runs, with our wrapper of ``load_pretrained_weights`` in place. Checked against the checkpoint
by explicit key names: every encoder/decoder tensor equals the checkpoint's (a branch's first convolution equals the
checkpoint's weight of its channels, unscaled; DBDC's every-modality norms equal the single norm; SMML's narrow
encoders up to their first other shape), every other tensor is unchanged, the Mean Teacher's teacher equals the
student, the log table names the groups. A checkpoint of other plans or topology stops with one line naming the
tensor and both shapes, the network untouched; ``--c`` with ``-pretrained_weights`` is one line; nnU-Net's own trainer
is unaffected. One slow test runs the real ``nnUNetv2_train -pretrained_weights`` command.
"""

from __future__ import annotations

import copy
import json
import re
import textwrap

import pytest
import torch
import trainer_harness
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from plans_fixtures import DATASET_JSON

import nnunet_mmssl.trainers as trainers
from nnunet_mmssl.architectures.multi_branch import MultiBranchUNet
from nnunet_mmssl.architectures.smml import SMMLNet
from nnunet_mmssl.building_blocks.norm_bank import ModalityNormBank
from nnunet_mmssl.trainers.warm_start import WarmStartError

UNREGISTERED_JSON = {"channel_names": {"0": "CT+MR"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                     "file_ending": ".nii.gz"}
TRAINER_NAMES = [n for n in trainers.__all__ if n not in ("MMSSLTrainerBase", "SSLTrainerBase")]
#: the first convolution of nnU-Net's encoders (plain: stage 0's first conv; ResEnc: the stem), and its alias in the
#: ConvDropoutNormReLU's ``all_modules``
FIRST_CONV = ("stages.0.0.convs.0.conv.weight", "stages.0.0.convs.0.all_modules.0.weight",
              "stem.convs.0.conv.weight", "stem.convs.0.all_modules.0.weight")
RESENC_ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv2d",
                    "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]], "n_blocks_per_stage": [1, 2, 2],
                    "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def _unregistered(name: str) -> bool:
    return name.startswith(("DBDC", "Pooled"))


def _plans(unregistered: bool, architecture: dict | None = None, **arch_kwargs) -> tuple[dict, dict]:
    plans = trainer_harness.plans()
    dataset_json = copy.deepcopy(DATASET_JSON)
    entry = plans["configurations"]["2d"]
    if architecture is not None:
        entry["architecture"] = copy.deepcopy(architecture)
    entry["architecture"]["arch_kwargs"].update(arch_kwargs)
    if unregistered:
        entry.update(use_mask_for_norm=[False], normalization_schemes=["ZScoreNormalization"])
        plans["mmssl"] = {"layout": "unregistered", "modalities": ["CT", "MR"],
                          "intensity_schemes": {"CT": "CTNormalization", "MR": "ZScoreNormalization"}}
        dataset_json = copy.deepcopy(UNREGISTERED_JSON)
    return plans, dataset_json


def make(trainer_class, unregistered: bool, seed: int = 1, architecture: dict | None = None, **arch_kwargs):
    """A trainer built by nnU-Net's code on the CPU (not initialised: nnU-Net's loader initialises it), its log
    lines collected in ``trainer.log_lines``."""
    import nnunetv2.run.run_training  # noqa: F401 (imported before construction, as nnUNetv2_train does)

    torch.manual_seed(seed)
    plans, dataset_json = _plans(unregistered, architecture, **arch_kwargs)
    trainer = trainer_class(plans, "2d", 0, dataset_json, torch.device("cpu"))
    trainer.log_lines = []
    trainer.print_to_log_file = lambda *args, **kwargs: trainer.log_lines.append(" ".join(str(a) for a in args))
    return trainer


def train_nnunet(path, unregistered: bool, steps: int = 2, architecture: dict | None = None, trainer=None,
                 **arch_kwargs) -> dict:
    """nnU-Net's own nnUNetTrainer (``trainer`` or one on the tiny plans), ``steps`` training steps on synthetic
    batches, saved by its save_checkpoint; returns its network weights."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = trainer or make(nnUNetTrainer, unregistered, 0, architecture, **arch_kwargs)
    trainer.initialize()
    generator = torch.Generator().manual_seed(0)
    patch = trainer.configuration_manager.patch_size
    trainer.on_train_epoch_start()
    for _ in range(steps):
        data = torch.randn((trainer.batch_size, trainer.num_input_channels, *patch), generator=generator)
        full = (torch.rand((trainer.batch_size, 1, *patch), generator=generator) > 0.6).float()
        target = [torch.nn.functional.interpolate(full, scale_factor=s, mode="nearest-exact") if s[0] != 1 else full
                  for s in trainer._get_deep_supervision_scales()]
        trainer.train_step({"data": data, "target": target})
    trainer.save_checkpoint(str(path))
    return {k: v.clone() for k, v in trainer.network.state_dict().items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """nnUNetTrainer checkpoints of the registered (2 channels) and unregistered (1 channel) tiny plans, trained two
    steps: ``{unregistered: (path, network_weights)}``."""
    root = tmp_path_factory.mktemp("warm")
    trainer_harness.set_folders(str(root / "nnunet"))
    result = {}
    for unregistered in (False, True):
        path = root / f"nnunet_{int(unregistered)}.pth"
        result[unregistered] = (path, train_nnunet(path, unregistered))
    return result


def warm_start(trainer, path) -> dict:
    """nnU-Net's maybe_load_checkpoint with -pretrained_weights (our wrapper in place); the network before it."""
    import nnunetv2.run.run_training as run_training

    trainer.initialize()
    before = {k: v.clone() for k, v in bare(trainer).state_dict().items()}
    run_training.maybe_load_checkpoint(trainer, False, False, str(path))
    return before


def bare(trainer) -> torch.nn.Module:
    return trainer.network.module if trainer.is_ddp else trainer.network


def expected_tensors(network, source: dict, before: dict) -> dict[str, torch.Tensor]:
    """What each loaded network tensor must equal, by explicit key names per network family."""
    expected = {}
    if isinstance(network, MultiBranchUNet):
        for k, group in enumerate(network.modality_groups):
            for rel in network.encoders[k].state_dict():
                value = source[f"encoder.{rel}"]
                expected[f"encoders.{k}.{rel}"] = value[:, group] if rel in FIRST_CONV else value
            for rel in network.decoders[k].state_dict():  # nnU-Net's decoder holds its encoder: the same tensors
                expected[f"decoders.{k}.{rel}"] = expected[f"encoders.{k}.{rel[8:]}"] if rel.startswith("encoder.") \
                    else source[f"decoder.{rel}"]
    elif has_banks(network):
        for key in network.state_dict():
            bank = re.fullmatch(r"(.*)\.norms\.\d+\.(weight|bias)", key)
            if bank:
                expected[key] = source[f"{bank.group(1)}.{bank.group(2)}"]
            elif key in source:
                expected[key] = source[key]
    elif isinstance(network, SMMLNet):
        for b, branch in enumerate(network.branches):
            for rel in branch.decoder.state_dict():
                expected[f"branches.{b}.decoder.{rel}"] = source[f"decoder.{rel}"]
            for k, encoder in enumerate(branch.encoders):
                for rel in encoder.state_dict():  # the tiny plans' narrow encoders share stage 0's width (4)
                    if rel.startswith(("stem.", "stages.0.")):
                        value = source[f"encoder.{rel}"]
                        expected[f"branches.{b}.encoders.{k}.{rel}"] = value[:, [k]] if rel in FIRST_CONV else value
    elif isinstance(network, (PlainConvUNet, ResidualEncoderUNet)):
        assert network.state_dict().keys() == source.keys()
        expected = dict(source)
    else:
        raise AssertionError(f"no expectation for {type(network).__name__}: add its family here")
    return expected


def has_banks(network) -> bool:
    """DBDC's networks (plain or ResEnc): norms replaced by per-modality banks."""
    return any(isinstance(m, ModalityNormBank) for m in network.modules())


def assert_warm_started(network, source: dict, before: dict) -> dict:
    expected = expected_tensors(network, source, before)
    after = network.state_dict()
    for key, value in after.items():
        if key in expected:
            assert torch.equal(value, expected[key]), key
        else:
            assert torch.equal(value, before[key]), f"{key} changed but is not loaded"
    changed = [k for k in expected if not torch.equal(before[k], expected[k])]
    assert len(changed) > len(expected) // 2, "the checkpoint must differ from the initialisation"
    return expected


@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_every_trainer_warm_starts_from_nnunets_checkpoint(name, checkpoints):
    path, source = checkpoints[_unregistered(name)]
    trainer = make(getattr(trainers, name), _unregistered(name))
    before = warm_start(trainer, path)
    network = bare(trainer)
    assert_warm_started(network, source, before)
    log = trainer.log_lines
    assert log[0].startswith(f"Warm start from {path} (checkpoint of nnUNetTrainer): ")
    rows = [line.split() for line in log[2:]]
    groups = {(row[0], row[2]) for row in rows if row[0] in ("loaded", "sliced", "initial")}
    teacher = getattr(trainer, "teacher", None)
    if teacher is not None:
        student = network.state_dict()
        assert all(torch.equal(v, student[k]) for k, v in teacher.module.state_dict().items())
        assert "  trainer  teacher: a copy of the warm-started student" in log
    if isinstance(network, MultiBranchUNet):
        assert {("loaded", f"{m}.{k}") for m in ("encoders", "decoders") for k in (0, 1)} <= groups
        for k, group in enumerate(network.modality_groups):
            assert any(line.startswith(f"  sliced         1  encoders.{k}.stages.0.0.convs.0.conv.weight <- encoder."
                                       f"stages.0.0.convs.0.conv.weight[:, {group}]") for line in log), log
        fusion = {n for n, m in network.named_children() if n not in ("encoders", "decoders")
                  and any(True for _ in m.parameters())}
        assert {("initial", n) for n in fusion} <= groups and fusion == {g for s, g in groups if s == "initial"}
    elif has_banks(network):
        assert any("<- encoder (every modality's norm <- the one norm)" in line for line in log)
        assert any(row[:3] == ["initial", row[1], "encoder"] and "running_mean" in " ".join(row) for row in rows)
        if network.projector is not None:
            assert ("initial", "projector") in groups
            assert "  trainer  prototype_bank: 1 tensors left at initialisation (trained by this trainer only)" in log
    elif isinstance(network, SMMLNet):
        assert ("initial", "branches.0.fusions") in groups
        assert any("narrow encoder (widths [4, 4, 12], the decoder's [4, 8, 16])" in line for line in log)
        if getattr(trainer, "refiners", None) is not None:
            assert any(line.startswith("  trainer  refiners: ") for line in log)
    else:
        assert groups == {("loaded", "encoder"), ("loaded", "decoder")}


@pytest.fixture(scope="module")
def resenc_checkpoints(tmp_path_factory):
    """nnUNetTrainer checkpoints of tiny ResEnc plans (registered and unregistered), one step each."""
    root = tmp_path_factory.mktemp("warm_resenc")
    trainer_harness.set_folders(str(root / "nnunet"))
    result = {}
    for unregistered in (False, True):
        path = root / f"resenc_{int(unregistered)}.pth"
        result[unregistered] = (path, train_nnunet(path, unregistered, steps=1, architecture=RESENC_ARCH))
    return result


@pytest.mark.parametrize("name", ["MemCifSSLTrainer", "MMFMCMLTrainer", "MeanTeacherTrainer", "DBDCTrainer",
                                  "SMMLTrainer"])
def test_resenc_checkpoint_warm_starts_resenc_networks(name, resenc_checkpoints):
    """ResEnc plans: every encoder is nnU-Net's residual encoder; the stem's first convolution is sliced, every
    residual block (and its skip projection) loaded, DBDC's banks inside the blocks from the one norm."""
    path, source = resenc_checkpoints[_unregistered(name)]
    trainer = make(getattr(trainers, name), _unregistered(name), architecture=RESENC_ARCH)
    before = warm_start(trainer, path)
    expected = assert_warm_started(bare(trainer), source, before)
    assert any(".stem.convs.0.conv.weight" in key for key in expected)
    if name != "SMMLTrainer":  # SMML's narrow residual encoders take the stem and stage 0 only
        assert any(".skip." in key for key in expected), "the residual blocks' skip projections are loaded too"


def test_supervised_twin_checkpoint_loads_whole(tmp_path):
    """A checkpoint of the same network (the supervised twin, what the study's warm start passes) loads every tensor,
    fusion blocks included."""
    trainer_harness.set_folders(str(tmp_path / "nnunet"))
    twin = make(trainers.MemCifSupervisedTrainer, False, seed=5)
    twin.initialize()
    path = tmp_path / "twin.pth"
    twin.save_checkpoint(str(path))
    trainer = make(trainers.MemCifSSLTrainer, False)
    warm_start(trainer, path)
    saved = bare(twin).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in bare(trainer).state_dict().items())
    assert "0 sliced, 0 left at initialisation" in trainer.log_lines[0]


@pytest.mark.parametrize("other, message", [
    ({"n_conv_per_stage": [1, 2, 1]},
     "tensor encoder.stages.1.0.convs.1.conv.weight (8, 8, 3, 3) of the checkpoint has no counterpart in the network"),
    ({"n_stages": 4, "features_per_stage": [4, 8, 16, 32], "kernel_sizes": [[3, 3]] * 4,
      "strides": [[1, 1], [2, 2], [2, 2], [2, 2]], "n_conv_per_stage": [1] * 4, "n_conv_per_stage_decoder": [1] * 3},
     ("tensor decoder.stages.0.convs.0.conv.weight has shape (16, 32, 3, 3) in the checkpoint but the network's "
      "decoders.0.stages.0.convs.0.conv.weight has (8, 16, 3, 3)")),
    ({"features_per_stage": [4, 8, 32]},
     ("tensor encoder.stages.2.0.convs.0.conv.weight has shape (32, 8, 3, 3) in the checkpoint but the network's "
      "encoders.0.stages.2.0.convs.0.conv.weight has (16, 8, 3, 3)")),
    ("resenc", ("the network's encoders.0.stages.0.0.convs.0.conv.weight (4, 1, 3, 3) has no counterpart in the "
                "checkpoint (looked for encoder.stages.0.0.convs.0.conv.weight, absent)")),
])
def test_checkpoint_of_other_plans_is_refused_in_one_line(other, message, tmp_path, capsys):
    import nnunetv2.run.run_training as run_training

    from nnunet_mmssl.trainers.user_errors import report_user_errors

    trainer_harness.set_folders(str(tmp_path / "nnunet"))
    path = tmp_path / "other.pth"
    if other == "resenc":
        train_nnunet(path, False, steps=0, architecture=RESENC_ARCH)
    else:
        train_nnunet(path, False, steps=0, **other)
    trainer = make(trainers.MemCifSSLTrainer, False)
    trainer.initialize()
    before = copy.deepcopy(bare(trainer).state_dict())
    with pytest.raises(WarmStartError) as error:
        run_training.maybe_load_checkpoint(trainer, False, False, str(path))
    assert message in str(error.value) and str(error.value).startswith(f"{path}, ")
    assert all(torch.equal(v, before[k]) for k, v in bare(trainer).state_dict().items())
    assert not any(line.startswith("Warm start") for line in trainer.log_lines)
    report_user_errors()(error.type, error.value, error.tb)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and message in lines[0]


def test_other_class_count_leaves_the_segmentation_layers_at_initialisation(tmp_path):
    """A checkpoint of other labels: every tensor but the segmentation layers loads (nnU-Net never loads those)."""
    import nnunetv2.run.run_training as run_training

    trainer_harness.set_folders(str(tmp_path / "nnunet"))
    path = tmp_path / "labels.pth"
    train_nnunet(path, False, steps=0)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["network_weights"] = {k: (torch.cat([v, v[:1]]) if ".seg_layers." in k else v)
                                     for k, v in checkpoint["network_weights"].items()}
    torch.save(checkpoint, path)
    trainer = make(trainers.PlainSupervisedTrainer, False)
    trainer.initialize()
    before = copy.deepcopy(bare(trainer).state_dict())
    run_training.maybe_load_checkpoint(trainer, False, False, str(path))
    after = bare(trainer).state_dict()
    seg = [k for k in after if ".seg_layers." in k]
    assert seg and all(torch.equal(after[k], before[k]) for k in seg)
    assert all(torch.equal(after[k], checkpoint["network_weights"][k]) for k in after if k not in seg)
    assert any("segmentation layer: the checkpoint has 3 outputs, this network 2" in line
               for line in trainer.log_lines)


def test_continue_with_pretrained_weights_is_one_line_and_nnunets_trainer_is_unaffected(checkpoints):
    """``--c`` with ``-pretrained_weights``: one line for ours, nnU-Net's RuntimeError for its own trainer, whose
    ``-pretrained_weights`` stays nnU-Net's function (segmentation layers not loaded, no table)."""
    import nnunetv2.run.run_training as run_training
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    path, source = checkpoints[False]
    ours = make(trainers.MeanTeacherTrainer, False)
    with pytest.raises(WarmStartError, match=r"-pretrained_weights cannot be combined with --c"):
        run_training.maybe_load_checkpoint(ours, True, False, str(path))
    theirs = make(nnUNetTrainer, False)
    with pytest.raises(RuntimeError, match="Cannot both continue a training AND load pretrained weights"):
        run_training.maybe_load_checkpoint(theirs, True, False, str(path))
    before = warm_start(theirs, path)
    after = theirs.network.state_dict()
    for key, value in after.items():
        assert torch.equal(value, before[key] if ".seg_layers." in key else source[key]), key
    assert theirs.log_lines == []


@pytest.mark.slow
def test_nnunet_train_console_warm_starts_our_trainer(checkpoints, planned_phantom, tmp_path, monkeypatch):
    """The real ``nnUNetv2_train 901 2d 0 -tr MemCifSSLTrainer_ws -pretrained_weights FILE`` (a one-step subclass in
    a user's trainer folder, learning rate 1e-9) on the session's converted and preprocessed phantom (copied,
    tests/phantom_workspace.py), FILE an nnUNetTrainer
    checkpoint of its plans: the table is in the training log and the final weights are the warm-started ones; a
    checkpoint of other plans (the tiny fixture plans) stops the command with one line."""
    import phantom_workspace
    from console_harness import console_environment, run_consoles
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer_source = textwrap.dedent('''
        import torch
        from nnunet_mmssl.trainers import MemCifSSLTrainer


        class MemCifSSLTrainer_ws(MemCifSSLTrainer):
            def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
                super().__init__(plans, configuration, fold, dataset_json, device)
                self.num_epochs = 1
                self.num_iterations_per_epoch = 1
                self.num_val_iterations_per_epoch = 1
                self.initial_lr = 1e-9

            def perform_actual_validation(self, save_probabilities=False):
                pass
    ''')
    env = console_environment(tmp_path, "ws_trainers.py", trainer_source)
    phantom_workspace.copy_into(planned_phantom, tmp_path)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, env[key])
    preprocessed = tmp_path / "preprocessed" / phantom_workspace.DATASET
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    torch.manual_seed(0)
    supervised = nnUNetTrainer(plans, "2d", 0, dataset_json, torch.device("cpu"))
    supervised.print_to_log_file = lambda *args, **kwargs: None
    path = tmp_path / "supervised.pth"
    source = train_nnunet(path, False, trainer=supervised)

    def train(checkpoint, fold: str) -> list[str]:
        return ["nnUNetv2_train", str(phantom_workspace.DATASET_ID), "2d", fold, "-tr", "MemCifSSLTrainer_ws",
                "-device", "cpu", "-pretrained_weights", str(checkpoint)]

    # both commands at once (CI's time budget; each one's start runs on one core), each in a fold folder of its own:
    # this plans' checkpoint (fold 0), a checkpoint of other plans (the tiny fixture plans; fold 1)
    other, _ = checkpoints[False]
    result, refused = run_consoles([train(path, "0"), train(other, "1")], env, ok=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fold = tmp_path / "results" / phantom_workspace.DATASET / "MemCifSSLTrainer_ws__nnUNetPlans__2d" / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"Warm start from {path} (checkpoint of nnUNetTrainer)" in log
    assert "encoders.0.stages.0.0.convs.0.conv.weight <- encoder.stages.0.0.convs.0.conv.weight[:, [0]]" in log
    trained = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=True)["network_weights"]
    first = "stages.0.0.convs.0.conv.weight"
    for k in (0, 1):
        torch.testing.assert_close(trained[f"encoders.{k}.{first}"], source[f"encoder.{first}"][:, [k]])
        for rel in ("stages.1.0.convs.0.conv.weight", "stages.1.0.convs.0.norm.weight"):
            torch.testing.assert_close(trained[f"encoders.{k}.{rel}"], source[f"encoder.{rel}"])
        torch.testing.assert_close(trained[f"decoders.{k}.seg_layers.0.weight"], source["decoder.seg_layers.0.weight"])

    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"nnUNetv2_train: error: {other}, tensor ") and "in the checkpoint but the network's" in last

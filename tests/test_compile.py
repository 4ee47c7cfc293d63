"""torch.compile compatibility of every network our trainers build (nnU-Net compiles ``self.network`` on CUDA unless
``nnUNet_compile`` is false).

Each network is the one the trainer itself builds: the trainer is constructed and initialised by nnU-Net's own code
on tiny 2d and 3d plans, and its network (plus SMML's refinement networks and the Mean Teacher's teacher) is compiled
with ``fullgraph=True`` -- Dynamo raises on any graph break, so passing means one graph per mode, nothing falls back
to eager Python per step. In the trainer's training mode (its flags: every head, SMML's two masks per sample) the
compiled outputs and the parameters' gradients equal eager's; in inference mode (eval, no deep supervision, as
``nnUNetv2_predict`` runs it; SMML also with ``set_missing_modalities``) the outputs do. The ``eager`` backend checks
the tracing without code generation, so each case runs in seconds on a CPU.
"""

import copy
import os

import pytest
import torch
import trainer_harness as harness
from plans_fixtures import ARCH_2D, DATASET_JSON

import nnunet_mmssl.trainers as trainers
from nnunet_mmssl.architectures.smml import random_modality_masks

ARCH_3D = copy.deepcopy(ARCH_2D)
ARCH_3D["arch_kwargs"].update(conv_op="torch.nn.modules.conv.Conv3d", kernel_sizes=[[3, 3, 3]] * 3,
                              strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                              norm_op="torch.nn.modules.instancenorm.InstanceNorm3d")
PATCHES = {"2d": [16, 16], "3d_fullres": [8, 8, 8]}

#: one trainer per network class (and SMML's masks in 3d) in the fast set. Slow: the ablations that drop whole parts
#: of a network (MemCif without MEM and CIF, MMF-MCML without fusion, SMML's single branch) and the 3d twins; with the
#: full networks (fast) they bracket the other ablations, whose graphs are the full graph with one module switched off
#: (MemCif noMEM/noCIF, MMF-MCML MMF/MMF_MAE/MMF_MCML), not compiled here for CI's time budget. The trainers that use
#: nnU-Net's own network (PlainSupervised, ModalityDropout; Mean Teacher in 3d) compile nnU-Net's network, checked
#: once by Mean Teacher in 2d.
FAST = [("MemCifSSLTrainer", "2d"), ("MMFMCMLTrainer", "2d"), ("SMMLTrainer", "2d"), ("MeanTeacherTrainer", "2d"),
        ("PooledUNetTrainer", "2d"), ("SMMLTrainer", "3d_fullres")]
SLOW = [(name, "2d") for name in ("MemCifSSLTrainer_plain", "MMFMCMLTrainer_baseline", "SMMLTrainer_single")] + \
       [(name, "3d_fullres") for name in ("MemCifSSLTrainer", "MMFMCMLTrainer", "PooledUNetTrainer")]
CASES = FAST + [pytest.param(*case, marks=pytest.mark.slow) for case in SLOW]


@pytest.fixture
def folders(tmp_path, monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(key, raising=False)  # restored after the test; set_folders sets them
    harness.set_folders(str(tmp_path))
    return tmp_path


def make_trainer(name: str, configuration: str, root, plans: dict | None = None,
                 dataset_json: dict = DATASET_JSON) -> object:
    """Trainer ``name`` constructed and initialised by nnU-Net's code on the CPU (nnUNet_compile is false in tests:
    the test compiles the network itself), on ``plans`` (default the harness's) with a 3d configuration added."""
    plans = harness.plans() if plans is None else plans
    if configuration == "3d_fullres":
        plans["configurations"]["3d_fullres"] = dict(
            plans["configurations"]["2d"], data_identifier="nnUNetPlans_3d_fullres", patch_size=PATCHES[configuration],
            spacing=[1.0, 1.0, 1.0], architecture=ARCH_3D)
        folder = os.path.join(root, "preprocessed", plans["dataset_name"], "nnUNetPlans_3d_fullres")
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "case_0000.b2nd"), "a").close()
    torch.manual_seed(0)
    trainer = getattr(trainers, name)(plans, configuration, 0, copy.deepcopy(dataset_json), torch.device("cpu"))
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.initialize()
    return trainer


def _flat(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in _flat(item)]


def _loss(outputs: list[torch.Tensor]) -> torch.Tensor:
    # weights per output, so that a wrong pairing of outputs changes the gradients too
    return sum((i + 1) * (t.float() ** 2).mean() for i, t in enumerate(outputs))


def assert_compiled_matches_eager(module: torch.nn.Module, *args, grad: bool = True, all_trained: bool = True,
                                  **kwargs) -> list[torch.Tensor]:
    """Compile ``module`` as one graph; its outputs (and with ``grad`` its parameters' gradients: every parameter's
    with ``all_trained``) equal eager's. Returns the compiled outputs."""
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    with torch.set_grad_enabled(grad):
        eager = _flat(module(*args, **kwargs))
        if grad:
            module.zero_grad(set_to_none=True)
            _loss(eager).backward()
            eager_grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
            module.zero_grad(set_to_none=True)
        traced = _flat(compiled(*args, **kwargs))
    assert len(traced) == len(eager) > 0
    # fullgraph lets some host reads of inputs through (a .tolist() is specialised on); Dynamo's explain reports them
    with torch.set_grad_enabled(grad):
        explained = torch._dynamo.explain(module)(*args, **kwargs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    for a, b in zip(eager, traced, strict=True):
        torch.testing.assert_close(b, a)
    if grad:
        _loss(traced).backward()
        traced_grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        assert traced_grads.keys() == eager_grads.keys()
        assert len(eager_grads) == len(list(module.parameters())) if all_trained else eager_grads
        for key, value in eager_grads.items():
            torch.testing.assert_close(traced_grads[key], value, msg=lambda m, key=key: f"grad of {key}: {m}")
        module.zero_grad(set_to_none=True)
    return traced


@pytest.mark.parametrize("name,configuration", CASES)
def test_every_network_compiles_as_one_graph_and_matches_eager(name, configuration, folders):
    torch._dynamo.reset()
    trainer = make_trainer(name, configuration, folders)
    network = trainer.network  # nnUNet_compile is false: the bare network
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, trainer.num_input_channels, *PATCHES[configuration], generator=generator)
    num_scales = len(trainer.configuration_manager.pool_op_kernel_sizes) - 1  # deep-supervision outputs per head

    # training, in the trainer's own mode (MultiBranch: every head; SMML: two masks per sample, branch outputs)
    trainer.on_train_epoch_start()
    network.train()
    if name.startswith("SMML"):
        masks = random_modality_masks(x.shape[0], x.shape[1], generator=generator)
        network.return_branches = True
        outputs = assert_compiled_matches_eager(network, x, masks=masks)
        network.return_branches = False
        assert len(outputs) == 2 * num_scales + 2  # two deep-supervision lists + two fused feature maps
        assert (trainer.refiners is not None) == trainer.use_srn  # _single, _dual*: no SRN
        for refiner in trainer.refiners or []:  # SRN: the softmax of a prediction in, refined logits out (nnU-Net's
            # U-Net without deep supervision: its lower-resolution heads get no gradient)
            assert_compiled_matches_eager(refiner, torch.softmax(outputs[0].detach(), 1), all_trained=False)
    else:
        heads = getattr(network, "num_heads", 1)
        outputs = assert_compiled_matches_eager(network, x)
        assert len(outputs) == heads * num_scales
    if name == "MeanTeacherTrainer":  # the teacher: a copy of the student, run without gradient
        assert_compiled_matches_eager(trainer.teacher.module, x, grad=False)

    # inference, as nnUNetv2_predict runs it
    trainer.on_validation_epoch_start()
    trainer.set_deep_supervision_enabled(False)
    network.eval()
    outputs = assert_compiled_matches_eager(network, x, grad=False)
    assert len(outputs) == 1 and outputs[0].shape == (2, 2, *PATCHES[configuration])
    if name.startswith("SMML"):  # nnUNetv2_mmssl_predict --missing
        network.set_missing_modalities([0])
        missing = assert_compiled_matches_eager(network, x, grad=False)
        assert not torch.allclose(missing[0], outputs[0])  # the mask reached the compiled graph
        network.set_missing_modalities(None)


# ---------------------------------------------------------------- DBDC: norm banks selected per sample on the device
UNREGISTERED_JSON = {"channel_names": {"0": "CT+MR"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                     "file_ending": ".nii.gz"}


def make_dbdc_trainer(name: str, configuration: str, root) -> object:
    """A DBDC trainer on unregistered plans (modalities CT and MR, one channel), built by nnU-Net's code."""
    plans = harness.plans()
    plans["configurations"]["2d"].update(use_mask_for_norm=[False], normalization_schemes=["ZScoreNormalization"])
    plans["mmssl"] = {"layout": "unregistered", "modalities": ["CT", "MR"],
                      "intensity_schemes": {"CT": "CTNormalization", "MR": "ZScoreNormalization"}}
    return make_trainer(name, configuration, root, plans, UNREGISTERED_JSON)


def _run_seeded(call, network, seed: int, *args, **kwargs) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs of one call with the RNG seeded (feature dropout draws), and the network's buffers after it."""
    torch.manual_seed(seed)
    outputs = _flat(call(*args, **kwargs))
    return outputs, {n: b.clone() for n, b in network.named_buffers()}


@pytest.mark.parametrize("name,configuration", [("DBDCTrainer_mlmbEncoder", "2d")])  # banked and shared norms
def test_dbdc_network_compiles_as_one_graph_and_matches_eager(name, configuration, folders):
    """DBDCUNet as the trainer drives it -- one forward of a batch mixing both modalities (a modality vector on the
    device), feature dropout on some samples, embeddings returned -- and as prediction runs it (eval, one modality
    as an int or a vector): one graph (``fullgraph``), outputs, gradients and the banks' running statistics equal
    eager's."""
    torch._dynamo.reset()
    trainer = make_dbdc_trainer(name, configuration, folders)
    network = trainer.network
    assert any(bank.num_modalities == 2 for bank in network.modules() if hasattr(bank, "norms"))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, *PATCHES[configuration], generator=generator)
    modality = torch.tensor([0, 1, 1, 0])
    perturb = torch.tensor([False, False, True, True])
    compiled = torch.compile(network, backend="eager", fullgraph=True)

    network.train()
    network.return_embeddings = True
    start = copy.deepcopy(network.state_dict())
    # Dynamo's explain also reports what fullgraph lets through (e.g. a .tolist() of an input, specialised on)
    explained = torch._dynamo.explain(network)(x, modality=modality, perturb_features=perturb)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    network.load_state_dict(start)
    eager, eager_buffers = _run_seeded(network, network, 3, x, modality=modality, perturb_features=perturb)
    network.zero_grad(set_to_none=True)
    _loss(eager).backward()
    eager_grads = {n: p.grad.clone() for n, p in network.named_parameters()}
    network.zero_grad(set_to_none=True)
    network.load_state_dict(start)  # the running statistics as before the eager call
    traced, traced_buffers = _run_seeded(compiled, network, 3, x, modality=modality, perturb_features=perturb)
    network.return_embeddings = False
    assert len(traced) == len(eager) == len(trainer._get_deep_supervision_scales()) + 1  # logits per scale + embeddings
    for a, b in zip(eager, traced, strict=True):
        torch.testing.assert_close(b, a)
    assert eager_buffers.keys() == traced_buffers.keys()
    for key, value in eager_buffers.items():  # per-modality running statistics updated inside the graph
        torch.testing.assert_close(traced_buffers[key], value, msg=lambda m, key=key: f"{key}: {m}")
    assert any(not torch.equal(start[key], value) for key, value in eager_buffers.items() if "running_mean" in key)
    _loss(traced).backward()
    for key, value in eager_grads.items():
        torch.testing.assert_close(network.get_parameter(key).grad, value, msg=lambda m, key=key: f"grad of {key}: {m}")
    network.zero_grad(set_to_none=True)

    trainer.set_deep_supervision_enabled(False)
    network.eval()
    vector = assert_compiled_matches_eager(network, x, grad=False, modality=modality)
    network.set_inference_modality("MR")
    index = assert_compiled_matches_eager(network, x, grad=False)
    assert vector[0].shape == index[0].shape == (4, 2, *PATCHES[configuration])
    # samples 1 and 2 are MR in both calls; samples 0 and 3 are CT only in the first
    torch.testing.assert_close(index[0][1:3], vector[0][1:3])
    assert not torch.allclose(index[0][0], vector[0][0], atol=1e-4)


def test_pooled_guard_at_prediction_compiles_as_one_graph(folders):
    """The pooled U-Net's modality guard, on in a predictor's network (the trainer turns it off), adds no graph
    break: the modality index is checked on the host only when it is an int (our predictor's)."""
    torch._dynamo.reset()
    trainer = make_trainer("PooledUNetTrainer", "2d", folders)
    network = trainer.network
    network.eval()
    network.guard_enabled = True  # as in a predictor's network; our predictor names the modality
    network.set_inference_modality(0)
    x = torch.randn(2, trainer.num_input_channels, *PATCHES["2d"], generator=torch.Generator().manual_seed(1))
    assert_compiled_matches_eager(network, x, grad=False)

"""Mixed precision (issue #22): every loss and statistic stays finite and close to float32 under autocast.

nnU-Net trains on CUDA under float16 autocast. Here autocast is forced on the CPU (``torch.autocast("cpu",
dtype=float16)`` and bfloat16), which casts convolutions and matrix products (``matmul``, ``bmm``, ``einsum``,
``linear``) to the lower precision just as CUDA autocast does; that is the cast that overflowed SMML's FRC.

Sizes: the slow tests run each loss at the plans' real sizes, 3d_fullres 128^3 with batch 2 (SMML's stage-1 features
64^3) and a 2d patch of 512 x 512 with batch 12, fed activations made by the tail of the real fusion block at
nnU-Net's initialisation (instance norm + leaky ReLU + He-initialised 1x1 convolution), with BraTS-like labels (a
nested tumour covering ~13 % of the patch). The fast tests run every trainer's real ``train_step`` under forced
autocast on the fixture plans.
"""

import copy
import functools
import inspect
import math
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunet_mmssl.architectures.smml import MaskedConvFusion
from nnunet_mmssl.building_blocks.attention import ChannelSelfAttention
from nnunet_mmssl.losses import consistency, mutual_learning, prototypes, smml, targets
from nnunet_mmssl.losses.consistency import cross_modal_consistency_loss
from nnunet_mmssl.losses.mutual_learning import contrastive_mutual_learning_loss
from nnunet_mmssl.losses.precision import float32_region, full_precision
from nnunet_mmssl.losses.prototypes import PrototypeBank, mpcl_loss
from nnunet_mmssl.losses.smml import class_entropy_weights, frc_loss, pbc_loss, refinement_kl
from nnunet_mmssl.semisup import ema, gradient_share
from nnunet_mmssl.semisup.gradient_share import global_norm

LOW = [torch.float16, torch.bfloat16]
#: relative error (norm of the difference / norm of the float32 value) of a loss and of its gradient under float16
#: autocast against float32 arithmetic on the same activations (as autocast hands them over): the loss's own
#: arithmetic. Measured at 128^3 x 2: losses bit-identical; gradients <= 2.2e-4, float16's rounding of the gradient
#: itself on its way back into the float16 activations
LOSS_TOLERANCE = 1e-6
GRAD_TOLERANCE = 1e-3
#: the same against float32 activations (FRC, MEM: their inputs rounded to the lower precision as well)
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
#: (batch, spatial shape of the full-resolution patch) of the plans' real configurations
SIZES = {"3d_fullres": (2, (128, 128, 128)), "2d": (12, (512, 512))}
#: nnU-Net's GradScaler starts at 2^16: the backward of a float16 graph runs on the scaled loss (per-voxel gradients of
#: a mean over 200,000 voxels are below float16's smallest normal number otherwise), the gradients are divided after
GRAD_SCALE = 2.0 ** 16


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))


def brats_like_classes(batch: int, shape: tuple[int, ...], num_classes: int = 4, seed: int = 0) -> torch.Tensor:
    """(B, *S) long: background, and nested spheres of classes 1..C-1 (a tumour over ~13 % of the patch)."""
    generator = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    classes = torch.zeros(batch, *shape, dtype=torch.long)
    for b in range(batch):
        centre = [s / 2 + float(torch.randint(-s // 8, s // 8 + 1, (1,), generator=generator)) for s in shape]
        distance = sum((g - c) ** 2 for g, c in zip(grids, centre)).sqrt() / (min(shape) / 2)
        for c, radius in enumerate((0.62, 0.4, 0.2)[:num_classes - 1], start=1):
            classes[b][distance < radius] = c
    return classes


def fusion_tail(conv_op, channels: int, seed: int) -> nn.Module:
    """Instance norm + leaky ReLU + 1x1 convolution of SMML's real fusion block, with nnU-Net's He initialisation."""
    torch.manual_seed(seed)
    norm = nn.InstanceNorm3d if conv_op is nn.Conv3d else nn.InstanceNorm2d
    block = MaskedConvFusion(channels, channels, conv_op, norm, {"eps": 1e-5, "affine": True}, nn.LeakyReLU,
                             {"inplace": True})
    block.apply(InitWeights_He(1e-2))
    return block.block[4:]


def pre_activations(classes: torch.Tensor, channels: int, seed: int) -> torch.Tensor:
    """(B, D, *s) smooth random field plus a per-class, per-channel offset: what the fusion block's 3x3 conv emits."""
    generator = torch.Generator().manual_seed(seed)
    batch, spatial = classes.shape[0], classes.shape[1:]
    coarse = torch.randn(batch, channels, *[max(2, s // 8) for s in spatial], generator=generator)
    field = F.interpolate(coarse, size=spatial, mode="trilinear" if len(spatial) == 3 else "bilinear")
    offsets = torch.randn(int(classes.max()) + 1, channels, generator=generator)
    field += offsets[classes].movedim(-1, 1)
    return field + 0.5 * torch.randn(field.shape, generator=generator)


@functools.lru_cache(maxsize=1)
def frc_case(size: str, channels: int):
    """Stage-1 fused features of both branches (two fusion tails, float32, detached) and the full-resolution
    classes, cached for the size."""
    batch, shape = SIZES[size]
    classes = brats_like_classes(batch, shape)
    small = classes[(slice(None), *[slice(None, None, 2)] * len(shape))]  # stage 1: half resolution
    conv = nn.Conv3d if len(shape) == 3 else nn.Conv2d
    with torch.no_grad():
        features = [fusion_tail(conv, channels, seed)(pre_activations(small, channels, seed + 2))
                    for seed in (1, 2)]
    logits = torch.randn(batch, 4, *shape, generator=torch.Generator().manual_seed(5)) * 3
    weights = class_entropy_weights(logits, logits.roll(1, 1))
    return features, classes, weights


def run_frc(features, classes, weights, dtype):
    """FRC and its gradient w.r.t. the features; under autocast the features arrive in ``dtype``, as the fusion
    block's 1x1 convolution emits them there, and the backward runs on the loss scaled by :data:`GRAD_SCALE`."""
    leaves = [f.clone().requires_grad_() for f in features]
    with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
        emitted = [leaf if dtype is None else leaf.to(dtype) for leaf in leaves]
        loss = frc_loss(emitted[0], emitted[1], classes, weights, 4)
    scale = 1.0 if dtype is None else GRAD_SCALE
    (loss * scale).backward()
    return loss.detach(), torch.cat([leaf.grad.flatten() for leaf in leaves]) / scale


@pytest.mark.slow
@pytest.mark.parametrize("size", ["3d_fullres", "2d"])
def test_frc_at_real_patch_sizes_is_finite_and_close_to_float32(size):
    case = frc_case(size, channels=32 if size == "2d" else 64)
    reference, reference_grad = run_frc(*case, None)
    assert math.isfinite(reference) and reference > 1e-3 and reference_grad.isfinite().all()
    for dtype in LOW:
        loss, grad = run_frc(*case, dtype)
        assert math.isfinite(loss) and grad.isfinite().all(), (size, dtype, loss)
        assert relative_error(loss, reference) < TOLERANCE[dtype], (size, dtype, float(loss), float(reference))
        assert relative_error(grad, reference_grad) < TOLERANCE[dtype], (size, dtype)



# ---------------------------------------------------------------- the other losses at the plans' real sizes
@functools.lru_cache(maxsize=1)
def logits_case(size: str):
    """Two branches' full-resolution logits (B, 4, *S): a class margin of 4 plus a smooth field and noise of sd ~2
    (|logit| up to ~12, a trained network's range), their BraTS-like classes and regions, and 8-channel unit
    embeddings for MPCL (its sums run over the voxels; the embedding width only multiplies the time and memory)."""
    batch, shape = SIZES[size]
    classes = brats_like_classes(batch, shape)
    onehot = F.one_hot(classes, 4).movedim(-1, 1).float()
    logits = [4 * onehot + 2 * pre_activations(classes, 4, seed) for seed in (6, 7)]
    regions = torch.stack([classes > 0, classes > 1, classes > 2], 1).float()
    embeddings = F.normalize(pre_activations(classes, 8, 8), dim=1)
    return logits, classes, regions, embeddings


def _mpcl(embeddings, classes):
    bank = PrototypeBank(2, 4, embeddings.shape[1], seed=0)
    modality = torch.arange(embeddings.shape[0]) % 2
    return mpcl_loss(embeddings, classes, bank.prototypes, modality)[0]


#: name -> (loss of the two logits (or the embeddings), classes, regions; whether it has a gradient)
LOSS_CASES = {
    "pbc": (lambda a, b, c, r: sum(pbc_loss(a, b, c, 6.0)), True),
    "pbc_regions": (lambda a, b, c, r: sum(pbc_loss(a[:, 1:], b[:, 1:], r, 6.0, sigmoid=True)), True),
    "refinement_kl": (lambda a, b, c, r: refinement_kl(a, b), True),
    "entropy_weights": (lambda a, b, c, r: class_entropy_weights(a, b).sum(), False),
    "consistency_printed": (lambda a, b, c, r: cross_modal_consistency_loss(a, b, reduction="printed"), True),
    "mutual_learning": (lambda a, b, c, r: contrastive_mutual_learning_loss(a, b), True),
    "mpcl": (lambda e, _, c, r: _mpcl(e, c), True),
}


def run_loss(name: str, size: str, dtype, autocast: bool = True):
    """The loss and its gradient w.r.t. its float32 inputs. The inputs arrive in ``dtype`` (as the network's last
    convolution emits them under autocast); with ``autocast`` the loss runs under autocast of ``dtype`` and the
    backward on the loss scaled by :data:`GRAD_SCALE`, else in float32 (the reference: the same activations)."""
    logits, classes, regions, embeddings = logits_case(size)
    loss_fn, has_grad = LOSS_CASES[name]
    # float32 leaves holding the values rounded to dtype: the same activations for both runs
    leaves = [t.to(dtype).float().requires_grad_(has_grad) for t in ([embeddings] if name == "mpcl" else logits)]
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        inputs = [leaf.to(dtype) if autocast else leaf for leaf in leaves] + [None]
        loss = loss_fn(inputs[0], inputs[1], classes, regions)
    if not has_grad:
        return loss.detach(), None
    scale = GRAD_SCALE if autocast else 1.0
    (loss * scale).backward()
    return loss.detach(), torch.cat([(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).flatten()
                                     for leaf in leaves]) / scale


@pytest.mark.slow
def test_every_loss_at_the_3d_patch_size_is_finite_and_equals_float32():
    """float16 at 128^3 x 2 (4.2 million voxels; the 2d patch's 3.1 million go through the same flattened code, see
    the FRC test for both). bfloat16 has float32's exponent range, so it cannot overflow; its precision is tested at
    the fixture size by the train-step tests and at both sizes by the FRC test."""
    failures = []
    for name in LOSS_CASES:
        reference, reference_grad = run_loss(name, "3d_fullres", torch.float16, autocast=False)
        assert math.isfinite(reference) and abs(float(reference)) > 1e-6, (name, reference)
        loss, grad = run_loss(name, "3d_fullres", torch.float16)
        grad_error = 0.0 if grad is None else relative_error(grad, reference_grad)
        if not (math.isfinite(loss) and relative_error(loss, reference) < LOSS_TOLERANCE
                and grad_error < GRAD_TOLERANCE):
            failures.append((name, float(loss), float(reference), grad_error))
    assert not failures, failures


def test_prototype_bank_update_under_autocast_equals_float32():
    """The EMA of the prototypes from the 65,536 voxels a DBDC step feeds it, with half-precision embeddings."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (65_536,), generator=generator)
    centres = torch.randn(4, 64, generator=generator)
    embeddings = F.normalize(torch.randn(65_536, 64, generator=generator) + 3 * centres[labels], dim=1)
    correct = torch.rand(65_536, generator=generator) > 0.2
    for dtype in LOW:
        reference, bank = PrototypeBank(2, 4, 64, momentum=0.5), PrototypeBank(2, 4, 64, momentum=0.5)
        reference.update(embeddings.to(dtype).float(), labels, correct, 1)
        with torch.autocast("cpu", dtype=dtype):
            counts = bank.update(embeddings.to(dtype), labels, correct, 1)
        assert int(counts.sum()) == int(correct.sum())
        assert torch.equal(bank.prototypes, reference.prototypes), dtype
        assert not torch.equal(bank.prototypes, PrototypeBank(2, 4, 64).prototypes)  # it moved


# ---------------------------------------------------------------- the mechanism
def test_float32_region_switches_autocast_off_everywhere_and_casts_inputs():
    seen = {}

    @float32_region
    def probe(a, b, pair, count):
        seen.update(cpu=torch.is_autocast_enabled("cpu"), cuda=torch.is_autocast_enabled("cuda"),
                    dtypes=(a.dtype, b.dtype, pair[0].dtype, pair[1].dtype, count.dtype))
        return torch.einsum("bn,bn->b", a, a)  # a sum of 300,000 ones: inf in float16

    a = torch.ones(2, 300_000, dtype=torch.float16, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64)
    count = torch.ones(3, dtype=torch.long)
    torch.set_autocast_enabled("cuda", True)  # the flag alone (no CUDA here): the region must clear it too
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = probe(a, b, [a, b.bfloat16()], count=count)
            assert torch.is_autocast_enabled("cpu")  # restored on exit
    finally:
        torch.set_autocast_enabled("cuda", False)
    assert seen == {"cpu": False, "cuda": False,
                    "dtypes": (torch.float32, torch.float64, torch.float32, torch.float32, torch.long)}
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((2,), 300_000.0))
    out.sum().backward()  # the cast is differentiable: gradient reaches the float16 input in its own dtype
    assert a.grad.dtype == torch.float16 and torch.equal(a.grad, torch.full_like(a, 2.0))


def _public_functions(module) -> list:
    return [f for name, f in inspect.getmembers(module, inspect.isfunction)
            if f.__module__ == module.__name__ and not name.startswith("_")]


def test_every_loss_and_statistic_runs_in_a_float32_region():
    functions = [f for m in (smml, consistency, mutual_learning, prototypes, targets) for f in _public_functions(m)]
    functions += [PrototypeBank.update, ema.update_ema_, gradient_share.global_norm, gradient_share.gradient_share,
                  gradient_share.difference_norm]
    assert len(functions) >= 20
    missing = [f.__qualname__ for f in functions if not getattr(f, "float32_region", False)]
    assert not missing, f"not in a float32 region: {missing}"


def test_mem_channel_attention_affinity_does_not_overflow():
    """MEM's energy ``F F^T`` sums over every voxel: ~140,000 on the diagonal at a 48^3 map, beyond float16's 65,504."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 48, 48, 48, generator=generator) + 0.5
    block = ChannelSelfAttention(16)
    with torch.no_grad():
        block.gamma.fill_(1.0)
        reference = block.attention(x)
        for dtype in LOW:
            with torch.autocast("cpu", dtype=dtype):
                out = block.attention(x.to(dtype))
            assert out.dtype == dtype and out.isfinite().all()
            assert relative_error(out, reference) < TOLERANCE[dtype], dtype


def test_global_norm_of_half_precision_gradients():
    grads = [torch.full((600, 1000), 2.0, dtype=torch.float16), None, torch.ones(10, dtype=torch.bfloat16)]
    with torch.autocast("cpu", dtype=torch.float16):
        norm = global_norm(grads)
    assert norm.dtype == torch.float32 and math.isclose(float(norm), math.sqrt(600_000 * 4 + 10), rel_tol=1e-6)


# ---------------------------------------------------------------- every trainer's real step under forced autocast
#: one trainer per loss set (the variants switch terms of these off); DBDC as an unregistered CT + MR dataset
STEP_TRAINERS = ["MemCifSSLTrainer", "MMFMCMLTrainer", "MeanTeacherTrainer", "SMMLTrainer", "DBDCTrainer",
                 "SMMLSSLTrainer", "PlainSupervisedTrainer", "ModalityDropoutTrainer"]
#: the fast test's: every loss and statistic is in one of them (SMMLSSLTrainer applies SMMLTrainer's PBC and FRC to
#: pseudo-labels; the last two have nnU-Net's loss only)
FAST_STEP_TRAINERS = STEP_TRAINERS[:5]
#: a step whose networks run in float32: everything else (losses, statistics, EMA, gradient share, the trainer's own
#: arithmetic) runs under autocast and must give float32's step; measured: bit-identical (float16 and bfloat16)
LOSSES_TOLERANCE = {torch.float16: 1e-6, torch.bfloat16: 1e-6}
#: the whole step under autocast, networks included (their convolutions in the lower precision, as nnU-Net's own):
#: objective relative error and gradient cosine; measured at the fixture size: objective <= 1.6e-4 (float16) and
#: 5.4e-4 (bfloat16), cosine >= 0.9936 (float16) and 0.943 (bfloat16, SMML: small layers at initialisation)
STEP_OBJECTIVE_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
STEP_MIN_COSINE = {torch.float16: 0.98, torch.bfloat16: 0.9}
DBDC_JSON = {"channel_names": {"0": "CT+MR"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
             "file_ending": ".nii.gz"}


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import trainer_harness

    trainer_harness.set_folders(tempfile.mkdtemp(prefix="amp-test-"))
    return trainer_harness


def _dbdc_trainer():
    """DBDC on the fixture plans as an unregistered CT + MR dataset (two modalities, one channel each)."""
    import trainer_harness

    from nnunet_mmssl.trainers import DBDCTrainer

    plans = trainer_harness.plans()
    plans["configurations"]["2d"].update(use_mask_for_norm=[False], normalization_schemes=["ZScoreNormalization"])
    plans["mmssl"] = {"layout": "unregistered", "modalities": ["CT", "MR"],
                      "intensity_schemes": {"CT": "CTNormalization", "MR": "ZScoreNormalization"}}
    torch.manual_seed(0)
    trainer = DBDCTrainer(plans, "2d", 0, dict(DBDC_JSON), torch.device("cpu"))
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.initialize()
    return trainer


def _dbdc_step(harness, trainer, seed: int) -> dict:
    """One DBDC step: a (labelled, unlabelled) batch per modality, modality k's images shifted by 2k."""
    pairs = []
    for k in range(trainer.num_modalities):
        labelled, unlabelled = harness.batches(trainer, seed=seed + k, count=1)[0]
        pairs.append(({"data": labelled["data"] + 2 * k, "target": labelled["target"]},
                      {"data": unlabelled["data"] + 2 * k}))
    trainer.dataloader_unlabeled = [iter([u]) for _, u in pairs]
    trainer.on_train_epoch_start()
    torch.manual_seed(seed)
    return trainer.train_step({"modality_batches": [lab for lab, _ in pairs]})


def _float32_network(module: nn.Module) -> None:
    """Run ``module`` in float32 with autocast off (its outputs stay float32)."""
    forward = module.forward

    def wrapped(x, *args, **kwargs):
        with full_precision(x.device.type):
            return forward(x.float(), *args, **kwargs)

    module.forward = wrapped


def _step(harness, name: str, dtype, float32_networks: bool = False):
    """A fresh trainer (same seed, same weights), one real ``train_step`` (its forward and losses under forced CPU
    autocast of ``dtype``, with nnU-Net's GradScaler, as on CUDA); returns (objective, gradient vector, optimizer
    stepped)."""
    import nnunet_mmssl.trainers as trainers

    trainer = _dbdc_trainer() if name == "DBDCTrainer" else harness.make_trainer(getattr(trainers, name), seed=0)
    if dtype is not None:
        trainer.grad_scaler = torch.amp.GradScaler("cpu")
    if float32_networks:
        teacher = getattr(trainer, "teacher", None)
        for module in [trainer.network, *(getattr(trainer, "refiners", None) or []),
                       *([teacher.module] if teacher is not None else [])]:
            _float32_network(module)
    if dtype is not None:  # autocast around compute_losses, where nnU-Net's train_step has it on CUDA
        compute_losses = trainer.compute_losses

        def autocast_losses(*args, **kwargs):
            with torch.autocast("cpu", dtype=dtype):
                return compute_losses(*args, **kwargs)

        trainer.compute_losses = autocast_losses
    if name == "DBDCTrainer":
        output = _dbdc_step(harness, trainer, seed=0)
    else:
        output = harness.run_steps(trainer, harness.batches(trainer, seed=0, count=1), seed=0)[0]
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params])
    return float(output["objective"]), grads, trainer._optimizer_stepped


@functools.lru_cache(maxsize=1)
def _reference(name: str):
    return _step(_harness_module(), name, None)


def _harness_module():
    import trainer_harness

    return trainer_harness


@pytest.mark.parametrize("name", FAST_STEP_TRAINERS)
def test_losses_of_a_train_step_under_forced_float16_autocast_match_float32(harness, name):
    """Everything but the networks under float16 autocast (with the GradScaler): the step equals float32."""
    reference, reference_grad, _ = _reference(name)
    assert math.isfinite(reference) and reference_grad.norm() > 0
    dtype = torch.float16
    objective, grad, stepped = _step(harness, name, dtype, float32_networks=True)
    assert stepped, f"{name}: the GradScaler skipped the step (non-finite gradients)"
    assert abs(objective - reference) <= LOSSES_TOLERANCE[dtype] * abs(reference), (name, objective, reference)
    assert relative_error(grad, reference_grad) < LOSSES_TOLERANCE[dtype], (name, relative_error(grad, reference_grad))


@pytest.mark.slow
@pytest.mark.parametrize("name", STEP_TRAINERS)
def test_whole_train_step_under_forced_autocast_is_finite_and_close_to_float32(harness, name):
    """The losses as above in bfloat16 (and float16 for the trainers the fast test leaves out); then the whole step,
    networks included, in float16 and bfloat16."""
    reference, reference_grad, _ = _reference(name)
    for dtype in LOW if name not in FAST_STEP_TRAINERS else [torch.bfloat16]:
        objective, grad, stepped = _step(harness, name, dtype, float32_networks=True)
        assert stepped and relative_error(grad, reference_grad) < LOSSES_TOLERANCE[dtype], (name, dtype)
        assert abs(objective - reference) <= LOSSES_TOLERANCE[dtype] * abs(reference), (name, dtype)
    for dtype in LOW:
        objective, grad, stepped = _step(harness, name, dtype)
        assert stepped, f"{name} {dtype}: the GradScaler skipped the step (non-finite gradients)"
        assert math.isfinite(objective) and grad.isfinite().all(), (name, dtype, objective)
        assert abs(objective - reference) <= STEP_OBJECTIVE_TOLERANCE[dtype] * abs(reference), (name, dtype)
        cosine = float(F.cosine_similarity(grad.double(), reference_grad.double(), dim=0))
        assert cosine >= STEP_MIN_COSINE[dtype], (name, dtype, cosine)


@pytest.mark.parametrize("dtype", LOW)
def test_dbdc_norm_bank_statistics_run_in_float32_under_autocast(dtype):
    """DBDC's norm bank in training under forced autocast, fed a half-precision activation (what a convolution returns
    under autocast) whose channel means are large against their spread (a realistic post-convolution offset): the
    per-modality statistics and running statistics are those of float32 arithmetic on the same values, and the
    output is finite. Before the fix the one-hot products ran in float16 and ``lerp`` refused the float32 running
    statistics (RuntimeError), and E[x^2] - mean^2 lost the variance."""
    from nnunet_mmssl.building_blocks.norm_bank import ModalityContext, ModalityNormBank

    torch.manual_seed(0)
    context = ModalityContext()
    bank = ModalityNormBank(2, 8, 3, context, kind="batch", momentum=0.01, eps=1e-5)
    reference = copy.deepcopy(bank)
    x = (40.0 + torch.randn(4, 8, 8, 16, 16) * torch.tensor([0.5, 3.0, 1.0, 2.0, 0.5, 3.0, 1.0, 2.0]).view(1, 8, 1,
                                                                                                         1, 1))
    x = x.to(dtype)  # exactly representable in the low dtype: both computations see the same numbers
    modality = torch.tensor([1, 0, 1, 1])
    context.set(modality)
    with torch.autocast("cpu", dtype=dtype):
        out = bank(x)
    reference._context.set(modality)  # a deep copy has its own context
    expected = reference(x.float())
    assert torch.isfinite(out).all()
    for a, b in zip(bank.norms, reference.norms):
        assert a.running_mean.dtype == torch.float32
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-3, atol=1e-4)
    tolerance = 1e-2 if dtype is torch.float16 else 5e-2
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)

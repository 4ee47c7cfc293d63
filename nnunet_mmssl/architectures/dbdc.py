"""DBDC's modality all-in-one U-Net (Chen et al., Fig. 2) and a modality guard for plain U-Nets.

:class:`DBDCUNet` is nnU-Net's ``PlainConvUNet`` and :class:`DBDCResEncUNet` nnU-Net's ``ResidualEncoderUNet`` (the
residual-encoder presets, ``nnUNetPlannerResEncM/L/XL``) -- the same arch kwargs from the plans, all convolutions
shared by every modality -- with

* the modality-level modulation bank (MLMB, eqs. 1-3): every norm becomes a
  :class:`~nnunet_mmssl.building_blocks.norm_bank.ModalityNormBank` inside ``norm_bank_scope`` (the paper's Table IV);
  in the residual encoder that is every norm of its stem, of both convolutions of each residual block and of a
  block's 1x1 projection on the skip path (the stem counts as encoder);
* the projector of the prototype bank (MLPB, eq. 4ff.): the outputs of the ``projector_scales`` highest-resolution
  decoder stages, upsampled to full resolution and concatenated, go through three 1x1 convolutions to
  ``embedding_dim`` channels, L2-normalised per voxel (returned only when ``return_embeddings`` is set: training);
* feature perturbation for dual consistency: channel dropout of the bottleneck for the samples a boolean mask picks.

``forward(x, modality=None, perturb_features=None)``: ``modality`` is a (B,) long tensor of per-sample modality
indices (a batch may mix modalities) or an int; None uses :attr:`inference_modality`, which our predictor sets from
``--modality``; a model with one modality needs nothing. Called without a modality, a model of several modalities
raises :class:`~nnunet_mmssl.building_blocks.norm_bank.ModalityNotSetError` with the fix -- so ``nnUNetv2_predict``
fails with that message instead of guessing.

:class:`ModalityGuardedUNet` (:class:`ModalityGuardedResEncUNet`) wraps nnU-Net's plain (residual-encoder) U-Net
(the paper's pooled "UNet" rows) with the same modality check: its weights are shared by all modalities, but its
input must be normalised with the input's modality's scheme, which only our predictor does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunet_mmssl.architectures.encoders import BASE_KWARG, PLAIN, RESENC, base_kind, check_kind
from nnunet_mmssl.building_blocks.norm_bank import (
    ModalityContext,
    ModalityNormBank,
    ModalityNotSetError,
    modality_not_set_message,
    replace_norms_with_banks,
)
from nnunet_mmssl.diagnostics import debug_checks_enabled


class ModalitySelection:
    """Mixin: the modality names of a network and how a forward call resolves the batch's modality."""

    modalities: list[str]
    #: modality index used when ``forward`` gets none (set by our predictor); None = not set
    inference_modality: int | None

    def _init_modalities(self, modalities: Sequence[str]) -> None:
        names = [str(m) for m in modalities]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"modalities must be a non-empty list of unique names, got {modalities!r}")
        self.modalities = names
        self.inference_modality = None

    def set_inference_modality(self, modality: str | int | None) -> None:
        """Select the modality of the images the network will predict (name or index; None = unset).

        Raises:
            ValueError: an unknown name or index, listing the trained modalities.
        """
        if modality is None:
            self.inference_modality = None
            return
        if isinstance(modality, str):
            if modality not in self.modalities:
                raise ValueError(f"Unknown modality {modality!r}: this model was trained on {self.modalities}.")
            self.inference_modality = self.modalities.index(modality)
            return
        index = int(modality)
        if not 0 <= index < len(self.modalities):
            raise ValueError(f"Modality index {index} out of range: this model was trained on {self.modalities}.")
        self.inference_modality = index

    def resolve_modality(self, x: torch.Tensor, modality: torch.Tensor | int | None) -> torch.Tensor:
        """(B,) long tensor of the samples' modality indices (see :meth:`batch_modality`)."""
        resolved = self.batch_modality(x, modality)
        if isinstance(resolved, torch.Tensor):
            return resolved
        return torch.full((x.shape[0],), resolved, dtype=torch.long, device=x.device)

    def batch_modality(self, x: torch.Tensor, modality: torch.Tensor | int | None) -> torch.Tensor | int:
        """The batch's modality: an ``int`` when one modality is known on the host for the whole batch (an int
        argument, the inference modality, or a model of one modality), else the (B,) long tensor given.

        An int is checked here (free: it is on the host). A tensor is read on the device only: its values are checked
        only with :func:`nnunet_mmssl.diagnostics.debug_checks` on (each check would synchronise host and GPU); the
        trainer builds it from indices checked when the data were set up, and prediction passes an int.

        Raises:
            ModalityNotSetError: no modality given or selected and the model has several.
            ValueError: an index out of range (a tensor's: with debug checks only) or a wrong length.
        """
        if modality is None:
            modality = self.inference_modality
        if modality is None:
            if len(self.modalities) == 1:
                return 0
            raise ModalityNotSetError(modality_not_set_message(self.modalities))
        if isinstance(modality, torch.Tensor):
            vector = modality.to(device=x.device, dtype=torch.long).reshape(-1)
            if vector.shape[0] != x.shape[0]:
                raise ValueError(f"modality has {vector.shape[0]} entries for a batch of {x.shape[0]}")
            if debug_checks_enabled() and vector.numel() and (
                    int(vector.min()) < 0 or int(vector.max()) >= len(self.modalities)):
                raise ValueError(f"modality indices {sorted(set(vector.tolist()))} out of range for {self.modalities}")
            return vector
        index = int(modality)
        if not 0 <= index < len(self.modalities):
            raise ValueError(f"modality index {index} out of range for {self.modalities}")
        return index


def _check_base(network: nn.Module, base: str, own: str) -> None:
    """Refuse a ``base`` arch kwarg that names the other U-Net than the class's own (plans edited by hand)."""
    if check_kind(base) != own:
        raise ValueError(f"{type(network).__name__} is built on nnU-Net's {own} U-Net, but its arch kwargs say "
                         f"{BASE_KWARG}={base!r}. Use the class of that base (the trainer picks it from the plans).")


class _DBDCNetwork(ModalitySelection):
    """DBDC's additions to an nnU-Net U-Net (``self.encoder``, ``self.decoder`` built by the U-Net's ``__init__``):
    the norm banks, the projector, feature dropout and the forward that drives them."""

    def _init_dbdc(self, conv_op, encoder_stages: list[nn.Module], modalities: Sequence[str], norm_bank_scope: str,
                   norm_bank_kind: str, norm_bank_momentum: float, use_projector: bool, embedding_dim: int,
                   projector_scales: int, feature_dropout: float) -> None:
        """Everything after the U-Net's own ``__init__``; ``encoder_stages``: the encoder's modules holding norms,
        in order, the last one the bottleneck."""
        self._init_modalities(modalities)
        self.conv_dim = 2 if conv_op in (nn.Conv2d,) or getattr(conv_op, "__name__", "") == "Conv2d" else 3
        self.modality_context = ModalityContext()
        self.norm_bank_counts = replace_norms_with_banks(
            encoder_stages, self.decoder.stages, len(self.modalities), self.conv_dim, self.modality_context,
            norm_bank_scope, norm_bank_kind, norm_bank_momentum)
        self.norm_bank_scope = norm_bank_scope
        self.feature_dropout = float(feature_dropout)
        self.embedding_dim = int(embedding_dim)
        self.return_embeddings = False
        self.projector = None
        if use_projector:
            num_decoder_stages = len(self.decoder.stages)
            self.projector_scales = max(1, min(int(projector_scales), num_decoder_stages))
            in_channels = sum(self.decoder.stages[num_decoder_stages - 1 - i].output_channels
                              for i in range(self.projector_scales))
            conv = nn.Conv2d if self.conv_dim == 2 else nn.Conv3d
            self.projector = nn.Sequential(
                conv(in_channels, self.embedding_dim, 1), nn.LeakyReLU(0.01, inplace=True),
                conv(self.embedding_dim, self.embedding_dim, 1), nn.LeakyReLU(0.01, inplace=True),
                conv(self.embedding_dim, self.embedding_dim, 1))

    def compute_conv_feature_map_size(self, input_size):
        """nnU-Net's estimate (encoder + decoder feature maps per sample) + the projector's full-resolution maps."""
        size = super().compute_conv_feature_map_size(input_size)
        if self.projector is not None:
            voxels = int(np.prod(input_size, dtype=np.int64))
            size += voxels * (self.projector[0].in_channels + 3 * self.embedding_dim)
        return size

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = enabled

    def _perturb(self, bottleneck: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:  # no host sync on mask.any(): an all-False mask selects the unperturbed features below
            return bottleneck
        dropout = F.dropout2d if self.conv_dim == 2 else F.dropout3d
        dropped = dropout(bottleneck, self.feature_dropout, training=True)
        shape = (-1,) + (1,) * (bottleneck.ndim - 1)
        return torch.where(mask.to(bottleneck.device).view(shape), dropped, bottleneck)

    def _decode(self, skips: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """nnU-Net's UNetDecoder.forward, also returning every stage's features (highest resolution first)."""
        decoder = self.decoder
        lres = skips[-1]
        seg_outputs, features = [], []
        for s in range(len(decoder.stages)):
            x = decoder.transpconvs[s](lres)
            x = torch.cat((x, skips[-(s + 2)]), 1)
            x = decoder.stages[s](x)
            features.append(x)
            if decoder.deep_supervision:
                seg_outputs.append(decoder.seg_layers[s](x))
            elif s == len(decoder.stages) - 1:
                seg_outputs.append(decoder.seg_layers[-1](x))
            lres = x
        return seg_outputs[::-1], features[::-1]

    def embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B, D, *S) L2-normalised pixel embeddings from the decoder features (highest resolution first)."""
        size = features[0].shape[2:]
        mode = "bilinear" if self.conv_dim == 2 else "trilinear"
        parts = [features[0]] + [F.interpolate(f, size=size, mode=mode, align_corners=False)
                                 for f in features[1:self.projector_scales]]
        return F.normalize(self.projector(torch.cat(parts, 1)), dim=1)

    def forward(self, x: torch.Tensor, modality: torch.Tensor | int | None = None,
                perturb_features: torch.Tensor | None = None,
                modality_runs: Sequence[tuple[int, int]] | None = None):
        """Logits (a list, highest resolution first, under deep supervision); with :attr:`return_embeddings`,
        ``(logits, embeddings)``.

        Args:
            x: (B, 1, *S) images.
            modality: (B,) modality indices, an int, or None (see the module docstring).
            perturb_features: (B,) bool, samples whose bottleneck gets channel dropout (dual consistency). Applied
                whenever given, in train and eval mode alike: the caller asks for it (the trainer passes it only on
                its training step; prediction never does).
            modality_runs: with a tensor ``modality``, optionally the host's knowledge that the batch is contiguous
                runs ((k, n), ...) of one modality each (:func:`~nnunet_mmssl.building_blocks.norm_bank.modality_runs`):
                the BatchNorm banks then normalise each run with the fused kernel (same result, faster). It must
                describe ``modality``; with debug checks on it is compared with it.
        """
        batch_modality = self.batch_modality(x, modality)
        runs = None
        if modality_runs is not None and isinstance(batch_modality, torch.Tensor):
            runs = tuple(modality_runs)
            if sum(n for _, n in runs) != x.shape[0]:  # host ints: checked once here, not in every bank
                raise ValueError(f"modality runs {list(runs)} do not cover a batch of {x.shape[0]}")
            if debug_checks_enabled():
                expected = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in runs]) if runs else None
                if expected is None or not torch.equal(expected, batch_modality.cpu()):
                    raise ValueError(f"modality_runs {list(runs)} do not describe the modality vector "
                                     f"{batch_modality.tolist()}")
        self.modality_context.set(batch_modality, runs)
        try:
            skips = self.encoder(x)
            skips[-1] = self._perturb(skips[-1], perturb_features)
            seg_outputs, features = self._decode(skips)
        finally:
            self.modality_context.set(None)
        logits = seg_outputs if self.decoder.deep_supervision else seg_outputs[0]
        if self.return_embeddings:
            if self.projector is None:
                raise RuntimeError("return_embeddings is set but this network has no projector (use_projector=False)")
            return logits, self.embed(features)
        return logits


class DBDCUNet(_DBDCNetwork, PlainConvUNet):
    """nnU-Net's PlainConvUNet with per-modality norm banks, a pixel-embedding projector and feature dropout.

    Args:
        input_channels ... nonlin_first: nnU-Net's ``PlainConvUNet`` arch kwargs (from the plans).
        modalities: modality names, in bank order.
        norm_bank_scope: ``"all"`` (paper), ``"encoder+bottleneck"``, ``"encoder"`` or ``"none"`` (Table IV).
        norm_bank_kind: ``"batch"`` (paper, running statistics per modality) or ``"instance"``.
        norm_bank_momentum: running-statistics momentum (paper: alpha = 0.99 -> 0.01).
        use_projector: build the MLPB projector (False for the "w/o MLPB" variants).
        embedding_dim: D (paper 64).
        projector_scales: decoder stages (from the highest resolution) concatenated for the embeddings.
        feature_dropout: channel-dropout probability of the bottleneck under feature perturbation.
        base: ``"plain"`` (the plans' record of the base U-Net, absent in older plans; another value is refused).
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = False,
                 norm_op=None, norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None,
                 nonlin_kwargs=None, deep_supervision: bool = False, nonlin_first: bool = False,
                 modalities: Sequence[str] = ("image",), norm_bank_scope: str = "all",
                 norm_bank_kind: str = "batch", norm_bank_momentum: float = 0.01, use_projector: bool = True,
                 embedding_dim: int = 64, projector_scales: int = 3, feature_dropout: float = 0.5,
                 base: str = PLAIN):
        _check_base(self, base, PLAIN)
        super().__init__(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                         n_conv_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs,
                         dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, deep_supervision, nonlin_first)
        self._init_dbdc(conv_op, list(self.encoder.stages), modalities, norm_bank_scope, norm_bank_kind,
                        norm_bank_momentum, use_projector, embedding_dim, projector_scales, feature_dropout)


def _zero_last_bank_before_add(module: nn.Module) -> None:
    """nnU-Net's ``init_last_bn_before_add_to_0`` for residual blocks whose norms are banks: every modality's norm
    of a block's last convolution starts at weight 0, bias 0 (the block starts as its skip path, as in nnU-Net)."""
    if isinstance(module, BasicBlockD):
        last = module.conv2
    elif isinstance(module, BottleneckD):
        last = module.conv3
    else:
        return
    norms = last.norm.norms if isinstance(last.norm, ModalityNormBank) else [last.norm]
    for norm in norms:
        nn.init.constant_(norm.weight, 0)
        nn.init.constant_(norm.bias, 0)


class DBDCResEncUNet(_DBDCNetwork, ResidualEncoderUNet):
    """nnU-Net's ResidualEncoderUNet (the ResEnc presets) with DBDC's norm banks, projector and feature dropout.

    The banks replace every norm of the residual encoder (stem, both convolutions of each residual block, the 1x1
    projection of a block's skip path) and of the decoder, inside ``norm_bank_scope`` as for :class:`DBDCUNet`; the
    stem belongs to the encoder. Initialised as nnU-Net initialises the ResEnc U-Net (He, and each residual block's
    last norm at zero), in every modality's norm.

    Args:
        input_channels ... stem_channels: nnU-Net's ``ResidualEncoderUNet`` arch kwargs (from the plans).
        modalities ... feature_dropout: as :class:`DBDCUNet`.
        base: ``"resenc"`` (recorded in the plans like our other networks' base; another value is refused).
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_blocks_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = False,
                 norm_op=None, norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None,
                 nonlin_kwargs=None, deep_supervision: bool = False, block=BasicBlockD, bottleneck_channels=None,
                 stem_channels: int | None = None, modalities: Sequence[str] = ("image",),
                 norm_bank_scope: str = "all", norm_bank_kind: str = "batch", norm_bank_momentum: float = 0.01,
                 use_projector: bool = True, embedding_dim: int = 64, projector_scales: int = 3,
                 feature_dropout: float = 0.5, base: str = RESENC):
        _check_base(self, base, RESENC)
        super().__init__(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                         n_blocks_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias, norm_op,
                         norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, deep_supervision,
                         block, bottleneck_channels, stem_channels)
        stem = [self.encoder.stem] if self.encoder.stem is not None else []
        self._init_dbdc(conv_op, stem + list(self.encoder.stages), modalities, norm_bank_scope, norm_bank_kind,
                        norm_bank_momentum, use_projector, embedding_dim, projector_scales, feature_dropout)

    @staticmethod
    def initialize(module):
        InitWeights_He(1e-2)(module)
        _zero_last_bank_before_add(module)


class _ModalityGuard(ModalitySelection):
    """The modality guard on an nnU-Net U-Net: in eval mode ``forward`` refuses an input without its modality.

    Trained on the unregistered modalities pooled (one set of weights); the guard only makes ``nnUNetv2_predict``
    (which would normalise every image with one scheme) fail with the fix instead of predicting silently wrong.
    """

    #: the base U-Net the class is built on (``"plain"`` or ``"resenc"``)
    guard_base: str = PLAIN

    def __init__(self, *args, modalities: Sequence[str] = ("image",), base: str | None = None, **kwargs):
        _check_base(self, self.guard_base if base is None else base, self.guard_base)
        super().__init__(*args, **kwargs)
        self._init_modalities(modalities)
        #: check the modality in eval mode; the trainer switches it off (its data are already normalised per case)
        self.guard_enabled = True

    def forward(self, x: torch.Tensor, modality: torch.Tensor | int | None = None):
        if self.guard_enabled and not self.training:
            self.batch_modality(x, modality)
        return super().forward(x)


class ModalityGuardedUNet(_ModalityGuard, PlainConvUNet):
    """nnU-Net's PlainConvUNet, unchanged, that refuses to predict without being told the input's modality."""

    guard_base = PLAIN


class ModalityGuardedResEncUNet(_ModalityGuard, ResidualEncoderUNet):
    """nnU-Net's ResidualEncoderUNet, unchanged, with the same modality guard."""

    guard_base = RESENC


#: DBDC's network for each base U-Net of nnU-Net's plans (``"plain"``: PlainConvUNet, ``"resenc"``: ResEnc presets)
DBDC_NETWORKS = {PLAIN: "nnunet_mmssl.architectures.dbdc.DBDCUNet",
                 RESENC: "nnunet_mmssl.architectures.dbdc.DBDCResEncUNet"}
#: the pooled U-Net's guarded network for each base
GUARDED_NETWORKS = {PLAIN: "nnunet_mmssl.architectures.dbdc.ModalityGuardedUNet",
                    RESENC: "nnunet_mmssl.architectures.dbdc.ModalityGuardedResEncUNet"}


def architecture_on_base(base_architecture: Mapping, networks: Mapping[str, str], extra_kwargs: Mapping,
                         owner: str) -> dict:
    """A configuration's architecture entry turned into ours: the network of ``networks`` for the plans' base U-Net
    (nnU-Net's ``PlainConvUNet`` or ``ResidualEncoderUNet``, or an entry of ours already), the planned kwargs kept,
    the base's kind recorded as ``base``, plus ``extra_kwargs``. The input is not modified.

    Raises:
        ValueError: another network class, naming ``owner``, the class and the supported ones.
    """
    name = base_architecture["network_class_name"]
    ours = {class_name: kind for kind, class_name in networks.items()}
    if name in ours:
        kind = ours[name]
    else:
        try:
            kind = base_kind(name)
        except ValueError as error:
            raise ValueError(f"{owner}: {error}") from None
    architecture = copy.deepcopy(dict(base_architecture))
    architecture["network_class_name"] = networks[kind]
    architecture["arch_kwargs"] = {**architecture["arch_kwargs"], BASE_KWARG: kind, **copy.deepcopy(dict(extra_kwargs))}
    return architecture

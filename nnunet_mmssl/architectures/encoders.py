"""The plans' encoder for every branch: nnU-Net's plain or residual encoder, built from the planned arch kwargs.

nnU-Net plans one of two U-Nets of ``dynamic_network_architectures`` (:data:`SUPPORTED_BASES`): the original
``PlainConvUNet`` (``nnUNetPlans``, ``n_conv_per_stage`` convolutions per stage) and the ``ResidualEncoderUNet`` of
its residual-encoder presets (``nnUNetResEncUNet{M,L,XL}Plans``: a stem convolution, then ``n_blocks_per_stage``
residual blocks per stage). Our networks record which one the plans chose as ``base`` in their arch kwargs
(``"plain"`` or ``"resenc"``; absent means ``"plain"``, so plans and model folders written before the residual
encoder was supported load unchanged) and build each branch's encoder with :func:`build_encoder`, exactly as the
base class builds its own; the decoder is nnU-Net's ``UNetDecoder`` on that encoder (:func:`build_decoder`), again
as the base class builds it (the plain U-Net passes ``nonlin_first``, the residual one does not have it).
"""

from collections.abc import Mapping

import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0
from torch import nn

PLAIN = "plain"
RESENC = "resenc"
#: the U-Nets of nnU-Net's plans our networks are built from: kind -> dotted class path
SUPPORTED_BASES = {
    PLAIN: "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    RESENC: "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}
#: arch kwarg in which our networks record the kind of their base
BASE_KWARG = "base"
DEFAULT_BASE = PLAIN

_COMMON_ENCODER_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "conv_bias", "norm_op",
                        "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs")
#: arch kwargs of each base that configure its encoder (as the base class passes them)
ENCODER_KEYS = {
    PLAIN: _COMMON_ENCODER_KEYS + ("n_conv_per_stage", "nonlin_first"),
    RESENC: _COMMON_ENCODER_KEYS + ("n_blocks_per_stage", "block", "bottleneck_channels", "stem_channels"),
}
#: arch kwargs of each base that configure its decoder
DECODER_KEYS = {
    PLAIN: ("n_conv_per_stage_decoder", "deep_supervision", "nonlin_first"),
    RESENC: ("n_conv_per_stage_decoder", "deep_supervision"),
}
#: the arch kwarg holding the encoder's depth per stage
DEPTH_KEY = {PLAIN: "n_conv_per_stage", RESENC: "n_blocks_per_stage"}


def supported_bases_text() -> str:
    """The supported classes, for messages."""
    return " or ".join(SUPPORTED_BASES.values())


def base_kind(class_name: str) -> str:
    """``"plain"`` or ``"resenc"`` for a plans' ``network_class_name``.

    Raises:
        ValueError: naming the class and the supported ones.
    """
    for kind, name in SUPPORTED_BASES.items():
        if class_name == name:
            return kind
    raise ValueError(f"Our networks are built from nnU-Net's {supported_bases_text()} plans, but this configuration "
                     f"uses {class_name}. Plan with nnU-Net's default planner or a residual-encoder preset "
                     f"(nnUNetv2_mmssl_plan_and_preprocess -pl ExperimentPlanner or -pl nnUNetPlannerResEncM/L/XL).")


def check_kind(kind: str) -> str:
    """Return ``kind`` if it is a supported base kind.

    Raises:
        ValueError: naming the value and the supported kinds.
    """
    if kind not in SUPPORTED_BASES:
        raise ValueError(f"{BASE_KWARG}={kind!r} is not a supported encoder base; use one of "
                         f"{sorted(SUPPORTED_BASES)} (plain: {SUPPORTED_BASES[PLAIN]}, resenc: "
                         f"{SUPPORTED_BASES[RESENC]}).")
    return kind


def architecture_kind(arch_kwargs: Mapping) -> str:
    """The base kind our network's arch kwargs record (``"plain"`` when absent, as in older plans)."""
    return check_kind(arch_kwargs.get(BASE_KWARG, DEFAULT_BASE))


def encoder_kwargs(kind: str, arch_kwargs: Mapping) -> dict:
    """The arch kwargs that configure a ``kind`` encoder (present ones only; the rest keep the class defaults)."""
    return {k: arch_kwargs[k] for k in ENCODER_KEYS[check_kind(kind)] if k in arch_kwargs}


def decoder_kwargs(kind: str, arch_kwargs: Mapping) -> dict:
    """The arch kwargs that configure the decoder on a ``kind`` encoder."""
    return {k: arch_kwargs[k] for k in DECODER_KEYS[check_kind(kind)] if k in arch_kwargs}


def split_arch_kwargs(kind: str, arch_kwargs: Mapping) -> tuple[dict, dict, dict]:
    """Split arch kwargs into ``(encoder kwargs, decoder kwargs, the rest)`` (the rest: our method switches etc.)."""
    encoder = encoder_kwargs(kind, arch_kwargs)
    decoder = decoder_kwargs(kind, arch_kwargs)
    rest = {k: v for k, v in arch_kwargs.items() if k not in encoder and k not in decoder}
    return encoder, decoder, rest


def build_encoder(kind: str, input_channels: int, arch_kwargs: Mapping,
                  return_skips: bool = True) -> PlainConvEncoder | ResidualEncoder:
    """The encoder nnU-Net's ``kind`` U-Net builds from ``arch_kwargs``, for ``input_channels`` inputs.

    Args:
        kind: ``"plain"`` (``PlainConvEncoder``) or ``"resenc"`` (``ResidualEncoder`` with its default stem, as
            ``ResidualEncoderUNet`` builds it).
        input_channels: channels this encoder reads (a branch's modality group).
        arch_kwargs: the plans' arch kwargs of that U-Net (extra keys are ignored; ``conv_op`` etc. as classes).
        return_skips: return every stage's output (what a U-Net decoder needs).

    Raises:
        ValueError: for an unsupported ``kind``.
    """
    kwargs = encoder_kwargs(kind, arch_kwargs)
    n_stages = kwargs["n_stages"]
    if kind == PLAIN:
        depth = kwargs.pop("n_conv_per_stage")
        if isinstance(depth, int):
            depth = [depth] * n_stages
        return PlainConvEncoder(input_channels=input_channels, n_conv_per_stage=depth, return_skips=return_skips,
                                **kwargs)
    depth = kwargs.pop("n_blocks_per_stage")
    if isinstance(depth, int):
        depth = [depth] * n_stages
    kwargs.setdefault("block", BasicBlockD)
    return ResidualEncoder(input_channels=input_channels, n_blocks_per_stage=depth, return_skips=return_skips,
                           disable_default_stem=False, **kwargs)


def build_decoder(kind: str, encoder: PlainConvEncoder | ResidualEncoder, num_classes: int,
                  arch_kwargs: Mapping) -> UNetDecoder:
    """nnU-Net's ``UNetDecoder`` on ``encoder``, configured as nnU-Net's ``kind`` U-Net configures it."""
    kwargs = decoder_kwargs(kind, arch_kwargs)
    depth = kwargs.pop("n_conv_per_stage_decoder")
    if isinstance(depth, int):
        depth = [depth] * (len(encoder.output_channels) - 1)
    return UNetDecoder(encoder, num_classes, depth, kwargs.pop("deep_supervision", False), **kwargs)


def encoder_stem(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What an encoder does before its first stage: the residual encoder's stem convolution, nothing for the plain
    one. For code that runs the stages one at a time (``encoder.stages[s]``)."""
    stem = getattr(encoder, "stem", None)
    return x if stem is None else stem(x)


def initialize_module(module: nn.Module) -> None:
    """nnU-Net's initialisation of both bases, for ``network.apply``: He init of the convolutions; the last norm of
    every residual block zeroed (``ResidualEncoderUNet.initialize``; a plain network has no residual blocks)."""
    InitWeights_He(1e-2)(module)
    init_last_bn_before_add_to_0(module)

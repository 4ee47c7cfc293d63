"""Inference helpers on top of nnU-Net's predictor: prediction with modalities (input channels) missing."""

from nnunet_mmssl.inference.missing import (
    MissingModalityError,
    MissingModalityPredictor,
    channel_list,
    resolve_missing_channels,
)

__all__ = ["MissingModalityError", "MissingModalityPredictor", "channel_list", "resolve_missing_channels"]

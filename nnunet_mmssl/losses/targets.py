"""Class maps from nnU-Net targets, shared by the losses that need one class per voxel (prototypes, relations)."""

from __future__ import annotations

import torch

from nnunet_mmssl.losses.precision import float32_region


@float32_region
def class_map_from_target(target: torch.Tensor, has_regions: bool, ignore_label: int | None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prototype class of every voxel and the valid-voxel mask from an nnU-Net target at full resolution.

    Args:
        target: labels (B, 1, *S) (label values = classes), or regions (B, R[+1], *S) binary (with an ignore label,
            nnU-Net appends the ignore mask as the last channel).
        has_regions: region dataset.
        ignore_label: nnU-Net's ignore label, or None.

    Returns:
        ``(classes (B, *S) long, valid (B, *S) bool or None)``; for regions the class is 0 for background, else the
        (1-based) index of the last region containing the voxel.
    """
    if not has_regions:
        labels = target[:, 0].long()
        if ignore_label is None:
            return labels, None
        valid = labels != ignore_label
        return torch.where(valid, labels, torch.zeros_like(labels)), valid
    valid = None
    if ignore_label is not None:
        valid = target[:, -1] == 0
        target = target[:, :-1]
    return regions_to_classes(target > 0.5), valid


@float32_region
def regions_to_classes(regions: torch.Tensor) -> torch.Tensor:
    """(B, R, *S) bool region masks -> (B, *S) long: 0 background, else 1 + index of the last region containing
    the voxel."""
    index = torch.arange(1, regions.shape[1] + 1, device=regions.device).view(1, -1, *([1] * (regions.ndim - 2)))
    return (regions.long() * index).amax(1)

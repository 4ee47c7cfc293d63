"""Synthetic *unregistered* sources: CT-like cases of some "patients", MR-like cases of others.

For the unregistered path (DBDC) end to end without real data. Each modality is its own source folder of its own
patients, with its own grid, spacing, intensity scale and label numbering -- what a user with a CT dataset and an MR
dataset from different studies has::

    output_folder/CT/ct_000/{image.nii.gz, label.nii.gz}     label value 5 = lesion (CT datasets number it 5)
    output_folder/CT/ct_006/image.nii.gz                     no label: unlabelled
    output_folder/MR/mr_000/{image.nii.gz, label.nii.gz}     label value 1 = lesion

The anatomy is the phantom of :mod:`~nnunet_mmssl.dataset_conversion.phantom` (an ellipsoid "brain" with one or two
lesions). CT-like: Hounsfield-like values, air -1000, tissue 40, lesion +50 HU, noise sd 8. MR-like: the phantom's
``MRB`` image (tissue ~400, lesion core bright, bias field, noise). Convert with::

    nnUNetv2_mmssl_convert -i OUT/CT OUT/MR --source-modality CT MR --image image.nii.gz --label label.nii.gz \\
        --label-map CT:5=1 -d ID -n NAME
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from nnunet_mmssl.dataset_conversion.phantom import _to_sitk, generate_phantom_case
from nnunet_mmssl.io_checks import write_image

#: per modality: (shape z, y, x), (spacing z, y, x) mm, label value of the lesion
UNREGISTERED_PHANTOM_GEOMETRY: dict[str, tuple[tuple[int, int, int], tuple[float, float, float], int]] = {
    "CT": ((16, 48, 48), (2.5, 1.0, 1.0), 5),
    "MR": ((12, 40, 40), (3.0, 1.2, 1.2), 1),
}


def _ct_image(case, rng: np.random.Generator) -> np.ndarray:
    body = case.brain.astype(np.float32)
    hu = -1000.0 + 1040.0 * body + 50.0 * case.label
    return (hu + rng.normal(0.0, 8.0, size=hu.shape)).astype(np.float32)


def make_unregistered_phantom_sources(output_folder: str | os.PathLike, num_labeled: Mapping[str, int] | int = 4,
                                      num_unlabeled: Mapping[str, int] | int = 4,
                                      modalities: Sequence[str] = ("CT", "MR"), seed: int = 0,
                                      geometry: Mapping[str, tuple] | None = None) -> Path:
    """Write one source folder per modality (see the module docstring); return ``output_folder``.

    Args:
        output_folder: where to write (created if missing).
        num_labeled, num_unlabeled: cases per modality (one int for all, or per modality name).
        modalities: names from :data:`UNREGISTERED_PHANTOM_GEOMETRY` ("CT" is CT-like, anything else MR-like with
            the MR geometry).
        seed: base seed; case ``i`` of modality ``k`` uses ``default_rng([seed, k, i])``.
        geometry: per modality ``(shape, spacing, label value)`` overriding :data:`UNREGISTERED_PHANTOM_GEOMETRY`.
    """
    out = Path(output_folder)
    for k, modality in enumerate(modalities):
        table = {**UNREGISTERED_PHANTOM_GEOMETRY, **dict(geometry or {})}
        shape, spacing, label_value = table.get(modality, table["MR"])
        n_lab = num_labeled[modality] if isinstance(num_labeled, Mapping) else int(num_labeled)
        n_unl = num_unlabeled[modality] if isinstance(num_unlabeled, Mapping) else int(num_unlabeled)
        for i in range(n_lab + n_unl):
            rng = np.random.default_rng([int(seed), k, i])
            case = generate_phantom_case(rng, shape, spacing)
            image = _ct_image(case, rng) if modality.upper() == "CT" else case.images["MRB"]
            folder = out / modality / f"{modality.lower()}_{i:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            write_image(_to_sitk(image, spacing), folder / "image.nii.gz")
            if i < n_lab:
                label = (case.label * label_value).astype(np.uint8)
                write_image(_to_sitk(label, spacing), folder / "label.nii.gz")
    return out

"""Evaluation: Dice, sensitivity, HD95 and ASD (ASSD) per label/region, folder evaluation and reports.

See :mod:`nnunet_mmssl.evaluation.metrics` for the metric definitions and the empty-mask conventions, and
:mod:`nnunet_mmssl.evaluation.report` for folder pairing, aggregation and the JSON layout.
"""

from nnunet_mmssl.evaluation.metrics import (
    EMPTY_MASK_CONVENTIONS,
    METRIC_NAMES,
    compute_binary_metrics,
    image_diagonal_mm,
    surface_distances,
    surface_voxels,
)
from nnunet_mmssl.evaluation.report import (
    evaluate_folders,
    format_table,
    resolve_label_definitions,
    write_json_atomic,
)

__all__ = [
    "EMPTY_MASK_CONVENTIONS",
    "METRIC_NAMES",
    "compute_binary_metrics",
    "evaluate_folders",
    "format_table",
    "image_diagonal_mm",
    "resolve_label_definitions",
    "surface_distances",
    "surface_voxels",
    "write_json_atomic",
]

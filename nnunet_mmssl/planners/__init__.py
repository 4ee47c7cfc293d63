"""Plans for our networks: the ``mmssl`` plans block and the architecture entries derived from it."""

from nnunet_mmssl.planners.mmssl_plans import (
    MMSSL_KEY,
    add_mmssl_block,
    default_modality_groups,
    get_mmssl_block,
    multi_branch_architecture,
    parse_modality_groups,
    unlabeled_data_identifier,
)

__all__ = ["MMSSL_KEY", "add_mmssl_block", "default_modality_groups", "get_mmssl_block", "multi_branch_architecture",
           "parse_modality_groups", "unlabeled_data_identifier"]

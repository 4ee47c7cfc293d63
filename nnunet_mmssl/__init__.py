"""nnunet_mmssl: semi-supervised multi-modal segmentation trainers for nnU-Net v2.

Importing this package is cheap and has no side effects; the trainers live in
:mod:`nnunet_mmssl.trainers`.
"""

__version__ = "0.1.0"

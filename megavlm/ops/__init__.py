"""Fused vision-side ops (patch embedding, projector) with a pure-PyTorch reference path. See docs/kernels.md.

Public API: ``patch_embed`` and ``projector``, each routed to the fused kernels or the reference by its ``kernels``
argument (``resolve_kernels``; the model passes the choice it resolved once, with ``resolved=True``), and the
``*_ref`` reference implementations. Per op, its custom ops, autograd and fused composite live in
``patch_embed_op.py``, ``projector_op.py`` and ``scatter_op.py`` (the projector's row scatter); ``gemm.py`` chooses
their GEMMs (cuBLAS or the Hopper CUTLASS GEMMs). Importing this package registers ``torch.ops.megavlm.*``.
"""

from .dispatch import fused_unavailable_reason, resolve_kernels
from .patch_embed_op import patch_embed
from .projector_op import AffineRows, projector
from .reference import (
    CLIP_MEAN,
    CLIP_STD,
    fold_normalization,
    merge_tokens_ref,
    patch_embed_ref,
    projector_ref,
    scatter_rows_ref,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "AffineRows",
    "fold_normalization",
    "fused_unavailable_reason",
    "merge_tokens_ref",
    "patch_embed",
    "patch_embed_ref",
    "projector",
    "projector_ref",
    "resolve_kernels",
    "scatter_rows_ref",
]

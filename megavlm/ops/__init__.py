"""Fused vision-side ops (patch embedding, projector, row scatter) with a
pure-PyTorch reference path. See docs/kernels.md.

Public API: ``patch_embed``, ``projector``, ``scatter_rows`` (routed by
``resolve_kernels``), and the ``*_ref`` reference implementations.
"""

from .dispatch import fused_unavailable_reason, patch_embed, projector, resolve_kernels, scatter_rows
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
    "fold_normalization",
    "fused_unavailable_reason",
    "merge_tokens_ref",
    "patch_embed",
    "patch_embed_ref",
    "projector",
    "projector_ref",
    "resolve_kernels",
    "scatter_rows",
    "scatter_rows_ref",
]

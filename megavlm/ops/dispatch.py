"""Route the public ops to the fused CUDA kernels or the PyTorch reference.

``resolve_kernels(mode)``:
    'reference' -> 'reference'
    'fused'     -> 'fused', or RuntimeError explaining why it cannot run
                   (no CUDA device / CPU-only torch, megavlm._C not built, ...)
    'auto'      -> 'fused' iff CUDA is available and megavlm._C is built and
                   sees a device, else 'reference'
    None        -> $MEGAVLM_KERNELS or 'auto'

With 'auto', inputs that live on the CPU always take the reference path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ext
from .fused import AffineRows, patch_embed_fused, projector_fused, scatter_rows_fused  # registers torch.ops.megavlm.*
from .reference import CLIP_MEAN, CLIP_STD, patch_embed_ref, projector_ref, scatter_rows_ref

__all__ = ["fused_unavailable_reason", "patch_embed", "projector", "resolve_kernels", "scatter_rows"]

_MODES = ("auto", "fused", "reference")
_UNSET = object()
_reason_cache = _UNSET


def fused_unavailable_reason() -> str | None:
    """None when the fused kernels can run, else a human-readable reason (cached)."""
    global _reason_cache
    if _reason_cache is not _UNSET:
        return _reason_cache
    if not torch.cuda.is_available():
        reason = "torch.cuda.is_available() is False (no CUDA device, or a CPU-only torch build)"
    else:
        ext = _ext.load()
        if ext is None:
            reason = f"megavlm._C is not built or not importable ({_ext.error()}); build it with `python -m megavlm._build`"
        elif not ext.cuda_available():
            reason = f"megavlm._C cannot use CUDA: {ext.cuda_status()}"
        else:
            reason = None
    _reason_cache = reason
    return reason


def _reset_cache() -> None:
    """Testing hook: forget the cached availability check."""
    global _reason_cache
    _reason_cache = _UNSET


def resolve_kernels(mode: str | None = "auto") -> str:
    """'auto' | 'fused' | 'reference' (or None -> $MEGAVLM_KERNELS) -> 'fused' | 'reference'."""
    if mode is None:
        mode = os.environ.get("MEGAVLM_KERNELS", "auto")
    mode = str(mode).strip().lower()
    if mode not in _MODES:
        raise ValueError(f"kernels must be one of {_MODES}, got {mode!r}")
    if mode == "reference":
        return "reference"
    reason = fused_unavailable_reason()
    if mode == "fused":
        if reason is not None:
            raise RuntimeError(f"fused megavlm kernels were requested but cannot run: {reason}")
        return "fused"
    return "fused" if reason is None else "reference"


def _route(mode, *tensors: Tensor | None) -> str:
    impl = resolve_kernels(mode)
    if impl == "fused":
        devs = [t.device for t in tensors if t is not None]
        if any(d.type != "cuda" for d in devs):
            if mode is not None and str(mode).strip().lower() == "fused":
                raise ValueError(f"fused kernels need CUDA tensors; got devices {sorted({str(d) for d in devs})}")
            return "reference"
    return impl


def patch_embed(
    pixels: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    pos: Tensor | None = None,
    class_emb: Tensor | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    out_dtype: torch.dtype | None = None,
    *,
    kernels: str | None = "auto",
) -> Tensor:
    """uint8 pixels [B,H,W,C] -> patch tokens [B, (1+)P, D]; see reference.patch_embed_ref."""
    if _route(kernels, pixels, weight) == "fused":
        return patch_embed_fused(pixels, weight, bias, pos, class_emb, mean, std, out_dtype)
    return patch_embed_ref(pixels, weight, bias, pos, class_emb, mean, std, out_dtype)


def projector(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    merge: bool,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    act: str = "gelu",
    eps: float = 1e-5,
    *,
    dst: Tensor | None = None,
    index: Tensor | AffineRows | None = None,
    kernels: str | None = "auto",
) -> Tensor:
    """[N,T,Din] -> [N,T',Dout] (merge/LN optional). With ``dst``/``index`` the output rows are
    also written in place into ``dst`` [M, Dout] (``dst[index[k]] = out.view(-1, Dout)[k]``)
    and ``dst`` is returned. ``index`` may be an ``AffineRows`` (image n's token t at row
    base + n*image_stride + t*token_stride), which lets the Hopper GEMM write the rows itself."""
    if (dst is None) != (index is None):
        raise ValueError("dst and index must be given together")
    impl = _route(kernels, x, w1)
    if impl == "fused":
        return projector_fused(x, ln_weight, ln_bias, merge, w1, b1, w2, b2, act, eps, dst=dst, index=index)
    out = projector_ref(x, ln_weight, ln_bias, merge, w1, b1, w2, b2, act, eps)
    if dst is None:
        return out
    if isinstance(index, AffineRows):
        index = index.index(out.shape[0], out.shape[1], dst.device)
    return scatter_rows_ref(dst, index, out.reshape(-1, out.shape[-1]))


def scatter_rows(dst: Tensor, index: Tensor, src: Tensor, *, kernels: str | None = "auto") -> Tensor:
    """In place ``dst[index[k], :] = src[k, :]`` (unique indices in [0, M)); returns dst.
    The fused kernel skips out-of-range indices instead of raising."""
    if _route(kernels, dst, src) == "fused":
        return scatter_rows_fused(dst, index, src)
    return scatter_rows_ref(dst, index, src)

"""Row scatter ``dst[index[k]] = src[k]`` in place, with autograd: how the projector's cuBLAS path (and its Hopper
path when the rows form no AffineRows layout) writes its output into the decoder's embedding rows.

The kernel copies each row as 16-byte units when aligned and skips out-of-range indices instead of raising; on CPU
tensors the wrapper runs ``index_copy_``. ``torch.ops.megavlm.scatter_rows_`` is the custom op (mutating, so its
autograd lives in ``ScatterRowsFunction``); ``scatter_rows_fused`` picks one or the other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._launch import launch_ctx
from .reference import check_scatter_rows_args

__all__ = ["ScatterRowsFunction", "scatter_rows_fused"]


def _scatter_rows_impl_(dst: Tensor, index: Tensor, src: Tensor) -> None:
    check_scatter_rows_args(dst, index, src)
    if dst.is_cuda:
        if not dst.is_contiguous():
            raise ValueError("scatter_rows: dst must be contiguous (it is written in place)")
        if src.device != dst.device or index.device != dst.device:
            raise ValueError(f"scatter_rows: dst, index, src must be on one device; got {dst.device}, {index.device}, "
                             f"{src.device}")
        idx = index.to(torch.int64).contiguous()
        s = src.to(dst.dtype).contiguous()
        ext, dev, stream = launch_ctx(dst)
        ext.scatter_rows(
            dev, stream, dst.data_ptr(), dst.shape[0], idx.data_ptr(), idx.shape[0], s.data_ptr(),
            dst.shape[1] * dst.element_size(),
        )
        return
    dst.index_copy_(0, index.to(torch.int64), src.to(dst.dtype))


@torch.library.custom_op("megavlm::scatter_rows_", mutates_args={"dst"})
def scatter_rows_op(dst: Tensor, index: Tensor, src: Tensor) -> None:
    """In place dst[index[k]] = src[k] (no autograd here; see ScatterRowsFunction)."""
    _scatter_rows_impl_(dst, index, src)


@scatter_rows_op.register_fake
def _(dst, index, src):
    return None


class ScatterRowsFunction(torch.autograd.Function):
    """In-place row scatter with autograd: grad_dst = grad with the overwritten rows zeroed,
    grad_src = grad[index]."""

    @staticmethod
    def forward(ctx, dst, index, src):
        torch.ops.megavlm.scatter_rows_(dst, index, src)
        ctx.mark_dirty(dst)
        ctx.save_for_backward(index)
        ctx.src_dtype = src.dtype
        return dst

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        nig = ctx.needs_input_grad
        g_dst = grad.index_fill(0, index, 0) if nig[0] else None
        g_src = grad.index_select(0, index).to(ctx.src_dtype) if nig[2] else None
        return g_dst, None, g_src


def scatter_rows_fused(dst: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """In place ``dst[index[k]] = src[k]``; returns dst (autograd-aware)."""
    if torch.is_grad_enabled() and (dst.requires_grad or src.requires_grad):
        return ScatterRowsFunction.apply(dst, index, src)
    torch.ops.megavlm.scatter_rows_(dst, index, src)
    return dst

"""The fused projector: optional 2x2 token merge + LayerNorm -> Linear -> exact GELU -> Linear, its rows written
straight into the decoder's embedding buffer; its custom ops, autograd and the public routed ``projector``.

Fused path, cuBLAS GEMMs:
    y = merge_layernorm(x)            # optional 2x2 merge + LayerNorm in one pass
    z = y @ W1^T                      # cuBLAS
    a = bias_gelu(z, b1)              # bias + exact GELU epilogue (z is saved for backward)
    o = addmm(b2, a, W2^T)            # cuBLAS with its bias epilogue
    scatter_rows_(emb, index, o)      # rows written straight into the decoder input buffer (scatter_op.py)
Hopper GEMM path (bf16 on an sm_90 GPU, megavlm._C built with CUTLASS; MEGAVLM_FUSED_GEMM=auto or cutlass, gemm.py):
    a, z = linear_gelu(y, W1, b1)     # one CUTLASS GEMM: bias + exact GELU in its epilogue; z (pre-activation)
                                      #   is stored by the same epilogue only when a backward will need it
    emb[rows] = linear_into_(a, W2, b2)  # one CUTLASS GEMM whose epilogue adds b2 and stores each image's rows
                                      #   straight into the embedding buffer (rows base + n*sn + t*st: AffineRows)
Other row layouts (images at different offsets) use addmm + scatter_rows_ as above.

On CPU tensors every kernel wrapper runs a torch emulation of the same algorithm, so the CPU tests check the autograd
and custom-op wiring.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from ._launch import dtype_name, empty, f32, launch_ctx, ptr
from .gemm import linear_sm90_launch, use_sm90
from .reference import (
    acc_dtype,
    check_projector_args,
    grid_width,
    merge_tokens_ref,
    projector_ref,
    scatter_rows_ref,
    unmerge_tokens_ref,
)
from .scatter_op import scatter_rows_fused

__all__ = [
    "AffineRows",
    "BiasGeluFunction",
    "LinearIntoFunction",
    "MergeLayerNormFunction",
    "affine_rows",
    "projector",
    "projector_fused",
]


class AffineRows(NamedTuple):
    """Rows of the destination buffer that receive image ``n``'s token ``t``: ``base + n*image_stride +
    t*token_stride`` (one image per sample at the same offset gives this layout in both (b, s) and (s, b) order)."""

    base: int
    image_stride: int
    token_stride: int

    def index(self, n_images: int, tokens: int, device=None) -> Tensor:
        n = torch.arange(n_images, device=device).view(-1, 1)
        t = torch.arange(tokens, device=device).view(1, -1)
        return (self.base + n * self.image_stride + t * self.token_stride).reshape(-1)


def affine_rows(index: Tensor, n_images: int, tokens: int) -> AffineRows | None:
    """``index`` [n_images*tokens] (image-major) as an AffineRows when it is one, else None. One device sync."""
    if index.numel() != n_images * tokens or index.numel() == 0:
        return None
    idx = index.reshape(n_images, tokens).to(torch.int64)
    base = idx[0, 0]
    sn = idx[1, 0] - base if n_images > 1 else torch.zeros_like(base)
    st = idx[0, 1] - base if tokens > 1 else torch.zeros_like(base)
    n = torch.arange(n_images, device=idx.device).view(-1, 1)
    t = torch.arange(tokens, device=idx.device).view(1, -1)
    ok = (idx == base + n * sn + t * st).all()
    b, sn_, st_, ok_ = torch.stack([base, sn, st, ok.to(torch.int64)]).tolist()
    if not ok_ or b < 0 or (n_images > 1 and sn_ == 0) or (tokens > 1 and st_ == 0):
        return None
    return AffineRows(int(b), int(sn_), int(st_))


def _rows_view(dst: Tensor, rows: AffineRows, n_images: int, tokens: int) -> Tensor:
    """The [n_images, tokens, D] strided view of ``dst`` [M, D] at ``rows`` (checked to lie inside dst)."""
    D = dst.shape[1]
    last = rows.base + (n_images - 1) * rows.image_stride + (tokens - 1) * rows.token_stride
    if rows.base < 0 or rows.image_stride < 0 or rows.token_stride < 0 or last >= dst.shape[0]:
        raise ValueError(f"rows {rows} for {n_images}x{tokens} tokens fall outside the {dst.shape[0]}-row buffer")
    return dst.as_strided((n_images, tokens, D), (rows.image_stride * D, rows.token_stride * D, 1),
                          dst.storage_offset() + rows.base * D)


# kernel wrappers (CUDA -> megavlm._C, CPU -> torch emulation)


def _merge_layernorm_impl(x: Tensor, weight, bias, merge: bool, eps: float) -> Tensor:
    N, T, Din = x.shape
    if merge:
        gw = grid_width(T)
        Tout, Fdim = T // 4, 4 * Din
    else:
        gw, Tout, Fdim = 0, T, Din
    if x.is_cuda:
        xc = x.contiguous()
        y = empty((N, Tout, Fdim), x.dtype, x.device)
        g32, b32 = f32(weight), f32(bias)
        ext, dev, stream = launch_ctx(x)
        ext.merge_layernorm(
            dev, stream, xc.data_ptr(), y.data_ptr(), N, T, Din, bool(merge), gw, ptr(g32), ptr(b32), float(eps),
            dtype_name(x.dtype),
        )
        return y
    v = merge_tokens_ref(x) if merge else x
    if weight is None:
        return v.contiguous().clone()
    acc = acc_dtype(x.dtype)
    return F.layer_norm(
        v.to(acc), (Fdim,), weight.detach().to(acc), None if bias is None else bias.detach().to(acc), eps
    ).to(x.dtype)


def _bias_gelu_impl(z: Tensor, bias) -> Tensor:
    R, C = z.shape
    if z.is_cuda:
        zc = z.contiguous()
        out = empty((R, C), z.dtype, z.device)
        b32 = f32(bias)
        ext, dev, stream = launch_ctx(z)
        ext.bias_gelu(dev, stream, zc.data_ptr(), ptr(b32), out.data_ptr(), R, C, dtype_name(z.dtype))
        return out
    acc = acc_dtype(z.dtype)
    u = z.to(acc)
    if bias is not None:
        u = u + bias.detach().to(acc)
    return F.gelu(u).to(z.dtype)


def _bias_gelu_backward_impl(grad: Tensor, z: Tensor, bias) -> Tensor:
    R, C = z.shape
    if z.is_cuda:
        zc = z.contiguous()
        gc = grad.to(z.dtype).contiguous()
        dz = empty((R, C), z.dtype, z.device)
        b32 = f32(bias)
        ext, dev, stream = launch_ctx(z)
        ext.bias_gelu_backward(
            dev, stream, gc.data_ptr(), zc.data_ptr(), ptr(b32), dz.data_ptr(), R, C, dtype_name(z.dtype)
        )
        return dz
    acc = acc_dtype(z.dtype)
    u = z.to(acc)
    if bias is not None:
        u = u + bias.detach().to(acc)
    cdf = 0.5 * (1.0 + torch.erf(u * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * u * u) * (1.0 / math.sqrt(2.0 * math.pi))
    return (grad.to(acc) * (cdf + u * pdf)).to(z.dtype)


def _linear_gelu_impl(x: Tensor, w: Tensor, bias, save_preact: bool) -> tuple[Tensor, Tensor]:
    """x [R, K] -> (gelu(x @ w^T + bias), the pre-activation or an empty tensor), one GEMM with the epilogue."""
    R, K = x.shape
    n = w.shape[0]
    if x.is_cuda:
        xc, wc = x.contiguous(), w.to(x.dtype).contiguous()
        a = empty((R, n), x.dtype, x.device)
        z = empty((R, n), x.dtype, x.device) if save_preact else x.new_empty(0)
        if R:
            linear_sm90_launch(xc, wc, bias, a, z if save_preact else None, 1, R, n, R * n, True)
        return a, z
    acc = acc_dtype(x.dtype)  # emulation: fp32 accumulate + epilogue, one rounding each, as the kernel
    u = x.to(acc) @ w.detach().to(acc).t()
    if bias is not None:
        u = u + bias.detach().to(acc)
    return F.gelu(u).to(x.dtype), (u.to(x.dtype) if save_preact else x.new_empty(0))


def _linear_into_impl_(dst: Tensor, a: Tensor, w: Tensor, bias, base: int, image_stride: int,
                       token_stride: int) -> None:
    """dst rows base + n*image_stride + t*token_stride = a[n, t] @ w^T + bias (one GEMM, in place)."""
    N, T, K = a.shape
    rows = AffineRows(base, image_stride, token_stride)
    view = _rows_view(dst, rows, N, T)
    if dst.is_cuda:
        if not dst.is_contiguous():
            raise ValueError("linear_into_: dst must be contiguous (it is written in place)")
        D = dst.shape[1]
        out = dst.view(-1)[rows.base * D:]  # base address of row `base`
        ac, wc = a.contiguous(), w.to(a.dtype).contiguous()
        if N * T:
            linear_sm90_launch(ac, wc, bias, out, None, N, T, token_stride * D, image_stride * D, False)
        return
    acc = acc_dtype(a.dtype)
    o = a.to(acc) @ w.detach().to(acc).t()
    if bias is not None:
        o = o + bias.detach().to(acc)
    view.copy_(o.to(dst.dtype))


# merge + LayerNorm: custom op, autograd, eager Function


def _merge_layernorm_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, merge, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.merge = bool(merge)
    ctx.eps = float(eps)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _merge_layernorm_backward(ctx, gy: Tensor):
    x, weight = ctx.saved_tensors
    nig = ctx.needs_input_grad
    acc = acc_dtype(x.dtype)
    gy = gy.to(acc)
    g_w = g_b = None
    if weight is not None:
        v = merge_tokens_ref(x.to(acc)) if ctx.merge else x.to(acc)
        mu = v.mean(-1, keepdim=True)
        var = (v - mu).pow(2).mean(-1, keepdim=True)
        rstd = torch.rsqrt(var + ctx.eps)
        xhat = (v - mu) * rstd
        if nig[1]:
            g_w = (gy * xhat).sum((0, 1)).to(weight.dtype)
        if nig[2] and ctx.bias_dtype is not None:
            g_b = gy.sum((0, 1)).to(ctx.bias_dtype)
        dxhat = gy * weight.to(acc)
        dv = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    else:
        dv = gy
    g_x = None
    if nig[0]:
        g_x = (unmerge_tokens_ref(dv) if ctx.merge else dv).to(x.dtype)
    return g_x, g_w, g_b, None, None


@torch.library.custom_op("megavlm::merge_layernorm", mutates_args=())
def merge_layernorm_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, merge: bool, eps: float) -> Tensor:
    return _merge_layernorm_impl(x, weight, bias, merge, eps)


@merge_layernorm_op.register_fake
def _(x, weight, bias, merge, eps):
    N, T, Din = x.shape
    if merge:
        return x.new_empty((N, T // 4, 4 * Din))
    return x.new_empty((N, T, Din))


merge_layernorm_op.register_autograd(_merge_layernorm_backward, setup_context=_merge_layernorm_setup_context)


class MergeLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, merge, eps):
        y = _merge_layernorm_impl(x, weight, bias, merge, eps)
        _merge_layernorm_setup_context(ctx, (x, weight, bias, merge, eps), y)
        return y

    @staticmethod
    def backward(ctx, gy):
        return _merge_layernorm_backward(ctx, gy)


# bias + GELU: custom ops, autograd, eager Function


def _bias_gelu_setup_context(ctx, inputs, output) -> None:
    z, bias = inputs
    ctx.save_for_backward(z, bias)


def _bias_gelu_backward(ctx, grad: Tensor):
    z, bias = ctx.saved_tensors
    nig = ctx.needs_input_grad
    dz = torch.ops.megavlm.bias_gelu_backward(grad, z, bias)
    g_b = None
    if bias is not None and nig[1]:
        g_b = dz.sum(0, dtype=acc_dtype(z.dtype)).to(bias.dtype)
    return (dz if nig[0] else None), g_b


@torch.library.custom_op("megavlm::bias_gelu", mutates_args=())
def bias_gelu_op(z: Tensor, bias: Tensor | None) -> Tensor:
    return _bias_gelu_impl(z, bias)


@bias_gelu_op.register_fake
def _(z, bias):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.custom_op("megavlm::bias_gelu_backward", mutates_args=())
def bias_gelu_backward_op(grad: Tensor, z: Tensor, bias: Tensor | None) -> Tensor:
    return _bias_gelu_backward_impl(grad, z, bias)


@bias_gelu_backward_op.register_fake
def _(grad, z, bias):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


bias_gelu_op.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup_context)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, bias):
        out = _bias_gelu_impl(z, bias)
        _bias_gelu_setup_context(ctx, (z, bias), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _bias_gelu_backward(ctx, grad)


# the Hopper GEMMs: linear_gelu (GEMM1) and the in-place linear_into_ (GEMM2)


@torch.library.custom_op("megavlm::linear_gelu", mutates_args=())
def linear_gelu_op(x: Tensor, w: Tensor, bias: Tensor | None, save_preact: bool) -> tuple[Tensor, Tensor]:
    """x [R, K] -> (gelu(x @ w^T + bias) [R, n], pre-activation [R, n] or empty): the Hopper GEMM with epilogue."""
    return _linear_gelu_impl(x, w, bias, save_preact)


@linear_gelu_op.register_fake
def _(x, w, bias, save_preact):
    R, n = x.shape[0], w.shape[0]
    return x.new_empty((R, n)), (x.new_empty((R, n)) if save_preact else x.new_empty(0))


def _linear_gelu_setup_context(ctx, inputs, output) -> None:
    x, w, bias, save_preact = inputs
    ctx.save_for_backward(x, w, output[1])
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_gelu_backward(ctx, grad_a: Tensor, grad_z):
    x, w, z = ctx.saved_tensors
    if z.numel() == 0:
        raise RuntimeError("linear_gelu: backward needs the pre-activation; call it with save_preact=True")
    nig = ctx.needs_input_grad
    dz = torch.ops.megavlm.bias_gelu_backward(grad_a, z, None)  # z already includes the bias
    g_x = torch.mm(dz, w.to(dz.dtype)).to(x.dtype) if nig[0] else None
    g_w = torch.mm(dz.t(), x.to(dz.dtype)).to(w.dtype) if nig[1] else None
    g_b = dz.sum(0, dtype=acc_dtype(dz.dtype)).to(ctx.bias_dtype) if nig[2] and ctx.bias_dtype else None
    return g_x, g_w, g_b, None


linear_gelu_op.register_autograd(_linear_gelu_backward, setup_context=_linear_gelu_setup_context)


@torch.library.custom_op("megavlm::linear_into_", mutates_args={"dst"})
def linear_into_op(dst: Tensor, a: Tensor, w: Tensor, bias: Tensor | None, base: int, image_stride: int,
                   token_stride: int) -> None:
    """In place: dst rows ``base + n*image_stride + t*token_stride`` = a[n, t] @ w^T + bias (see LinearIntoFunction)."""
    _linear_into_impl_(dst, a, w, bias, base, image_stride, token_stride)


@linear_into_op.register_fake
def _(dst, a, w, bias, base, image_stride, token_stride):
    return None


class LinearIntoFunction(torch.autograd.Function):
    """``dst[rows(n, t)] = a[n, t] @ w^T + bias`` in place with autograd: grad_dst = grad with those rows zeroed;
    the rows' grad flows to a, w and bias as through a Linear."""

    @staticmethod
    def forward(ctx, dst, a, w, bias, rows: AffineRows):
        torch.ops.megavlm.linear_into_(dst, a, w, bias, *rows)
        ctx.mark_dirty(dst)
        ctx.save_for_backward(a, w)
        ctx.rows = rows
        ctx.bias_dtype = None if bias is None else bias.dtype
        return dst

    @staticmethod
    def backward(ctx, grad):
        a, w = ctx.saved_tensors
        N, T, K = a.shape
        nig = ctx.needs_input_grad
        index = ctx.rows.index(N, T, grad.device)
        g_rows = grad.index_select(0, index).to(a.dtype)
        g_dst = grad.index_fill(0, index, 0) if nig[0] else None
        g_a = torch.mm(g_rows, w.to(a.dtype)).view(N, T, K) if nig[1] else None
        g_w = torch.mm(g_rows.t(), a.reshape(N * T, K)).to(w.dtype) if nig[2] else None
        g_b = g_rows.sum(0, dtype=acc_dtype(a.dtype)).to(ctx.bias_dtype) if nig[3] and ctx.bias_dtype else None
        return g_dst, g_a, g_w, g_b, None


# the composite


def projector_fused(
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
    reduce=None,
) -> Tensor:
    """[N, T, Din] -> [N, T', Dout]; with ``dst`` [M, Dout] and ``index`` (a row index tensor or AffineRows) the rows
    are written into ``dst`` in place and ``dst`` is returned. On the Hopper GEMM path an index that forms an
    AffineRows layout is stored by the second GEMM itself; passing the AffineRows saves the sync that tells it.

    Tensor parallelism: with ``w1``/``b1`` this rank's column shard and ``w2`` its row shard (megatron's
    ColumnParallelLinear / RowParallelLinear), ``reduce`` (megatron's ``reduce_from_tensor_model_parallel_region``)
    sums the second GEMM's partial output over the TP group before ``b2`` is added, as RowParallelLinear does."""
    check_projector_args(x, ln_weight, ln_bias, merge, w1, b1, w2, b2, act)
    if (dst is None) != (index is None):
        raise ValueError("dst and index must be given together")
    dt = x.dtype
    if merge or ln_weight is not None:
        y = torch.ops.megavlm.merge_layernorm(x, ln_weight, ln_bias, bool(merge), float(eps))
    else:
        y = x
    N, Tq, Fdim = y.shape
    y2 = y.reshape(N * Tq, Fdim)
    sm90 = use_sm90(y2, "projector", Fdim, w1.shape[0], w2.shape[0])
    rows = None
    if dst is not None and sm90 and dst.dtype == dt and reduce is None:
        # The second GEMM stores the rows itself when they form an AffineRows layout. Telling costs one device sync:
        # done before the first GEMM is queued, so that it does not wait for that GEMM nor leave a gap after it.
        rows = index if isinstance(index, AffineRows) else affine_rows(index, N, Tq)
    if sm90:
        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (y2, w1, b1))
        a, _ = torch.ops.megavlm.linear_gelu(y2, w1.to(dt), b1, grads)
    else:
        a = torch.ops.megavlm.bias_gelu(torch.mm(y2, w1.to(dt).t()), b1)
    Dout = w2.shape[0]
    if rows is not None:
        a3 = a.view(N, Tq, -1)
        if torch.is_grad_enabled() and (dst.requires_grad or a3.requires_grad or w2.requires_grad
                                        or (b2 is not None and b2.requires_grad)):
            return LinearIntoFunction.apply(dst, a3, w2.to(dt), b2, rows)
        torch.ops.megavlm.linear_into_(dst, a3, w2.to(dt), b2, *rows)
        return dst
    if reduce is not None:
        o = reduce(torch.mm(a, w2.to(dt).t()))
        o = o + b2.to(dt) if b2 is not None else o
    else:
        o = torch.addmm(b2.to(dt), a, w2.to(dt).t()) if b2 is not None else torch.mm(a, w2.to(dt).t())
    if dst is None:
        return o.view(N, Tq, Dout)
    if isinstance(index, AffineRows):
        index = index.index(N, Tq, dst.device)
    return scatter_rows_fused(dst, index, o)


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
    reduce=None,
    kernels: str | None = "auto",
    resolved: bool = False,
) -> Tensor:
    """``(N, T, Din)`` -> ``(N, T', Dout)`` (merge/LN optional; T' = T/4 with merge). With ``dst``/``index`` the output
    rows are also written in place into ``dst`` ``(M, Dout)`` (``dst[index[k]] = out.view(-1, Dout)[k]``) and ``dst``
    is returned. ``index`` may be an ``AffineRows`` (image n's token t at row base + n*image_stride + t*token_stride),
    which lets the Hopper GEMM write the rows itself. ``reduce`` (tensor parallelism, see ``projector_fused``) sums
    the second GEMM's partial output over the TP group before ``b2`` is added. ``kernels`` picks the fused kernels or
    the reference (dispatch.route; ``resolved=True`` for a choice already resolved)."""
    if (dst is None) != (index is None):
        raise ValueError("dst and index must be given together")
    if dispatch.route(kernels, x, w1, resolved=resolved) == "fused":
        return projector_fused(x, ln_weight, ln_bias, merge, w1, b1, w2, b2, act, eps, dst=dst, index=index,
                               reduce=reduce)
    if reduce is None:
        out = projector_ref(x, ln_weight, ln_bias, merge, w1, b1, w2, b2, act, eps)
    else:  # as RowParallelLinear: the partial products summed over the group, then the bias
        out = reduce(projector_ref(x, ln_weight, ln_bias, merge, w1, b1, w2, None, act, eps))
        out = out + b2.to(out.dtype) if b2 is not None else out
    if dst is None:
        return out
    if isinstance(index, AffineRows):
        index = index.index(out.shape[0], out.shape[1], dst.device)
    return scatter_rows_ref(dst, index, out.reshape(-1, out.shape[-1]))

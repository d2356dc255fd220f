"""The fused patch embedding: uint8 pixels ``(B, H, W, C)`` -> normalized patch tokens ``(B, T, D)`` (T = P, or 1 + P
with a class token), its custom ops, autograd and the public routed ``patch_embed``.

Fused path (cuBLAS GEMM; see docs/kernels.md):
    X = patchify(pixels)              # one pass: uint8 HWC -> normalized, patch-major
                                      #   [B, T, Kp] in out dtype (class rows zero, K padded to 8)
    out = X @ W[D, Kp]^T              # cuBLAS, written straight into the [B, T, D] output
    out += table[t]  (in place)       # one epilogue pass: bias (patch rows) / class_emb (row 0)
                                      #   + pos[t], added in fp32
With MEGAVLM_FUSED_GEMM=cutlass on an sm_90 GPU (bf16):
    out = X @ W^T + bias + table[t]   # one CUTLASS GEMM (csrc/patch_embed/gemm_sm90_table.cu); bias and the position
                                      #   table (class row: class_emb + pos[0] - bias) added in its epilogue
Backward: grad_pos/grad_cls/grad_bias are batch/row sums of grad_out; grad_W = grad_out^T @ X with X recomputed by
the patchify kernel (no copy of the activations is kept; pixels are the only saved tensor).

On CPU tensors every kernel wrapper runs a torch emulation of the same algorithm (same layouts, padding and fp32
epilogues), so the CPU tests check the autograd and custom-op wiring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from ._launch import dtype_name, empty, f32, launch_ctx, ptr
from .gemm import linear_sm90_launch, use_sm90
from .reference import CLIP_MEAN, CLIP_STD, acc_dtype, as_float_list, check_patch_embed_args, patch_embed_ref

__all__ = ["PatchEmbedFunction", "patch_embed", "patch_embed_fused"]


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _norm_affine(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    """(x/255 - m)/s == x * scale + shift."""
    scale = [1.0 / (255.0 * s) for s in std]
    shift = [-m / s for m, s in zip(mean, std)]
    return scale, shift


# kernel wrappers (CUDA -> megavlm._C, CPU -> torch emulation)


def _patchify_impl(pixels: Tensor, scale, shift, patch: int, cls_rows: int, k_pad: int, dtype: torch.dtype) -> Tensor:
    B, H, W, C = pixels.shape
    gh, gw = H // patch, W // patch
    T = cls_rows + gh * gw
    K = C * patch * patch
    if pixels.is_cuda:
        pixels = pixels.contiguous()
        out = empty((B, T, k_pad), dtype, pixels.device)
        ext, dev, stream = launch_ctx(pixels)
        ext.patchify(
            dev, stream, pixels.data_ptr(), out.data_ptr(), B, H, W, C, patch, cls_rows, k_pad,
            [float(v) for v in scale], [float(v) for v in shift], dtype_name(dtype),
        )
        return out
    acc = acc_dtype(dtype)
    sc = torch.tensor(list(scale), dtype=acc)
    sh = torch.tensor(list(shift), dtype=acc)
    x = pixels.to(acc) * sc + sh
    x = x.reshape(B, gh, patch, gw, patch, C).permute(0, 1, 3, 5, 2, 4).reshape(B, gh * gw, K)
    out = torch.zeros((B, T, k_pad), dtype=acc)
    out[:, cls_rows:, :K] = x
    return out.to(dtype)


def _add_pos_bias_impl_(out2d: Tensor, tokens: int, pos, bias, class_emb, cls_rows: int) -> Tensor:
    """In place: out2d [B*T, D] += (class row ? class_emb : bias) + pos[t] (in fp32/fp64)."""
    D = out2d.shape[1]
    pos_rows = 0 if pos is None else pos.numel() // D
    if out2d.is_cuda:
        pos32, b32, c32 = f32(pos, (-1, D)), f32(bias), f32(class_emb, (D,))
        ext, dev, stream = launch_ctx(out2d)
        ext.add_pos_bias(
            dev, stream, out2d.data_ptr(), out2d.shape[0], tokens, D, ptr(pos32), pos_rows, ptr(b32),
            ptr(c32), cls_rows, dtype_name(out2d.dtype),
        )
        return out2d
    acc = acc_dtype(out2d.dtype)
    table = torch.zeros((tokens, D), dtype=acc)
    if bias is not None:
        table[cls_rows:] += bias.detach().to(acc)
    if class_emb is not None:
        table[0] += class_emb.detach().reshape(D).to(acc)
    if pos is not None:
        table[tokens - pos_rows:] += pos.detach().reshape(-1, D).to(acc)
    res = (out2d.reshape(-1, tokens, D).to(acc) + table).reshape(-1, D)
    out2d.copy_(res)
    return out2d


def _linear_table_impl(x: Tensor, w: Tensor, bias, table: Tensor) -> Tensor:
    """x [B, T, K] -> x @ w^T + bias + table[t] [B, T, n] in x's dtype: one GEMM, bias and table in its epilogue
    (fp32, one rounding)."""
    B, T, K = x.shape
    n = w.shape[0]
    if x.is_cuda:
        out = empty((B, T, n), x.dtype, x.device)
        if B * T:
            linear_sm90_launch(x.contiguous(), w.to(x.dtype).contiguous(), bias, out, None, B, T, n, T * n, False,
                                table)
        return out
    acc = acc_dtype(x.dtype)
    u = x.to(acc) @ w.detach().to(acc).t() + table.to(acc)
    if bias is not None:
        u = u + bias.detach().to(acc)
    return u.to(x.dtype)


# forward / setup / backward shared by the custom op and the Function


def _patch_embed_forward(pixels, weight, bias, pos, class_emb, mean, std, out_dtype) -> Tensor:
    g = check_patch_embed_args(pixels, weight, bias, pos, class_emb)
    mean = as_float_list(mean, g.C, "mean")
    std = as_float_list(std, g.C, "std")
    scale, shift = _norm_affine(mean, std)
    Kp = _round_up(g.K, 8)
    X = _patchify_impl(pixels, scale, shift, g.p, g.cls_rows, Kp, out_dtype)  # [B, T, Kp]
    Wm = weight.detach().reshape(g.D, g.K).to(out_dtype)
    if Kp != g.K:
        Wm = F.pad(Wm, (0, Kp - g.K))
    if use_sm90(X, "patch_embed", Kp, g.D):
        # Hopper: bias and position table added in the GEMM's epilogue. The class row of X is zero, so its table
        # row carries class_emb + pos[0] - bias (CLIP adds no conv bias to the class token).
        table = torch.zeros((g.T, g.D), dtype=acc_dtype(out_dtype), device=X.device)
        if pos is not None:
            table[g.T - g.pos_rows:] += pos.detach().reshape(-1, g.D).to(table.dtype)
        if g.cls_rows:
            table[0] += class_emb.detach().reshape(g.D).to(table.dtype)
            if bias is not None:
                table[0] -= bias.detach().to(table.dtype)
        return _linear_table_impl(X, Wm, bias, table)
    out = torch.mm(X.view(g.B * g.T, Kp), Wm.t())  # [B*T, D], written once by cuBLAS
    _add_pos_bias_impl_(out, g.T, pos, bias, class_emb, g.cls_rows)
    return out.view(g.B, g.T, g.D)


def _patch_embed_setup_context(ctx, inputs, output) -> None:
    pixels, weight, bias, pos, class_emb, mean, std, out_dtype = inputs
    g = check_patch_embed_args(pixels, weight, bias, pos, class_emb)
    ctx.save_for_backward(pixels)
    ctx.geom = (g.B, g.T, g.D, g.C, g.p, g.K, g.cls_rows, g.pos_rows)
    ctx.weight_meta = (tuple(weight.shape), weight.dtype)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.pos_meta = None if pos is None else (tuple(pos.shape), pos.dtype)
    ctx.cls_meta = None if class_emb is None else (tuple(class_emb.shape), class_emb.dtype)
    ctx.norm = _norm_affine(as_float_list(mean, g.C, "mean"), as_float_list(std, g.C, "std"))
    ctx.out_dtype = out_dtype


def _patch_embed_backward(ctx, grad: Tensor):
    (pixels,) = ctx.saved_tensors
    B, T, D, C, p, K, cls_rows, pos_rows = ctx.geom
    nig = ctx.needs_input_grad
    dt = ctx.out_dtype
    acc = acc_dtype(dt)
    g_w = g_b = g_pos = g_cls = None
    if nig[2] or nig[3] or nig[4]:
        gsum = grad.sum(0, dtype=acc)  # [T, D]
        if nig[3] and ctx.pos_meta is not None:
            shape, pdt = ctx.pos_meta
            g_pos = gsum[T - pos_rows:].reshape(shape).to(pdt)
        if nig[4] and ctx.cls_meta is not None:
            shape, cdt = ctx.cls_meta
            g_cls = gsum[0].reshape(shape).to(cdt)
        if nig[2] and ctx.bias_dtype is not None:
            g_b = gsum[cls_rows:].sum(0).to(ctx.bias_dtype)
    if nig[1]:
        Kp = _round_up(K, 8)
        scale, shift = ctx.norm
        X = torch.ops.megavlm.patchify(pixels, scale, shift, p, cls_rows, Kp, dt)  # recomputed, [B, T, Kp]
        g2 = grad.reshape(B * T, D).to(dt)
        g_wp = torch.mm(g2.t(), X.reshape(B * T, Kp))  # class rows of X are zero
        wshape, wdt = ctx.weight_meta
        g_w = g_wp[:, :K].reshape(wshape).to(wdt)
    return None, g_w, g_b, g_pos, g_cls, None, None, None


# custom ops (visible to torch.compile) and the eager Function


@torch.library.custom_op("megavlm::patchify", mutates_args=())
def patchify_op(
    pixels: Tensor,
    scale: Sequence[float],
    shift: Sequence[float],
    patch: int,
    cls_rows: int,
    k_pad: int,
    dtype: torch.dtype,
) -> Tensor:
    """uint8 [B,H,W,C] -> [B, cls_rows + P, k_pad]: x*scale[c]+shift[c], flatten (C, ph, pw), zero class rows/pad."""
    return _patchify_impl(pixels, scale, shift, patch, cls_rows, k_pad, dtype)


@patchify_op.register_fake
def _(pixels, scale, shift, patch, cls_rows, k_pad, dtype):
    B, H, W, C = pixels.shape
    return pixels.new_empty((B, cls_rows + (H // patch) * (W // patch), k_pad), dtype=dtype)


@torch.library.custom_op("megavlm::patch_embed", mutates_args=())
def patch_embed_op(
    pixels: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pos: Tensor | None,
    class_emb: Tensor | None,
    mean: Sequence[float],
    std: Sequence[float],
    out_dtype: torch.dtype,
) -> Tensor:
    return _patch_embed_forward(pixels, weight, bias, pos, class_emb, mean, std, out_dtype)


@patch_embed_op.register_fake
def _(pixels, weight, bias, pos, class_emb, mean, std, out_dtype):
    g = check_patch_embed_args(pixels, weight, bias, pos, class_emb)
    return pixels.new_empty((g.B, g.T, g.D), dtype=out_dtype)


patch_embed_op.register_autograd(_patch_embed_backward, setup_context=_patch_embed_setup_context)


class PatchEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pixels, weight, bias, pos, class_emb, mean, std, out_dtype):
        out = _patch_embed_forward(pixels, weight, bias, pos, class_emb, mean, std, out_dtype)
        _patch_embed_setup_context(ctx, (pixels, weight, bias, pos, class_emb, mean, std, out_dtype), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _patch_embed_backward(ctx, grad)


def patch_embed_fused(
    pixels: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    pos: Tensor | None = None,
    class_emb: Tensor | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    g = check_patch_embed_args(pixels, weight, bias, pos, class_emb)
    mean = as_float_list(mean, g.C, "mean")
    std = as_float_list(std, g.C, "std")
    return torch.ops.megavlm.patch_embed(pixels, weight, bias, pos, class_emb, mean, std, out_dtype or weight.dtype)


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
    resolved: bool = False,
) -> Tensor:
    """uint8 pixels ``(B, H, W, C)`` -> patch tokens ``(B, (1+)P, D)``; see reference.patch_embed_ref. ``kernels``
    picks the fused kernels or the reference (dispatch.route; ``resolved=True`` for a choice already resolved)."""
    if dispatch.route(kernels, pixels, weight, resolved=resolved) == "fused":
        return patch_embed_fused(pixels, weight, bias, pos, class_emb, mean, std, out_dtype)
    return patch_embed_ref(pixels, weight, bias, pos, class_emb, mean, std, out_dtype)

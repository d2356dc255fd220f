"""Fused patch-embedding / projector ops over the ``megavlm._C`` kernels.

Layers:

1. ``*_impl`` functions: one per kernel. On CUDA tensors they call the
   pybind11 kernels with raw pointers on ``torch.cuda.current_stream()``; on
   CPU tensors they run a torch emulation of the same algorithm (same
   intermediate layouts, roundings and fp32 epilogues), which lets the CPU
   test-suite exercise all the autograd / custom-op wiring below.
2. Torch custom ops (``torch.ops.megavlm.*``, ``torch.library.custom_op``)
   with ``register_fake`` and ``register_autograd`` so torch.compile sees
   them: ``patchify``, ``patch_embed``, ``merge_layernorm``, ``bias_gelu``,
   ``bias_gelu_backward`` and the in-place ``scatter_rows_``.
3. ``torch.autograd.Function`` classes for eager use sharing the same
   forward/backward code (``PatchEmbedFunction``, ``MergeLayerNormFunction``,
   ``BiasGeluFunction``, ``ScatterRowsFunction``).
4. ``patch_embed_fused`` / ``projector_fused`` / ``scatter_rows_fused``:
   the composite fused paths used by ``megavlm.ops.dispatch``. GEMMs stay in
   torch (cuBLAS).

Patch embedding (fused path):
    X = patchify(pixels)              # one pass: uint8 HWC -> normalized, patch-major
                                      #   [B, T, Kp] in out dtype (class rows zero, K padded to 8)
    out = X @ W[D, Kp]^T              # cuBLAS, written straight into the [B, T, D] output
    out += table[t]  (in place)       # one epilogue pass: bias (patch rows) / class_emb (row 0)
                                      #   + pos[t], added in fp32
Backward: grad_pos/grad_cls/grad_bias are batch/row sums of grad_out;
grad_W = grad_out^T @ X with X recomputed by the patchify kernel (no copy of
the activations is kept; pixels are the only saved tensor).

Projector (fused path):
    y = merge_layernorm(x)            # optional 2x2 merge + LayerNorm in one pass
    z = y @ W1^T                      # cuBLAS
    a = bias_gelu(z, b1)              # bias + exact GELU epilogue (z is saved for backward)
    o = addmm(b2, a, W2^T)            # cuBLAS with its bias epilogue
    scatter_rows_(emb, index, o)      # rows written straight into the decoder input buffer

Hopper GEMM path (bf16 on an sm_90 GPU, megavlm._C built with CUTLASS; see docs/kernels.md): the projector's by
default (``MEGAVLM_FUSED_GEMM=auto``), both ops' with ``cutlass``, neither with ``cublas``. Patch embedding:
    out = X @ W^T + bias + table[t]   # one CUTLASS GEMM; bias and the position table (class row: class_emb +
                                      #   pos[0] - bias) added in its epilogue: no pass over the output
Projector:
    a, z = linear_gelu(y, W1, b1)     # one CUTLASS GEMM: bias + exact GELU in its epilogue; z (pre-activation)
                                      #   is stored by the same epilogue only when a backward will need it
    emb[rows] = linear_into_(a, W2, b2)  # one CUTLASS GEMM whose epilogue adds b2 and stores each image's rows
                                      #   straight into the embedding buffer (rows base + n*sn + t*st: AffineRows)
Other row layouts (images at different offsets) use addmm + scatter_rows_ as above.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext
from .reference import (
    CLIP_MEAN,
    CLIP_STD,
    acc_dtype,
    as_float_list,
    check_patch_embed_args,
    check_projector_args,
    grid_width,
    merge_tokens_ref,
    unmerge_tokens_ref,
)

__all__ = [
    "AffineRows",
    "BiasGeluFunction",
    "LinearIntoFunction",
    "MergeLayerNormFunction",
    "PatchEmbedFunction",
    "ScatterRowsFunction",
    "patch_embed_fused",
    "projector_fused",
    "affine_rows",
    "fused_gemm",
    "scatter_rows_fused",
    "set_poison",
    "set_fused_gemm",
    "sm90_gemm_unavailable_reason",
    "sm90_tiles",
]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

_POISON = False


def set_poison(on: bool) -> None:
    """Testing hook: fill every buffer that a kernel is expected to fully write with NaN first."""
    global _POISON
    _POISON = bool(on)


_GEMM_MODES = ("auto", "cublas", "cutlass")
_FUSED_GEMM: str | None = None  # None: $MEGAVLM_FUSED_GEMM, default 'auto'
# What 'auto' gives the Hopper GEMMs where they can run (measured on an H100 and an H200, docs/kernels.md): the
# projector, whose GELU and row store they absorb; not the patch embedding, whose 577-token images leave ragged tiles
# that make the CUTLASS GEMM slower than cuBLAS + the add_pos_bias pass.
_AUTO_SM90_OPS = ("projector",)


def set_fused_gemm(mode: str | None) -> None:
    """Which GEMMs the fused patch embedding and projector use: 'cublas' (torch.mm + the epilogue kernels: add_pos_bias,
    bias_gelu, scatter_rows), 'cutlass' (the Hopper GEMMs with those epilogues inside, for both ops), 'auto' (the
    Hopper GEMMs for the ops where they are faster, on CUDA tensors), or None to read $MEGAVLM_FUSED_GEMM again
    (default 'auto')."""
    global _FUSED_GEMM
    if mode is not None and mode not in _GEMM_MODES:
        raise ValueError(f"fused GEMMs must be one of {_GEMM_MODES}, got {mode!r}")
    _FUSED_GEMM = mode


def fused_gemm() -> str:
    """The configured GEMMs of the fused ops: 'auto' (default) | 'cublas' | 'cutlass'."""
    mode = _FUSED_GEMM or os.environ.get("MEGAVLM_FUSED_GEMM", "auto").strip().lower() or "auto"
    if mode not in _GEMM_MODES:
        raise ValueError(f"MEGAVLM_FUSED_GEMM must be one of {_GEMM_MODES}, got {mode!r}")
    return mode


def gemms_label(device: torch.device | str, dtype: torch.dtype) -> str:
    """Which GEMMs the fused ops take for tensors like these, for the start-up line: 'cuBLAS GEMMs', 'CUTLASS
    GEMMs' or 'CUTLASS GEMMs for the projector, cuBLAS for the others'."""
    t = torch.empty(0, device=device, dtype=dtype)
    ops = [op for op in ("projector", "patch_embed") if _use_sm90(t, op)]
    if not ops:
        return "cuBLAS GEMMs"
    if len(ops) == 2:
        return "CUTLASS GEMMs"
    return f"CUTLASS GEMMs for the {ops[0].replace('_', ' ')}, cuBLAS for the others"


def sm90_tiles(epilogue: str) -> str:
    """Which compiled Hopper GEMM serves an epilogue ('gelu' (gelu_aux too) or 'bias'): $MEGAVLM_SM90_GELU_TILES /
    $MEGAVLM_SM90_BIAS_TILES, e.g. 'pp128x128x64_c2x1'; '' (unset) means the build's default, chosen by
    benchmarks/sm90_tiles.py. `megavlm._C.linear_sm90_gemms()` lists what a build has."""
    if epilogue not in ("gelu", "bias"):
        raise ValueError(f"sm90_tiles: epilogue must be 'gelu' or 'bias', got {epilogue!r}")
    var = f"MEGAVLM_SM90_{epilogue.upper()}_TILES"
    tiles = os.environ.get(var, "").strip()
    if tiles and not re.fullmatch(r"(pp|co|sk)\d+x\d+x\d+_c\dx\d(_e\d+x\d+)?(_pgelu)?", tiles):
        raise ValueError(f"{var} must name tiles like 'pp128x128x64_c2x1' (schedule pp|co|sk, tile MxNxK, cluster, "
                         f"optionally _e<M>x<N>: the epilogue's subtile, and _pgelu: csrc/common/gelu.h's GELU), "
                         f"got {tiles!r}")
    return tiles


def sm90_gemm_unavailable_reason(t: Tensor) -> str | None:
    """None when the Hopper GEMMs can serve a tensor like ``t`` (CUDA bf16 on sm_90, megavlm._C built with them);
    CPU tensors are served by the torch emulation (tests); else the reason."""
    if not t.is_cuda:
        return None if t.dtype.is_floating_point else f"dtype {t.dtype}"
    if t.dtype != torch.bfloat16:
        return f"the Hopper GEMMs are bf16 only, got {t.dtype}"
    ext = _ext.load()
    if ext is None or not getattr(ext, "linear_sm90_compiled", lambda: False)():
        return "megavlm._C was built without the Hopper GEMMs (no sm_90 arch or no CUTLASS headers)"
    if torch.cuda.get_device_capability(t.device) != (9, 0):
        return f"the Hopper GEMMs need an sm_90 GPU, this is {torch.cuda.get_device_name(t.device)}"
    return None


def _use_sm90(t: Tensor, op: str, *dims: int) -> bool:
    """Whether op's ('projector' | 'patch_embed') GEMMs over ``t`` with these feature sizes take the Hopper path."""
    mode = fused_gemm()
    if mode == "cublas" or (mode == "auto" and (op not in _AUTO_SM90_OPS or not t.is_cuda)):
        return False
    # TMA: feature sizes multiples of 8 (16 bytes); the torch wrappers make every operand contiguous.
    if any(d % 8 for d in dims):
        return False
    return sm90_gemm_unavailable_reason(t) is None


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


def _empty(shape, dtype: torch.dtype, device) -> Tensor:
    if _POISON and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _dtype_name(dt: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dt]
    except KeyError:
        raise ValueError(f"fused CUDA kernels support float32/float16/bfloat16, got {dt}") from None


def _launch_ctx(t: Tensor):
    """(extension, device index, raw stream handle) for a CUDA tensor."""
    ext = _ext.require()
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(t.device).cuda_stream
    return ext, dev, stream


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _f32(t: Tensor | None, shape=None) -> Tensor | None:
    """Detached contiguous fp32 copy/view (kernel-side parameters are fp32)."""
    if t is None:
        return None
    t = t.detach()
    if shape is not None:
        t = t.reshape(shape)
    return t.to(torch.float32).contiguous()


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _norm_affine(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    """(x/255 - m)/s == x * scale + shift."""
    scale = [1.0 / (255.0 * s) for s in std]
    shift = [-m / s for m, s in zip(mean, std)]
    return scale, shift


# ----------------------------------------------------------------------------
# kernel wrappers (CUDA -> megavlm._C, CPU -> torch emulation)
# ----------------------------------------------------------------------------


def _patchify_impl(pixels: Tensor, scale, shift, patch: int, cls_rows: int, k_pad: int, dtype: torch.dtype) -> Tensor:
    B, H, W, C = pixels.shape
    gh, gw = H // patch, W // patch
    T = cls_rows + gh * gw
    K = C * patch * patch
    if pixels.is_cuda:
        pixels = pixels.contiguous()
        out = _empty((B, T, k_pad), dtype, pixels.device)
        ext, dev, stream = _launch_ctx(pixels)
        ext.patchify(
            dev, stream, pixels.data_ptr(), out.data_ptr(), B, H, W, C, patch, cls_rows, k_pad,
            [float(v) for v in scale], [float(v) for v in shift], _dtype_name(dtype),
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
        pos32, b32, c32 = _f32(pos, (-1, D)), _f32(bias), _f32(class_emb, (D,))
        ext, dev, stream = _launch_ctx(out2d)
        ext.add_pos_bias(
            dev, stream, out2d.data_ptr(), out2d.shape[0], tokens, D, _ptr(pos32), pos_rows, _ptr(b32),
            _ptr(c32), cls_rows, _dtype_name(out2d.dtype),
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


def _merge_layernorm_impl(x: Tensor, weight, bias, merge: bool, eps: float) -> Tensor:
    N, T, Din = x.shape
    if merge:
        gw = grid_width(T)
        Tout, Fdim = T // 4, 4 * Din
    else:
        gw, Tout, Fdim = 0, T, Din
    if x.is_cuda:
        xc = x.contiguous()
        y = _empty((N, Tout, Fdim), x.dtype, x.device)
        g32, b32 = _f32(weight), _f32(bias)
        ext, dev, stream = _launch_ctx(x)
        ext.merge_layernorm(
            dev, stream, xc.data_ptr(), y.data_ptr(), N, T, Din, bool(merge), gw, _ptr(g32), _ptr(b32), float(eps),
            _dtype_name(x.dtype),
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
        out = _empty((R, C), z.dtype, z.device)
        b32 = _f32(bias)
        ext, dev, stream = _launch_ctx(z)
        ext.bias_gelu(dev, stream, zc.data_ptr(), _ptr(b32), out.data_ptr(), R, C, _dtype_name(z.dtype))
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
        dz = _empty((R, C), z.dtype, z.device)
        b32 = _f32(bias)
        ext, dev, stream = _launch_ctx(z)
        ext.bias_gelu_backward(
            dev, stream, gc.data_ptr(), zc.data_ptr(), _ptr(b32), dz.data_ptr(), R, C, _dtype_name(z.dtype)
        )
        return dz
    acc = acc_dtype(z.dtype)
    u = z.to(acc)
    if bias is not None:
        u = u + bias.detach().to(acc)
    cdf = 0.5 * (1.0 + torch.erf(u * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * u * u) * (1.0 / math.sqrt(2.0 * math.pi))
    return (grad.to(acc) * (cdf + u * pdf)).to(z.dtype)


def _scatter_rows_impl_(dst: Tensor, index: Tensor, src: Tensor) -> None:
    if dst.dim() != 2 or src.dim() != 2 or index.dim() != 1:
        raise ValueError(
            f"scatter_rows expects dst [M, D], index [K], src [K, D]; got {tuple(dst.shape)}, "
            f"{tuple(index.shape)}, {tuple(src.shape)}"
        )
    if src.shape[0] != index.shape[0] or src.shape[1] != dst.shape[1]:
        raise ValueError(f"shape mismatch: dst {tuple(dst.shape)}, index {tuple(index.shape)}, src {tuple(src.shape)}")
    if dst.is_cuda:
        if not dst.is_contiguous():
            raise ValueError("scatter_rows: dst must be contiguous (it is written in place)")
        if src.device != dst.device or index.device != dst.device:
            raise ValueError(f"scatter_rows: dst, index, src must be on one device; got {dst.device}, {index.device}, {src.device}")
        idx = index.to(torch.int64).contiguous()
        s = src.to(dst.dtype).contiguous()
        ext, dev, stream = _launch_ctx(dst)
        ext.scatter_rows(
            dev, stream, dst.data_ptr(), dst.shape[0], idx.data_ptr(), idx.shape[0], s.data_ptr(),
            dst.shape[1] * dst.element_size(),
        )
        return
    dst.index_copy_(0, index.to(torch.int64), src.to(dst.dtype))


def _linear_sm90_launch(x: Tensor, w: Tensor, bias, out: Tensor, aux, batch: int, tokens: int,
                        out_token_stride: int, out_batch_stride: int, gelu: bool, table: Tensor | None = None) -> None:
    ext, dev, stream = _launch_ctx(x)
    K, n = x.shape[-1], w.shape[0]
    b32 = _f32(bias)
    t32 = _f32(table)
    tiles = "" if t32 is not None else sm90_tiles("gelu" if gelu else "bias")
    ws_bytes = ext.linear_sm90_workspace(batch, tokens, K, n, out_token_stride, out_batch_stride, gelu,
                                         aux is not None, t32 is not None, tiles)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes else None
    ext.linear_sm90(dev, stream, x.data_ptr(), w.data_ptr(), _ptr(b32), out.data_ptr(), _ptr(aux), _ptr(t32),
                    _ptr(ws), ws_bytes, batch, tokens, K, n, out_token_stride, out_batch_stride, gelu, tiles)


def _linear_table_impl(x: Tensor, w: Tensor, bias, table: Tensor) -> Tensor:
    """x [B, T, K] -> x @ w^T + bias + table[t] [B, T, n] in x's dtype: one GEMM, bias and table in its epilogue
    (fp32, one rounding)."""
    B, T, K = x.shape
    n = w.shape[0]
    if x.is_cuda:
        out = _empty((B, T, n), x.dtype, x.device)
        if B * T:
            _linear_sm90_launch(x.contiguous(), w.to(x.dtype).contiguous(), bias, out, None, B, T, n, T * n, False,
                                table)
        return out
    acc = acc_dtype(x.dtype)
    u = x.to(acc) @ w.detach().to(acc).t() + table.to(acc)
    if bias is not None:
        u = u + bias.detach().to(acc)
    return u.to(x.dtype)


def _linear_gelu_impl(x: Tensor, w: Tensor, bias, save_preact: bool) -> tuple[Tensor, Tensor]:
    """x [R, K] -> (gelu(x @ w^T + bias), the pre-activation or an empty tensor), one GEMM with the epilogue."""
    R, K = x.shape
    n = w.shape[0]
    if x.is_cuda:
        xc, wc = x.contiguous(), w.to(x.dtype).contiguous()
        a = _empty((R, n), x.dtype, x.device)
        z = _empty((R, n), x.dtype, x.device) if save_preact else x.new_empty(0)
        if R:
            _linear_sm90_launch(xc, wc, bias, a, z if save_preact else None, 1, R, n, R * n, True)
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
            _linear_sm90_launch(ac, wc, bias, out, None, N, T, token_stride * D, image_stride * D, False)
        return
    acc = acc_dtype(a.dtype)
    o = a.to(acc) @ w.detach().to(acc).t()
    if bias is not None:
        o = o + bias.detach().to(acc)
    view.copy_(o.to(dst.dtype))


# ----------------------------------------------------------------------------
# patch embedding: forward / setup / backward shared by the custom op and the Function
# ----------------------------------------------------------------------------


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
    if _use_sm90(X, "patch_embed", Kp, g.D):
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


# ----------------------------------------------------------------------------
# merge + LayerNorm
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# bias + GELU
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# torch custom ops (visible to torch.compile)
# ----------------------------------------------------------------------------


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


@torch.library.custom_op("megavlm::scatter_rows_", mutates_args={"dst"})
def scatter_rows_op(dst: Tensor, index: Tensor, src: Tensor) -> None:
    """In place dst[index[k]] = src[k] (no autograd here; see ScatterRowsFunction)."""
    _scatter_rows_impl_(dst, index, src)


@scatter_rows_op.register_fake
def _(dst, index, src):
    return None


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


# ----------------------------------------------------------------------------
# autograd.Function classes (eager), same forward/backward code as the custom ops
# ----------------------------------------------------------------------------


class PatchEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pixels, weight, bias, pos, class_emb, mean, std, out_dtype):
        out = _patch_embed_forward(pixels, weight, bias, pos, class_emb, mean, std, out_dtype)
        _patch_embed_setup_context(ctx, (pixels, weight, bias, pos, class_emb, mean, std, out_dtype), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _patch_embed_backward(ctx, grad)


class MergeLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, merge, eps):
        y = _merge_layernorm_impl(x, weight, bias, merge, eps)
        _merge_layernorm_setup_context(ctx, (x, weight, bias, merge, eps), y)
        return y

    @staticmethod
    def backward(ctx, gy):
        return _merge_layernorm_backward(ctx, gy)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, bias):
        out = _bias_gelu_impl(z, bias)
        _bias_gelu_setup_context(ctx, (z, bias), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _bias_gelu_backward(ctx, grad)


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


# ----------------------------------------------------------------------------
# composite fused paths
# ----------------------------------------------------------------------------


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
    sm90 = _use_sm90(y2, "projector", Fdim, w1.shape[0], w2.shape[0])
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


def scatter_rows_fused(dst: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """In place ``dst[index[k]] = src[k]``; returns dst (autograd-aware)."""
    if torch.is_grad_enabled() and (dst.requires_grad or src.requires_grad):
        return ScatterRowsFunction.apply(dst, index, src)
    torch.ops.megavlm.scatter_rows_(dst, index, src)
    return dst

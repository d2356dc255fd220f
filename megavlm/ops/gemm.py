"""Which GEMMs the fused patch embedding and projector use, and the launch of the Hopper (sm_90) CUTLASS GEMMs.

``MEGAVLM_FUSED_GEMM`` (or ``set_fused_gemm``): 'cublas' (torch.mm plus the epilogue kernels add_pos_bias, bias_gelu,
scatter_rows), 'cutlass' (the Hopper GEMMs with those epilogues inside, for both ops) or 'auto' (default: the Hopper
GEMMs for the ops where they were measured faster, on CUDA tensors). The Hopper GEMMs need bf16 on an sm_90 GPU, a
megavlm._C built with CUTLASS, and feature sizes that are multiples of 8; anything else stays on cuBLAS. On CPU
tensors 'cutlass' runs their torch emulation (the CPU tests of the row layouts and autograd).
"""

from __future__ import annotations

import os
import re

import torch
from torch import Tensor

from . import _ext
from ._launch import f32, launch_ctx, ptr

__all__ = [
    "fused_gemm",
    "gemms_label",
    "linear_sm90_launch",
    "set_fused_gemm",
    "sm90_gemm_unavailable_reason",
    "sm90_tiles",
    "use_sm90",
]

_GEMM_MODES = ("auto", "cublas", "cutlass")
_FUSED_GEMM: str | None = None  # None: $MEGAVLM_FUSED_GEMM, default 'auto'
# What 'auto' gives the Hopper GEMMs. The projector: its GELU and row store move into the GEMMs' epilogues, the
# forward into the embedding rows took 1.082 ms against cuBLAS + bias_gelu + scatter_rows' 1.221 ms on an H200
# (1.26x vs 1.11x the unfused 1.360 ms), 1.109 vs 1.226 ms on an H100. Not the patch embedding: its 577-token images
# (a prime) leave a ragged tile per image, and the GEMM with the position table in its epilogue took 0.151 ms against
# cuBLAS + add_pos_bias' 0.140 ms (H200; H100 0.159 vs 0.150 ms). `OUT=... bash benchmarks/gpu_check.sh`, its
# benchmarks/kernel_bench.py rows, 2026-11-27 (docs/kernels.md).
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
    ops = [op for op in ("projector", "patch_embed") if use_sm90(t, op)]
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


def use_sm90(t: Tensor, op: str, *dims: int) -> bool:
    """Whether op's ('projector' | 'patch_embed') GEMMs over ``t`` with these feature sizes take the Hopper path."""
    mode = fused_gemm()
    if mode == "cublas" or (mode == "auto" and (op not in _AUTO_SM90_OPS or not t.is_cuda)):
        return False
    # TMA: feature sizes multiples of 8 (16 bytes); the torch wrappers make every operand contiguous.
    if any(d % 8 for d in dims):
        return False
    return sm90_gemm_unavailable_reason(t) is None


def linear_sm90_launch(x: Tensor, w: Tensor, bias, out: Tensor, aux, batch: int, tokens: int,
                       out_token_stride: int, out_batch_stride: int, gelu: bool, table: Tensor | None = None) -> None:
    """One Hopper GEMM (``_C.linear_sm90``, see csrc/projector/gemm_sm90.h) on CUDA tensors: the epilogue named by
    gelu / aux / table, with the tiles $MEGAVLM_SM90_*_TILES picks (the table GEMM has one instantiation)."""
    ext, dev, stream = launch_ctx(x)
    K, n = x.shape[-1], w.shape[0]
    b32 = f32(bias)
    t32 = f32(table)
    tiles = "" if t32 is not None else sm90_tiles("gelu" if gelu else "bias")
    ws_bytes = ext.linear_sm90_workspace(batch, tokens, K, n, out_token_stride, out_batch_stride, gelu,
                                         aux is not None, t32 is not None, tiles)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes else None
    ext.linear_sm90(dev, stream, x.data_ptr(), w.data_ptr(), ptr(b32), out.data_ptr(), ptr(aux), ptr(t32),
                    ptr(ws), ws_bytes, batch, tokens, K, n, out_token_stride, out_batch_stride, gelu, tiles)

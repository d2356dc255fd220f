"""Pure-PyTorch reference implementations (the source of truth; used on CPU).

Every function here is differentiable with plain autograd and computes in the
requested dtype (float64 for gradchecks, float32 as the accuracy reference,
bf16/fp16 as the "unfused torch" path).

Conventions shared with the fused kernels (megavlm/ops/{patch_embed,projector,scatter}_op.py):

* ``patch_embed_ref``: pixels are uint8 HWC ``[B, H, W, C]``; the conv weight
  is stored as ``[D, C, p, p]`` (conv2d layout, as in megatron / HF); a patch
  vector is the normalized patch flattened in (C, ph, pw) order, so the result
  equals ``F.conv2d`` on the normalized NCHW image. Output ``[B, T, D]`` with
  ``T = P`` or ``1 + P`` when a class token is used (row 0 = class_emb + pos[0],
  no conv bias). ``pos`` may have T rows, or P rows (no position for the class
  token).
* ``projector_ref``: optional 2x2 token merge of a square token grid (merged
  vector = concat of the tokens at (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1)),
  optional LayerNorm over the (merged) feature dim, then
  Linear -> exact-erf GELU -> Linear.
* ``scatter_rows_ref``: ``dst[index[k]] = src[k]`` in place (like ``index_copy_``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PatchEmbedGeometry",
    "check_patch_embed_args",
    "check_projector_args",
    "check_scatter_rows_args",
    "fold_normalization",
    "merge_tokens_ref",
    "patch_embed_conv2d",
    "patch_embed_folded_ref",
    "patch_embed_ref",
    "patchify_ref",
    "projector_ref",
    "scatter_rows_ref",
    "unmerge_tokens_ref",
]

# OpenAI CLIP preprocessing constants (used by LLaVA's CLIP ViT-L/14-336 tower).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_float_list(values, channels: int, name: str) -> list[float]:
    """mean/std as a list of ``channels`` Python floats (a scalar or length-1 value broadcasts)."""
    if isinstance(values, Tensor):
        values = values.detach().reshape(-1).tolist()
    elif isinstance(values, (int, float)):
        values = [values]
    vals = [float(v) for v in values]
    if len(vals) == 1 and channels != 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ValueError(f"{name} must have {channels} values (one per channel), got {len(vals)}")
    return vals


class PatchEmbedGeometry:
    """Shapes derived from the patch-embedding arguments."""

    __slots__ = ("B", "H", "W", "C", "D", "p", "gh", "gw", "P", "T", "K", "cls_rows", "pos_rows")

    def __init__(self, B, H, W, C, D, p, cls_rows, pos_rows):
        self.B, self.H, self.W, self.C, self.D, self.p = B, H, W, C, D, p
        self.gh, self.gw = H // p, W // p
        self.P = self.gh * self.gw
        self.cls_rows = cls_rows
        self.T = cls_rows + self.P
        self.K = C * p * p
        self.pos_rows = pos_rows


def check_patch_embed_args(pixels: Tensor, weight: Tensor, bias, pos, class_emb) -> PatchEmbedGeometry:
    """Validate shapes/dtypes; raises ValueError with a clear message."""
    if not isinstance(pixels, Tensor) or pixels.dim() != 4:
        raise ValueError(f"pixels must be a uint8 tensor [B, H, W, C], got shape {getattr(pixels, 'shape', None)}")
    if pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8 (HWC, 0..255), got {pixels.dtype}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be a conv2d weight [D, C, p, p], got {tuple(weight.shape)}")
    B, H, W, C = pixels.shape
    D, Cw, p, _ = weight.shape
    if Cw != C:
        raise ValueError(f"weight has {Cw} input channels but pixels have {C}")
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not divisible by the patch size {p}")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must be [D={D}], got {tuple(bias.shape)}")
    cls_rows = 0
    if class_emb is not None:
        if class_emb.numel() != D:
            raise ValueError(f"class_emb must have D={D} elements, got shape {tuple(class_emb.shape)}")
        cls_rows = 1
    P = (H // p) * (W // p)
    T = cls_rows + P
    pos_rows = 0
    if pos is not None:
        if pos.shape[-1] != D or pos.numel() % D:
            raise ValueError(f"pos must be [T, D] with D={D}, got {tuple(pos.shape)}")
        pos_rows = pos.numel() // D
        if pos.dim() == 3 and pos.shape[0] != 1:
            raise ValueError(f"pos must be [T, D] or [1, T, D], got {tuple(pos.shape)}")
        if pos_rows not in (T, P):
            raise ValueError(f"pos has {pos_rows} rows; expected {T} (1+P with class token) or {P} (patches only)")
    for name, t in (("weight", weight), ("bias", bias), ("pos", pos), ("class_emb", class_emb)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return PatchEmbedGeometry(B, H, W, C, D, p, cls_rows, pos_rows)


def patchify_ref(x: Tensor, patch: int) -> Tensor:
    """[B, H, W, C] -> [B, P, C*p*p] with patch vectors flattened in (C, ph, pw) order."""
    B, H, W, C = x.shape
    gh, gw = H // patch, W // patch
    return x.reshape(B, gh, patch, gw, patch, C).permute(0, 1, 3, 5, 2, 4).reshape(B, gh * gw, C * patch * patch)


def _add_class_and_pos(y: Tensor, pos, class_emb, dt: torch.dtype) -> Tensor:
    B, P, D = y.shape
    if class_emb is not None:
        y = torch.cat([class_emb.to(dt).reshape(1, 1, D).expand(B, 1, D), y], dim=1)
    if pos is not None:
        pos2 = pos.to(dt).reshape(-1, D)
        if pos2.shape[0] == y.shape[1]:
            y = y + pos2
        else:  # P rows: no position embedding on the class token
            y = torch.cat([y[:, :1], y[:, 1:] + pos2], dim=1)
    return y


def patch_embed_ref(
    pixels: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    pos: Tensor | None = None,
    class_emb: Tensor | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """uint8 [B,H,W,C] -> [B, (1+)P, D] patch tokens; see the module docstring."""
    g = check_patch_embed_args(pixels, weight, bias, pos, class_emb)
    dt = out_dtype or weight.dtype
    acc = acc_dtype(dt)
    m = torch.tensor(as_float_list(mean, g.C, "mean"), dtype=acc, device=pixels.device)
    s = torch.tensor(as_float_list(std, g.C, "std"), dtype=acc, device=pixels.device)
    x = ((pixels.to(acc) / 255.0 - m) / s).to(dt)
    patches = patchify_ref(x, g.p)
    y = F.linear(patches, weight.reshape(g.D, g.K).to(dt), None if bias is None else bias.to(dt))
    return _add_class_and_pos(y, pos, class_emb, dt)


def patch_embed_conv2d(
    pixels: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    pos: Tensor | None = None,
    class_emb: Tensor | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """The unfused torch formulation (HF ``CLIPVisionEmbeddings`` style), used as the
    baseline: uint8 HWC -> float NCHW -> normalize -> cast -> ``F.conv2d`` ->
    flatten/transpose -> class-token concat -> + positions. Same result as
    ``patch_embed_ref``."""
    g = check_patch_embed_args(pixels, weight, bias, pos, class_emb)
    dt = out_dtype or weight.dtype
    acc = acc_dtype(dt)
    m = torch.tensor(as_float_list(mean, g.C, "mean"), dtype=acc, device=pixels.device).view(1, g.C, 1, 1)
    s = torch.tensor(as_float_list(std, g.C, "std"), dtype=acc, device=pixels.device).view(1, g.C, 1, 1)
    x = pixels.permute(0, 3, 1, 2).to(acc)
    x = ((x / 255.0 - m) / s).to(dt)
    y = F.conv2d(x, weight.to(dt), None if bias is None else bias.to(dt), stride=g.p)
    y = y.flatten(2).transpose(1, 2)
    return _add_class_and_pos(y, pos, class_emb, dt)


def fold_normalization(weight: Tensor, bias: Tensor | None, mean: Sequence[float], std: Sequence[float]):
    """Fold ``(x/255 - m)/s`` into the projection: returns (W', b') with

        W' = W / (255 s_c)                 (per input channel c)
        b' = b - sum_{c,ph,pw} W[:, c, ph, pw] * m_c / s_c

    so that ``W'·x_raw + b' == W·((x_raw/255 - m)/s) + b`` for raw pixel
    patches. Differentiable: gradients flow back to the original W and b.
    """
    C = weight.shape[1]
    acc = weight.dtype
    m = torch.tensor(as_float_list(mean, C, "mean"), dtype=acc, device=weight.device)
    s = torch.tensor(as_float_list(std, C, "std"), dtype=acc, device=weight.device)
    w_f = weight / (255.0 * s).view(1, C, 1, 1)
    shift = (weight * (m / s).view(1, C, 1, 1)).sum(dim=(1, 2, 3))
    b_f = -shift if bias is None else bias - shift
    return w_f, b_f


def patch_embed_folded_ref(pixels, weight, bias=None, pos=None, class_emb=None, mean=CLIP_MEAN, std=CLIP_STD,
                           out_dtype=None):
    """Same result as ``patch_embed_ref`` computed with the folded weights on raw 0..255 patches."""
    g = check_patch_embed_args(pixels, weight, bias, pos, class_emb)
    dt = out_dtype or weight.dtype
    w_f, b_f = fold_normalization(weight, bias, mean, std)
    raw = patchify_ref(pixels.to(dt), g.p)
    y = F.linear(raw, w_f.reshape(g.D, g.K).to(dt), b_f.to(dt))
    return _add_class_and_pos(y, pos, class_emb, dt)


def grid_width(tokens: int) -> int:
    """Width of the square token grid used by the 2x2 merge (raises ValueError if not square/even)."""
    w = math.isqrt(int(tokens))
    if w * w != tokens or w % 2:
        raise ValueError(f"2x2 token merge needs a square token grid with even side; got {tokens} tokens")
    return w


def merge_tokens_ref(x: Tensor) -> Tensor:
    """2x2 pixel-shuffle merge: [N, h*w, D] -> [N, h*w/4, 4D]."""
    N, T, D = x.shape
    w = grid_width(T)
    h = T // w
    return x.reshape(N, h // 2, 2, w // 2, 2, D).permute(0, 1, 3, 2, 4, 5).reshape(N, T // 4, 4 * D)


def unmerge_tokens_ref(v: Tensor) -> Tensor:
    """Inverse of ``merge_tokens_ref``: [N, T/4, 4D] -> [N, T, D]."""
    N, Tq, F4 = v.shape
    D = F4 // 4
    T = 4 * Tq
    w = grid_width(T)
    h = T // w
    return v.reshape(N, h // 2, w // 2, 2, 2, D).permute(0, 1, 3, 2, 4, 5).reshape(N, T, D)


def check_projector_args(x, ln_weight, ln_bias, merge, w1, b1, w2, b2, act) -> None:
    if act not in ("gelu",):
        raise ValueError(f"unsupported activation {act!r}; only exact 'gelu' is implemented")
    if x.dim() != 3:
        raise ValueError(f"x must be [N, T, Din], got {tuple(x.shape)}")
    N, T, Din = x.shape
    Fdim = Din
    if merge:
        grid_width(T)
        Fdim = 4 * Din
    if ln_weight is None and ln_bias is not None:
        raise ValueError("ln_bias given without ln_weight")
    if ln_weight is not None and tuple(ln_weight.shape) != (Fdim,):
        raise ValueError(f"ln_weight must be [{Fdim}], got {tuple(ln_weight.shape)}")
    if ln_bias is not None and tuple(ln_bias.shape) != (Fdim,):
        raise ValueError(f"ln_bias must be [{Fdim}], got {tuple(ln_bias.shape)}")
    if w1.dim() != 2 or w1.shape[1] != Fdim:
        raise ValueError(f"w1 must be [Dh, {Fdim}], got {tuple(w1.shape)}")
    Dh = w1.shape[0]
    if b1 is not None and tuple(b1.shape) != (Dh,):
        raise ValueError(f"b1 must be [{Dh}], got {tuple(b1.shape)}")
    if w2.dim() != 2 or w2.shape[1] != Dh:
        raise ValueError(f"w2 must be [Dout, {Dh}], got {tuple(w2.shape)}")
    if b2 is not None and tuple(b2.shape) != (w2.shape[0],):
        raise ValueError(f"b2 must be [{w2.shape[0]}], got {tuple(b2.shape)}")


def projector_ref(
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
) -> Tensor:
    """[N, T, Din] -> [N, T' (= T/4 if merge), Dout], computed in x.dtype (LayerNorm statistics in fp32/fp64)."""
    check_projector_args(x, ln_weight, ln_bias, merge, w1, b1, w2, b2, act)
    dt = x.dtype
    if merge:
        x = merge_tokens_ref(x)
    if ln_weight is not None:
        acc = acc_dtype(dt)
        x = F.layer_norm(
            x.to(acc), (x.shape[-1],), ln_weight.to(acc), None if ln_bias is None else ln_bias.to(acc), eps
        ).to(dt)
    h = F.linear(x, w1.to(dt), None if b1 is None else b1.to(dt))
    h = F.gelu(h)
    return F.linear(h, w2.to(dt), None if b2 is None else b2.to(dt))


def check_scatter_rows_args(dst: Tensor, index: Tensor, src: Tensor) -> None:
    """dst [M, D], index [K], src [K, D]; raises ValueError with the shapes otherwise."""
    if dst.dim() != 2 or src.dim() != 2 or index.dim() != 1:
        raise ValueError(
            f"scatter_rows expects dst [M, D], index [K], src [K, D]; got {tuple(dst.shape)}, "
            f"{tuple(index.shape)}, {tuple(src.shape)}"
        )
    if src.shape[0] != index.shape[0] or src.shape[1] != dst.shape[1]:
        raise ValueError(f"shape mismatch: dst {tuple(dst.shape)}, index {tuple(index.shape)}, src {tuple(src.shape)}")


def scatter_rows_ref(dst: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """In place ``dst[index[k], :] = src[k, :]`` (indices unique, in [0, M)); returns dst."""
    check_scatter_rows_args(dst, index, src)
    return dst.index_copy_(0, index.to(torch.int64), src.to(dst.dtype))

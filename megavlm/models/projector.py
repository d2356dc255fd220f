"""The vision→language projector, built from a ``shapes.ProjectorArch``: megatron-core's MultimodalProjector
(``mlp``: Linear, GELU, Linear; or ``affine``: one Linear), optionally after a 2×2 token merge (InternVL's pixel
shuffle of the token grid, or Qwen2-VL's runs of 4 consecutive tokens) with a norm on each token before it (Qwen2-VL)
or a LayerNorm on its merged input (InternVL), and before all that an optional 2×2 pooling of each crop's token grid
(``model.projector.pool``: ``avg2x2`` or ``shuffle2x2``, any family); or Qwen-VL's cross-attention resampler
(``resampler``: a fixed number of learned queries attend to the features)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import make_viewless_tensor

from ..ops.reference import grid_width, merge_tokens_ref
from .specs import ColumnLinear, RowLinear


def pool_tokens(x: torch.Tensor, pool: str) -> torch.Tensor:
    """2×2 pooling of each crop's square token grid (row-major), ``(n, h·w, c)`` → ``(n, h/2·w/2, c')``: ``avg2x2``
    averages each 2×2 block (c' = c); ``shuffle2x2`` concatenates it (c' = 4c) in Phi-3-Vision's order, the tokens at
    (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1) — InternVL's pixel-shuffle order, the same function."""
    if pool == "shuffle2x2":
        return merge_tokens_ref(x)
    if pool != "avg2x2":
        raise ValueError(f"pool={pool!r}: avg2x2 or shuffle2x2")
    n, t, c = x.shape
    w = grid_width(t)
    grid = x.reshape(n, t // w, w, c).permute(0, 3, 1, 2)  # (n, c, h, w)
    return F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)


class Projector(MultimodalProjector):
    """Input ``(t, n, d_vision)`` → ``(t', n, h)`` with ``t' = t / merge²``. TP-split like an MLP (fc1 column-,
    fc2 row-parallel); the merge and the LayerNorm run whole on every TP rank (their input is replicated)."""

    def __init__(self, config, arch):
        if arch.merge not in (1, 2):
            raise ValueError(f"projector merge={arch.merge}: only 2×2 (2) or none (1)")
        if arch.merge_layout not in ("grid", "blocks"):
            raise ValueError(f"projector merge_layout={arch.merge_layout!r}: grid or blocks")
        if arch.kind == "mlp" and arch.inner_size != config.ffn_hidden_size:
            config = dataclasses.replace(config, ffn_hidden_size=arch.inner_size)  # megatron's MLP reads its width here
        super().__init__(config, MLPSubmodules(linear_fc1=ColumnLinear, linear_fc2=RowLinear),
                         arch.kind, arch.input_size)
        self.merge, self.merge_layout, self.pool = arch.merge, arch.merge_layout, arch.pool
        self.layer_norm = torch.nn.LayerNorm(arch.input_size) if arch.pre_norm else None
        norms = {"layer_norm": torch.nn.LayerNorm, "rms_norm": torch.nn.RMSNorm}
        self.token_norm = (norms[arch.token_norm](arch.vision_size, eps=arch.norm_eps) if arch.token_norm else None)

    def tokens(self, vision_tokens: int) -> int:
        """Tokens out of ``vision_tokens`` feature tokens of one crop."""
        return vision_tokens // (1 if self.pool == "none" else 4) // self.merge ** 2

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, t, d_vision)`` features → ``(n, t', input_size)``: the token norm, the pool, the merge and the
        LayerNorm (what the fused projector op does in its first step)."""
        if self.token_norm is not None:
            x = self.token_norm(x)
        if self.pool != "none":
            x = pool_tokens(x, self.pool)
        if self.merge == 2 and self.merge_layout == "grid":
            x = merge_tokens_ref(x)  # HF InternVL's pixel_shuffle(scale_factor=0.5) order (tests/ops)
        elif self.merge == 2:  # Qwen2-VL's PatchMerger: each run of 4 tokens is one 2×2 block of patches
            x = x.reshape(x.shape[0], x.shape[1] // 4, 4 * x.shape[2])
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge > 1 or self.pool != "none" or self.layer_norm is not None or self.token_norm is not None:
            x = self.prepare(x.transpose(0, 1)).transpose(0, 1).contiguous()  # (t', n, input)
        if self.projector_type == "affine" and self.tp_group.size() > 1:
            # megatron's affine projector gathers the Linear's output over TP but adds the bias it gets back with
            # skip_bias_add, which is this rank's shard only (a shape error at TP > 1): gather the bias too
            out, bias = self.encoder(x)
            if bias is not None:
                out = out + tensor_parallel.gather_from_tensor_model_parallel_region(bias)
            return make_viewless_tensor(inp=out, requires_grad=True, keep_graph=True)
        return super().forward(x)


def build_projector(config, arch):
    """The projector ``arch`` describes: :class:`Resampler` for ``kind="resampler"``, else :class:`Projector`."""
    return Resampler(config, arch) if arch.kind == "resampler" else Projector(config, arch)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos positions ``(grid², dim)`` of a ``grid × grid`` token grid in row-major order (MAE's
    ``get_2d_sincos_pos_embed``, which Qwen-VL's resampler uses): the first half encodes the column, the second the
    row, each as ``[sin(p·ω), cos(p·ω)]`` with ``ω_i = 10000^(-i / (dim/4))``. fp32."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def one(p):
        out = p.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()


def key_positions(dim: int, tokens: int) -> torch.Tensor:
    """2D sin-cos positions of ``tokens`` feature tokens: the last ``g²`` on a ``g × g`` grid (the patches), a leading
    class token (``tokens = g² + 1``) at zero."""
    import math

    g = math.isqrt(tokens)
    if g * g == tokens:
        return sincos_2d(dim, g)
    g = math.isqrt(tokens - 1)
    if g * g != tokens - 1:
        raise ValueError(f"the resampler needs a square grid of feature tokens (g² or g² + 1), got {tokens}")
    return torch.cat([torch.zeros(1, dim), sincos_2d(dim, g)])


class Resampler(MegatronModule):
    """Qwen-VL's cross-attention resampler (``shapes.ProjectorArch(kind="resampler")``): ``queries`` learnable queries
    attend, in one multi-head cross-attention layer, to an image's feature tokens, so any image gives the same number
    of tokens. Features → (a bias-free Linear to the LLM width when the widths differ) → LayerNorm (``ln_kv``); queries
    → LayerNorm (``ln_q``); fixed 2D sin-cos positions added to the queries (their ``√queries`` grid) and the keys (the
    features' grid: computed at that grid, where Qwen-VL interpolates its query table bicubically), not to the values;
    attention as ``torch.nn.MultiheadAttention`` (q/k/v and output projections with biases).

    TP: the q/k/v projections are column-parallel and the output projection row-parallel, so each rank holds
    ``heads / tp`` heads (as megatron's attention); the queries, the norms and the input Linear are replicated (their
    input is)."""

    def __init__(self, config, arch):
        super().__init__(config=config)
        from megatron.core import parallel_state

        h, dt = arch.hidden_size, config.params_dtype
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if arch.heads % tp or h % arch.heads:
            raise ValueError(f"resampler: {arch.heads} heads must divide the width {h} and be divisible by TP={tp}")
        self.num_queries, self.heads, self.local_heads = arch.queries, arch.heads, arch.heads // tp
        self.query = torch.nn.Parameter(torch.empty(arch.queries, h, dtype=dt))
        if config.perform_initialization:
            with torch.no_grad():
                torch.nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = (torch.nn.Linear(arch.vision_size, h, bias=False, dtype=dt) if arch.vision_size != h
                        else None)
        self.ln_q = torch.nn.LayerNorm(h, eps=arch.norm_eps, dtype=dt)
        self.ln_kv = torch.nn.LayerNorm(h, eps=arch.norm_eps, dtype=dt)
        kw = dict(config=config, init_method=config.init_method, bias=True)
        self.linear_q, self.linear_k, self.linear_v = (
            ColumnLinear(h, h, gather_output=False, skip_bias_add=False, **kw) for _ in range(3))
        self.linear_proj = RowLinear(h, h, input_is_parallel=True, skip_bias_add=False,
                                             config=config, init_method=config.output_layer_init_method, bias=True)

    def tokens(self, vision_tokens: int) -> int:
        return self.num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(t, n, d_vision)`` features of n images → ``(queries, n, h)``."""
        t, n, _ = x.shape
        if self.kv_proj is not None:
            x = self.kv_proj(x)
        x = self.ln_kv(x)
        h = x.shape[-1]
        q = self.ln_q(self.query)
        pos_q = sincos_2d(h, int(self.num_queries ** 0.5)).to(x.device, x.dtype)
        pos_k = key_positions(h, t).to(x.device, x.dtype)
        q_in = (q + pos_q).unsqueeze(1).expand(-1, n, -1)  # (Q, n, h)
        k_in = x + pos_k.unsqueeze(1)

        def heads(lin, inp):  # (s, n, h) → (n, heads/tp, s, hn)
            out, _ = lin(inp)
            return out.view(inp.shape[0], n, self.local_heads, -1).permute(1, 2, 0, 3)

        a = F.scaled_dot_product_attention(heads(self.linear_q, q_in), heads(self.linear_k, k_in),
                                           heads(self.linear_v, x))  # (n, heads/tp, Q, hn)
        a = a.permute(2, 0, 1, 3).reshape(self.num_queries, n, -1)
        out, _ = self.linear_proj(a)
        return out

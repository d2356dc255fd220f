"""A plain-PyTorch reference of Qwen-VL's resampler (``torch.nn.MultiheadAttention``, MAE's numpy 2D sin-cos
positions) and the copying of its weights into megavlm's TP-split ``Resampler`` (used in-process and by the TP=2
worker)."""

from __future__ import annotations

import numpy as np
import torch


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE's ``get_2d_sincos_pos_embed`` (what Qwen-VL's resampler uses), written independently of megavlm's."""
    g = np.arange(grid, dtype=np.float64)
    mesh = np.stack(np.meshgrid(g, g), axis=0).reshape(2, 1, grid, grid)  # (w, h) order, as MAE
    return torch.from_numpy(np.concatenate([sincos_1d(dim // 2, mesh[0]), sincos_1d(dim // 2, mesh[1])], 1)).float()


class RefResampler(torch.nn.Module):
    def __init__(self, d_vision: int, hidden: int, queries: int, heads: int, eps: float = 1e-6):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(queries, hidden) * 0.5)
        self.kv_proj = torch.nn.Linear(d_vision, hidden, bias=False) if d_vision != hidden else torch.nn.Identity()
        self.ln_q, self.ln_kv = torch.nn.LayerNorm(hidden, eps=eps), torch.nn.LayerNorm(hidden, eps=eps)
        self.attn = torch.nn.MultiheadAttention(hidden, heads)
        self.grid = int(round(queries ** 0.5))
        with torch.no_grad():  # everything random, norms around 1
            for name, p in self.named_parameters():
                if name.startswith("ln_"):
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
                elif name != "query":
                    p.normal_(0, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, t, d_vision)`` → ``(n, queries, hidden)``; ``t`` is a square number (the features' grid)."""
        n, t, _ = x.shape
        h = self.query.shape[1]
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        q = self.ln_q(self.query) + sincos_2d(h, self.grid)
        k = x + sincos_2d(h, int(round(t ** 0.5))).unsqueeze(1)
        return self.attn(q.unsqueeze(1).expand(-1, n, -1), k, x, need_weights=False)[0].permute(1, 0, 2)


def load_into(ours, ref: RefResampler, tp_rank: int = 0, tp: int = 1) -> None:
    """Copy the reference's weights into megavlm's ``Resampler`` (this TP rank's shard of each split weight)."""
    h = ref.query.shape[1]
    w_q, w_k, w_v = ref.attn.in_proj_weight.detach().chunk(3)
    b_q, b_k, b_v = ref.attn.in_proj_bias.detach().chunk(3)
    rows = slice(tp_rank * h // tp, (tp_rank + 1) * h // tp)
    with torch.no_grad():
        ours.query.copy_(ref.query)
        if ours.kv_proj is not None:
            ours.kv_proj.weight.copy_(ref.kv_proj.weight)
        for a, b in ((ours.ln_q, ref.ln_q), (ours.ln_kv, ref.ln_kv)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        for lin, w, b in ((ours.linear_q, w_q, b_q), (ours.linear_k, w_k, b_k), (ours.linear_v, w_v, b_v)):
            lin.weight.copy_(w[rows])
            lin.bias.copy_(b[rows])
        ours.linear_proj.weight.copy_(ref.attn.out_proj.weight[:, rows])
        ours.linear_proj.bias.copy_(ref.attn.out_proj.bias)


def grad_pairs(ours, ref: RefResampler, tp_rank: int = 0, tp: int = 1):
    """(name, our gradient, the reference's gradient of the same shard) for every parameter."""
    h = ref.query.shape[1]
    rows = slice(tp_rank * h // tp, (tp_rank + 1) * h // tp)
    gw, gb = ref.attn.in_proj_weight.grad.chunk(3), ref.attn.in_proj_bias.grad.chunk(3)
    out = [("query", ours.query.grad, ref.query.grad)]
    if ours.kv_proj is not None:
        out.append(("kv_proj", ours.kv_proj.weight.grad, ref.kv_proj.weight.grad))
    for name in ("ln_q", "ln_kv"):
        a, b = getattr(ours, name), getattr(ref, name)
        out += [(f"{name}.weight", a.weight.grad, b.weight.grad), (f"{name}.bias", a.bias.grad, b.bias.grad)]
    for i, name in enumerate(("linear_q", "linear_k", "linear_v")):
        lin = getattr(ours, name)
        out += [(f"{name}.weight", lin.weight.grad, gw[i][rows]), (f"{name}.bias", lin.bias.grad, gb[i][rows])]
    out += [("linear_proj.weight", ours.linear_proj.weight.grad, ref.attn.out_proj.weight.grad[:, rows]),
            ("linear_proj.bias", ours.linear_proj.bias.grad, ref.attn.out_proj.bias.grad)]
    return out


def compare(tp_rank: int = 0, tp: int = 1, d_vision: int = 24, hidden: int = 32, queries: int = 16, heads: int = 4,
            tokens: int = 36, images: int = 3, seed: int = 0) -> dict:
    """Outputs and gradients (parameters and input) of megavlm's ``Resampler`` at this TP rank against the reference:
    the largest absolute differences."""
    from megavlm.models.projector import Resampler
    from megavlm.shapes import ProjectorArch

    torch.manual_seed(seed)
    ref = RefResampler(d_vision, hidden, queries, heads)
    x = torch.randn(images, tokens, d_vision)
    grad_out = torch.randn(images, queries, hidden)
    cfg = _config(hidden, heads, tp)
    ours = Resampler(cfg, ProjectorArch("resampler", d_vision, hidden, queries=queries, heads=heads, norm_eps=1e-6))
    load_into(ours, ref, tp_rank, tp)
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = ref(xr)
    want.backward(grad_out)
    got = ours(xo.transpose(0, 1).contiguous()).transpose(0, 1)
    got.backward(grad_out)
    diffs = {"output": (got - want).abs().max().item(), "input grad": (xo.grad - xr.grad).abs().max().item()}
    for name, a, b in grad_pairs(ours, ref, tp_rank, tp):
        diffs[name] = (a - b).abs().max().item()
    diffs["scale"] = want.abs().max().item()
    return diffs


def _config(hidden: int, heads: int, tp: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=heads, tensor_model_parallel_size=tp,
                             use_cpu_initialization=True, add_bias_linear=True, gradient_accumulation_fusion=False,
                             params_dtype=torch.float32, pipeline_dtype=torch.float32)

"""LongRoPE (Phi-3's long-context rotary embedding; megatron-core 0.19 has none) as a rotary embedding of ours that
takes the place of GPTModel's ``rotary_pos_emb`` (same interface as megatron's ``RotaryEmbedding``: called with the
sequence length, returns the angles ``(s, 1, 1, rotary dim)`` that megatron's attention applies).

The frequencies are plain RoPE's divided per frequency by ``short_factor``, or by ``long_factor`` when the sequence
is longer than ``original_max_positions`` (transformers' ``_compute_longrope_parameters``, the same float32 ops); the
attention factor multiplies cos and sin, which megatron applies as its rotary ``mscale``
(:func:`attention_factor_fields`). Like transformers, the choice is per forward pass: a sequence longer than
``original_max_positions`` uses the long factors at every position. Under a KV cache megatron asks for the cache's
length, so a generation whose cache is longer than ``original_max_positions`` uses the long factors from its first
token (transformers switches when the text crosses that length).
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


class LongRoPE(RotaryEmbedding):
    def __init__(self, kv_channels: int, rotary_percent: float, rotary_base: float, short_factor, long_factor,
                 original_max_positions: int):
        super().__init__(kv_channels, rotary_percent, rotary_base=int(rotary_base), use_cpu_initialization=True)
        dim = int(kv_channels * rotary_percent) if rotary_percent < 1.0 else kv_channels
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        self.short_inv = 1.0 / (torch.tensor(short_factor, dtype=torch.float32) * rotary_base ** shape)
        self.long_inv = 1.0 / (torch.tensor(long_factor, dtype=torch.float32) * rotary_base ** shape)
        self.original_max_positions = int(original_max_positions)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
        inv = self.long_inv if max_seq_len > self.original_max_positions else self.short_inv
        seq = torch.arange(max_seq_len, dtype=torch.float32) + offset
        freqs = torch.outer(seq, inv)
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :].to(dev)


def attention_factor_fields(factor: float) -> dict:
    """TransformerConfig attributes whose rotary ``mscale`` is ``factor``: megatron's attention multiplies cos and sin
    by ``_yarn_get_concentration_factor(s, m, m_all) = (0.1·m·ln s + 1) / (0.1·m_all·ln s + 1)``; with s = e and
    m_all = 0 that is ``0.1·m + 1``. (The fields are megatron's YaRN ones; the decoder's rotary embedding stays
    ours.)"""
    return {"yarn_rotary_scaling_factor": math.e, "yarn_mscale": 10.0 * (float(factor) - 1.0),
            "yarn_mscale_all_dim": 0.0}

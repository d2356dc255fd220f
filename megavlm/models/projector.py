"""The vision→language projector, built from a ``shapes.ProjectorArch``: megatron-core's MultimodalProjector
(``mlp``: Linear, GELU, Linear; or ``affine``: one Linear), optionally after a 2×2 token merge (InternVL's pixel
shuffle of the token grid, or Qwen2-VL's runs of 4 consecutive tokens) with a norm on each token before it (Qwen2-VL)
or a LayerNorm on its merged input (InternVL)."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules

from ..ops.reference import merge_tokens_ref


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
        super().__init__(config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                         arch.kind, arch.input_size)
        self.merge, self.merge_layout = arch.merge, arch.merge_layout
        self.layer_norm = torch.nn.LayerNorm(arch.input_size) if arch.pre_norm else None
        norms = {"layer_norm": torch.nn.LayerNorm, "rms_norm": torch.nn.RMSNorm}
        self.token_norm = (norms[arch.token_norm](arch.vision_size, eps=arch.norm_eps) if arch.token_norm else None)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, t, d_vision)`` features → ``(n, t', input_size)``: the token norm, the merge and the LayerNorm (what
        the fused projector op does in its first step)."""
        if self.token_norm is not None:
            x = self.token_norm(x)
        if self.merge == 2 and self.merge_layout == "grid":
            x = merge_tokens_ref(x)  # HF InternVL's pixel_shuffle(scale_factor=0.5) order (tests/ops)
        elif self.merge == 2:  # Qwen2-VL's PatchMerger: each run of 4 tokens is one 2×2 block of patches
            x = x.reshape(x.shape[0], x.shape[1] // 4, 4 * x.shape[2])
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge > 1 or self.layer_norm is not None or self.token_norm is not None:
            x = self.prepare(x.transpose(0, 1)).transpose(0, 1).contiguous()  # (t', n, input)
        return super().forward(x)


def build_projector(config, arch) -> Projector:
    return Projector(config, arch)

"""The vision→language projector, built from a ``shapes.ProjectorArch``: megatron-core's MultimodalProjector
(``mlp``: Linear, GELU, Linear; or ``affine``: one Linear), optionally after a 2×2 token merge (InternVL's pixel
shuffle) and a LayerNorm on its input."""

from __future__ import annotations

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
        super().__init__(config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                         arch.kind, arch.input_size)
        self.merge = arch.merge
        self.layer_norm = torch.nn.LayerNorm(arch.input_size) if arch.pre_norm else None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, t, d_vision)`` features → ``(n, t', input_size)``: the merge and the LayerNorm (what the fused
        projector op does in its first step)."""
        if self.merge == 2:
            x = merge_tokens_ref(x)  # HF InternVL's pixel_shuffle(scale_factor=0.5) order (tests/ops)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge > 1 or self.layer_norm is not None:
            x = self.prepare(x.transpose(0, 1)).transpose(0, 1).contiguous()  # (t', n, input)
        return super().forward(x)


def build_projector(config, arch) -> Projector:
    return Projector(config, arch)

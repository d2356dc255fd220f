"""The vision→language projector: megatron-core's MultimodalProjector, ``mlp`` (Linear, GELU, Linear) or ``affine``
(one Linear) — a ``shapes.ProjectorArch``'s kind."""

from __future__ import annotations

from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules

def build_projector(config, kind: str, input_size: int) -> MultimodalProjector:
    """TP-split like an MLP: fc1 column-parallel, fc2 row-parallel. Input ``(t, n, d_vision)`` → ``(t, n, h)``."""
    return MultimodalProjector(
        config,
        MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        kind,
        input_size,
    )

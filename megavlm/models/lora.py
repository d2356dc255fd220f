"""LoRA (Hu et al. 2021) on megatron's tensor-parallel linear layers: ``y = W x + (alpha/rank)·B A x`` with ``W``
frozen and only ``A`` ``(rank, in)`` and ``B`` ``(out, rank)`` trained.

The split over tensor-parallel ranks follows Megatron-Bridge's ``ParallelLinearAdapter`` so that TP > 1 computes
what TP = 1 does:

* column-parallel base (``linear_qkv``, ``linear_fc1``; output split over TP): ``A`` is replicated, ``B`` is split
  on its output dim like ``W``. Every rank computes the whole ``h = A x`` ``(s, b, r)``; its gradient, which each
  rank holds a partial sum of (one slice of B each), is all-reduced (``copy_to_tensor_model_parallel_region``). With
  sequence parallelism the input is first all-gathered along the sequence.
* row-parallel base (``linear_proj``, ``linear_fc2``; input split over TP, output all-reduced): ``A`` is split on its
  input dim like ``W``, the partial ``A x`` is all-reduced, ``B`` is replicated; with sequence parallelism its output
  is split along the sequence as the base's reduce-scatter splits the base's.

Replicated factors compute identical gradients on every TP rank, so they need no extra reduction; the split ones
carry megatron's ``tensor_model_parallel`` attributes (grad norm, distributed optimizer) and are saved split
(``sharded_state_dict``), so checkpoints reshard over TP and PP like the base weights.

``B`` starts at zero (a fresh adapter leaves the model unchanged), ``A`` as PEFT's ``kaiming_uniform_(a=√5)`` on the
full-size factor from a generator seeded by the run seed and the layer's global name, then sliced: every TP/PP layout
starts from the same adapters. The adapters are classes built at spec time (``models/specs.py``), not patches.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

#: Parameter names of the factors on an adapted linear layer (state_dict keys ``<linear>.lora_a`` / ``.lora_b``).
A, B = "lora_a", "lora_b"


class _LoRAMixin:
    """Mixed into ColumnParallelLinear / RowParallelLinear (``lora_linear``); ``_lora`` (the LoRAConfig), ``_column``
    and ``_swiglu`` are class attributes set by the factory."""

    _lora = None
    _column = True
    _swiglu = False

    def _add_adapter(self, in_features: int, out_features: int) -> None:
        """Create ``lora_a`` / ``lora_b`` (this rank's share) for a base of full size ``out_features × in_features``;
        ``A`` is zero until :func:`init_adapters` gives it its start values."""
        cfg = self._lora
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.lora_rank, self.lora_scale, self.lora_full = cfg.rank, cfg.alpha / cfg.rank, (out_features, in_features)
        dtype, device = self.weight.dtype, self.weight.device
        if self._column:
            a = torch.zeros(cfg.rank, in_features, dtype=dtype, device=device)
            b = torch.zeros(out_features // tp, cfg.rank, dtype=dtype, device=device)
        else:
            a = torch.zeros(cfg.rank, in_features // tp, dtype=dtype, device=device)
            b = torch.zeros(out_features, cfg.rank, dtype=dtype, device=device)
        self.lora_a, self.lora_b = torch.nn.Parameter(a), torch.nn.Parameter(b)
        split = self.lora_b if self._column else self.lora_a
        tensor_parallel.set_tensor_model_parallel_attributes(split, True, 0 if self._column else 1, 1)
        self.lora_dropout = torch.nn.Dropout(cfg.dropout) if cfg.dropout else torch.nn.Identity()

    def reset_adapter(self, generator: torch.Generator) -> None:
        """``A`` = kaiming-uniform(a=√5) of the full-size ``(rank, in)`` factor (this rank's slice), ``B`` = 0."""
        full = torch.empty(self.lora_rank, self.lora_full[1], dtype=torch.float32)
        bound = 1.0 / math.sqrt(self.lora_full[1])  # kaiming_uniform_(a=√5) on (r, in): gain·√(3/fan_in) = 1/√in
        full.uniform_(-bound, bound, generator=generator)
        if not self._column:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            rank = parallel_state.get_tensor_model_parallel_rank()
            full = full.chunk(tp, dim=1)[rank]
        with torch.no_grad():
            self.lora_a.copy_(full)
            self.lora_b.zero_()

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's output on the base's input ``x`` (``(s, b, in)``, column base; ``(s, b, in/tp)``, row base;
        ``s`` the local share under sequence parallelism), shaped like the base's output."""
        x = self.lora_dropout(x)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        sp = tp > 1 and self.config.sequence_parallel
        if self._column:
            if sp:  # the whole sequence; the input's gradient is identical on every rank: split, not reduce-scatter
                x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            h = F.linear(x, self.lora_a)
            if tp > 1:  # each rank's B slice gives a partial gradient of h: all-reduce it in backward
                h = tensor_parallel.copy_to_tensor_model_parallel_region(h)
            return F.linear(h, self.lora_b) * self.lora_scale
        h = F.linear(x, self.lora_a)
        if tp > 1:
            h = tensor_parallel.reduce_from_tensor_model_parallel_region(h)
        y = F.linear(h, self.lora_b) * self.lora_scale
        if sp:
            y = tensor_parallel.scatter_to_sequence_parallel_region(y)
        return y

    def forward(self, input_, *args, **kwargs):
        out, bias = super().forward(input_, *args, **kwargs)
        return out + self._adapter(input_).to(out.dtype), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        axes = {"weight": 0, "bias": 0, B: 0} if self._column else {"weight": 1, A: 1}
        sd = make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, axes,
                                                 sharded_offsets, tp_group=self.tp_group)
        if self._swiglu and self.config.gated_linear_unit:
            # a rank's rows of a SwiGLU fc1 are [its gate rows; its up rows]: saved as megatron saves the weight (the
            # MLP's own sharded_state_dict), so the global B is [gate; up] at any TP
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
            from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

            metadata = ensure_metadata_has_dp_cp_group(metadata)
            sd[prefix + B] = apply_swiglu_sharded_factory(
                sd[prefix + B], sharded_offsets, (metadata or {}).get("singleton_local_shards", False),
                tp_group=self.tp_group, dp_group=metadata["dp_cp_group"])
        return sd


_CLASSES: dict = {}


def lora_linear(base: type, lora, column: bool, swiglu: bool = False) -> type:
    """``base`` (a ColumnParallelLinear (``column``) or RowParallelLinear class) with a LoRA adapter of ``lora`` (a
    LoRAConfig); ``swiglu``: the base is an MLP's ``linear_fc1``, [gate; up] when the MLP is gated."""
    key = (base, column, swiglu, lora.rank, lora.alpha, lora.dropout)
    if key not in _CLASSES:
        def __init__(self, input_size, output_size, *args, **kwargs):
            base.__init__(self, input_size, output_size, *args, **kwargs)
            self._add_adapter(input_size, output_size)

        _CLASSES[key] = type("LoRA" + base.__name__, (_LoRAMixin, base),
                             {"__init__": __init__, "_lora": lora, "_column": column, "_swiglu": swiglu})
    return _CLASSES[key]


def adapted(module: torch.nn.Module):
    """``(name, layer)`` of every adapted linear layer in ``module``."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _LoRAMixin)]


def init_adapters(model: torch.nn.Module, seed: int) -> None:
    """Give every adapter its start values from a generator seeded by ``seed`` and the layer's global name (the part,
    the transformer layer's global number, the linear), so any TP/PP layout starts from the same adapters."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    for name, layer in model.named_modules():
        if not isinstance(layer, TransformerLayer):
            continue
        part = name.split(".")[0]
        for sub, lin in adapted(layer):
            if lin.lora_a.is_meta:  # the converter's shape-only model
                continue
            key = f"{seed}:{part}:{layer.layer_number}:{sub}".encode()
            gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
            lin.reset_adapter(gen)


def is_adapter_key(name: str) -> bool:
    """Whether a state_dict key is a LoRA factor."""
    return name.endswith(("." + A, "." + B))


def merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """``W + (alpha/rank)·B A`` of full-size (TP = 1) tensors, computed in fp32, in ``weight``'s dtype."""
    return (weight.float() + (alpha / rank) * (b.float() @ a.float())).to(weight.dtype)

"""Layer specs and TransformerConfigs for the three parts of the VLM.

ModuleSpec picks the implementation (local / SDPA / Transformer Engine) so that no ``forward`` has a backend
branch. Local layers keep Transformer Engine's checkpoint names (``sharded_state_dict_keys_map``) so a checkpoint
moves between backends.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.vision.vit_layer_specs import _get_mlp_module_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """HF ``quick_gelu`` (OpenAI CLIP's activation)."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF ``gelu_pytorch_tanh``."""
    return F.gelu(x, approximate="tanh")


class Norm:
    """LayerNorm or RMSNorm (per ``config.normalization``) whose parameters carry ``sequence_parallel``.

    megatron's ``WrappedTorchNorm`` refuses sequence parallelism; with SP the norm weights see only a slice of the
    sequence, so their gradients must be all-reduced over TP, which ``finalize_model_grads`` does for parameters
    marked ``sequence_parallel``.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


class SDPAttention(MegatronModule):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash/mem-efficient kernels on
    GPU). Same interface as megatron's ``DotProductAttention``: query ``(sq, b, np, hn)``, key/value
    ``(sk, b, ng, hn)``; returns ``(sq, b, np*hn)``."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if packed_seq_params is not None:  # thd: (t, heads, hn), samples delimited by cu_seqlens
            return self._packed(query, key, value, packed_seq_params, mask_type == AttnMaskType.causal)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (b, heads, s, hn)
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None if attention_mask is None else ~attention_mask  # megatron masks True = drop
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal, scale=self.scale, enable_gqa=q.shape[1] != k.shape[1],
        )
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _packed(self, query, key, value, params, causal: bool):
        """Block-diagonal (causal) attention over a packed sequence: the mask Transformer Engine derives from
        ``cu_seqlens``. Returns ``(t, heads*hn)``."""
        t = query.shape[0]
        pos = torch.arange(t, device=query.device)
        seg = torch.bucketize(pos, params.cu_seqlens_q[1:].to(query.device), right=True)
        mask = seg[:, None] == seg[None, :]
        if causal:
            mask &= pos[:, None] >= pos[None, :]
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))  # (1, heads, t, hn)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.scale, enable_gqa=q.shape[1] != k.shape[1])
        return out.squeeze(0).permute(1, 0, 2).reshape(t, -1)


class LayerScaleBiasDropoutAdd(torch.nn.Module):
    """bias-dropout-add with layer scale: ``residual + dropout(weight * (x + bias))``, ``weight`` a learned
    per-channel vector (InternViT's ``lambda_1`` / ``lambda_2``; CaiT's LayerScale). It takes the place of megatron's
    ``get_bias_dropout_add`` in a layer spec (``self_attn_bda`` / ``mlp_bda``): called as ``bda(training, fused)``, it
    returns the function the layer applies. ``weight`` is replicated over TP (the branch output is whole there)."""

    def __init__(self, hidden_size: int, init_value: float = 0.1):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), float(init_value)))

    def forward(self, training: bool, fused: bool):
        def bda(x_with_bias, residual, prob):
            x, bias = x_with_bias
            x = x if bias is None else x + bias
            out = F.dropout(self.weight.to(x.dtype) * x, p=prob, training=training)
            return residual + out.to(residual.dtype)
        return bda


class _AllReduceSum(torch.autograd.Function):
    """Sum over the TP group in forward and in backward (a statistic every rank's output depends on)."""

    @staticmethod
    def forward(ctx, x):
        from megatron.core import parallel_state

        x = x.clone()
        torch.distributed.all_reduce(x, group=parallel_state.get_tensor_model_parallel_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        from megatron.core import parallel_state

        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad


class FullWidthRMSNorm(MegatronModule):
    """RMSNorm of q (or k) over all heads together, as InternViT's ``q_norm``/``k_norm`` (megatron's
    ``qk_layernorm`` normalizes each head on its own). Used as ``q_layernorm``/``k_layernorm`` of megatron's
    SelfAttention, which hands it ``(sq, b, heads/tp, hn)``: under TP each rank holds some heads, so the sum of squares
    is summed over the TP group (forward and backward) before normalizing, and ``weight`` is split with the heads
    (axis 0, as the q rows of ``linear_qkv``). Statistics in fp32, as HF's."""

    #: HF's ``InternVLVisionRMSNorm(embed_dim)`` keeps its default eps, whatever the encoder's ``layer_norm_eps``.
    EPS = 1e-6

    def __init__(self, config: TransformerConfig, hidden_size: int, **_unused):
        super().__init__(config=config)
        from megatron.core import parallel_state

        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.full_width = config.num_attention_heads * config.kv_channels
        self.eps = self.EPS
        self.weight = torch.nn.Parameter(torch.ones(self.full_width // self.tp, dtype=config.params_dtype))
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(*shape[:-2], shape[-2] * shape[-1]).float()
        sq = flat.pow(2).sum(-1, keepdim=True)
        if self.tp > 1:
            sq = _AllReduceSum.apply(sq)
        normed = flat * torch.rsqrt(sq / self.full_width + self.eps)
        return (self.weight * normed.to(dtype)).reshape(shape)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0},
                                                   sharded_offsets)


class _AutogradLinear:
    """Mixed into megatron's Column/RowParallelLinear (:class:`ColumnLinear`, :class:`RowLinear`): where the matmul
    needs none of megatron's communication or fusion (no dgrad all-reduce, no sequence-parallel all-gather, no
    gradient-accumulation fusion, no deferred embedding wgrad: TP=1, and every row-parallel layer, whose reduction
    happens outside ``_forward_impl``), it is the same ``matmul(input, weight.t())`` (+ bias) as megatron's
    ``LinearWithGradAccumulationAndAsyncCommunication.forward``, left to torch's autograd: its backward computes the
    same two products in C++ instead of a Python ``autograd.Function`` per layer and micro-batch
    (tensor_parallel/layers.py, ``_forward_impl``: megatron's own override point). The weight gradient comes out as
    ``(input^T·grad)^T`` instead of ``grad^T·input`` (the same sums; BLAS may round the last bit apart). Otherwise
    megatron's path runs unchanged."""

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, grad_output_buffer=None, gtp_remat_size=1, **kwargs):
        if not (gradient_accumulation_fusion or allreduce_dgrad or sequence_parallel or gtp_remat_size > 1
                or grad_output_buffer is not None):
            out = torch.matmul(input, weight.t())
            return out if bias is None else out + bias
        return super()._forward_impl(
            input, weight, bias=bias, gradient_accumulation_fusion=gradient_accumulation_fusion,
            allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel, grad_output_buffer=grad_output_buffer,
            gtp_remat_size=gtp_remat_size, **kwargs)


class ColumnLinear(_AutogradLinear, ColumnParallelLinear):
    """megatron's ColumnParallelLinear (same parameters, checkpoints and TP split); see :class:`_AutogradLinear`."""


class RowLinear(_AutogradLinear, RowParallelLinear):
    """megatron's RowParallelLinear (same parameters, checkpoints and TP split); see :class:`_AutogradLinear`."""


class _SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` of ``x = [gate; up]`` (the last dim, megatron's fc1 layout), with both halves' gradients
    written into one buffer: the same values autograd computes for megatron's unfused ``glu`` (``up`` · silu's
    derivative for the gate, ``silu(gate)`` for up), without ``glu``'s ``x_linear + glu_linear_offset`` (+0.0) pass and
    the ``cat`` that the backward of its ``chunk`` does."""

    @staticmethod
    def forward(ctx, x):
        gate, up = x.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(x, act)  # what autograd saves for glu too (gate, up, silu(gate))
        return act * up

    @staticmethod
    def backward(ctx, grad):
        x, act = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        dx = torch.empty_like(x)
        d_gate, d_up = dx.chunk(2, dim=-1)
        torch.mul(grad, act, out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return dx


class SwiGLU(torch.nn.Module):
    """The MLP's gated activation as megatron's ``MLPSubmodules.activation_func`` module (:class:`_SwiGLUFunction`);
    :func:`block_spec` sets ``config.use_te_activation_func``, the switch with which megatron's ``MLP.forward`` calls
    that module (its name says TE, the call is any module's: megatron/core/transformer/mlp.py, ``MLP.__init__`` /
    ``forward``)."""

    def __init__(self, config: TransformerConfig, **_unused):
        super().__init__()
        assert config.glu_linear_offset == 0.0 and config.activation_func_clamp_value is None, \
            "SwiGLU: megatron's glu_linear_offset / activation_func_clamp_value are not supported"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwiGLUFunction.apply(x)


def _swiglu(config: TransformerConfig, backend: str) -> bool:
    """Whether the layers' MLP activation is :class:`SwiGLU` (a gated SiLU MLP on megatron's local layers)."""
    return backend != "te" and config.gated_linear_unit and config.activation_func is F.silu


def _without_bias(cls: type) -> type:
    """``cls`` (a linear layer class) always built without a bias: megatron gives ``linear_qkv`` a bias whenever the
    other linears have one (``add_bias_linear or add_qkv_bias``), which an encoder with biased projections but
    bias-free q/k/v (InternViT with ``attention_bias=false``) cannot use."""
    def __init__(self, *args, bias=True, **kwargs):
        cls.__init__(self, *args, bias=False, **kwargs)
    return type(cls.__name__ + "NoBias", (cls,), {"__init__": __init__})


def layer_spec(backend: str, causal: bool, layer_scale: tuple[int, float] | None = None,
               qk_norm: bool = False, qkv_bias: bool = True, lora=None, swiglu: bool = False) -> ModuleSpec:
    """A transformer layer spec: causal for the decoder, unmasked for the vision encoder. ``layer_scale``:
    ``(hidden_size, initial value)`` of a per-channel scale on both residual branches (None: none); ``qk_norm``: q and
    k RMS-normalized over their full width (:class:`FullWidthRMSNorm`); ``qkv_bias=False``: no q/k/v bias even where
    the other linears have one; ``lora``: a LoRAConfig whose ``targets`` get adapters (``models/lora.py``; not with
    Transformer Engine's fused layers); ``swiglu``: the MLP's activation is the :class:`SwiGLU` module (the config must
    say ``use_te_activation_func``: :func:`block_spec`)."""
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
        spec.submodules.self_attention.params["attn_mask_type"] = mask
        if lora is not None:
            raise ValueError("LoRA adapters wrap megatron's own linear layers, not Transformer Engine's")
        _customize(spec, layer_scale, qk_norm, qkv_bias)
        return spec
    core = SDPAttention if backend == "sdpa" else DotProductAttention
    return _customize(ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnLinear, core_attention=core, linear_proj=RowLinear
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=_mlp_spec(swiglu),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    ), layer_scale, qk_norm, qkv_bias, lora)


def _mlp_spec(swiglu: bool):
    """megatron's local MLP spec (``vit_layer_specs._get_mlp_module_spec``) on :class:`ColumnLinear` /
    :class:`RowLinear`, with the :class:`SwiGLU` module where the MLP is a gated SiLU."""
    spec = _get_mlp_module_spec(use_te=False)
    sub = spec.keywords["submodules"]
    sub.linear_fc1, sub.linear_fc2 = ColumnLinear, RowLinear
    if swiglu:
        sub.activation_func = SwiGLU
    return spec


def _customize(spec: ModuleSpec, layer_scale: tuple[int, float] | None, qk_norm: bool,
               qkv_bias: bool = True, lora=None) -> ModuleSpec:
    """Layer scale on both residual branches, full-width q/k norms, bias-free q/k/v and LoRA adapters, where asked
    for."""
    sub = spec.submodules
    attn = sub.self_attention.submodules
    if not qkv_bias:
        attn.linear_qkv = _without_bias(attn.linear_qkv)
    if lora is not None and lora.rank:
        from megatron.core.transformer.mlp import MLP, MLPSubmodules

        from .lora import lora_linear

        def wrap(cls, target, column):
            return lora_linear(cls, lora, column, swiglu=target == "fc1") if target in lora.targets else cls

        attn.linear_qkv = wrap(attn.linear_qkv, "qkv", True)
        attn.linear_proj = wrap(attn.linear_proj, "proj", False)
        mlp = sub.mlp.keywords["submodules"]  # megatron's MLP spec: partial(MLP.as_mlp_submodule, submodules=...)
        sub.mlp = partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(
            linear_fc1=wrap(mlp.linear_fc1, "fc1", True), linear_fc2=wrap(mlp.linear_fc2, "fc2", False),
            activation_func=mlp.activation_func))
    if layer_scale is not None:
        params = {"hidden_size": layer_scale[0], "init_value": layer_scale[1]}
        sub.self_attn_bda = ModuleSpec(module=LayerScaleBiasDropoutAdd, params=params)
        sub.mlp_bda = ModuleSpec(module=LayerScaleBiasDropoutAdd, params=params)
    if qk_norm:
        sub.self_attention.submodules.q_layernorm = FullWidthRMSNorm
        sub.self_attention.submodules.k_layernorm = FullWidthRMSNorm
    return spec


def block_spec(config: TransformerConfig, backend: str, causal: bool, layer_scale: float | None = None,
               qk_norm: bool = False, qkv_bias: bool = True, lora=None):
    """Layer specs for this pipeline stage's share of layers plus the block's final norm (ours, so that sequence
    parallelism works without TE: megatron's default ``LNImpl`` is the torch wrapper that refuses SP).
    ``layer_scale``: the initial value of a per-channel layer scale (None: none); ``qk_norm``: full-width q/k RMS
    norms; ``qkv_bias=False``: bias-free q/k/v; ``lora``: a LoRAConfig (adapters on its targets) or None."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = Norm
    n = get_num_layers_to_build(config)
    scale = None if layer_scale is None else (config.hidden_size, layer_scale)
    swiglu = _swiglu(config, backend)
    if swiglu:  # megatron's MLP calls the spec's activation module only with this flag (see SwiGLU)
        config.use_te_activation_func = True
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(backend, causal, scale, qk_norm, qkv_bias, lora, swiglu)] * n, layer_norm=final_norm)


def _common(cfg, rt, dtype: torch.dtype) -> dict:
    p = cfg.parallel
    return dict(
        tensor_model_parallel_size=p.tp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=not rt.on_gpu,
        init_method_std=0.02,
        calculate_per_token_loss=True,
        **_recompute(cfg.train.recompute),
    )


def _recompute(mode: str) -> dict:
    """``train.recompute`` as megatron's fields: ``selective`` recomputes the core attention (megatron's default
    ``recompute_modules``); ``full`` recomputes every transformer layer from its input, one layer per unit."""
    if mode == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if mode == "selective":
        return {"recompute_granularity": "selective"}
    return {}


def language_config(cfg, rt, dtype: torch.dtype) -> TransformerConfig:
    lm = cfg.model.language
    config = _language_config(cfg, rt, dtype)
    if getattr(lm, "rope_type", "default") == "longrope":  # LongRoPE's attention factor is megatron's rotary mscale
        from .rope import attention_factor_fields

        for k, v in attention_factor_fields(lm.rope_attention_factor).items():
            setattr(config, k, v)
    return config


def _language_config(cfg, rt, dtype: torch.dtype) -> TransformerConfig:
    lm, p = cfg.model.language, cfg.parallel
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.ffn_hidden_size,
        num_attention_heads=lm.num_heads,
        num_query_groups=lm.num_kv_heads,
        kv_channels=lm.hidden_size // lm.num_heads,
        normalization="RMSNorm",
        layernorm_epsilon=lm.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=getattr(lm, "qkv_bias", False),
        mrope_section=list(lm.mrope_section) if getattr(lm, "mrope_section", None) else None,
        pipeline_model_parallel_size=p.pp,
        num_layers_in_first_pipeline_stage=p.first_stage_layers if p.pp > 1 else None,
        sequence_parallel=p.sequence_parallel,
        **_common(cfg, rt, dtype),
    )


_VIT_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh, "gelu": F.gelu, "silu": F.silu}


def vision_config(arch, cfg, rt, dtype: torch.dtype) -> TransformerConfig:
    """The vision encoder (a ``shapes.ViTArch``) lives whole on the first pipeline stage, unsplit by PP and without
    SP."""
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        kv_channels=arch.hidden_size // arch.num_heads,
        normalization="RMSNorm" if arch.norm == "rms_norm" else "LayerNorm",
        layernorm_epsilon=arch.norm_eps,
        qk_layernorm=arch.qk_norm,
        gated_linear_unit=arch.gated_mlp,
        activation_func=_VIT_ACTIVATIONS[arch.activation],
        add_bias_linear=True,
        add_qkv_bias=arch.qkv_bias,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        **_common(cfg, rt, dtype),
    )


def projector_config(cfg, rt, dtype: torch.dtype) -> TransformerConfig:
    lm = cfg.model.language
    return TransformerConfig(
        num_layers=1,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_heads,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        **_common(cfg, rt, dtype),
    )

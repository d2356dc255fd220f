"""Pieces several families share: the LLaMA-layout decoder (LLaMA, Mistral, Qwen2) as HF describes it — its config
fields and its parameter mappings — and small readers of HF folders.

Torch-free at import; transformers is imported inside the functions that read HF configs.
"""

from __future__ import annotations

import json
import math
import os

from ..errors import UserError

#: HF ``model_type`` values of the decoders megavlm's ``LanguageConfig`` describes (LlamaForCausalLM layout; Qwen2
#: adds q/k/v biases).
TEXT_TYPES = ("llama", "mistral", "qwen2")
#: HF file prefixes of a standalone decoder folder (``LlamaForCausalLM`` / ``Qwen2ForCausalLM``).
DECODER_PREFIXES = (("model.", "language", ""), ("lm_head.", "language", "lm_head."))
#: Default pixel statistics (OpenAI CLIP's) when a folder has no preprocessor_config.json.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
#: HF ``dtype`` names megavlm reads and writes.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def hf_config(folder: str, what: str):
    """``AutoConfig`` of a local folder (never the network); UserError naming ``--{what}`` otherwise."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"--{what} {folder}: no config.json (expected a folder written by save_pretrained)")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--{what} {folder}: cannot read config.json: {e}") from e


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def image_norm(*folders) -> dict:
    """``image_mean``/``image_std`` of the first folder's preprocessor_config.json that has them (else CLIP's)."""
    for folder in folders:
        pp = read_json(os.path.join(folder, "preprocessor_config.json")) or {}
        if "image_mean" in pp and "image_std" in pp:
            return dict(image_mean=[float(x) for x in pp["image_mean"]], image_std=[float(x) for x in pp["image_std"]])
    return dict(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def dtype_name(hf_cfg) -> str:
    """The HF config's dtype as a name (``float32`` when it names none megavlm knows)."""
    d = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None)
    if d is not None and not isinstance(d, str):
        d = str(d).replace("torch.", "")
    return d if d in DTYPE_NAMES else "float32"


def rope_theta(tc) -> float:
    """Plain RoPE's base of an HF text config (anything else is refused: megatron has no other scaling here)."""
    rp = getattr(tc, "rope_parameters", None) or {}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    scaling = getattr(tc, "rope_scaling", None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        rope_type = scaling.get("rope_type", scaling.get("type"))
    check(rope_type == "default", f"text_config.rope_parameters.rope_type={rope_type!r} is not supported (only "
                                  "plain RoPE, 'default')")
    theta = rp.get("rope_theta", getattr(tc, "rope_theta", 10000.0))
    check(float(theta) == int(theta), f"text_config rope_theta={theta} must be an integer (megatron's rotary_base)")
    return float(theta)


def language_fields(tc, where: str, types: tuple[str, ...] = TEXT_TYPES) -> dict:
    """``model.language`` keys of an HF LLaMA / Mistral / Qwen2 config (``types``: the ``model_type`` values
    accepted, e.g. a VLM's own name for its Qwen2 decoder); UserError for what megavlm cannot build."""
    mt = getattr(tc, "model_type", None)
    if mt == "phi3" and types == TEXT_TYPES:
        return phi3_language_fields(tc, where)
    check(mt in types, f"{where}: model_type={mt!r} is not supported; supported language models: "
                       f"{', '.join(types + ('phi3',) if types == TEXT_TYPES else types)} (LlamaForCausalLM layout, "
                       "Qwen2 with q/k/v biases, Phi-3 with fused projections)")
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None)
    check(head_dim in (None, tc.hidden_size // heads),
          f"{where}: head_dim={head_dim} != hidden_size/num_attention_heads={tc.hidden_size // heads} is not supported")
    for flag in ("attention_bias", "mlp_bias"):  # (Qwen2's q/k/v biases are built in, not a flag)
        check(not getattr(tc, flag, False), f"{where}: {flag}=true is not supported (LLaMA has no linear biases)")
    check(getattr(tc, "hidden_act", "silu") == "silu", f"{where}: hidden_act={tc.hidden_act!r} is not supported "
                                                       "(SwiGLU with silu only)")
    if mt == "mistral":
        check(getattr(tc, "sliding_window", None) is None,
              f"{where}: sliding_window={tc.sliding_window} is not supported (full causal attention only)")
    qwen2 = mt.startswith("qwen2")  # (qwen2, and the Qwen2 decoders of Qwen2-VL / Qwen2.5-VL)
    if qwen2:
        sliding = getattr(tc, "use_sliding_window", False) or "sliding_attention" in (getattr(tc, "layer_types", None)
                                                                                      or ())
        check(not sliding, f"{where}: use_sliding_window=true is not supported (full causal attention only)")
    return dict(hidden_size=tc.hidden_size, num_layers=tc.num_hidden_layers, num_heads=heads, num_kv_heads=kv,
                ffn_hidden_size=tc.intermediate_size, rope_theta=rope_theta(tc), norm_eps=float(tc.rms_norm_eps),
                vocab_size=tc.vocab_size, qkv_bias=qwen2)


#: HF ``model_type`` values of Phi-3-layout decoders (fused ``qkv_proj`` = [q; k; v], ``gate_up_proj`` = [gate; up]).
PHI3_TYPES = ("phi3", "phi4_multimodal")


def phi3_language_fields(tc, where: str) -> dict:
    """``model.language`` keys of an HF Phi-3 decoder config (``Phi3ForCausalLM``, or Phi-4-multimodal's own, whose
    top-level config is its text config); UserError for what megavlm cannot build."""
    mt = getattr(tc, "model_type", None)
    check(mt in PHI3_TYPES, f"{where}: model_type={mt!r} is not a Phi-3 decoder ({', '.join(PHI3_TYPES)})")
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None)
    check(head_dim in (None, tc.hidden_size // heads),
          f"{where}: head_dim={head_dim} != hidden_size/num_attention_heads={tc.hidden_size // heads} is not supported")
    check(getattr(tc, "hidden_act", "silu") == "silu", f"{where}: hidden_act={tc.hidden_act!r} is not supported "
                                                       "(SwiGLU with silu only)")
    check(getattr(tc, "sliding_window", None) is None,
          f"{where}: sliding_window={tc.sliding_window} is not supported (full causal attention only)")
    rp = dict(getattr(tc, "rope_parameters", None) or {})
    factor = float(rp.get("partial_rotary_factor", getattr(tc, "partial_rotary_factor", 1.0)) or 1.0)
    rot = int(tc.hidden_size // heads * factor)
    check(rot % 2 == 0 and rot > 0, f"{where}: partial_rotary_factor={factor} gives {rot} rotary channels per head "
                                    "(must be even and > 0)")
    fields = dict(hidden_size=tc.hidden_size, num_layers=tc.num_hidden_layers, num_heads=heads,
                  num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
                  ffn_hidden_size=tc.intermediate_size, norm_eps=float(tc.rms_norm_eps), vocab_size=tc.vocab_size,
                  qkv_bias=False, rotary_percent=factor, hf_layout="phi3")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "longrope":
        return dict(fields, rope_theta=rope_theta(tc))
    theta = float(rp.get("rope_theta", 10000.0))
    check(theta == int(theta), f"{where}: rope_theta={theta} must be an integer (megatron's rotary_base)")
    orig = rp.get("original_max_position_embeddings", getattr(tc, "original_max_position_embeddings", None))
    check(orig, f"{where}: rope_type=longrope without original_max_position_embeddings")
    scale = rp.get("factor") or tc.max_position_embeddings / orig
    attn = rp.get("attention_factor")
    if attn is None:  # transformers' default (_compute_longrope_parameters)
        attn = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
    return dict(fields, rope_theta=theta, rope_type="longrope",
                rope_short_factor=[float(x) for x in rp["short_factor"]],
                rope_long_factor=[float(x) for x in rp["long_factor"]], rope_original_max_positions=int(orig),
                rope_attention_factor=float(attn))


def decoder_part(lm):
    """The decoder's mappings (``language_model.`` ↔ HF's canonical LLaMA names; with ``hf_layout=phi3`` Phi-3's
    ``qkv_proj`` = [q; k; v] and ``gate_up_proj`` = [gate; up], which is megatron's SwiGLU ``linear_fc1`` as it is)."""
    from ..convert.mapping import QKV, Direct, GatedMLP, Part, StackedQKV, Vocab

    a = "decoder.layers.*."
    h = "layers.*."
    maps = [
        Vocab("embedding.word_embeddings.weight", "embed_tokens.weight"),
        Direct("decoder.final_layernorm.weight", "norm.weight"),
        *(() if lm.tie_embeddings else (Vocab("output_layer.weight", "lm_head.weight"),)),  # tied: the embedding
        Direct(a + "input_layernorm.weight", h + "input_layernorm.weight"),
        QKV(a + "self_attention.linear_qkv.weight", tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv")),
        Direct(a + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight"),
        Direct(a + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight"),
        GatedMLP(a + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight")),
        Direct(a + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight"),
    ]
    if lm.hf_layout == "phi3":
        fused_maps = {a + "self_attention.linear_qkv.weight": StackedQKV(a + "self_attention.linear_qkv.weight",
                                                                        h + "self_attn.qkv_proj.weight"),
                      a + "mlp.linear_fc1.weight": Direct(a + "mlp.linear_fc1.weight", h + "mlp.gate_up_proj.weight")}
        maps = [fused_maps.get(m.ours, m) for m in maps]
    if lm.qkv_bias:  # Qwen2: same grouped GQA order as the weight rows
        maps.append(QKV(a + "self_attention.linear_qkv.bias", tuple(h + f"self_attn.{p}_proj.bias" for p in "qkv")))
    return Part("language", "language_model.", tuple(maps), (lm.num_heads, lm.num_kv_heads))


def text_config_fields(lm, vocab_size: int) -> tuple[type, dict]:
    """(transformers config class, fields) of the decoder ``lm`` (``model.language``) for export."""
    from transformers import LlamaConfig, Phi3Config, Qwen2Config

    text = dict(hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size, num_hidden_layers=lm.num_layers,
                num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads, rms_norm_eps=lm.norm_eps,
                vocab_size=vocab_size, hidden_act="silu", tie_word_embeddings=lm.tie_embeddings)
    if lm.qkv_bias:  # Qwen2: q/k/v biases are built in; head_dim is derived (not a Qwen2Config field)
        text.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * lm.num_layers)
        return Qwen2Config, text
    if lm.hf_layout == "phi3":
        if lm.rope_type == "longrope":  # (Phi3Config reads it here over rope_parameters')
            text["original_max_position_embeddings"] = lm.rope_original_max_positions
        return Phi3Config, text
    text.update(head_dim=lm.hidden_size // lm.num_heads, attention_bias=False, mlp_bias=False)
    return LlamaConfig, text


def set_text_config(tc, lm, vocab_size: int) -> None:
    """Write the decoder's fields (and plain RoPE with its theta) into an HF text config in place."""
    _, fields = text_config_fields(lm, vocab_size)
    for k, val in fields.items():
        setattr(tc, k, val)
    tc.rope_parameters = rope_parameters(getattr(tc, "rope_parameters", None), lm)


def rope_parameters(stored: dict | None, lm) -> dict:
    """HF ``rope_parameters`` of the decoder ``lm`` (over those ``stored`` at import)."""
    rp = dict(stored or {})
    rp.update(rope_type=lm.rope_type, rope_theta=float(lm.rope_theta))
    if lm.rotary_percent != 1.0 or "partial_rotary_factor" in rp:
        rp["partial_rotary_factor"] = float(lm.rotary_percent)
    if lm.rope_type == "longrope":
        rp.update(short_factor=list(lm.rope_short_factor), long_factor=list(lm.rope_long_factor),
                  original_max_position_embeddings=lm.rope_original_max_positions,
                  attention_factor=float(lm.rope_attention_factor))
    return rp

"""Tensor name maps and layout transforms between HF LLaVA (CLIP/SigLIP + LLaMA/Mistral/Qwen2) and megavlm's
megatron-core VLM.

Pure functions on tensors and dicts: no process group, no file I/O. See docs/convert.md for the table.

HF names are handled in a *canonical* form per part (what the HF module's own ``state_dict`` uses below the part):

* vision (CLIP, SigLIP):  ``embeddings.patch_embedding.weight``, ``encoder.layers.N.self_attn.q_proj.weight``, ...
* projector:      ``linear_1.weight``, ...
* language:       ``embed_tokens.weight``, ``layers.N.self_attn.q_proj.weight``, ``norm.weight``, ``lm_head.weight``

:func:`split_hf_key` turns a file's key (any of the layouts below) into ``(part, canonical)``;
:func:`hf_file_key` gives the key written on export (the layout transformers 5.24's ``save_pretrained`` writes).
"""

from __future__ import annotations

import re

import torch

from ..errors import UserError

# (file prefix, part, canonical prefix); the first match wins, so longer prefixes come first.
_LLAVA_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision", ""),
    ("model.vision_tower.", "vision", ""),
    ("vision_tower.vision_model.", "vision", ""),
    ("vision_tower.", "vision", ""),
    ("model.multi_modal_projector.", "projector", ""),
    ("multi_modal_projector.", "projector", ""),
    ("model.language_model.", "language", ""),
    ("language_model.model.", "language", ""),
    ("language_model.lm_head.", "language", "lm_head."),
    ("lm_head.", "language", "lm_head."),
)
_CLIP_PREFIXES = (("vision_model.", "vision", ""), ("", "vision", ""))
_LLAMA_PREFIXES = (("model.", "language", ""), ("lm_head.", "language", "lm_head."))

#: Export layout (what transformers 5.24 ``LlavaForConditionalGeneration.save_pretrained`` writes).
_EXPORT_PREFIX = {"vision": "vision_tower.", "projector": "multi_modal_projector.", "language": "language_model.model."}


def split_hf_key(key: str, source: str) -> tuple[str, str]:
    """``source``: ``llava`` | ``clip`` | ``siglip`` | ``llama`` | ``qwen2``. Returns ``(part, canonical name)``;
    UserError if unknown."""
    table = {"llava": _LLAVA_PREFIXES, "clip": _CLIP_PREFIXES, "siglip": _CLIP_PREFIXES, "llama": _LLAMA_PREFIXES,
             "qwen2": _LLAMA_PREFIXES}[source]
    for prefix, part, canon in table:
        if key.startswith(prefix):
            return part, canon + key[len(prefix):]
    raise UserError(f"unexpected tensor {key!r} in the {source} checkpoint (not a {source} parameter name)")


def hf_file_key(part: str, canonical: str) -> str:
    if part == "language" and canonical.startswith("lm_head."):
        return "language_model." + canonical
    return _EXPORT_PREFIX[part] + canonical


# --------------------------------------------------------------------------------------
# Fused QKV (megatron groups by KV head: [q heads of group g, k_g, v_g] for each g)
# --------------------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """HF q/k/v (weights ``(n*hn, h)`` or biases ``(n*hn,)``) → megatron ``linear_qkv`` rows."""
    hn = q.shape[0] // num_heads
    rest = q.shape[1:]
    qg = q.reshape(num_groups, (num_heads // num_groups) * hn, *rest)
    kg = k.reshape(num_groups, hn, *rest)
    vg = v.reshape(num_groups, hn, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_group = qkv.shape[0] // num_groups
    hn = per_group // (num_heads // num_groups + 2)
    rest = qkv.shape[1:]
    g = qkv.reshape(num_groups, per_group, *rest)
    nq = (num_heads // num_groups) * hn
    q = g[:, :nq].reshape(-1, *rest)
    k = g[:, nq:nq + hn].reshape(-1, *rest)
    v = g[:, nq + hn:].reshape(-1, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


# --------------------------------------------------------------------------------------
# Name maps. Each entry: our name (below the part's module) → HF canonical name(s) and a kind:
#   "copy"  one tensor, same layout
#   "qkv"   three HF tensors (q, k, v) fused
#   "glu"   two HF tensors (gate, up) concatenated
#   "vocab" one tensor whose rows are padded to the padded vocabulary
# --------------------------------------------------------------------------------------


def vision_map(num_built_layers: int, flavour: str = "clip") -> dict[str, tuple[str, tuple[str, ...]]]:
    m = {
        "patch_weight": ("copy", ("embeddings.patch_embedding.weight",)),
        "position_embeddings": ("copy", ("embeddings.position_embedding.weight",)),
    }
    if flavour == "clip":  # class token and pre-LayerNorm
        m["class_embedding"] = ("copy", ("embeddings.class_embedding",))
        m["ln_pre.weight"] = ("copy", ("pre_layrnorm.weight",))
        m["ln_pre.bias"] = ("copy", ("pre_layrnorm.bias",))
    else:  # siglip: the patch embedding has a bias, no class token, no pre-LayerNorm
        m["patch_bias"] = ("copy", ("embeddings.patch_embedding.bias",))
    for i in range(num_built_layers):
        ours, hf = f"decoder.layers.{i}.", f"encoder.layers.{i}."
        for wb in ("weight", "bias"):
            m[ours + f"input_layernorm.{wb}"] = ("copy", (hf + f"layer_norm1.{wb}",))
            m[ours + f"self_attention.linear_qkv.{wb}"] = (
                "qkv", tuple(hf + f"self_attn.{p}_proj.{wb}" for p in "qkv"))
            m[ours + f"self_attention.linear_proj.{wb}"] = ("copy", (hf + f"self_attn.out_proj.{wb}",))
            m[ours + f"pre_mlp_layernorm.{wb}"] = ("copy", (hf + f"layer_norm2.{wb}",))
            m[ours + f"mlp.linear_fc1.{wb}"] = ("copy", (hf + f"mlp.fc1.{wb}",))
            m[ours + f"mlp.linear_fc2.{wb}"] = ("copy", (hf + f"mlp.fc2.{wb}",))
    return m


#: SigLIP's attention-pooling head (``vision_use_head``), which LLaVA never reads.
SIGLIP_HEAD = ("head.probe", "head.attention.in_proj_weight", "head.attention.in_proj_bias",
               "head.attention.out_proj.weight", "head.attention.out_proj.bias", "head.layernorm.weight",
               "head.layernorm.bias", "head.mlp.fc1.weight", "head.mlp.fc1.bias", "head.mlp.fc2.weight",
               "head.mlp.fc2.bias")


def siglip_head_shape(name: str, hidden: int, ffn: int) -> tuple[int, ...]:
    """Shape of a :data:`SIGLIP_HEAD` tensor for a tower of width ``hidden`` and MLP width ``ffn``."""
    return {"head.probe": (1, 1, hidden), "head.attention.in_proj_weight": (3 * hidden, hidden),
            "head.attention.in_proj_bias": (3 * hidden,), "head.mlp.fc1.weight": (ffn, hidden),
            "head.mlp.fc1.bias": (ffn,), "head.mlp.fc2.weight": (hidden, ffn)}.get(
        name, (hidden, hidden) if name == "head.attention.out_proj.weight" else (hidden,))


def vision_extra_names(num_layers: int, num_built_layers: int) -> list[str]:
    """HF CLIP/SigLIP tensors our encoder does not use: layers past the feature layer and the post-LayerNorm
    (SigLIP's pooling head, when there is one, comes on top: :data:`SIGLIP_HEAD`)."""
    names = []
    for i in range(num_built_layers, num_layers):
        hf = f"encoder.layers.{i}."
        for wb in ("weight", "bias"):
            names += [hf + f"layer_norm1.{wb}", hf + f"layer_norm2.{wb}", hf + f"mlp.fc1.{wb}",
                      hf + f"mlp.fc2.{wb}", hf + f"self_attn.out_proj.{wb}"]
            names += [hf + f"self_attn.{p}_proj.{wb}" for p in "qkv"]
    return names + ["post_layernorm.weight", "post_layernorm.bias"]


def projector_map() -> dict[str, tuple[str, tuple[str, ...]]]:
    return {f"encoder.linear_fc{i}.{wb}": ("copy", (f"linear_{i}.{wb}",)) for i in (1, 2) for wb in ("weight", "bias")}


def language_map(num_layers: int, qkv_bias: bool = False) -> dict[str, tuple[str, tuple[str, ...]]]:
    m = {
        "embedding.word_embeddings.weight": ("vocab", ("embed_tokens.weight",)),
        "decoder.final_layernorm.weight": ("copy", ("norm.weight",)),
        "output_layer.weight": ("vocab", ("lm_head.weight",)),
    }
    for i in range(num_layers):
        ours, hf = f"decoder.layers.{i}.", f"layers.{i}."
        m[ours + "input_layernorm.weight"] = ("copy", (hf + "input_layernorm.weight",))
        m[ours + "self_attention.linear_qkv.weight"] = ("qkv", tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"))
        if qkv_bias:  # Qwen2: same grouped GQA order as the weight rows
            m[ours + "self_attention.linear_qkv.bias"] = ("qkv", tuple(hf + f"self_attn.{p}_proj.bias" for p in "qkv"))
        m[ours + "self_attention.linear_proj.weight"] = ("copy", (hf + "self_attn.o_proj.weight",))
        m[ours + "pre_mlp_layernorm.weight"] = ("copy", (hf + "post_attention_layernorm.weight",))
        m[ours + "mlp.linear_fc1.weight"] = ("glu", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"))
        m[ours + "mlp.linear_fc2.weight"] = ("copy", (hf + "mlp.down_proj.weight",))
    return m


def to_ours(kind: str, tensors: list[torch.Tensor], target_shape, heads: tuple[int, int]) -> torch.Tensor:
    """HF tensor(s) → our layout (``target_shape`` is only used for vocabulary padding)."""
    if kind == "copy":
        return tensors[0]
    if kind == "qkv":
        return fuse_qkv(*tensors, *heads)
    if kind == "glu":
        return torch.cat(tensors, dim=0)
    if kind == "vocab":
        t = tensors[0]
        if t.shape[0] > target_shape[0]:
            raise UserError(f"vocabulary tensor has {t.shape[0]} rows but the model has {target_shape[0]}")
        if tuple(t.shape) == tuple(target_shape):
            return t  # no padding rows: no copy
        out = torch.zeros(target_shape, dtype=t.dtype)  # padding rows: zero (logit 0, never a real token)
        out[: t.shape[0]] = t
        return out
    raise AssertionError(kind)


def to_hf(kind: str, t: torch.Tensor, heads: tuple[int, int], vocab_size: int) -> list[torch.Tensor]:
    """Our tensor → the HF tensor(s) of the same map entry."""
    if kind == "copy":
        return [t]
    if kind == "qkv":
        return list(split_qkv(t, *heads))
    if kind == "glu":
        return [c.contiguous() for c in t.chunk(2, dim=0)]
    if kind == "vocab":
        return [t[:vocab_size].contiguous()]
    raise AssertionError(kind)


_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def layer_count(names, prefix: str) -> int:
    """1 + the largest layer index among ``names`` starting with ``prefix`` (0 if none)."""
    idx = [int(m.group(1)) for n in names if n.startswith(prefix) for m in [_LAYER_RE.match(n[len(prefix):])] if m]
    return max(idx) + 1 if idx else 0

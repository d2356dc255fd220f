"""Parameter mappings between megavlm's megatron-core model and Hugging Face checkpoints, declared as data.

In the spirit of Megatron-Bridge's ``AutoMapping`` / ``QKVMapping`` / ``GatedMLPMapping``: a family lists, per part
of the model (:class:`Part`: the vision encoder, the projector, the decoder), one mapping per parameter of ours,
with ``*`` standing for a layer index on both sides::

    QKV("decoder.layers.*.self_attention.linear_qkv.weight",
        ("layers.*.self_attn.q_proj.weight", "layers.*.self_attn.k_proj.weight", "layers.*.self_attn.v_proj.weight"))

Our names are relative to the part's prefix in the model's ``state_dict`` (``language_model.``); HF names are the
part's *canonical* names (below the part's module in the HF model, whatever prefix the file uses: the family's
import says which prefixes map to which part). :func:`expand` resolves the patterns against the model's own names,
so a mapping covers exactly the layers the model built. The conversion engine (``engine.py``) executes the mappings
in both directions; the kinds:

* :class:`Direct`   one tensor, same layout (norms, biases, embeddings of the vision tower, ...)
* :class:`Reshaped` one tensor, same values in another shape
* :class:`QKV`      HF's separate q, k, v → megatron's fused ``linear_qkv`` (grouped by KV head)
* :class:`StackedQKV` HF's one ``[q; k; v]`` tensor → the same
* :class:`GatedMLP` HF's gate and up projections → megatron's fused SwiGLU ``linear_fc1`` ([gate; up])
* :class:`Vocab`    embedding / output rows, padded with zero rows to the padded vocabulary

Pure functions on tensors and names: no process group, no file I/O. See docs/convert.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import UserError

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
# Mappings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What a mapping may need: the part's ``(num_heads, num_query_groups)`` and the real vocabulary size."""

    heads: tuple[int, int] | None = None
    vocab_size: int = 0


@dataclass(frozen=True)
class Mapping:
    """One parameter of ours ← ``hf`` tensor(s); ``*`` in ``ours`` and ``hf`` is the same layer index."""

    ours: str
    hf: tuple[str, ...]

    def __post_init__(self):
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))

    def to_ours(self, tensors: list[torch.Tensor], shape: tuple[int, ...], ctx: Ctx) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, t: torch.Tensor, ctx: Ctx) -> list[torch.Tensor]:
        raise NotImplementedError


class Direct(Mapping):
    """Same tensor, same layout."""

    def to_ours(self, tensors, shape, ctx):
        return tensors[0]

    def to_hf(self, t, ctx):
        return [t]


@dataclass(frozen=True)
class Reshaped(Mapping):
    """Same values, another shape on the HF side (``hf_shape``; e.g. a class token ``(1, 1, d)`` that we keep as
    ``(d,)``)."""

    hf_shape: tuple[int, ...] = ()

    def to_ours(self, tensors, shape, ctx):
        return tensors[0].reshape(shape)

    def to_hf(self, t, ctx):
        return [t.reshape(self.hf_shape)]


class QKV(Mapping):
    """``hf`` = (q, k, v) of one attention (weights or biases) → megatron's fused, head-grouped ``linear_qkv``."""

    def to_ours(self, tensors, shape, ctx):
        return fuse_qkv(*tensors, *ctx.heads)

    def to_hf(self, t, ctx):
        return list(split_qkv(t, *ctx.heads))


class StackedQKV(Mapping):
    """``hf`` = one tensor holding q, k and v stacked (``[q; k; v]`` rows, weights or biases: Qwen2-VL's vision
    ``attn.qkv``, Phi-3's ``qkv_proj``) → megatron's fused, head-grouped ``linear_qkv``."""

    def _split(self, t, ctx):
        heads, groups = ctx.heads
        hn = t.shape[0] // (heads + 2 * groups)
        return t.split([heads * hn, groups * hn, groups * hn], dim=0)

    def to_ours(self, tensors, shape, ctx):
        return fuse_qkv(*self._split(tensors[0], ctx), *ctx.heads)

    def to_hf(self, t, ctx):
        return [torch.cat(split_qkv(t, *ctx.heads), dim=0)]


class GatedMLP(Mapping):
    """``hf`` = (gate, up) → megatron's SwiGLU ``linear_fc1`` = [gate; up]."""

    def to_ours(self, tensors, shape, ctx):
        return torch.cat(tensors, dim=0)

    def to_hf(self, t, ctx):
        return [c.contiguous() for c in t.chunk(2, dim=0)]


class Vocab(Mapping):
    """Rows of the vocabulary, ours padded with zero rows (logit 0, never a real token) to the padded vocabulary."""

    def to_ours(self, tensors, shape, ctx):
        t = tensors[0]
        if t.shape[0] > shape[0]:
            raise UserError(f"vocabulary tensor has {t.shape[0]} rows but the model has {shape[0]}")
        if tuple(t.shape) == tuple(shape):
            return t  # no padding rows: no copy
        out = torch.zeros(shape, dtype=t.dtype)
        out[: t.shape[0]] = t
        return out

    def to_hf(self, t, ctx):
        return [t[:ctx.vocab_size].contiguous()]


@dataclass(frozen=True)
class Part:
    """One part of the model: our parameters under ``prefix`` (e.g. ``vision_model.``), HF tensors of part ``name``,
    the mappings between them, and the part's attention heads ``(num_heads, num_query_groups)`` for QKV."""

    name: str
    prefix: str
    mappings: tuple[Mapping, ...]
    heads: tuple[int, int] | None = None


@dataclass(frozen=True)
class Resolved:
    """A mapping with the layer index filled in: ``ours`` is a full ``state_dict`` key, ``hf`` canonical names."""

    part: Part
    mapping: Mapping
    ours: str
    hf: tuple[str, ...]
    layer: int | None


def _pattern(name: str) -> re.Pattern:
    return re.compile("^" + re.escape(name).replace(r"\*", r"(\d+)") + "$")


def expand(parts: list[Part], names) -> list[Resolved]:
    """Every mapping of ``parts`` resolved against the model's ``state_dict`` keys ``names`` (a pattern with ``*``
    matches each layer the model has). Raises if a key of a part has no mapping or a mapping matches nothing."""
    out: list[Resolved] = []
    names = [n for n in names if not n.endswith("_extra_state")]
    claimed: set[str] = set()
    for part in parts:
        for m in part.mappings:
            pat = _pattern(part.prefix + m.ours)
            hits = 0
            for n in names:
                match = pat.match(n)
                if not match:
                    continue
                layer = match.group(1) if pat.groups else None
                hf = tuple(h.replace("*", layer) if layer is not None else h for h in m.hf)
                out.append(Resolved(part, m, n, hf, None if layer is None else int(layer)))
                claimed.add(n)
                hits += 1
            if not hits:
                raise AssertionError(f"mapping {part.prefix + m.ours} matches no parameter of the model")
    left = [n for n in names if n not in claimed and any(n.startswith(p.prefix) for p in parts)]
    if left:
        raise AssertionError(f"no mapping for {left[0]} (and {len(left) - 1} more)")
    return out


def layer_count(names, prefix: str) -> int:
    """1 + the largest layer index among ``names`` starting with ``prefix`` (0 if none)."""
    layer_re = re.compile(r"layers\.(\d+)\.")
    idx = [int(m.group(1)) for n in names if n.startswith(prefix) for m in [layer_re.match(n[len(prefix):])] if m]
    return max(idx) + 1 if idx else 0


def split_hf_key(key: str, prefixes, what: str) -> tuple[str, str]:
    """A file's tensor name → ``(part, canonical name)`` by the first matching ``(file prefix, part, canonical
    prefix)``; UserError if none matches."""
    for prefix, part, canon in prefixes:
        if key.startswith(prefix):
            return part, canon + key[len(prefix):]
    raise UserError(f"unexpected tensor {key!r} in the {what} checkpoint (not a {what} parameter name)")

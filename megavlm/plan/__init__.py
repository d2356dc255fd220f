"""``megavlm plan``: parameter counts, memory per GPU, and layouts that fit — computed, never measured.

Nothing here imports torch or megatron (a plan is made on a login node in a second); ``measure.py`` next to it
holds the torch side that checks these numbers against real CPU runs (``benchmarks/plan_memory.py``).

Parameters are counted from the descriptions the model builds from (the model family's ``ViTArch`` and
``ProjectorArch`` and the decoder section, ``megavlm/shapes.py``), per tensor-parallel rank and per pipeline stage;
``tests/plan/test_plan.py`` holds them equal to ``sum(p.numel())`` of built models.

Memory per GPU (bytes) follows megatron's accounting:

- **weights** ``P·e`` (``e`` = 2 in bf16, 4 in fp32), **gradients** ``4·P_trained`` (megatron's DDP keeps fp32 main
  grads: ``grad_reduce_in_fp32``), **optimizer** Adam's two fp32 moments plus, in bf16, an fp32 main copy of the
  weights: 12 bytes per trained parameter in bf16 (8 in fp32), divided by DP with the distributed optimizer —
  megatron's table: 18 bytes/param in bf16 (6 + 12/DP distributed), 16 in fp32 (8 + 8/DP). Frozen parameters
  have neither gradients nor optimizer state.
- **activations**: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022): count
  the tensors each layer keeps for its backward pass. For their GPT layer (LayerNorm, 4h GELU MLP, dropout, fp16)
  that gives ``s·b·h·(34 + 5·a·s/h)`` bytes, ``/t`` with TP and sequence parallelism. Here the same count is done
  for this model's layers (RMSNorm, SwiGLU, GQA, RoPE, no dropout; CLIP/SigLIP ViT layers) in the run's dtype —
  ``decoder_layer_bytes`` lists every term. Selective recompute drops the ``s²`` attention terms (as does flash /
  SDPA attention), full recompute keeps each layer's input only (plus one layer rebuilt during backward). Under
  1F1B the pipeline stage ``r`` of ``pp`` holds ``min(pp - r, m)`` micro-batches' activations (``m`` micro-batches
  per step); the first stage also holds the vision encoder (whose activations exist only when it trains, stage 3)
  and the projector; the last stage holds the final norm, the output layer and the fp32 softmax of the loss.
- **transient**: the largest working set on top of what is saved — the gradients in flight inside the backward
  of one layer or of the loss, a weight's gradient before it is added to the main grad, the attention workspace.

What the planner cannot see: the CUDA context and allocator caching/fragmentation (``reserve``), NCCL buffers,
DALI's decode buffers, Transformer Engine workspaces. ``fits`` leaves ``reserve_gib`` of every GPU unused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

from .. import families
from ..shapes import (decoder_layers_per_stage, divisors, language_params, lora_layer_params, lora_parts,
                      padded_vocab, trainable_parts, trained_label)

GIB = 2 ** 30
RECOMPUTE_MODES = ("none", "selective", "full")
#: What a layout search leaves free on each GPU by default (CUDA context, allocator fragmentation, NCCL).
DEFAULT_RESERVE_GIB = 4.0


# ----------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StageParams:
    vision: int = 0
    projector: int = 0
    language: int = 0
    trainable: int = 0
    #: LoRA adapters (counted in ``vision`` / ``language`` too): with LoRA they are all that trains of their part.
    vision_lora: int = 0
    language_lora: int = 0

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.language


def stage_params(cfg, vocab_size: int, tp: int, pp: int, rank: int, first_stage_layers=None) -> StageParams:
    """Parameters on one GPU (one TP rank) of pipeline stage ``rank``."""
    lm, fam = cfg.model.language, families.of(cfg)
    layers = decoder_layers_per_stage(lm.num_layers, pp, first_stage_layers)[rank]
    first, last = rank == 0, rank == pp - 1
    sp = StageParams(
        vision=fam.vision_arch(cfg).params(tp) if first else 0,
        projector=fam.projector_arch(cfg).params(tp) if first else 0,
        language=language_params(lm, vocab_size, tp, layers, first, last),
    )
    _add_lora(cfg, sp, tp, layers, first)
    return sp


def _add_lora(cfg, sp: StageParams, tp: int, layers: int, first: bool) -> None:
    """Count the LoRA adapters into ``sp`` (``layers`` decoder layers; the vision encoder's when ``first``) and set
    what trains: a part with adapters trains only them (``train.stage`` / ``train.trainable`` decide the rest)."""
    lora, lm = cfg.model.lora, cfg.model.language
    adapted = lora_parts(lora)
    if "language" in adapted:
        sp.language_lora = layers * lora_layer_params(lora, lm.hidden_size, lm.num_heads, lm.num_kv_heads,
                                                      lm.ffn_hidden_size, True, tp)
    if "vision" in adapted and first:
        v = families.of(cfg).vision_arch(cfg)
        sp.vision_lora = v.num_layers * lora_layer_params(lora, v.hidden_size, v.num_heads, v.num_heads,
                                                          v.ffn_hidden_size, v.gated_mlp, tp)
    sp.vision += sp.vision_lora
    sp.language += sp.language_lora
    tv, tproj, tlang = trainable_parts(cfg.train.stage, cfg.train.trainable)
    sp.trainable = (sp.vision_lora if "vision" in adapted else sp.vision * tv) + sp.projector * tproj + (
        sp.language_lora if "language" in adapted else sp.language * tlang)


# ----------------------------------------------------------------------------------------------------------------
# Activations (Korthikanti et al.'s counting, for this model's layers)
# ----------------------------------------------------------------------------------------------------------------


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                            recompute: str = "none") -> float:
    """The paper's closed form for one GPT layer (fp16, 4h GELU MLP, dropout): ``sbh(34 + 5as/h)`` without
    parallelism, ``sbh(10 + 24/t + 5as/(ht))`` with TP, ``sbh/t·(34 + 5as/h)`` with TP+SP; selective recompute drops
    the ``5as/h`` term; full recompute keeps ``2sbh`` (``/t`` with SP). For reference and tests; the planner uses
    :func:`decoder_layer_bytes`, the same count for this model's layer."""
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    attn = 0 if recompute == "selective" else 5 * a * s / h
    if sp:
        return s * b * h / t * (34 + attn)
    return s * b * h * (10 + 24 / t + attn / t)


def norm_bytes(e: int, backend: str, trained: bool, fused: bool = False) -> int:
    """Bytes per element an RMSNorm keeps. On CPU torch's RMSNorm (local/SDPA specs) is a composite computed in
    fp32: in bf16 it keeps the fp32 copy of its input, the fp32 normalized input (for the weight's gradient, when
    trained) and its bf16 output (the next linear's input, when trained); in fp32 the input itself and the two
    others (measured). On CUDA (``fused``) torch's fused RMSNorm kernel and Transformer Engine's LayerNormLinear
    keep the input and, for the next trained linear, the output, in the activation dtype (not measured here)."""
    if backend == "te" or fused:
        return 2 * e if trained else e
    f = 4 if e == 2 else e
    return 2 * f + e if trained else f


def _attention_flash(backend: str) -> bool:
    return backend in ("sdpa", "te")


def decoder_layer_bytes(lm, s: int, b: int, tp: int, sp: bool, e: int, backend: str, trained: bool,
                        recompute: str = "none", fused_norm: bool = False) -> dict:
    """Bytes one decoder layer keeps for its backward pass, per micro-batch on one TP rank: ``saved`` (by term) and
    ``transient`` (the extra working set while its backward runs).

    ``e`` is the activation dtype's size. With ``trained=False`` (stage 1: frozen LLM that back-propagates to the
    projector) megatron's frozen linears keep no input. Terms (``T = s·b`` tokens, ``T/t`` in the norm region with
    SP): what both norms keep (:func:`norm_bytes`), q after RoPE, k and v (repeated to all heads for GQA by megatron's
    local attention; without GQA, v is a view that keeps the whole fused qkv output alive), the attention probabilities
    (``b·a/t·s²``, fp32 softmax plus its bf16 copy in bf16; absent with SDPA/TE), the attention output, RoPE's
    cos/sin tables, and the SwiGLU tensors (fc1 output ``2F``, SiLU output ``F``, product ``F``; with TE's layers
    also megatron's ``x_linear + glu_linear_offset`` ``F``, which megavlm's local SwiGLU module does not make:
    models/specs.py)."""
    h, a, g, f = lm.hidden_size, lm.num_heads, lm.num_kv_heads, lm.ffn_hidden_size
    dh = h // a
    T = s * b
    tn = T // tp if sp else T
    qd, kd = a * dh // tp, g * dh // tp
    if recompute == "full":
        full = decoder_layer_bytes(lm, s, b, tp, sp, e, backend, trained, "none", fused_norm)
        return {"saved": {"layer input": tn * h * e}, "transient": full["total"] + full["transient"] - tn * h * e,
                "total": tn * h * e}
    terms: dict[str, float] = {}
    terms["2 RMSNorms (input, normalized, output)"] = 2 * tn * h * norm_bytes(e, backend, trained, fused_norm)
    gqa = a > g
    flash = _attention_flash(backend)
    if recompute == "selective" or flash:
        # checkpointed core attention (or SDPA/TE) keeps its inputs: q, k (not repeated) and v, a view that keeps
        # the fused qkv output alive
        terms["q, k, qkv"] = T * (qd + kd + (qd + 2 * kd)) * e
        if flash and recompute != "selective":
            terms["attention output (kept by SDPA/TE)"] = T * qd * e
    else:
        terms["q, k, v" if gqa else "q, k, qkv"] = (3 * T * qd if gqa else T * (2 * qd + 3 * qd)) * e
        probs = b * (a // tp) * s * s
        terms["attention probs (s²)"] = probs * (4 + 2 if e == 2 else e)
    if trained:
        terms["attention context"] = T * qd * e
    if backend == "te":
        terms["SwiGLU (fc1 out, silu, offset add, product)"] = T * (f // tp) * (5 if trained else 4) * e
    else:
        terms["SwiGLU (fc1 out, silu, product)"] = T * (f // tp) * (4 if trained else 3) * e
    terms["RoPE cos/sin (q and k)"] = 4 * s * dh * e
    total = sum(terms.values())
    # Transient in backward: gradients of the largest intermediates of one layer (attention probs and scores on the
    # local path, the SwiGLU gradients), plus the non-flash scores workspace.
    mlp_t = 2 * T * (f // tp) * e
    att_t = 0 if (flash or recompute == "selective") else 2 * b * (a // tp) * s * s * (4 if e == 2 else e)
    if recompute == "selective" and not flash:  # the core attention is rebuilt in backward
        att_t = b * (a // tp) * s * s * (4 + 2 if e == 2 else e) + 2 * b * (a // tp) * s * s * (4 if e == 2 else e)
    return {"saved": terms, "transient": max(mlp_t, att_t), "total": total}


def vision_layer_bytes(v, n_images: int, tp: int, e: int, backend: str, recompute: str = "none") -> dict:
    """One ViT layer (``v``: a ``shapes.ViTArch``; trained: stage 3) for ``n_images`` images: inputs and outputs of
    both LayerNorms, the fused qkv output (q, k, v are views of it), the attention probs (local attention), the
    attention context, and the MLP (fc1 output, quick-GELU's sigmoid, the activation's output)."""
    d, f, a = v.hidden_size, v.ffn_hidden_size, v.num_heads
    t = v.positions
    T = n_images * t
    if recompute == "full":
        full = vision_layer_bytes(v, n_images, tp, e, backend, "none")
        return {"saved": {"layer input": T * d * e}, "transient": full["total"] + full["transient"] - T * d * e,
                "total": T * d * e}
    terms = {"norm inputs and outputs (2 norms)": 4 * T * d * e, "qkv": 3 * T * d // tp * e,
             "attention context": T * d // tp * e}
    flash = _attention_flash(backend)
    if flash and recompute != "selective":
        terms["attention output (kept by SDPA/TE)"] = T * d // tp * e
    if not flash and recompute != "selective":
        terms["attention probs (s²)"] = n_images * (a // tp) * t * t * (4 + 2 if e == 2 else e)
    terms["MLP (fc1 out, act)"] = T * (f // tp) * (3 if v.activation == "quick_gelu" else 2) * e
    att_t = 0 if flash else 2 * n_images * (a // tp) * t * t * (4 if e == 2 else e)
    return {"saved": terms, "transient": max(3 * T * (f // tp) * e, att_t), "total": sum(terms.values())}


# ----------------------------------------------------------------------------------------------------------------
# Memory per GPU
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """A parallel layout and the per-GPU options that change memory."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"
    first_stage_layers: int | None = None

    def label(self) -> str:
        flags = [f for f, on in (("SP", self.sequence_parallel), ("dist-opt", self.distributed_optimizer)) if on]
        if self.recompute != "none":
            flags.append(f"recompute={self.recompute}")
        return f"TP{self.tp} PP{self.pp} DP{self.dp} mb{self.micro_batch}" + (f" ({', '.join(flags)})" if flags
                                                                                 else "")


@dataclass
class Env:
    """Where the plan runs: ``device`` gpu|cpu decides ``model.dtype=auto`` (bf16 | fp32) and ``model.spec=auto``."""

    device: str = "gpu"
    #: ``sdpa`` or ``te`` on GPU (both keep no s² scores); the planner cannot tell which imports there.
    gpu_attention: str = "sdpa"

    def dtype_bytes(self, cfg) -> int:
        d = cfg.model.dtype
        return 2 if d == "bf16" or (d == "auto" and self.device == "gpu") else 4

    def backend(self, cfg) -> str:
        """As ``shapes.resolve_backend`` would choose (which of TE and SDPA imports on a GPU is ``gpu_attention``)."""
        spec = cfg.model.spec
        if self.device == "cpu":
            return "local" if spec == "local" else "sdpa"
        backend = self.gpu_attention if spec == "auto" else spec
        return "sdpa" if backend == "te" and cfg.model.lora.rank else backend  # LoRA wraps megatron's linears


def images_per_sample(cfg) -> int:
    """The synthetic data has one image per sample; shards up to ``data.max_images`` (the planner takes the most)."""
    return cfg.data.max_images if cfg.data.source == "shards" else 1


def stage_memory(cfg, vocab_size: int, layout: Layout, rank: int, env: Env | None = None) -> dict:
    """Memory (bytes) on one GPU of pipeline stage ``rank``: static parts, activations under each recompute mode,
    and ``peak`` for the layout's own options."""
    env = env or Env()
    fam = families.of(cfg)
    lm, v, tr = cfg.model.language, fam.vision_arch(cfg), cfg.train
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    e = env.dtype_bytes(cfg)
    backend = env.backend(cfg)
    params = stage_params(cfg, vocab_size, tp, pp, rank, layout.first_stage_layers)
    opt_per = 12 if e == 2 else 8  # fp32 main params (bf16 only) + Adam's exp_avg, exp_avg_sq
    weights = params.total * e
    grads = params.trainable * 4
    opt_plain = params.trainable * opt_per
    opt_dist = -(-params.trainable // dp) * opt_per
    optimizer = opt_dist if layout.distributed_optimizer else opt_plain

    b, s = layout.micro_batch, cfg.data.max_seq_len
    m = tr.global_batch // (layout.micro_batch * dp)
    in_flight = min(pp - rank, m)
    first, last = rank == 0, rank == pp - 1
    layers = decoder_layers_per_stage(lm.num_layers, pp, layout.first_stage_layers)[rank]
    tv, _, tlang = trainable_parts(tr.stage, tr.trainable)
    sp = layout.sequence_parallel and tp > 1
    T = s * b
    tn = T // tp if sp else T
    # crops through the encoder per micro-batch: every image at its most crops (tiles + thumbnail) for a tiling family
    # (native resolution: an image is one sequence of up to v.patches patches, its "crops" being those patches)
    crops = 1 if v.position_embedding == "rope_2d" else fam.image_processor(cfg).max_crops
    n_img = b * images_per_sample(cfg) * crops
    parch = fam.projector_arch(cfg)
    t_out = parch.tokens(v.tokens)
    h = lm.hidden_size
    vp = padded_vocab(vocab_size, lm.vocab_pad_multiple) // tp

    # a trained weight's gradient exists whole for a moment (megatron then adds it to the fp32 main grad), next to
    # the gradient of the layer's input; the local attention's score buffer (megatron's GlobalMemoryBuffer) stays for
    # the whole run
    dh = h // lm.num_heads
    # (not with LoRA on the LLM: its base weights are frozen, only the adapters' small gradients exist)
    full_lang = tlang and "language" not in lora_parts(cfg.model.lora)
    layer_wgrad = (max((lm.num_heads + 2 * lm.num_kv_heads) * dh // tp * h, 2 * lm.ffn_hidden_size // tp * h) * e
                   if full_lang else 0)
    workspace = 0
    t_v = v.positions
    if backend == "local":
        workspace = b * (lm.num_heads // tp) * s * s * e
        if first:
            workspace = max(workspace, n_img * (v.num_heads // tp) * t_v * t_v * e)
    if sp:
        workspace = max(workspace, T * max(h, lm.ffn_hidden_size // tp) * e)  # all-gather buffer
    # the trainer builds all micro-batches of a step up front: ids and labels (int64), loss mask (fp32), images
    batch = m * (b * s * 20 + (n_img * v.patches * v.patch_size ** 2 * v.num_channels if first else 0))

    acts = {}
    for mode in RECOMPUTE_MODES:
        dec = decoder_layer_bytes(lm, s, b, tp, sp, e, backend, bool(tlang), mode, env.device == "gpu")
        per_mb = {"decoder layers": layers * dec["total"]}
        bwd_t = max(dec["transient"], T * (lm.ffn_hidden_size // tp) * e + layer_wgrad)  # a decoder layer's backward
        fwd_t = 0
        if first:
            if tv:
                vl = vision_layer_bytes(v, n_img, tp, e, backend, mode)
                per_mb["vision encoder"] = (v.num_layers * vl["total"]
                                            + n_img * v.patches * v.num_channels * v.patch_size ** 2 * e  # patches
                                            + (n_img * t_v * v.hidden_size * e if v.pre_norm else 0))
            # the projector keeps the encoder's output whole (class token included: the slice is a view)
            proj_in = n_img * t_v * v.hidden_size * e
            if parch.pre_norm:  # the merged tokens and their LayerNorm output (fc1's input)
                proj_in += 2 * n_img * t_out * parch.input_size * e
            per_mb["projector"] = proj_in + (2 * n_img * t_out * h // tp * e if parch.kind == "mlp" else 0)
        if last:
            # final norm: its input and (trained) normalized + output; the loss keeps the fp32 softmax over the
            # vocabulary shard (megatron's cross entropy works in place on the fp32 logits)
            head = tn * h * norm_bytes(e, backend, bool(tlang), env.device == "gpu") + T * vp * 4
            per_mb["final norm, output layer, loss"] = head
            fwd_t = T * vp * 2 if e == 2 else 0  # bf16 logits next to their fp32 copy while the loss runs
            # backward starts at the loss: the output layer's input gradient (and the logits' bf16 gradient); the
            # last decoder layer's backward runs once the head's saved tensors are freed
            bwd_t = max(T * h * e + (T * vp * 2 if e == 2 else 0) + (vp * h * e if tlang else 0), bwd_t - head)
        else:
            per_mb["pipeline output"] = tn * h * e
        if first and tv:  # the encoder's backward runs after the decoder's saved tensors are freed
            bwd_t = max(bwd_t, vl["transient"] - layers * dec["total"])
        acts[mode] = {"per_micro_batch": per_mb, "micro_batches_in_flight": in_flight,
                      "saved": in_flight * sum(per_mb.values()), "batch": batch,
                      "transient": max(fwd_t, bwd_t)}
    static = weights + grads + optimizer + workspace
    mode = layout.recompute
    fwd_bwd_peak = static + batch + acts[mode]["saved"] + acts[mode]["transient"]
    # the optimizer step adds nothing: megavlm runs torch's fused AdamW (training/optim.py), which updates each
    # parameter in place (the foreach path it replaced made one fp32 temporary per trained parameter)
    step_peak = static
    return {
        "stage": rank, "params": dataclasses.asdict(params) | {"total": params.total},
        "decoder_layers": layers, "bytes_per_element": e, "attention": backend,
        "weights": weights, "gradients": grads, "optimizer": optimizer, "optimizer_plain": opt_plain,
        "optimizer_distributed": opt_dist, "workspace": workspace,
        "activations": acts, "peak": max(fwd_bwd_peak, step_peak), "peak_fwd_bwd": fwd_bwd_peak,
        "peak_optimizer_step": step_peak,
    }


def layout_memory(cfg, vocab_size: int, layout: Layout, env: Env | None = None) -> dict:
    """Every pipeline stage's memory and the largest peak (the GPU that must fit)."""
    env = env or Env()
    stages = [stage_memory(cfg, vocab_size, layout, r, env) for r in range(layout.pp)]
    return {"layout": dataclasses.asdict(layout), "label": layout.label(), "stages": stages,
            "peak": max(st["peak"] for st in stages)}


# ----------------------------------------------------------------------------------------------------------------
# Layout search
# ----------------------------------------------------------------------------------------------------------------


def candidate_layouts(cfg, gpus: int) -> list[Layout]:
    """Every (TP, PP, DP, micro-batch, recompute) that the config's checks accept on ``gpus`` GPUs, with sequence
    parallelism on whenever TP > 1 and the distributed optimizer whenever DP > 1 (both only save memory)."""
    from ..config import ConfigError, validate

    out = []
    for tp in divisors(gpus):
        if tp > 8:  # TP beyond one node's NVLink domain is not worth planning
            continue
        for pp in divisors(gpus // tp):
            dp = gpus // (tp * pp)
            per_dp = cfg.train.global_batch // dp if cfg.train.global_batch % dp == 0 else 0
            if not per_dp:
                continue
            fsl = cfg.parallel.first_stage_layers if pp == cfg.parallel.pp else None
            for mb in sorted(divisors(per_dp), reverse=True):
                trial = copy.deepcopy(cfg)
                p = trial.parallel
                p.tp, p.pp, p.first_stage_layers = tp, pp, fsl
                p.sequence_parallel = tp > 1
                p.distributed_optimizer = dp > 1
                trial.train.micro_batch = mb
                try:
                    validate(trial, gpus)
                except ConfigError:
                    continue
                for rc in RECOMPUTE_MODES:
                    out.append(Layout(tp, pp, dp, mb, tp > 1, dp > 1, rc, fsl))
    return out


_RECOMPUTE_COST = {"none": 0, "selective": 1, "full": 2}


def suggest(cfg, vocab_size: int, gpus: int, gpu_memory_gib: float, env: Env | None = None,
            reserve_gib: float = DEFAULT_RESERVE_GIB, limit: int = 5) -> list[dict]:
    """Layouts that fit, best first. Ranking (a rule of thumb, not a measured speed): no recompute before selective
    before full (full costs ~1/3 more compute); then the smallest model-parallel size TP·PP (less communication, no
    pipeline bubble); then the smallest pipeline bubble (pp-1)/m; then the largest micro-batch; then the most
    headroom. One row per (TP, PP): the best micro-batch and recompute for it."""
    env = env or Env()
    budget = (gpu_memory_gib - reserve_gib) * GIB
    fits = []
    for lay in candidate_layouts(cfg, gpus):
        mem = layout_memory(cfg, vocab_size, lay, env)
        if mem["peak"] <= budget:
            m = cfg.train.global_batch // (lay.micro_batch * lay.dp)
            bubble = (lay.pp - 1) / m
            key = (_RECOMPUTE_COST[lay.recompute], lay.tp * lay.pp, round(bubble, 6), -lay.micro_batch, mem["peak"])
            fits.append((key, lay, mem, bubble, m))
    fits.sort(key=lambda x: x[0])
    seen, rows = set(), []
    for key, lay, mem, bubble, m in fits:
        if (lay.tp, lay.pp) in seen:
            continue
        seen.add((lay.tp, lay.pp))
        rows.append({"layout": dataclasses.asdict(lay), "label": lay.label(), "peak": mem["peak"],
                     "micro_batches": m, "bubble": bubble, "headroom": budget - mem["peak"]})
        if len(rows) == limit:
            break
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------


def resolve_vocab_size(cfg) -> int:
    """``model.language.vocab_size``, or the tokenizer's size when it is 0 (as the trainer does)."""
    if cfg.model.language.vocab_size:
        return cfg.model.language.vocab_size
    from ..data.tokenizer import load_tokenizer, synthetic_vocabulary
    from ..errors import UserError

    if cfg.data.tokenizer is None:
        return len(synthetic_vocabulary())
    try:
        return len(load_tokenizer(cfg.data.tokenizer))
    except UserError as e:
        raise UserError(f"{e}; or plan without the tokenizer: model.language.vocab_size=N") from e


def make_plan(cfg, gpus: int, gpu_memory_gib: float, device: str = "gpu", vocab_size: int | None = None,
              reserve_gib: float = DEFAULT_RESERVE_GIB, limit: int = 5) -> dict:
    """Parameters, memory per GPU for the config's layout on ``gpus`` GPUs, and layouts that fit. Raises ConfigError
    for a config that is not valid even with one data-parallel replica; a layout that does not suit ``gpus`` (TP·PP
    not dividing it, a global batch that DP·micro-batch does not divide) is reported in ``config_layout['error']``
    and the suggestions still come."""
    from ..config import ConfigError, ConfigWarning, validate

    if gpus < 1:
        raise ConfigError(f"--gpus={gpus} must be >= 1")
    if not gpu_memory_gib > 0:
        raise ConfigError(f"--gpu-memory={gpu_memory_gib} must be > 0 (GiB per GPU)")
    if reserve_gib < 0 or reserve_gib >= gpu_memory_gib:
        raise ConfigError(f"--reserve={reserve_gib} must be >= 0 and below --gpu-memory={gpu_memory_gib}")
    with warnings.catch_warnings():  # the CLI has shown the config's warnings once; the layout search repeats them
        warnings.simplefilter("ignore", ConfigWarning)
        validate(cfg, cfg.parallel.tp * cfg.parallel.pp)
        try:
            dp, layout_error = validate(cfg, gpus), None
        except ConfigError as e:
            dp, layout_error = 1, str(e)
        vocab = vocab_size or resolve_vocab_size(cfg)
        env = Env(device=device)
        suggestions = suggest(cfg, vocab, gpus, gpu_memory_gib, env, reserve_gib, limit)
    fam = families.of(cfg)
    whole = StageParams(vision=fam.vision_arch(cfg).params(), language=language_params(cfg.model.language, vocab),
                        projector=fam.projector_arch(cfg).params())
    _add_lora(cfg, whole, 1, cfg.model.language.num_layers, True)
    v, parch = fam.vision_arch(cfg), fam.projector_arch(cfg)
    image = {"unpooled_tokens_per_crop": dataclasses.replace(parch, pool="none").tokens(v.tokens),
             "tokens_per_crop": fam.image_tokens(cfg),
             "max_tokens_per_image": fam.max_image_tokens(cfg), "formula": fam.image_tokens_formula(cfg),
             "pool": getattr(cfg.model.projector, "pool", "none"), "images_per_sample": cfg.data.max_images}
    p = cfg.parallel
    layout = Layout(p.tp, p.pp, dp, cfg.train.micro_batch, p.sequence_parallel, p.distributed_optimizer,
                    cfg.train.recompute, p.first_stage_layers)
    mem = layout_memory(cfg, vocab, layout, env)
    if layout_error:
        mem = {"layout": dataclasses.asdict(layout), "label": layout.label(), "stages": [], "peak": None,
               "error": f"not valid on {gpus} GPU(s): {layout_error}"}
    budget = (gpu_memory_gib - reserve_gib) * GIB
    return {
        "gpus": gpus, "gpu_memory_gib": gpu_memory_gib, "reserve_gib": reserve_gib, "device": device,
        "dtype": "bf16" if env.dtype_bytes(cfg) == 2 else "fp32", "attention": env.backend(cfg),
        "vocab_size": vocab, "stage": cfg.train.stage, "trainable": cfg.train.trainable,
        "lora": dataclasses.asdict(cfg.model.lora) if cfg.model.lora.rank else None,
        "parameters": dataclasses.asdict(whole) | {"total": whole.total},
        "image_tokens": image,
        "config_layout": mem | {"fits": mem["peak"] is not None and mem["peak"] <= budget},
        "suggestions": suggestions,
    }


_UNIT = ["GiB", GIB]  # format_plan switches to MiB for models whose peak is under 1 GiB


def _g(x: float) -> str:
    return f"{x / _UNIT[1]:.2f}"


def _n(x: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


def format_plan(plan: dict) -> str:
    """The human-readable plan (``megavlm plan``'s default output)."""
    peaks = [plan["config_layout"]["peak"] or 0] + [r["peak"] for r in plan["suggestions"]]
    _UNIT[:] = ["GiB", GIB] if max(peaks) >= GIB else ["MiB", 2 ** 20]
    P = plan["parameters"]
    lora = SimpleNamespace(**plan["lora"]) if plan.get("lora") else None
    lines = [(f"model: {plan['dtype']} on {plan['device']}, attention {plan['attention']}, "
              f"vocab {plan['vocab_size']}, trains {trained_label(plan['stage'], plan.get('trainable'), lora)}"), "",
             "parameters        total          trained",
             ]
    tv, tproj, tlang = trainable_parts(plan["stage"], plan.get("trainable"))
    adapted = lora_parts(lora)
    for name, on in (("vision", tv), ("projector", tproj), ("language", tlang)):
        trained = P.get(f"{name}_lora", 0) if name in adapted else (P[name] if on else 0)
        note = f"  (LoRA adapters; the {P[name] - trained:,} others frozen)" if name in adapted else ""
        lines.append(f"  {name:<10} {P[name]:>14,} ({_n(P[name]):>7})  {trained:>14,}{note}")
    lines.append(f"  {'total':<10} {P['total']:>14,} ({_n(P['total']):>7})  {P['trainable']:>14,}")
    im = plan.get("image_tokens")
    if im:
        saving = f"; {im['unpooled_tokens_per_crop']} without the pool" if im["pool"] != "none" else ""
        lines += ["", f"image tokens: {im['tokens_per_crop']} per crop ({im['formula']}{saving}), at most "
                      f"{im['max_tokens_per_image']} per image, up to {im['images_per_sample']} image(s) per sample"]
    cl = plan["config_layout"]
    lines += ["", f"memory per GPU ({_UNIT[0]}) for the config's layout on {plan['gpus']} GPU(s): {cl['label']}"]
    if cl.get("error"):
        lines.append(f"  {cl['error']}")
        cl = None
    lines += _layout_lines(plan, cl) if cl else []
    budget = plan["gpu_memory_gib"] - plan["reserve_gib"]
    lines += ["", (f"layouts that fit {plan['gpus']} GPU(s) x {plan['gpu_memory_gib']:g} GiB "
                   f"({budget:g} GiB usable), best first:")]
    if not plan["suggestions"]:
        lines.append("  none: more GPUs, a smaller micro-batch, or a smaller model")
    else:
        lines.append(f"  {'#':<3}{'layout':<52}{'peak ' + _UNIT[0]:>9}{'headroom':>10}{'bubble':>8}")
        for i, r in enumerate(plan["suggestions"], 1):
            lines.append(f"  {i:<3}{r['label']:<52}{_g(r['peak']):>9}{_g(r['headroom']):>10}{r['bubble']:>8.2f}")
        best = plan["suggestions"][0]["layout"]
        ov = [f"parallel.tp={best['tp']}", f"parallel.pp={best['pp']}", f"train.micro_batch={best['micro_batch']}",
              f"parallel.sequence_parallel={str(best['sequence_parallel']).lower()}",
              f"parallel.distributed_optimizer={str(best['distributed_optimizer']).lower()}",
              f"train.recompute={best['recompute']}"]
        lines.append(f"  overrides for #1: {' '.join(ov)}")
    return "\n".join(lines)


def _layout_lines(plan: dict, cl: dict) -> list[str]:
    lines = []
    head = f"  {'':<34}" + "".join(f"{'stage ' + str(st['stage']):>10}" for st in cl["stages"])
    lines.append(head)

    def row(label, get):
        lines.append(f"  {label:<34}" + "".join(f"{_g(get(st)):>10}" for st in cl["stages"]))

    lines.append(f"  {'parameters on this GPU':<34}" + "".join(f"{_n(st['params']['total']):>10}"
                                                              for st in cl["stages"]))
    row("weights", lambda st: st["weights"])
    row("gradients (fp32 main grads)", lambda st: st["gradients"])
    row("optimizer (plain)", lambda st: st["optimizer_plain"])
    row("optimizer (distributed)", lambda st: st["optimizer_distributed"])
    for mode in RECOMPUTE_MODES:
        row(f"activations, recompute={mode}", lambda st, m=mode: st["activations"][m]["saved"])
    row("transient + workspace", lambda st: st["activations"][cl["layout"]["recompute"]]["transient"]
        + st["workspace"])
    lines.append(f"  {'micro-batches in flight (1F1B)':<34}" + "".join(
        f"{st['activations']['none']['micro_batches_in_flight']:>10}" for st in cl["stages"]))
    row("input batches of a step", lambda st: st["activations"]["none"]["batch"])
    row("peak (this layout's options)", lambda st: st["peak"])
    lines.append(f"  -> peak {_g(cl['peak'])} {_UNIT[0]}: {'fits' if cl['fits'] else 'does NOT fit'} in "
                 f"{plan['gpu_memory_gib']:g} GiB less {plan['reserve_gib']:g} GiB reserve")
    return lines


def to_json(plan: dict) -> str:
    return json.dumps(plan, indent=2)

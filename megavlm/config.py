"""Run configuration: nested dataclasses, YAML loading, dotted overrides, validation.

This module deliberately imports neither torch nor megatron: it must be cheap to
import and usable before any process group exists (launchers, ``--help``,
validating a config for a given world size on a login node).

Typical use::

    cfg = load_config("configs/tiny_cpu.yaml", ["train.steps=100", "parallel.tp=2"])
    dp = validate(cfg, world_size)
    check_paths(cfg)            # train only: the files the run reads exist
    save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))

The ``model`` section belongs to a model family (``model.family``, default ``llava``; see ``megavlm/families``):
``model.vision``, ``model.projector`` and ``model.language`` are the family's own section classes, chosen when the
config is loaded. Every section checks itself (its ``check`` method); :func:`validate` runs those checks, the
family's, and the few rules that span sections.

Override values are parsed with YAML (``null``, ``true``, ``1e-3``, ``[1, 2]`` all
work) and then coerced to the field's declared type; every error is a
:class:`ConfigError` whose message names the dotted key and what would be valid.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import tempfile
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import yaml

from .shapes import decoder_layers_per_stage, divisors, fmt

__all__ = [
    "ConfigError",
    "ConfigWarning",
    "Config",
    "ModelConfig",
    "ViTConfig",
    "LanguageConfig",
    "ParallelConfig",
    "TrainConfig",
    "DataConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "load_config",
    "from_dict",
    "validate",
    "check_paths",
    "single_layout",
    "dp_size",
    "checkpoint_dir",
    "shards_dir",
    "to_dict",
    "to_yaml",
    "save_config",
    "SPEC_CHOICES",
    "DTYPE_CHOICES",
    "KERNELS_CHOICES",
    "LR_SCHEDULE_CHOICES",
    "STAGE_CHOICES",
    "RECOMPUTE_CHOICES",
    "DATA_SOURCE_CHOICES",
    "MIN_TEXT_TOKENS",
    "MAX_SHAPES_LIMIT",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key and the valid choices."""


class ConfigWarning(UserWarning):
    """A setting that is allowed but probably not meant (the CLI prints it once, on rank 0)."""


# --------------------------------------------------------------------------------------
# Allowed values
# --------------------------------------------------------------------------------------

SPEC_CHOICES = ("auto", "local", "sdpa", "te")
DTYPE_CHOICES = ("auto", "fp32", "bf16")
KERNELS_CHOICES = ("auto", "fused", "reference")
LR_SCHEDULE_CHOICES = ("cosine", "linear", "constant")
STAGE_CHOICES = (1, 2, 3)
RECOMPUTE_CHOICES = ("none", "selective", "full")
OBJECTIVE_CHOICES = ("sft", "dpo")
DATA_SOURCE_CHOICES = ("synthetic", "synthetic_shards", "shards")
IMAGE_MODE_CHOICES = ("resize", "pad", "crop")
#: ``model.projector.pool``: the 2×2 token pooling before the projector (every family's projector section has it).
POOL_CHOICES = ("none", "avg2x2", "shuffle2x2")
#: data.max_seq_len must leave at least this many text positions after the image tokens.
MIN_TEXT_TOKENS = 8
#: the synthetic data generator knows this many shape kinds at most per image.
MAX_SHAPES_LIMIT = 3
#: The family a config without ``model.family`` (every config written before families existed) belongs to.
DEFAULT_FAMILY = "llava"
#: Largest value of any size or count in the config (int32: DALI's batch size, kernel indices, tensor shapes).
MAX_SIZE = 2**31 - 1
#: Largest ``train.global_batch``: samples of one optimizer step, each rank's share held in memory at once (LLaVA
#: trains with 128-256, the largest published LLM runs with a few thousand sequences per step).
MAX_GLOBAL_BATCH = 2**24


# --------------------------------------------------------------------------------------
# Checks shared by the sections
# --------------------------------------------------------------------------------------


def _check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {fmt(choices)}")


def _check_choice_list(key: str, values: Sequence[Any], choices: Sequence[Any], noun: str, empty: str,
                       unset: str) -> None:
    """A non-empty list of distinct ``choices`` (``noun``: what one is; ``empty``: what ``[]`` would do; ``unset``:
    how to ask for none)."""
    if not values:
        raise ConfigError(f"{key}=[] {empty}; name {noun}s from: {fmt(choices)} ({unset})")
    for i, v in enumerate(values):
        _check_choice(f"{key}[{i}]", v, choices)
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}={values} names a {noun} twice")


def _check_min(key: str, value: Any, minimum: int) -> None:
    if value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ConfigError(f"{key}={value} must be {what}")
    if value > MAX_SIZE:  # sizes end up in int32 places (DALI's batch size, kernel indices, tensor shapes)
        raise ConfigError(f"{key}={value} is too large: at most {MAX_SIZE} (2**31-1)")


def _check_nonneg(key: str, value: Any) -> None:
    if not value >= 0:  # also catches NaN
        raise ConfigError(f"{key}={value} must be >= 0")


def _check_positive_float(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value} must be > 0")


def _check_range_open(key: str, value: float, lo: float, hi: float) -> None:
    if not (lo < value < hi):
        raise ConfigError(f"{key}={value} must satisfy {lo:g} < {key.rpartition('.')[2]} < {hi:g}")


def _check_path_text(key: str, value: Optional[str], null_means: str) -> None:
    if value is not None and not value.strip():
        raise ConfigError(f"{key}='' is not valid; use null ({null_means}) or a path")


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


@dataclass
class ViTConfig:
    """A ViT image encoder's shape (the fields every family's ViT section has; a family's vision section subclasses
    it with what is its own, e.g. LLaVA's CLIP/SigLIP ``flavour``)."""

    #: Square input resolution in pixels.
    image_size: int = 32
    #: Square patch size in pixels; must divide ``image_size``.
    patch_size: int = 8
    #: Input image channels (3 for RGB).
    num_channels: int = 3
    #: Encoder hidden width.
    hidden_size: int = 64
    #: Number of transformer layers in the encoder (of the pretrained tower; only those up to ``feature_layer`` are
    #: built).
    num_layers: int = 2
    #: Attention heads per encoder layer.
    num_heads: int = 4
    #: Encoder MLP inner width.
    ffn_hidden_size: int = 256
    #: Which hidden state feeds the projector, HF ``hidden_states`` indexing:
    #: -1 = last layer output, -2 = penultimate (LLaVA), k >= 1 = after k layers.
    #: Valid: 1..num_layers or -num_layers..-1.
    feature_layer: int = -1
    #: Epsilon of the encoder's LayerNorms.
    layernorm_eps: float = 1e-5
    #: Per-channel mean used to normalise pixels (one entry per channel).
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    #: Per-channel std used to normalise pixels (one entry per channel, all > 0).
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    def check(self, key: str) -> None:
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_layers", "num_heads",
                     "ffn_hidden_size"):
            _check_min(f"{key}.{name}", getattr(self, name), 1)
        _check_positive_float(f"{key}.layernorm_eps", self.layernorm_eps)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{key}.hidden_size={self.hidden_size} is not divisible by {key}.num_heads={self.num_heads}; valid "
                f"num_heads: {fmt(divisors(self.hidden_size))}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{key}.image_size={self.image_size} is not divisible by {key}.patch_size={self.patch_size}; valid "
                f"patch_size values: {fmt(divisors(self.image_size))}")
        nv = self.num_layers
        if not (1 <= self.feature_layer <= nv or -nv <= self.feature_layer <= -1):
            raise ConfigError(
                f"{key}.feature_layer={self.feature_layer} is out of range for {key}.num_layers={nv}; valid: "
                f"1..{nv} or -{nv}..-1 (-1 = last layer, -2 = penultimate)")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != self.num_channels:
                raise ConfigError(f"{key}.{name} has {len(values)} entries but {key}.num_channels="
                                  f"{self.num_channels}; give one value per channel")
        for i, s in enumerate(self.image_std):
            if not s > 0:
                raise ConfigError(f"{key}.image_std[{i}]={s} must be > 0")

    def tp_split(self, key: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """(head counts, MLP widths) that tensor parallelism splits: TP must divide each."""
        return [(f"{key}.num_heads", self.num_heads)], [(f"{key}.ffn_hidden_size", self.ffn_hidden_size)]


@dataclass
class LanguageConfig:
    """Decoder-only language model (Llama-style: RMSNorm, RoPE, SwiGLU, GQA; optional Qwen2-style q/k/v biases)."""

    #: Vocabulary size; 0 = take it from the tokenizer.
    vocab_size: int = 0
    #: Decoder hidden width.
    hidden_size: int = 128
    #: Number of decoder layers.
    num_layers: int = 2
    #: Query attention heads.
    num_heads: int = 4
    #: Key/value heads (grouped-query attention); must divide ``num_heads``.
    num_kv_heads: int = 2
    #: SwiGLU inner width.
    ffn_hidden_size: int = 352
    #: RoPE base frequency.
    rope_theta: float = 10000.0
    #: Epsilon of the decoder's RMSNorms.
    norm_eps: float = 1e-5
    #: Biases on the q/k/v projections (Qwen2); every other linear layer stays bias-free.
    qkv_bias: bool = False
    #: The output layer shares the embedding's weights (HF ``tie_word_embeddings``; small Qwen2 models); with PP the
    #: last stage keeps a copy that megatron keeps equal by all-reducing their gradients.
    tie_embeddings: bool = False
    #: Embedding/output rows are padded to a multiple of this; independent of TP so
    #: checkpoints can be resharded (must itself be a multiple of ``parallel.tp``).
    vocab_pad_multiple: int = 128
    #: Share of each head's channels that RoPE rotates (HF ``partial_rotary_factor``, Phi-4-mini's 0.75; megatron's
    #: ``rotary_percent``); the rest pass unrotated.
    rotary_percent: float = 1.0
    #: ``default`` (plain RoPE) | ``longrope`` (Phi-3's long-context RoPE, ``models/rope.py``: the rotary frequencies
    #: divided by ``rope_short_factor``, or by ``rope_long_factor`` when the sequence is longer than
    #: ``rope_original_max_positions``; cos and sin scaled by ``rope_attention_factor``).
    rope_type: str = "default"
    #: ``longrope``: one factor per rotary frequency (rotary channels / 2) each.
    rope_short_factor: Optional[list[float]] = None
    rope_long_factor: Optional[list[float]] = None
    #: ``longrope``: the pretraining length past which the long factors apply (HF
    #: ``original_max_position_embeddings``).
    rope_original_max_positions: int = 0
    #: ``longrope``: the factor on cos and sin (HF ``attention_factor``, resolved at import).
    rope_attention_factor: float = 1.0
    #: How the HF checkpoint lays out the decoder's tensors: ``llama`` (separate q/k/v and gate/up projections) or
    #: ``phi3`` (fused ``qkv_proj`` = [q; k; v] and ``gate_up_proj`` = [gate; up]); the model is the same.
    hf_layout: str = "llama"

    def check(self, key: str) -> None:
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"{key}.rotary_percent={self.rotary_percent} must be in (0, 1]")
        _check_choice(f"{key}.rope_type", self.rope_type, ("default", "longrope"))
        _check_choice(f"{key}.hf_layout", self.hf_layout, ("llama", "phi3"))
        rot = int(self.hidden_size // max(self.num_heads, 1) * self.rotary_percent)
        if self.rope_type == "longrope":
            if getattr(self, "mrope_section", None):
                raise ConfigError(f"{key}.rope_type=longrope does not combine with {key}.mrope_section (M-RoPE)")
            for name in ("rope_short_factor", "rope_long_factor"):
                got = getattr(self, name)
                if got is None or len(got) != rot // 2:
                    raise ConfigError(f"{key}.{name} must list {rot // 2} factors (one per rotary frequency: "
                                      f"head dim × rotary_percent / 2) for rope_type=longrope, got "
                                      f"{None if got is None else len(got)}")
            _check_min(f"{key}.rope_original_max_positions", self.rope_original_max_positions, 1)
            _check_positive_float(f"{key}.rope_attention_factor", self.rope_attention_factor)
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                     "vocab_pad_multiple"):
            _check_min(f"{key}.{name}", getattr(self, name), 1)
        _check_nonneg(f"{key}.vocab_size", self.vocab_size)
        _check_positive_float(f"{key}.norm_eps", self.norm_eps)
        _check_positive_float(f"{key}.rope_theta", self.rope_theta)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{key}.num_kv_heads={self.num_kv_heads} does not divide {key}.num_heads={self.num_heads}; valid "
                f"num_kv_heads: {fmt(divisors(self.num_heads))}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{key}.hidden_size={self.hidden_size} is not divisible by {key}.num_heads={self.num_heads}; valid "
                f"num_heads: {fmt(divisors(self.hidden_size))}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                f"{key} head dim hidden_size/num_heads = {self.hidden_size}/{self.num_heads} = "
                f"{self.hidden_size // self.num_heads} must be even for RoPE")

    def tp_split(self, key: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """(head counts, MLP widths) that tensor parallelism splits: TP must divide each."""
        return ([(f"{key}.num_heads", self.num_heads), (f"{key}.num_kv_heads", self.num_kv_heads)],
                [(f"{key}.ffn_hidden_size", self.ffn_hidden_size)])


#: The linear layers of a transformer layer that ``model.lora.targets`` may name (megatron's names: the fused q/k/v
#: projection, the attention output, the MLP's first (SwiGLU: gate+up) and second layer).
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's linear layers: ``W x + (alpha/rank)·B A x`` with the
    base ``W`` frozen; tensor-parallel aware (models/lora.py, docs/lora.md)."""

    #: Adapter rank; 0 = LoRA off.
    rank: int = 0
    #: Scale numerator: the adapter's output is multiplied by ``alpha / rank``.
    alpha: float = 16.0
    #: Dropout on the adapter's input (training only).
    dropout: float = 0.0
    #: Which linear layers of each transformer layer get an adapter: any of ``qkv``, ``proj``, ``fc1``, ``fc2``.
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    #: Also adapt the vision encoder's layers (the same targets); default: the LLM only.
    vision: bool = False

    def check(self, key: str) -> None:
        if self.rank < 0:
            raise ConfigError(f"{key}.rank={self.rank} must be >= 0 (0 = LoRA off)")
        if self.rank > MAX_SIZE:
            raise ConfigError(f"{key}.rank={self.rank} is too large: at most {MAX_SIZE} (2**31-1)")
        _check_positive_float(f"{key}.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout={self.dropout} must satisfy 0 <= dropout < 1")
        _check_choice_list(f"{key}.targets", self.targets, LORA_TARGETS, "layer", "adapts nothing",
                           f"or set {key}.rank=0 for no LoRA")


@dataclass
class ProjectorPoolConfig:
    """What every family's projector section has (its own section subclasses this): the token pooling."""

    #: Token pooling of each crop's (h, w) grid of vision tokens before the projector, 4× fewer tokens: ``none``,
    #: ``avg2x2`` (the mean of each 2×2 block: NVILA's spatial compression, Phi-4-MM's pooling) or ``shuffle2x2``
    #: (each 2×2 block concatenated into one token of 4× the channels: Phi-3-Vision's, so the projector takes 4× the
    #: width). The grid must have an even side (an odd one is a config error, not padded) and no class token.
    pool: str = "none"

    def check(self, key: str) -> None:
        _check_choice(f"{key}.pool", self.pool, POOL_CHOICES)


@dataclass
class ModelConfig:
    """The whole vision-language model: a model family and that family's sections."""

    #: Model family (``megavlm/families``): which architecture the sections below describe, how its weights map
    #: to and from Hugging Face, how it turns images into tokens and which prompt templates it knows.
    family: str = DEFAULT_FAMILY
    #: Image encoder (the family's section; see its class for the keys).
    vision: Any = None
    #: Vision-to-language projector (the family's section).
    projector: Any = None
    #: Language model (the family's section).
    language: Any = None
    #: Attention/layer implementation: ``auto|local|sdpa|te``. ``auto`` = te if
    #: importable on GPU, else sdpa (on CPU too); ``local`` is megatron's own unfused attention.
    spec: str = "auto"
    #: Parameter/compute dtype: ``auto|fp32|bf16``. ``auto`` = bf16 on GPU, fp32 on CPU.
    dtype: str = "auto"
    #: Fused CUDA ops: ``auto`` (fused when a GPU and a built ``megavlm._C`` are present), ``fused`` (required),
    #: ``reference`` (the pure-PyTorch ops).
    kernels: str = "auto"
    #: Low-rank adapters on the LLM's (and optionally the vision encoder's) linear layers; ``rank: 0`` = off.
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        from . import families

        fam = families.get(self.family, key="model.family")  # ConfigError for an unknown family
        for name, cls in fam.sections.items():
            if getattr(self, name) is None:
                setattr(self, name, cls())

    def check(self, key: str) -> None:
        _check_choice(f"{key}.spec", self.spec, SPEC_CHOICES)
        _check_choice(f"{key}.dtype", self.dtype, DTYPE_CHOICES)
        _check_choice(f"{key}.kernels", self.kernels, KERNELS_CHOICES)


@dataclass
class ParallelConfig:
    """Model-parallel layout; data-parallel size is derived from the world size."""

    #: Tensor-parallel size.
    tp: int = 1
    #: Pipeline-parallel size.
    pp: int = 1
    #: Megatron sequence parallelism (needs tp > 1).
    sequence_parallel: bool = False
    #: Shard optimizer state over data-parallel ranks.
    distributed_optimizer: bool = False
    #: Decoder layers on the first pipeline stage (which also holds the vision
    #: encoder and projector); None = even split. The remaining layers are split
    #: evenly over the other stages.
    first_stage_layers: Optional[int] = None

    def check(self, key: str) -> None:
        _check_min(f"{key}.tp", self.tp, 1)
        _check_min(f"{key}.pp", self.pp, 1)
        if self.sequence_parallel and self.tp <= 1:
            raise ConfigError(
                f"{key}.sequence_parallel=true requires {key}.tp > 1 (got tp=1); set {key}.sequence_parallel=false "
                f"or raise {key}.tp")


@dataclass
class TrainConfig:
    """Optimisation and schedule."""

    #: Which parameters train: 1 = projector only; 2 = projector + LLM; 3 = everything.
    stage: int = 2
    #: The parts that train, any of ``vision``, ``projector``, ``language`` (e.g. ``[vision, projector]`` for
    #: Qwen-VL's first stage, the LLM frozen); when set it replaces ``stage``'s preset; null = ``stage`` decides.
    trainable: Optional[list[str]] = None
    #: Number of optimizer steps.
    steps: int = 30
    #: Base random seed (model init and data).
    seed: int = 1234
    #: Samples per optimizer step, over all data-parallel ranks.
    global_batch: int = 8
    #: Samples per forward/backward pass on one rank.
    micro_batch: int = 2
    #: Peak learning rate.
    lr: float = 1e-3
    #: Learning rate reached at the last step.
    min_lr: float = 0.0
    #: Linear warmup steps from 0 to ``lr`` (more than ``steps`` is allowed: the LR then never reaches its peak, as
    #: in Megatron-LM; a warning says so).
    warmup_steps: int = 0
    #: Decay after warmup, to ``min_lr`` at ``steps``: ``cosine|linear|constant``.
    lr_schedule: str = "cosine"
    #: AdamW decoupled weight decay.
    weight_decay: float = 0.0
    #: Adam beta1.
    adam_beta1: float = 0.9
    #: Adam beta2.
    adam_beta2: float = 0.95
    #: Adam epsilon.
    adam_eps: float = 1e-8
    #: Global gradient-norm clipping threshold; 0 disables.
    clip_grad: float = 1.0
    #: Save and exit once the step count reaches a multiple of this (0 = never), e.g. to fit a cluster time limit;
    #: the next run with ``checkpoint.load=auto`` continues exactly where this one stopped.
    exit_interval: int = 0
    #: Activation recomputation (megatron's ``recompute_granularity``): ``none`` keeps every activation;
    #: ``selective`` recomputes the core attention in the backward pass (drops the s² attention scores);
    #: ``full`` keeps only each transformer layer's input and recomputes the layer (``recompute_method=uniform``,
    #: one layer per unit). ``megavlm plan`` shows what each saves.
    recompute: str = "none"
    #: ``sft`` (next-token loss on the answers) or ``dpo`` (direct preference optimisation, Rafailov et al. 2023, on
    #: preference pairs: records with ``chosen`` and ``rejected`` answers, or the synthetic set's pairs; the
    #: reference model is the weights the run starts from). With ``dpo`` a sample is a pair: ``global_batch`` and
    #: ``micro_batch`` count pairs, and a micro-batch runs ``2 × micro_batch`` sequences (docs/dpo.md).
    objective: str = "sft"
    #: DPO's β: the strength of the pull towards the reference model (the implicit reward is β·log π/π_ref).
    dpo_beta: float = 0.1

    def check(self, key: str) -> None:
        _check_choice(f"{key}.lr_schedule", self.lr_schedule, LR_SCHEDULE_CHOICES)
        _check_choice(f"{key}.objective", self.objective, OBJECTIVE_CHOICES)
        if not self.dpo_beta > 0 or not math.isfinite(self.dpo_beta):
            raise ConfigError(f"{key}.dpo_beta={self.dpo_beta} must be > 0")
        _check_choice(f"{key}.stage", self.stage, STAGE_CHOICES)
        if self.trainable is not None:
            from .shapes import PARTS

            _check_choice_list(f"{key}.trainable", self.trainable, PARTS, "part", "trains nothing",
                               f"or null: {key}.stage decides")
        _check_choice(f"{key}.recompute", self.recompute, RECOMPUTE_CHOICES)
        for name in ("steps", "global_batch", "micro_batch"):
            _check_min(f"{key}.{name}", getattr(self, name), 1)
        if self.global_batch > MAX_GLOBAL_BATCH:
            raise ConfigError(f"{key}.global_batch={self.global_batch} is too large: at most {MAX_GLOBAL_BATCH:,} "
                              "samples per step (each rank holds its share in memory at once)")
        for name in ("warmup_steps", "exit_interval", "min_lr", "weight_decay", "clip_grad"):
            _check_nonneg(f"{key}.{name}", getattr(self, name))
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"{key}.seed={self.seed} must be in [0, 2**32)")
        _check_positive_float(f"{key}.adam_eps", self.adam_eps)
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"{key}.lr={self.lr} must be > 0")
        if self.min_lr > self.lr:
            raise ConfigError(f"{key}.min_lr={self.min_lr} must be <= {key}.lr={self.lr}")
        _check_range_open(f"{key}.adam_beta1", self.adam_beta1, 0.0, 1.0)
        _check_range_open(f"{key}.adam_beta2", self.adam_beta2, 0.0, 1.0)
        if self.warmup_steps > self.steps:
            warnings.warn(f"{key}.warmup_steps={self.warmup_steps} is more than {key}.steps={self.steps}: the "
                          f"learning rate rises for the whole run and never reaches {key}.lr={self.lr}",
                          ConfigWarning, stacklevel=2)


@dataclass
class DataConfig:
    """Training/eval data."""

    #: ``synthetic_shards`` (the rendered-shapes set written as shards to ``data.shards`` on first use, then read like
    #: any shards), ``shards`` (WebDataset shards of ``megavlm data convert``, read through the DALI pipeline) or
    #: ``synthetic`` (the rendered-shapes set in memory, in a global order that does not depend on the DP size).
    source: str = "synthetic"
    #: Shard directory: read for ``source=shards``; written (if not already there) and read for
    #: ``source=synthetic_shards``, where null means ``{run_dir}/shards``.
    shards: Optional[str] = None
    #: Pack several samples into each sequence of ``max_seq_len`` tokens (no attention across samples, positions
    #: restart per sample); sources with shards only, ``train.micro_batch`` 1 (a micro-batch is one packed
    #: sequence), and an attention that takes packed sequences (``model.spec`` sdpa, te, or auto).
    packing: bool = False
    #: Conversation template for shard records (``megavlm/data/templates.py`` and the model family's own; null =
    #: the family's default).
    template: Optional[str] = "vicuna"
    #: How images are fitted to the encoder's square input: resize (squash) | pad (expand to a square, padding with
    #: the mean colour, then resize) | crop.
    image_mode: str = "pad"
    #: Most images in one sample.
    max_images: int = 1
    #: Stop when more than this share of the samples read were unusable (skipped and counted otherwise).
    max_bad_share: float = 0.05
    #: Pre-generated training samples (cycled).
    num_samples: int = 4096
    #: Held-out evaluation samples (0 disables eval).
    eval_samples: int = 200
    #: Every sequence is padded/truncated to this length (image tokens included).
    max_seq_len: int = 64
    #: Fewest shapes drawn in a synthetic image.
    min_shapes: int = 1
    #: Most shapes drawn in a synthetic image (at most 3).
    max_shapes: int = 3
    #: Share of the synthetic samples that ask whether an object is in the image (``is there a red square in the
    #: image ?`` → ``yes``/``no``, half about absent objects: what ``megavlm eval --task pope`` probes); > 0 adds
    #: their words to the synthetic tokenizer (existing ids unchanged).
    existence_share: float = 0.0
    #: Local path of an HF tokenizer; None = build the synthetic one.
    tokenizer: Optional[str] = None

    def check(self, key: str) -> None:
        from .data.templates import template_names

        _check_choice(f"{key}.source", self.source, DATA_SOURCE_CHOICES)
        _check_choice(f"{key}.image_mode", self.image_mode, IMAGE_MODE_CHOICES)
        if self.template is not None:
            _check_choice(f"{key}.template", self.template, template_names())
        if self.source == "shards" and not self.shards:
            raise ConfigError(f"{key}.source=shards needs {key}.shards=DIR (shards written by `megavlm data convert`)")
        _check_path_text(f"{key}.tokenizer", self.tokenizer, "synthetic tokenizer")
        if self.max_images < 1:
            raise ConfigError(f"{key}.max_images={self.max_images} must be >= 1")
        if not 0.0 <= self.max_bad_share <= 1.0:
            raise ConfigError(f"{key}.max_bad_share={self.max_bad_share} must be between 0 and 1")
        _check_min(f"{key}.num_samples", self.num_samples, 1)
        _check_min(f"{key}.max_seq_len", self.max_seq_len, 1)
        _check_nonneg(f"{key}.eval_samples", self.eval_samples)
        if not 0.0 <= self.existence_share <= 1.0:
            raise ConfigError(f"{key}.existence_share={self.existence_share} must be between 0 and 1")
        if not 1 <= self.min_shapes <= self.max_shapes <= MAX_SHAPES_LIMIT:
            raise ConfigError(f"{key}.min_shapes={self.min_shapes}, {key}.max_shapes={self.max_shapes}: need "
                              f"1 <= min_shapes <= max_shapes <= {MAX_SHAPES_LIMIT}")


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    #: Checkpoint directory; None = ``{run_dir}/checkpoints``.
    dir: Optional[str] = None
    #: Save every N steps (0 = only at the end).
    save_interval: int = 0
    #: ``none`` (fresh start), ``auto`` (latest under ``dir`` if any) or a checkpoint path.
    load: str = "none"
    #: Keep the newest K checkpoints (0 = keep all).
    keep: int = 2
    #: Load model weights only and start at step 0 with a fresh optimizer and LR schedule (stage 1 → stage 2).
    finetune: bool = False

    def check(self, key: str) -> None:
        if not self.load.strip():
            raise ConfigError(f"{key}.load='' is not valid; use 'none', 'auto' or a checkpoint path")
        _check_path_text(f"{key}.dir", self.dir, "{run_dir}/checkpoints")
        _check_nonneg(f"{key}.save_interval", self.save_interval)
        _check_nonneg(f"{key}.keep", self.keep)


@dataclass
class LoggingConfig:
    """Console/TensorBoard logging."""

    #: Console line every N steps (metrics.jsonl gets every step).
    interval: int = 1
    #: Also write TensorBoard event files.
    tensorboard: bool = True

    def check(self, key: str) -> None:
        _check_min(f"{key}.interval", self.interval, 1)


@dataclass
class Config:
    """Top-level run configuration."""

    #: Output directory for this run (config, metrics, checkpoints).
    run_dir: str = "runs/default"
    #: Model architecture.
    model: ModelConfig = field(default_factory=ModelConfig)
    #: Parallel layout.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    #: Optimisation.
    train: TrainConfig = field(default_factory=TrainConfig)
    #: Data.
    data: DataConfig = field(default_factory=DataConfig)
    #: Checkpointing.
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    #: Logging.
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check(self, key: str) -> None:
        if not self.run_dir.strip():
            raise ConfigError("run_dir='' is not valid; give a directory path")


# --------------------------------------------------------------------------------------
# YAML parsing
# --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML-1.2 style floats such as ``1e-3`` as floats.

    (PyYAML follows YAML 1.1, where an exponent without a dot is a string.)
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class DuplicateKeyError(yaml.YAMLError):
    """A key that appears twice in one YAML mapping (``line``/``first_line``: 1-based)."""

    def __init__(self, key: Any, line: int, first_line: int):
        self.key, self.line, self.first_line = key, line, first_line
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first_line})")


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: YAML would silently keep the last of two equal keys (so a setting written
    twice, e.g. after a copy-paste, would take effect from a line the reader may not be looking at). Keys merged in
    with ``<<: *anchor`` may be overridden: that is what merging is for."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.setdefault(key, key_node)
        except TypeError:  # an unhashable key: SafeLoader's own error says so
            break
        if first is not key_node:
            raise DuplicateKeyError(key, key_node.start_mark.line + 1, first.start_mark.line + 1)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


# --------------------------------------------------------------------------------------
# Schema introspection and coercion
# --------------------------------------------------------------------------------------

_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_type(obj: Any, name: str) -> Any:
    """The type of field ``name`` of section ``obj``: a sub-section's own class (the family's sections are chosen at
    load time, so the declared hint is not enough), else the declared type."""
    value = getattr(obj, name)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value)
    return _hints(type(obj))[name]


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every valid dotted key (sections and leaves) of the config ``obj``, in declaration order."""
    keys = []
    for f in dataclasses.fields(obj):
        key = prefix + f.name
        keys.append(key)
        if _is_section(_field_type(obj, f.name)):
            keys.extend(_all_keys(getattr(obj, f.name), key + "."))
    return keys


def _suggest(key: str, root: Any) -> Optional[str]:
    """Nearest valid dotted key for an unknown ``key``, or None."""
    keys = _all_keys(root)
    parent, _, leaf = key.rpartition(".")
    # 1. a typo of a sibling in the same (existing) section
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    m = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if m:
        return siblings[m[0]]
    # 2. the right name in the wrong section (e.g. 'model.tp' -> 'parallel.tp')
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return max(same_leaf, key=lambda k: difflib.SequenceMatcher(None, key, k).ratio())
    # 3. anything close overall (e.g. a misspelt section)
    m = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if m:
        return m[0]
    # 4. a close leaf name anywhere
    leaves: dict[str, str] = {}
    for k in keys:
        leaves.setdefault(k.rpartition(".")[2], k)
    m = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    return leaves[m[0]] if m else None


def _unknown_key_error(key: str, obj: Any, prefix: str, where: str, root: Any) -> ConfigError:
    valid = ", ".join(f.name for f in dataclasses.fields(obj))
    section = f"'{prefix[:-1]}'" if prefix else "the top level"
    msg = f"unknown config key '{key}'{where}"
    hint = _suggest(key, root)
    if hint:
        msg += f"; did you mean '{hint}'?"
    msg += f" (valid keys in {section}: {valid})"
    return ConfigError(msg)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        (elem,) = typing.get_args(tp)
        return f"list of {_type_name(elem)}"
    return getattr(tp, "__name__", str(tp))


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    got = "null" if value is None else type(value).__name__
    return ConfigError(f"{key}={value!r}: expected {_type_name(tp)}, got {got}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` to the field type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        try:
            return _coerce(key, value, args[0])
        except ConfigError:
            raise _type_error(key, value, tp) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, tp)
    if tp is int:
        if isinstance(value, bool):
            raise _type_error(key, value, tp)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # e.g. steps=1e4
            return int(value)
        raise _type_error(key, value, tp)
    if tp is float:
        if isinstance(value, bool):
            raise _type_error(key, value, tp)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _type_error(key, value, tp)
    if origin is list:
        (elem,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, tp)
        return [_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
    raise TypeError(f"unsupported config field type {tp!r} for {key}")  # schema bug


def _is_str_field(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return str in typing.get_args(tp)
    return False


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _apply_mapping(obj: Any, mapping: Any, prefix: str, where: str, root: Any) -> None:
    """Merge a (possibly partial) nested mapping into dataclass ``obj`` in place."""
    if mapping is None:  # e.g. a section whose keys are all commented out
        return
    if not isinstance(mapping, dict):
        name = f"'{prefix[:-1]}'" if prefix else "the config"
        valid = ", ".join(f.name for f in dataclasses.fields(obj))
        raise ConfigError(
            f"{name} is a section and must be a mapping of its keys ({valid}), "
            f"got {type(mapping).__name__} {mapping!r}{where}"
        )
    names = {f.name for f in dataclasses.fields(obj)}
    for raw_name, value in mapping.items():
        name = str(raw_name)
        key = prefix + name
        if name not in names:
            raise _unknown_key_error(key, obj, prefix, where, root)
        tp = _field_type(obj, name)
        if _is_section(tp):
            _apply_mapping(getattr(obj, name), value, key + ".", where, root)
        else:
            setattr(obj, name, _coerce(key, value, tp))


def _split_override(override: Any) -> tuple[str, str]:
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(
            f"override {override!r} must have the form dotted.key=value (e.g. train.steps=100)"
        )
    key, _, raw = override.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {override!r} has an empty key; expected dotted.key=value")
    return key, raw


def _parse_value(raw: str) -> Any:
    try:
        return _yaml_load(raw)
    except yaml.YAMLError:
        return raw  # e.g. a path with odd characters; type coercion decides


def _apply_override(cfg: Config, override: str) -> None:
    key, raw = _split_override(override)
    where = f" (in override {override!r})"
    parts = key.split(".")
    obj: Any = cfg
    prefix = ""
    for i, name in enumerate(parts):
        if name not in {f.name for f in dataclasses.fields(obj)}:
            # suggest from the whole remaining key: 'trian.steps' -> 'train.steps'
            raise _unknown_key_error(prefix + ".".join(parts[i:]), obj, prefix, where, cfg)
        tp = _field_type(obj, name)
        last = i == len(parts) - 1
        if not last:
            if not _is_section(tp):
                raise ConfigError(
                    f"'{prefix + name}' is a value of type {_type_name(tp)}, not a section, so "
                    f"'{key}' is not a valid key{where}"
                )
            obj = getattr(obj, name)
            prefix += name + "."
            continue
        value = _parse_value(raw)
        if _is_section(tp):
            _apply_mapping(getattr(obj, name), value, key + ".", where, cfg)
            return
        if _is_str_field(tp) and value is not None and not isinstance(value, (str, list, dict)):
            value = raw.strip()  # keep '007' or '1e-3' verbatim for string fields
        setattr(obj, name, _coerce(key, value, tp))


def _family_of(data: Any, overrides: Sequence[str]) -> str:
    """``model.family`` as the file and the overrides (the last one wins) set it, before anything else is applied:
    the family decides which section classes the rest of the keys go into."""
    family = DEFAULT_FAMILY
    if isinstance(data, dict) and isinstance(data.get("model"), dict) and "family" in data["model"]:
        family = data["model"]["family"]
    for ov in overrides:
        key, raw = _split_override(ov)
        if key == "model.family":
            family = _parse_value(raw)
        elif key == "model":
            value = _parse_value(raw)
            if isinstance(value, dict) and "family" in value:
                family = value["family"]
    if not isinstance(family, str):
        raise _type_error("model.family", family, str)
    return family


def load_config(path: Union[str, os.PathLike, None], overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`Config`: defaults, then the YAML file at ``path`` (may omit any
    key; None = defaults only), then ``dotted.key=value`` overrides in order."""
    data = None
    where = ""
    if path is not None:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = _yaml_load(f.read())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path!r}: {e.strerror or e}") from e
        except DuplicateKeyError as e:
            raise ConfigError(f"config file {path!r}: key {e.key!r} appears twice in the same section, at lines "
                              f"{e.first_line} and {e.line}; keep one") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
        where = f" (in {path})"
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = Config(model=ModelConfig(family=_family_of(data, overrides)))
    _apply_mapping(cfg, data, "", where, cfg)
    for ov in overrides:
        _apply_override(cfg, ov)
    return cfg


def from_dict(data: Any, where: str = "") -> Config:
    """The :class:`Config` of a nested dict (a saved ``config.yaml`` or a checkpoint's stored config); keys it
    lacks take their defaults (a config saved before ``model.family`` existed is a LLaVA one)."""
    cfg = Config(model=ModelConfig(family=_family_of(data, ())))
    _apply_mapping(cfg, data, "", where, cfg)
    return cfg


# --------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (deep copy) of ``cfg``."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """YAML text that :func:`load_config` reads back to an equal Config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: Union[str, os.PathLike]) -> None:
    """Atomically write the resolved config as YAML (creating parent directories)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    text = "# resolved megavlm config\n" + to_yaml(cfg)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".yaml.tmp", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------
# Derived quantities
# --------------------------------------------------------------------------------------


def shards_dir(cfg: "Config") -> Optional[str]:
    """Where the training shards are: ``data.shards``, or ``{run_dir}/shards`` for ``source=synthetic_shards``."""
    if cfg.data.shards:
        return cfg.data.shards
    return os.path.join(cfg.run_dir, "shards") if cfg.data.source == "synthetic_shards" else None


def synthetic_existence(cfg: Config) -> bool:
    """Whether the synthetic tokenizer needs the existence words (``data.existence_share`` > 0, or DPO on the
    synthetic pairs, or an eval that asks existence questions)."""
    return cfg.data.existence_share > 0 or cfg.train.objective == "dpo"


def checkpoint_dir(cfg: Config) -> str:
    """``checkpoint.dir`` or, when it is None, ``{run_dir}/checkpoints``."""
    if cfg.checkpoint.dir is not None:
        return cfg.checkpoint.dir
    return os.path.join(cfg.run_dir, "checkpoints")


def single_layout(cfg: Config, tp: int = 1) -> Config:
    """A copy of ``cfg`` at TP=``tp``, PP=1, without sequence parallelism or the distributed optimizer: how
    ``eval``, ``generate`` and the converter build a model (dist_checkpointing reshards any saved layout to it)."""
    c = copy.deepcopy(cfg)
    c.parallel.tp, c.parallel.pp = tp, 1
    c.parallel.first_stage_layers = None
    c.parallel.sequence_parallel = False
    c.parallel.distributed_optimizer = False
    return c


def dp_size(cfg: Config, world_size: int) -> int:
    """Data-parallel size ``world_size / (tp * pp)``; ConfigError if it is not an integer."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size={world_size!r} must be a positive integer")
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    mp = tp * pp
    if mp < 1:
        raise ConfigError(f"parallel.tp={tp} and parallel.pp={pp} must both be >= 1")
    if world_size % mp:
        multiples = [mp * k for k in (1, 2, 3)]
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp*parallel.pp = "
            f"{tp}*{pp} = {mp}: world_size must equal tp*pp*dp with an integer data-parallel "
            f"size dp, but here dp would be {world_size}/{mp} = {world_size / mp:g}. "
            f"Launch {fmt(multiples)}, ... processes (dp = 1, 2, 3, ...), or pick tp and pp whose "
            f"product divides {world_size} (one of {fmt(divisors(world_size))})"
        )
    return world_size // mp


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_types(obj: Any, prefix: str = "") -> None:
    """Re-check field types, in case a Config was built or mutated in code."""
    for f in dataclasses.fields(obj):
        tp = _field_type(obj, f.name)
        value = getattr(obj, f.name)
        key = prefix + f.name
        if _is_section(tp):
            _check_types(value, key + ".")
        else:
            if _is_str_field(tp) and value is not None and not isinstance(value, str):
                raise _type_error(key, value, tp)
            _coerce(key, value, tp)


def _check_sections(obj: Any, key: str) -> None:
    """Every section's own ``check``, the top level first, then each sub-section in declaration order."""
    obj.check(key)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type) and hasattr(value, "check"):
            _check_sections(value, f"{key}.{f.name}" if key else f.name)


def _check_tensor_parallel(cfg: Config, heads: list[tuple[str, int]], widths: list[tuple[str, int]]) -> None:
    tp, lang, data = cfg.parallel.tp, cfg.model.language, cfg.data
    counts = [h for _, h in heads]
    valid_tp = [t for t in divisors(min(counts)) if all(h % t == 0 for h in counts)]
    named = [f"{k}={h}" for k, h in heads]
    valid_tp_txt = (f"valid tp values: {fmt(valid_tp)} (dividing {', '.join(named[:-1])} and {named[-1]})"
                    if len(named) > 1 else f"valid tp values: {fmt(valid_tp)} (dividing {named[0]})")
    for key, h in heads:
        if h % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {key}={h}; {valid_tp_txt}")
    for key, width in widths:
        if width % tp:
            raise ConfigError(
                f"parallel.tp={tp} does not divide {key}={width} (the MLP is split over tp "
                f"ranks); use a multiple of {tp} or tp from: {fmt(divisors(width))}"
            )
    if lang.vocab_pad_multiple % tp:
        raise ConfigError(
            f"model.language.vocab_pad_multiple={lang.vocab_pad_multiple} must be a multiple of "
            f"parallel.tp={tp} so the padded vocabulary splits evenly over tp ranks"
        )
    if cfg.parallel.sequence_parallel and data.max_seq_len % tp:
        raise ConfigError(
            f"data.max_seq_len={data.max_seq_len} must be divisible by parallel.tp={tp} when "
            f"parallel.sequence_parallel=true; e.g. data.max_seq_len={-(-data.max_seq_len // tp) * tp}"
        )


def _check_pipeline(cfg: Config) -> None:
    pp, L, fsl = cfg.parallel.pp, cfg.model.language.num_layers, cfg.parallel.first_stage_layers
    valid_fsl = [f for f in range(1, L) if pp > 1 and (L - f) % (pp - 1) == 0]
    if pp > L:
        raise ConfigError(
            f"parallel.pp={pp} exceeds model.language.num_layers={L}: every pipeline stage needs "
            f"at least one decoder layer; valid pp values: {fmt(divisors(L))}"
        )
    if fsl is not None:
        hint = (f"valid parallel.first_stage_layers for pp={pp}, num_layers={L}: {fmt(valid_fsl)}, or null for an "
                "even split")
        if pp == 1:
            raise ConfigError(
                f"parallel.first_stage_layers={fsl} requires parallel.pp > 1 (got pp=1); "
                f"set parallel.first_stage_layers=null"
            )
        if not 1 <= fsl < L:
            raise ConfigError(
                f"parallel.first_stage_layers={fsl} must be in 1..{L - 1} "
                f"(model.language.num_layers={L}, the other stages need layers too); {hint}"
            )
        if (L - fsl) % (pp - 1):
            raise ConfigError(
                f"parallel.first_stage_layers={fsl} leaves {L - fsl} decoder layers, which do not "
                f"split evenly over the other {pp - 1} pipeline stages; {hint}"
            )
    elif L % pp:
        raise ConfigError(
            f"model.language.num_layers={L} is not divisible by parallel.pp={pp}; choose pp from "
            f"{fmt(divisors(L))} or set parallel.first_stage_layers (valid for pp={pp}: "
            f"{fmt(valid_fsl)})"
        )
    assert sum(decoder_layers_per_stage(L, pp, fsl)) == L


def validate(cfg: Config, world_size: int) -> int:
    """Run every check for a job of ``world_size`` processes and return the data-parallel size: each section's own
    ``check``, the model family's rules, then the rules that span sections (parallel layout against the model's
    shapes, batch sizes, sequence length against the image tokens, packing). Raises ConfigError on the first
    problem found; files and directories are :func:`check_paths`'s business."""
    from . import families

    _check_types(cfg)
    fam = families.get(cfg.model.family, key="model.family")
    for name, cls in fam.sections.items():
        if type(getattr(cfg.model, name)) is not cls:
            raise ConfigError(f"model.{name} is a {type(getattr(cfg.model, name)).__name__}, but model.family="
                              f"{cfg.model.family!r} describes it with {cls.__name__}; build the config with "
                              "load_config / from_dict, which pick the family's sections")
    _check_sections(cfg, "")
    fam.check(cfg)
    _check_pool(cfg, fam)
    m, par, tr, data = cfg.model, cfg.parallel, cfg.train, cfg.data

    if tr.objective == "dpo" and data.packing:
        raise ConfigError("train.objective=dpo runs each pair as two padded sequences of one micro-batch; set "
                          "data.packing=false")
    if data.packing:
        if data.source == "synthetic":
            raise ConfigError("data.packing needs data.source=shards or synthetic_shards")
        if tr.micro_batch != 1:
            raise ConfigError(f"data.packing needs train.micro_batch=1 (a micro-batch is one packed sequence), got "
                              f"{tr.micro_batch}; raise train.global_batch instead")
        if m.spec == "local":
            raise ConfigError("data.packing needs an attention that takes packed sequences: model.spec=auto, sdpa "
                              "or te (not local)")
    if m.lora.rank and m.spec == "te":
        raise ConfigError("model.lora.rank > 0 needs model.spec=auto, sdpa or local: the adapters wrap megatron's own "
                          "linear layers, not Transformer Engine's fused norm+linear (with auto, LoRA picks sdpa)")

    dp = dp_size(cfg, world_size)
    heads, widths = fam.tp_split(cfg)
    _check_tensor_parallel(cfg, heads, widths)
    _check_pipeline(cfg)

    step = tr.micro_batch * dp
    if tr.global_batch % step:
        lo = tr.global_batch // step * step
        hi = lo + step
        sugg = f"{lo} or {hi}" if lo > 0 else f"{hi}"
        raise ConfigError(
            f"train.global_batch={tr.global_batch} is not divisible by train.micro_batch*dp = "
            f"{tr.micro_batch}*{dp} = {step} (dp={dp} at world size {world_size} with tp={par.tp}, "
            f"pp={par.pp}); use a multiple of {step}, e.g. train.global_batch={sugg}"
        )

    n_img, why = fam.max_image_tokens(cfg), fam.image_tokens_formula(cfg)
    if data.max_seq_len < n_img + MIN_TEXT_TOKENS:
        raise ConfigError(
            f"data.max_seq_len={data.max_seq_len} is too short: an image takes {n_img} tokens ({why}) and at least "
            f"{MIN_TEXT_TOKENS} text tokens are needed; use data.max_seq_len >= {n_img + MIN_TEXT_TOKENS}"
        )
    return dp


def _check_pool(cfg: Config, fam) -> None:
    """``model.projector.pool`` needs a square token grid of even side per crop, which the family's shapes say."""
    pool = getattr(cfg.model.projector, "pool", "none")
    if pool == "none":
        return
    v, p = fam.vision_arch(cfg), fam.projector_arch(cfg)
    key = f"model.projector.pool={pool}"
    if v.position_embedding == "rope_2d":
        raise ConfigError(f"{key} is not supported by model.family={cfg.model.family}: its images are native-"
                          "resolution patch sequences, already joined 2×2 by the merger (model.vision.merge_size)")
    if p.kind == "resampler":
        raise ConfigError(f"{key} does not combine with model.projector.type=resampler (its queries fix the tokens "
                          "per image); use pool=none")
    if v.class_token and v.keep_class_token:
        raise ConfigError(f"{key} pools the patch grid, but model.vision.select_strategy=full keeps the class token "
                          "beside it; use select_strategy=default")
    side = v.image_size // v.patch_size
    if side % (2 * p.merge):
        raise ConfigError(
            f"{key} needs a token grid with an even side{' after the 2×2 pool, for the pixel shuffle' * (p.merge > 1)}"
            f": model.vision.image_size/patch_size = {v.image_size}/{v.patch_size} = {side} patches per side; choose "
            f"an image_size giving a multiple of {2 * p.merge} patches per side (odd grids are not padded)")


def check_paths(cfg: Config) -> None:
    """The files and directories a training run reads and writes: checked by ``megavlm train`` (after
    :func:`validate`) and ``megavlm check`` before any work, and only there (``plan``, ``generate`` and ``eval`` do
    not need the training data). ``run_dir``, the checkpoint directory and, for ``source=synthetic_shards``, the
    shard directory must be directories this process can write in, or be creatable (their nearest existing parent a
    writable directory); ``source=shards`` needs an existing directory; the model family must be able to read its
    training data (``Family.check_training``). Nothing is left behind by the checks."""
    from . import families

    families.of(cfg).check_training(cfg)
    _check_writable_dir("run_dir", cfg.run_dir)
    _check_writable_dir("checkpoint.dir" if cfg.checkpoint.dir is not None else
                        "checkpoint.dir=null (so {run_dir}/checkpoints)", checkpoint_dir(cfg))
    if cfg.data.source == "shards":
        if os.path.exists(cfg.data.shards) and not os.path.isdir(cfg.data.shards):
            raise ConfigError(f"data.shards={cfg.data.shards} is a file, not a directory; give the directory "
                              "`megavlm data convert --out` wrote")
        if not os.path.isdir(cfg.data.shards):
            raise ConfigError(f"data.shards={cfg.data.shards} is not a directory")
    elif cfg.data.source == "synthetic_shards":
        _check_writable_dir("data.shards" if cfg.data.shards else "data.shards=null (so {run_dir}/shards)",
                            shards_dir(cfg))


def _check_writable_dir(key: str, path: str) -> None:
    """ConfigError unless ``path`` is a directory this process can create entries in, or can be created."""
    shown = key if "=" in key else f"{key}={path}"
    if os.path.lexists(path) and not os.path.exists(path):
        raise ConfigError(f"{shown} is a broken symbolic link")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{shown} is a file, not a directory; give a directory (new or existing)")
        where = path
    else:
        where = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(where):
            where = os.path.dirname(where)
        if not os.path.isdir(where):
            raise ConfigError(f"{shown} cannot be created: {where} is a file, not a directory")
    try:  # the one sure test of "can write here" (permissions, read-only mounts, root or not): try it
        os.rmdir(tempfile.mkdtemp(prefix=".megavlm-check-", dir=where))
    except OSError as e:
        what = "in it" if where == path else f"in {where}, where it would be created"
        raise ConfigError(f"{shown}: cannot write {what} ({e.strerror or e})") from None

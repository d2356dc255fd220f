"""Run configuration: nested dataclasses, YAML loading, dotted overrides, validation.

This module deliberately imports neither torch nor megatron: it must be cheap to
import and usable before any process group exists (launchers, ``--help``,
validating a config for a given world size on a login node).

Typical use::

    cfg = load_config("configs/tiny_cpu.yaml", ["train.steps=100", "parallel.tp=2"])
    dp = validate(cfg, world_size)
    save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))

Override values are parsed with YAML (``null``, ``true``, ``1e-3``, ``[1, 2]`` all
work) and then coerced to the field's declared type; every error is a
:class:`ConfigError` whose message names the dotted key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import yaml

__all__ = [
    "ConfigError",
    "Config",
    "ModelConfig",
    "VisionConfig",
    "ProjectorConfig",
    "LanguageConfig",
    "ParallelConfig",
    "TrainConfig",
    "DataConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "load_config",
    "validate",
    "dp_size",
    "num_image_tokens",
    "LLAVA15_VISION",
    "checkpoint_dir",
    "shards_dir",
    "to_dict",
    "to_yaml",
    "save_config",
    "SPEC_CHOICES",
    "DTYPE_CHOICES",
    "KERNELS_CHOICES",
    "FLAVOUR_CHOICES",
    "SELECT_STRATEGY_CHOICES",
    "PROJECTOR_CHOICES",
    "LR_SCHEDULE_CHOICES",
    "STAGE_CHOICES",
    "RECOMPUTE_CHOICES",
    "DATA_SOURCE_CHOICES",
    "MIN_TEXT_TOKENS",
    "MAX_SHAPES_LIMIT",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key and the valid choices."""


# --------------------------------------------------------------------------------------
# Allowed values
# --------------------------------------------------------------------------------------

SPEC_CHOICES = ("auto", "local", "sdpa", "te")
DTYPE_CHOICES = ("auto", "fp32", "bf16")
KERNELS_CHOICES = ("auto", "fused", "reference")
FLAVOUR_CHOICES = ("clip", "siglip")
SELECT_STRATEGY_CHOICES = ("default", "full")
PROJECTOR_CHOICES = ("linear", "mlp2x_gelu")
LR_SCHEDULE_CHOICES = ("cosine", "linear", "constant")
STAGE_CHOICES = (1, 2, 3)
RECOMPUTE_CHOICES = ("none", "selective", "full")
DATA_SOURCE_CHOICES = ("synthetic", "synthetic_shards", "shards")
IMAGE_MODE_CHOICES = ("resize", "pad", "crop")
#: The names of data/conversation.py's TEMPLATES (kept here so config checks need no torch; a test keeps them equal).
TEMPLATE_CHOICES = ("vicuna", "vicuna_v1", "plain", "llama_2", "chatml")
#: data.max_seq_len must leave at least this many text positions after the image tokens.
MIN_TEXT_TOKENS = 8
#: the synthetic data generator knows this many shape kinds at most per image.
MAX_SHAPES_LIMIT = 3


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """ViT image encoder (CLIP- or SigLIP-style)."""

    #: Encoder family: ``clip`` (class token, pre-LN) or ``siglip`` (no class token).
    flavour: str = "clip"
    #: Square input resolution in pixels.
    image_size: int = 32
    #: Square patch size in pixels; must divide ``image_size``.
    patch_size: int = 8
    #: Input image channels (3 for RGB).
    num_channels: int = 3
    #: Encoder hidden width.
    hidden_size: int = 64
    #: Number of transformer layers in the encoder.
    num_layers: int = 2
    #: Attention heads per encoder layer.
    num_heads: int = 4
    #: Encoder MLP inner width.
    ffn_hidden_size: int = 256
    #: Which hidden state feeds the projector, HF ``hidden_states`` indexing:
    #: -1 = last layer output, -2 = penultimate (LLaVA), k >= 1 = after k layers.
    #: Valid: 1..num_layers or -num_layers..-1.
    feature_layer: int = -1
    #: ``default`` drops the class token before the projector, ``full`` keeps it.
    select_strategy: str = "default"
    #: Epsilon of the encoder's LayerNorms.
    layernorm_eps: float = 1e-5
    #: Per-channel mean used to normalise pixels (one entry per channel).
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    #: Per-channel std used to normalise pixels (one entry per channel, all > 0).
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])


@dataclass
class ProjectorConfig:
    """Vision-to-language projector."""

    #: ``linear`` (one Linear) or ``mlp2x_gelu`` (Linear, GELU, Linear as in LLaVA-1.5).
    type: str = "mlp2x_gelu"


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
    #: Embedding/output rows are padded to a multiple of this; independent of TP so
    #: checkpoints can be resharded (must itself be a multiple of ``parallel.tp``).
    vocab_pad_multiple: int = 128


@dataclass
class ModelConfig:
    """The whole vision-language model."""

    #: Image encoder.
    vision: VisionConfig = field(default_factory=VisionConfig)
    #: Vision-to-language projector.
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    #: Language model.
    language: LanguageConfig = field(default_factory=LanguageConfig)
    #: Attention/layer implementation: ``auto|local|sdpa|te``. ``auto`` = te if
    #: importable on GPU, else sdpa on GPU, local on CPU.
    spec: str = "auto"
    #: Parameter/compute dtype: ``auto|fp32|bf16``. ``auto`` = bf16 on GPU, fp32 on CPU.
    dtype: str = "auto"
    #: Fused CUDA ops: ``auto|fused|reference`` (reserved; only the value is validated).
    kernels: str = "auto"


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


@dataclass
class TrainConfig:
    """Optimisation and schedule."""

    #: Which parameters train: 1 = projector only; 2 = projector + LLM; 3 = everything.
    stage: int = 2
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
    #: Linear warmup steps from 0 to ``lr``.
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
    #: Conversation template for shard records: vicuna|vicuna_v1|plain|llama_2|chatml.
    template: str = "vicuna"
    #: How images are fitted to the encoder's square input: resize (squash) | pad (LLaVA's expand-to-square) | crop.
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
    #: Local path of an HF tokenizer; None = build the synthetic one.
    tokenizer: Optional[str] = None


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


@dataclass
class LoggingConfig:
    """Console/TensorBoard logging."""

    #: Console line every N steps (metrics.jsonl gets every step).
    interval: int = 1
    #: Also write TensorBoard event files.
    tensorboard: bool = True


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


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key (sections and leaves), in declaration order."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        tp = _hints(cls)[f.name]
        if _is_section(tp):
            keys.extend(_all_keys(tp, key + "."))
    return keys


def _suggest(key: str) -> Optional[str]:
    """Nearest valid dotted key for an unknown ``key``, or None."""
    keys = _all_keys()
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


def _unknown_key_error(key: str, cls: type, prefix: str, where: str) -> ConfigError:
    valid = ", ".join(f.name for f in dataclasses.fields(cls))
    section = f"'{prefix[:-1]}'" if prefix else "the top level"
    msg = f"unknown config key '{key}'{where}"
    hint = _suggest(key)
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


def _apply_mapping(obj: Any, mapping: Any, prefix: str, where: str) -> None:
    """Merge a (possibly partial) nested mapping into dataclass ``obj`` in place."""
    cls = type(obj)
    if mapping is None:  # e.g. a section whose keys are all commented out
        return
    if not isinstance(mapping, dict):
        name = f"'{prefix[:-1]}'" if prefix else "the config"
        valid = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(
            f"{name} is a section and must be a mapping of its keys ({valid}), "
            f"got {type(mapping).__name__} {mapping!r}{where}"
        )
    hints = _hints(cls)
    for raw_name, value in mapping.items():
        name = str(raw_name)
        key = prefix + name
        if name not in hints:
            raise _unknown_key_error(key, cls, prefix, where)
        tp = hints[name]
        if _is_section(tp):
            _apply_mapping(getattr(obj, name), value, key + ".", where)
        else:
            setattr(obj, name, _coerce(key, value, tp))


def _apply_override(cfg: Config, override: str) -> None:
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(
            f"override {override!r} must have the form dotted.key=value (e.g. train.steps=100)"
        )
    key, _, raw = override.partition("=")
    key = key.strip()
    where = f" (in override {override!r})"
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {override!r} has an empty key; expected dotted.key=value")
    parts = key.split(".")
    obj: Any = cfg
    prefix = ""
    for i, name in enumerate(parts):
        cls = type(obj)
        hints = _hints(cls)
        if name not in hints:
            # suggest from the whole remaining key: 'trian.steps' -> 'train.steps'
            raise _unknown_key_error(prefix + ".".join(parts[i:]), cls, prefix, where)
        tp = hints[name]
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
        try:
            value = _yaml_load(raw)
        except yaml.YAMLError:
            value = raw  # e.g. a path with odd characters; type coercion decides
        if _is_section(tp):
            _apply_mapping(getattr(obj, name), value, key + ".", where)
            return
        if _is_str_field(tp) and value is not None and not isinstance(value, (str, list, dict)):
            value = raw.strip()  # keep '007' or '1e-3' verbatim for string fields
        setattr(obj, name, _coerce(key, value, tp))


def load_config(path: Union[str, os.PathLike, None], overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`Config`: defaults, then the YAML file at ``path`` (may omit any
    key; None = defaults only), then ``dotted.key=value`` overrides in order."""
    cfg = Config()
    if path is not None:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = _yaml_load(f.read())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path!r}: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
        _apply_mapping(cfg, data, "", f" (in {path})")
    if isinstance(overrides, str):
        overrides = [overrides]
    for ov in overrides:
        _apply_override(cfg, ov)
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


def num_image_tokens(vision: VisionConfig) -> int:
    """Sequence positions one image occupies: (image_size // patch_size)**2, +1 for the
    class token when ``select_strategy == 'full'``."""
    n = (vision.image_size // vision.patch_size) ** 2
    if vision.select_strategy == "full":
        n += 1
    return n


#: LLaVA-1.5's vision tower as far as image tokens go (CLIP ViT-L/14 at 336², class token dropped): what
#: ``megavlm data inspect`` assumes without a config.
LLAVA15_VISION = VisionConfig(image_size=336, patch_size=14)


def shards_dir(cfg: "Config") -> Optional[str]:
    """Where the training shards are: ``data.shards``, or ``{run_dir}/shards`` for ``source=synthetic_shards``."""
    if cfg.data.shards:
        return cfg.data.shards
    return os.path.join(cfg.run_dir, "shards") if cfg.data.source == "synthetic_shards" else None


def checkpoint_dir(cfg: Config) -> str:
    """``checkpoint.dir`` or, when it is None, ``{run_dir}/checkpoints``."""
    if cfg.checkpoint.dir is not None:
        return cfg.checkpoint.dir
    return os.path.join(cfg.run_dir, "checkpoints")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


def _fmt(xs: Sequence[Any]) -> str:
    return ", ".join(str(x) for x in xs) if xs else "(none)"


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
            f"Launch {_fmt(multiples)}, ... processes (dp = 1, 2, 3, ...), or pick tp and pp whose "
            f"product divides {world_size} (one of {_fmt(_divisors(world_size))})"
        )
    return world_size // mp


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {_fmt(choices)}")


def _check_min(key: str, value: Any, minimum: int) -> None:
    if value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ConfigError(f"{key}={value} must be {what}")


def _check_range_open(key: str, value: float, lo: float, hi: float) -> None:
    if not (lo < value < hi):
        raise ConfigError(f"{key}={value} must satisfy {lo:g} < {key.rpartition('.')[2]} < {hi:g}")


def _check_types(obj: Any, prefix: str = "") -> None:
    """Re-check field types, in case a Config was built or mutated in code."""
    for f in dataclasses.fields(obj):
        tp = _hints(type(obj))[f.name]
        value = getattr(obj, f.name)
        key = prefix + f.name
        if _is_section(tp):
            if not isinstance(value, tp):
                raise ConfigError(f"{key} must be a {tp.__name__}, got {type(value).__name__}")
            _check_types(value, key + ".")
        else:
            if _is_str_field(tp) and value is not None and not isinstance(value, str):
                raise _type_error(key, value, tp)
            _coerce(key, value, tp)


def validate(cfg: Config, world_size: int) -> int:
    """Run every cross-field check for a job of ``world_size`` processes and return the
    data-parallel size. Raises ConfigError on the first problem found."""
    _check_types(cfg)
    m, v, lang, par = cfg.model, cfg.model.vision, cfg.model.language, cfg.parallel
    tr, data, ck = cfg.train, cfg.data, cfg.checkpoint

    # ---- enums ---------------------------------------------------------------------
    _check_choice("model.spec", m.spec, SPEC_CHOICES)
    _check_choice("model.dtype", m.dtype, DTYPE_CHOICES)
    _check_choice("model.kernels", m.kernels, KERNELS_CHOICES)
    _check_choice("model.vision.flavour", v.flavour, FLAVOUR_CHOICES)
    _check_choice("model.vision.select_strategy", v.select_strategy, SELECT_STRATEGY_CHOICES)
    _check_choice("model.projector.type", m.projector.type, PROJECTOR_CHOICES)
    _check_choice("train.lr_schedule", tr.lr_schedule, LR_SCHEDULE_CHOICES)
    _check_choice("train.stage", tr.stage, STAGE_CHOICES)
    _check_choice("train.recompute", tr.recompute, RECOMPUTE_CHOICES)
    _check_choice("data.source", data.source, DATA_SOURCE_CHOICES)
    _check_choice("data.image_mode", data.image_mode, IMAGE_MODE_CHOICES)
    if data.packing:
        if data.source == "synthetic":
            raise ConfigError("data.packing needs data.source=shards or synthetic_shards")
        if tr.micro_batch != 1:
            raise ConfigError(f"data.packing needs train.micro_batch=1 (a micro-batch is one packed sequence), got "
                              f"{tr.micro_batch}; raise train.global_batch instead")
        if m.spec == "local":
            raise ConfigError("data.packing needs an attention that takes packed sequences: model.spec=auto, sdpa "
                              "or te (not local)")
    if data.source == "shards":
        if not data.shards:
            raise ConfigError("data.source=shards needs data.shards=DIR (shards written by `megavlm data convert`)")
        if not os.path.isdir(data.shards):
            raise ConfigError(f"data.shards={data.shards} is not a directory")
    _check_choice("data.template", data.template, TEMPLATE_CHOICES)
    if data.max_images < 1:
        raise ConfigError(f"data.max_images={data.max_images} must be >= 1")
    if not 0.0 <= data.max_bad_share <= 1.0:
        raise ConfigError(f"data.max_bad_share={data.max_bad_share} must be between 0 and 1")
    if not ck.load.strip():
        raise ConfigError("checkpoint.load='' is not valid; use 'none', 'auto' or a checkpoint path")
    if data.tokenizer is not None and not data.tokenizer.strip():
        raise ConfigError("data.tokenizer='' is not valid; use null (synthetic tokenizer) or a path")
    if ck.dir is not None and not ck.dir.strip():
        raise ConfigError("checkpoint.dir='' is not valid; use null ({run_dir}/checkpoints) or a path")
    if not cfg.run_dir.strip():
        raise ConfigError("run_dir='' is not valid; give a directory path")
    if v.flavour == "siglip" and v.select_strategy == "full":
        raise ConfigError(
            "model.vision.select_strategy='full' keeps the class token, but "
            "model.vision.flavour='siglip' has none; use select_strategy=default with siglip"
        )

    # ---- positive / non-negative numbers ----------------------------------------------
    for key, value in (
        ("model.vision.image_size", v.image_size),
        ("model.vision.patch_size", v.patch_size),
        ("model.vision.num_channels", v.num_channels),
        ("model.vision.hidden_size", v.hidden_size),
        ("model.vision.num_layers", v.num_layers),
        ("model.vision.num_heads", v.num_heads),
        ("model.vision.ffn_hidden_size", v.ffn_hidden_size),
        ("model.language.hidden_size", lang.hidden_size),
        ("model.language.num_layers", lang.num_layers),
        ("model.language.num_heads", lang.num_heads),
        ("model.language.num_kv_heads", lang.num_kv_heads),
        ("model.language.ffn_hidden_size", lang.ffn_hidden_size),
        ("model.language.vocab_pad_multiple", lang.vocab_pad_multiple),
        ("parallel.tp", par.tp),
        ("parallel.pp", par.pp),
        ("train.steps", tr.steps),
        ("train.global_batch", tr.global_batch),
        ("train.micro_batch", tr.micro_batch),
        ("data.num_samples", data.num_samples),
        ("data.max_seq_len", data.max_seq_len),
        ("logging.interval", cfg.logging.interval),
    ):
        _check_min(key, value, 1)
    for key, value in (
        ("model.language.vocab_size", lang.vocab_size),
        ("train.warmup_steps", tr.warmup_steps),
        ("train.exit_interval", tr.exit_interval),
        ("data.eval_samples", data.eval_samples),
        ("checkpoint.save_interval", ck.save_interval),
        ("checkpoint.keep", ck.keep),
        ("train.min_lr", tr.min_lr),
        ("train.weight_decay", tr.weight_decay),
        ("train.clip_grad", tr.clip_grad),
    ):
        if not value >= 0:  # also catches NaN
            raise ConfigError(f"{key}={value} must be >= 0")
    if not 0 <= tr.seed < 2**32:
        raise ConfigError(f"train.seed={tr.seed} must be in [0, 2**32)")
    for key, value in (
        ("model.vision.layernorm_eps", v.layernorm_eps),
        ("model.language.norm_eps", lang.norm_eps),
        ("model.language.rope_theta", lang.rope_theta),
        ("train.adam_eps", tr.adam_eps),
    ):
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")

    # ---- world size / data parallel ------------------------------------------------
    dp = dp_size(cfg, world_size)

    # ---- tensor parallel -----------------------------------------------------------
    tp = par.tp
    head_counts = (lang.num_heads, lang.num_kv_heads, v.num_heads)
    valid_tp = [t for t in _divisors(min(head_counts)) if all(h % t == 0 for h in head_counts)]
    valid_tp_txt = (
        f"valid tp values: {_fmt(valid_tp)} (dividing model.language.num_heads={lang.num_heads}, "
        f"model.language.num_kv_heads={lang.num_kv_heads} and "
        f"model.vision.num_heads={v.num_heads})"
    )
    for key, heads in (
        ("model.language.num_heads", lang.num_heads),
        ("model.language.num_kv_heads", lang.num_kv_heads),
        ("model.vision.num_heads", v.num_heads),
    ):
        if heads % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {key}={heads}; {valid_tp_txt}")
    for key, width in (
        ("model.language.ffn_hidden_size", lang.ffn_hidden_size),
        ("model.vision.ffn_hidden_size", v.ffn_hidden_size),
    ):
        if width % tp:
            raise ConfigError(
                f"parallel.tp={tp} does not divide {key}={width} (the MLP is split over tp "
                f"ranks); use a multiple of {tp} or tp from: {_fmt(_divisors(width))}"
            )
    if lang.vocab_pad_multiple % tp:
        raise ConfigError(
            f"model.language.vocab_pad_multiple={lang.vocab_pad_multiple} must be a multiple of "
            f"parallel.tp={tp} so the padded vocabulary splits evenly over tp ranks"
        )
    if par.sequence_parallel:
        if tp <= 1:
            raise ConfigError(
                "parallel.sequence_parallel=true requires parallel.tp > 1 (got tp=1); "
                "set parallel.sequence_parallel=false or raise parallel.tp"
            )
        if data.max_seq_len % tp:
            raise ConfigError(
                f"data.max_seq_len={data.max_seq_len} must be divisible by parallel.tp={tp} when "
                f"parallel.sequence_parallel=true; e.g. data.max_seq_len="
                f"{-(-data.max_seq_len // tp) * tp}"
            )

    # ---- head geometry -------------------------------------------------------------
    if lang.num_heads % lang.num_kv_heads:
        raise ConfigError(
            f"model.language.num_kv_heads={lang.num_kv_heads} does not divide "
            f"model.language.num_heads={lang.num_heads}; valid num_kv_heads: "
            f"{_fmt(_divisors(lang.num_heads))}"
        )
    if lang.hidden_size % lang.num_heads:
        raise ConfigError(
            f"model.language.hidden_size={lang.hidden_size} is not divisible by "
            f"model.language.num_heads={lang.num_heads}; valid num_heads: "
            f"{_fmt(_divisors(lang.hidden_size))}"
        )
    if (lang.hidden_size // lang.num_heads) % 2:
        raise ConfigError(
            f"model.language head dim hidden_size/num_heads = {lang.hidden_size}/{lang.num_heads}"
            f" = {lang.hidden_size // lang.num_heads} must be even for RoPE"
        )
    if v.hidden_size % v.num_heads:
        raise ConfigError(
            f"model.vision.hidden_size={v.hidden_size} is not divisible by "
            f"model.vision.num_heads={v.num_heads}; valid num_heads: {_fmt(_divisors(v.hidden_size))}"
        )

    # ---- pipeline parallel ---------------------------------------------------------
    pp, L, fsl = par.pp, lang.num_layers, par.first_stage_layers
    if pp > L:
        raise ConfigError(
            f"parallel.pp={pp} exceeds model.language.num_layers={L}: every pipeline stage needs "
            f"at least one decoder layer; valid pp values: {_fmt(_divisors(L))}"
        )
    if fsl is not None:
        valid_fsl = [f for f in range(1, L) if pp > 1 and (L - f) % (pp - 1) == 0]
        hint = f"valid parallel.first_stage_layers for pp={pp}, num_layers={L}: {_fmt(valid_fsl)}, or null for an even split"
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
        valid_fsl = [f for f in range(1, L) if pp > 1 and (L - f) % (pp - 1) == 0]
        raise ConfigError(
            f"model.language.num_layers={L} is not divisible by parallel.pp={pp}; choose pp from "
            f"{_fmt(_divisors(L))} or set parallel.first_stage_layers (valid for pp={pp}: "
            f"{_fmt(valid_fsl)})"
        )

    # ---- vision geometry -----------------------------------------------------------
    if v.image_size % v.patch_size:
        raise ConfigError(
            f"model.vision.image_size={v.image_size} is not divisible by "
            f"model.vision.patch_size={v.patch_size}; valid patch_size values: "
            f"{_fmt(_divisors(v.image_size))}"
        )
    nv = v.num_layers
    if not (1 <= v.feature_layer <= nv or -nv <= v.feature_layer <= -1):
        raise ConfigError(
            f"model.vision.feature_layer={v.feature_layer} is out of range for "
            f"model.vision.num_layers={nv}; valid: 1..{nv} or -{nv}..-1 "
            f"(-1 = last layer, -2 = penultimate)"
        )
    for key, values in (("model.vision.image_mean", v.image_mean), ("model.vision.image_std", v.image_std)):
        if len(values) != v.num_channels:
            raise ConfigError(
                f"{key} has {len(values)} entries but model.vision.num_channels={v.num_channels}; "
                f"give one value per channel"
            )
    for i, s in enumerate(v.image_std):
        if not s > 0:
            raise ConfigError(f"model.vision.image_std[{i}]={s} must be > 0")

    # ---- batch -----------------------------------------------------------------------
    step = tr.micro_batch * dp
    if tr.global_batch % step:
        lo = tr.global_batch // step * step
        hi = lo + step
        sugg = f"{lo} or {hi}" if lo > 0 else f"{hi}"
        raise ConfigError(
            f"train.global_batch={tr.global_batch} is not divisible by train.micro_batch*dp = "
            f"{tr.micro_batch}*{dp} = {step} (dp={dp} at world size {world_size} with tp={tp}, "
            f"pp={pp}); use a multiple of {step}, e.g. train.global_batch={sugg}"
        )

    # ---- sequence length -------------------------------------------------------------
    n_img = num_image_tokens(v)
    if data.max_seq_len < n_img + MIN_TEXT_TOKENS:
        raise ConfigError(
            f"data.max_seq_len={data.max_seq_len} is too short: an image takes {n_img} tokens "
            f"((image_size/patch_size)^2"
            f"{' + 1 class token' if v.select_strategy == 'full' else ''}) and at least "
            f"{MIN_TEXT_TOKENS} text tokens are needed; use data.max_seq_len >= "
            f"{n_img + MIN_TEXT_TOKENS}"
        )

    # ---- synthetic data ------------------------------------------------------------
    if not 1 <= data.min_shapes <= data.max_shapes <= MAX_SHAPES_LIMIT:
        raise ConfigError(
            f"data.min_shapes={data.min_shapes}, data.max_shapes={data.max_shapes}: need "
            f"1 <= min_shapes <= max_shapes <= {MAX_SHAPES_LIMIT}"
        )

    # ---- optimiser / schedule ------------------------------------------------------
    if not tr.lr > 0:
        raise ConfigError(f"train.lr={tr.lr} must be > 0")
    if tr.min_lr > tr.lr:
        raise ConfigError(f"train.min_lr={tr.min_lr} must be <= train.lr={tr.lr}")
    if tr.warmup_steps > tr.steps:
        raise ConfigError(
            f"train.warmup_steps={tr.warmup_steps} must be <= train.steps={tr.steps}"
        )
    _check_range_open("train.adam_beta1", tr.adam_beta1, 0.0, 1.0)
    _check_range_open("train.adam_beta2", tr.adam_beta2, 0.0, 1.0)

    return dp

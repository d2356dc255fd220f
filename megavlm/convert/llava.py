"""``megavlm convert hf-to-mcore`` / ``mcore-to-hf``: HF LLaVA (CLIP/SigLIP + LLaMA/Mistral/Qwen2) ↔ megavlm dist
checkpoints.

Both directions describe our VLM at TP=1/PP=1 in this one process, built on the meta device (names, shapes, dtypes,
no storage), and go through its ``state_dict`` names with the explicit name map of :mod:`megavlm.convert.mapping`;
dist_checkpointing reshards to any TP/PP on load. Tensors stream (:mod:`megavlm.convert.stream`): hf-to-mcore makes
each parameter from the HF files when the checkpoint writer reaches it, mcore-to-hf reads one layer at a time and
writes it straight into the safetensors file, so memory is about one layer's, not the model's. Outputs are written
under ``{out}.tmp-*`` and renamed to ``out`` only when complete.

Layout written by hf-to-mcore::

    OUT/checkpoints/iter_0000000/   dist checkpoint, step 0, no optimizer state (``has_optimizer: False``)
    OUT/checkpoints/latest
    OUT/tokenizer/                  HF tokenizer files
    OUT/config.yaml                 megavlm config of the model (checkpoint.load and data.tokenizer point here)
    OUT/hf_extra.safetensors        HF tensors our encoder does not use (vision layers past the feature layer,
                                    post-LayerNorm, SigLIP's pooling head), re-emitted by mcore-to-hf; absent when
                                    there are none
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile

import torch

from .. import runtime
from ..config import (
    MIN_TEXT_TOKENS,
    Config,
    ConfigError,
    _apply_mapping,
    num_image_tokens,
    save_config,
    to_dict,
    validate,
)
from ..data.tokenizer import IMAGE_TOKEN, find_tokenizer, image_token_id, load_tokenizer
from ..errors import UserError
from ..training import checkpoint as ckpt
from . import mapping as M
from . import stream
from .hf_io import SHARD_BYTES, HFTensors, SafetensorsFile, parse_size, read_json, write_safetensors, write_sharded

EXTRA_FILE = "hf_extra.safetensors"
OUTPUT = "language_model.output_layer.weight"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_TEXT_TYPES = ("llama", "mistral", "qwen2")
_VISION_TYPES = {"clip_vision_model": ("clip", "quick_gelu", "CLIPVisionModel"),
                 "siglip_vision_model": ("siglip", "gelu_pytorch_tanh", "SiglipVisionModel")}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _runtime(seed: int):
    """A TP=1/PP=1 runtime in this process (reusing one that is already up, as in tests)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise UserError("megavlm convert runs in a single process; run it without torchrun")
        from ..runtime import cpu

        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        rt = runtime.Runtime(rank=0, world_size=1, local_rank=0, device=dev, backend="gloo", tp=1, pp=1, dp=1,
                             tp_rank=0, pp_rank=0, dp_rank=0, cpu_compat=cpu.is_enabled())
        runtime.set_seed(seed, rt)
        return rt
    if runtime.env_world_size() != 1:
        raise UserError("megavlm convert runs in a single process; run it without torchrun")
    return runtime.initialize(1, 1, seed)


class _Staging:
    """``with _Staging(out) as tmp``: a sibling temp dir renamed to ``out`` on success, removed on failure."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        if os.path.exists(self.out) and (not os.path.isdir(self.out) or os.listdir(self.out)):
            raise UserError(f"--out {out}: already exists and is not an empty directory; choose a new path")

    def __enter__(self) -> str:
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.out) + ".tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.isdir(self.out):
            os.rmdir(self.out)  # empty (checked above)
        os.rename(self.tmp, self.out)
        return False


def _hf_config(folder: str, what: str):
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"--{what} {folder}: no config.json (expected a folder written by save_pretrained)")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--{what} {folder}: cannot read config.json: {e}") from e


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def _rope_theta(tc) -> float:
    rp = getattr(tc, "rope_parameters", None) or {}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    scaling = getattr(tc, "rope_scaling", None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        rope_type = scaling.get("rope_type", scaling.get("type"))
    _check(rope_type == "default", f"text_config.rope_parameters.rope_type={rope_type!r} is not supported (only "
                                   "plain RoPE, 'default')")
    theta = rp.get("rope_theta", getattr(tc, "rope_theta", 10000.0))
    _check(float(theta) == int(theta), f"text_config rope_theta={theta} must be an integer (megatron's rotary_base)")
    return float(theta)


def _language_fields(tc, where: str) -> dict:
    mt = getattr(tc, "model_type", None)
    _check(mt in _TEXT_TYPES, f"{where}: model_type={mt!r} is not supported; supported language models: "
                              f"{', '.join(_TEXT_TYPES)} (LlamaForCausalLM layout, Qwen2 with q/k/v biases)")
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None)
    _check(head_dim in (None, tc.hidden_size // heads),
           f"{where}: head_dim={head_dim} != hidden_size/num_attention_heads={tc.hidden_size // heads} is not supported")
    for flag in ("attention_bias", "mlp_bias"):  # (Qwen2's q/k/v biases are built in, not a flag)
        _check(not getattr(tc, flag, False), f"{where}: {flag}=true is not supported (LLaMA has no linear biases)")
    _check(getattr(tc, "hidden_act", "silu") == "silu", f"{where}: hidden_act={tc.hidden_act!r} is not supported "
                                                        "(SwiGLU with silu only)")
    if mt == "mistral":
        _check(getattr(tc, "sliding_window", None) is None,
               f"{where}: sliding_window={tc.sliding_window} is not supported (full causal attention only)")
    if mt == "qwen2":
        sliding = getattr(tc, "use_sliding_window", False) or "sliding_attention" in (getattr(tc, "layer_types", None)
                                                                                      or ())
        _check(not sliding, f"{where}: use_sliding_window=true is not supported (full causal attention only)")
    return dict(hidden_size=tc.hidden_size, num_layers=tc.num_hidden_layers, num_heads=heads, num_kv_heads=kv,
                ffn_hidden_size=tc.intermediate_size, rope_theta=_rope_theta(tc), norm_eps=float(tc.rms_norm_eps),
                vocab_size=tc.vocab_size, qkv_bias=mt == "qwen2")


def _vision_fields(vc, where: str) -> dict:
    mt = getattr(vc, "model_type", None)
    _check(mt in _VISION_TYPES, f"{where}: vision model_type={mt!r} is not supported; supported: " + ", ".join(
        f"{k} ({cls})" for k, (_, _, cls) in _VISION_TYPES.items()))
    flavour, act, _ = _VISION_TYPES[mt]
    _check(vc.hidden_act == act, f"{where}: vision hidden_act={vc.hidden_act!r} is not supported ({flavour}: "
                                 f"{act} only)")
    for k in ("image_size", "patch_size"):
        _check(isinstance(getattr(vc, k), int), f"{where}: vision {k}={getattr(vc, k)!r} must be one integer")
    return dict(flavour=flavour, image_size=vc.image_size, patch_size=vc.patch_size, num_channels=vc.num_channels,
                hidden_size=vc.hidden_size, num_layers=vc.num_hidden_layers, num_heads=vc.num_attention_heads,
                ffn_hidden_size=vc.intermediate_size, layernorm_eps=float(vc.layer_norm_eps))


def _image_norm(*folders) -> dict:
    for folder in folders:
        pp = read_json(os.path.join(folder, "preprocessor_config.json")) or {}
        if "image_mean" in pp and "image_std" in pp:
            return dict(image_mean=[float(x) for x in pp["image_mean"]], image_std=[float(x) for x in pp["image_std"]])
    return dict(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def _dtype_name(hf_cfg) -> str:
    d = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None)
    if isinstance(d, torch.dtype):
        d = str(d).replace("torch.", "")
    return d if d in _DTYPES else "float32"


def _build_cfg(vision: dict, language: dict, feature_layer: int, select_strategy: str, norm: dict,
               max_pos: int, tp: int, pp: int, dtype_name: str) -> Config:
    cfg = Config()
    for k, v in dict(vision, feature_layer=feature_layer, select_strategy=select_strategy, **norm).items():
        setattr(cfg.model.vision, k, v)
    for k, v in language.items():
        setattr(cfg.model.language, k, v)
    cfg.model.projector.type = "mlp2x_gelu"
    # bf16 weights stay bf16; fp16/fp32 are held as fp32 (exact, and megavlm has no fp16 mode)
    cfg.model.dtype = "bf16" if dtype_name == "bfloat16" else "fp32"
    n_img = num_image_tokens(cfg.model.vision)
    cfg.data.max_seq_len = max(n_img + MIN_TEXT_TOKENS, min(max_pos, 2048))
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    try:
        validate(cfg, tp * pp)
    except ConfigError as e:
        raise UserError(f"the HF model does not fit megavlm at --tp {tp} --pp {pp}: {e}") from e
    return cfg


def _single_layout(cfg: Config) -> Config:
    """The config the converter builds the model with: TP=1/PP=1, local layers (TE-independent names)."""
    c = copy.deepcopy(cfg)
    c.parallel.tp = c.parallel.pp = 1
    c.parallel.first_stage_layers = None
    c.parallel.sequence_parallel = False
    c.model.spec, c.model.kernels = "local", "reference"
    return c


def _part_maps(cfg: Config) -> dict:
    from ..models.specs import vision_num_layers

    v, lm = cfg.model.vision, cfg.model.language
    return {
        "vision": ("vision_model.", M.vision_map(vision_num_layers(v), v.flavour), (v.num_heads, v.num_heads)),
        "projector": ("projector.", M.projector_map(), None),
        "language": ("language_model.", M.language_map(lm.num_layers, lm.qkv_bias), (lm.num_heads, lm.num_kv_heads)),
    }


# --------------------------------------------------------------------------------------
# hf-to-mcore
# --------------------------------------------------------------------------------------


def hf_to_mcore(out: str, hf: str | None = None, vision: str | None = None, language: str | None = None,
                tp: int = 1, pp: int = 1, feature_layer: int = -2, select_strategy: str = "default",
                seed: int = 1234) -> str:
    """Convert and return the path of the written checkpoint (``OUT/checkpoints/iter_0000000``)."""
    if (hf is None) == (vision is None and language is None) or (hf is None and (vision is None or language is None)):
        raise UserError("give either --hf DIR (a LlavaForConditionalGeneration folder) or both --vision DIR and "
                        "--language DIR")
    stage = _Staging(out)
    if hf is not None:
        lc = _hf_config(hf, "hf")
        _check(getattr(lc, "model_type", None) == "llava",
               f"--hf {hf}: model_type={getattr(lc, 'model_type', None)!r} is not supported; expected 'llava' "
               "(LlavaForConditionalGeneration); for separate vision/language models use --vision/--language")
        fl = lc.vision_feature_layer
        _check(isinstance(fl, int), f"--hf {hf}: vision_feature_layer={fl!r} (a list of layers) is not supported")
        _check(lc.projector_hidden_act == "gelu",
               f"--hf {hf}: projector_hidden_act={lc.projector_hidden_act!r} is not supported (exact gelu only)")
        _check(getattr(lc, "multimodal_projector_bias", True),
               f"--hf {hf}: multimodal_projector_bias=false is not supported")
        vf, lf = _vision_fields(lc.vision_config, f"--hf {hf}"), _language_fields(lc.text_config, f"--hf {hf}")
        strategy = lc.vision_feature_select_strategy
        if vf["flavour"] == "siglip":  # no class token: HF must keep every position ('full'), which is our default
            _check(strategy == "full", f"--hf {hf}: vision_feature_select_strategy={strategy!r} with a SigLIP tower "
                                       "drops a patch token (SigLIP has no class token); only 'full' is supported")
            strategy = "default"
        cfg = _build_cfg(vf, lf, fl, strategy, _image_norm(hf),
                         getattr(lc.text_config, "max_position_embeddings", 2048), tp, pp, _dtype_name(lc))
        tok_dir, both = hf, HFTensors(hf, "llava")
        src = {"vision": both, "projector": both, "language": both}
        image_token = getattr(lc, "image_token_index", getattr(lc, "image_token_id", None))
        hf_cfg_dict = lc.to_dict()
        tied = bool(getattr(lc.text_config, "tie_word_embeddings", False) or getattr(lc, "tie_word_embeddings", False))
    else:
        vcfg, tcfg = _hf_config(vision, "vision"), _hf_config(language, "language")
        vf, lf = _vision_fields(vcfg, f"--vision {vision}"), _language_fields(tcfg, f"--language {language}")
        _check(select_strategy in ("default", "full"), f"--select-strategy {select_strategy!r}: use default or full")
        cfg = _build_cfg(vf, lf, feature_layer, select_strategy, _image_norm(vision),
                         getattr(tcfg, "max_position_embeddings", 2048), tp, pp, _dtype_name(tcfg))
        tok_dir = language
        src = {"vision": HFTensors(vision, vf["flavour"]), "projector": None,
               "language": HFTensors(language, "qwen2" if lf["qkv_bias"] else "llama")}
        image_token = None
        hf_cfg_dict = None
        tied = bool(getattr(tcfg, "tie_word_embeddings", False))

    # ---- tokenizer ----------------------------------------------------------------------
    try:
        tok = load_tokenizer(tok_dir)
    except ValueError as e:
        raise UserError(str(e)) from e
    lm = cfg.model.language
    emb_key = src["language"].file_key("language", "embed_tokens.weight") if src["language"].has(
        "language", "embed_tokens.weight") else "embed_tokens.weight"
    new_rows = 0
    if hf is None and IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        if len(tok) > lm.vocab_size:  # grow the embeddings by the new token(s), initialised to the mean row
            new_rows = len(tok) - lm.vocab_size
            lm.vocab_size = len(tok)
    tid = image_token_id(tok)  # UserError when the tokenizer has none
    if image_token is not None and tid != image_token:
        raise UserError(f"tokenizer in {tok_dir}: {IMAGE_TOKEN!r} has id {tid} but config.json says "
                        f"image_token_index={image_token}")
    if len(tok) > lm.vocab_size:
        raise UserError(f"tokenizer in {tok_dir} has {len(tok)} tokens but the embeddings ({emb_key}) have "
                        f"{lm.vocab_size} rows (text_config.vocab_size); token ids past the embeddings would be "
                        "out of range")

    # ---- the model's shapes and the recipe of each tensor -------------------------------
    bcfg = _single_layout(cfg)
    rt = _runtime(seed)
    model = stream.meta_model(bcfg, rt, lm.vocab_size, tid)
    shapes = stream.param_shapes(model)
    recipes: dict[str, object] = {}  # state_dict key → () -> tensor, read from the HF files when it is written
    for part, (prefix, table, heads) in _part_maps(cfg).items():
        s = src[part]
        if s is None:  # fresh projector (megatron's init, seeded)
            cache: dict = {}
            recipes.update((prefix + k, _fresh_projector(bcfg, rt, seed, k, cache)) for k in table)
            continue
        for ours, (kind, hf_names) in table.items():
            if prefix + ours == OUTPUT and tied and not s.has("language", "lm_head.weight"):
                continue  # tied embeddings: the output layer starts as a copy (below)
            shape, dtype = shapes[prefix + ours]
            expect = M.to_hf(kind, torch.empty(shape, dtype=dtype, device="meta"), heads, lm.vocab_size - new_rows)
            for name, e in zip(hf_names, expect):
                got = s.shape(part, name)
                if tuple(got) != tuple(e.shape):
                    raise UserError(f"tensor {s.file_key(part, name)!r} has shape {list(got)} but the "
                                    f"config implies {list(e.shape)} (for {prefix + ours})")
                s.claim(part, name)
            grow = (lm.vocab_size - new_rows, lm.vocab_size) if kind == "vocab" and new_rows else None
            recipes[prefix + ours] = _hf_recipe(s, part, kind, hf_names, shape, heads, grow)
    if tied and not src["language"].has("language", "lm_head.weight"):
        recipes[OUTPUT] = recipes["language_model.embedding.word_embeddings.weight"]
    # unused HF vision tensors: kept for mcore-to-hf
    v = cfg.model.vision
    from ..models.specs import vision_num_layers

    extras = M.vision_extra_names(v.num_layers, vision_num_layers(v))
    if v.flavour == "siglip" and src["vision"].has("vision", M.SIGLIP_HEAD[0]):  # vision_use_head
        extras += list(M.SIGLIP_HEAD)
    for name in extras:
        src["vision"].claim("vision", name)
    missing = [k for k in shapes if not k.endswith("_extra_state") and k not in recipes]
    if missing:
        raise UserError(f"no HF tensor for {missing[0]} (and {len(missing) - 1} more)")
    for s in {id(x): x for x in src.values() if x is not None}.values():
        left = s.unused()
        if left:
            raise UserError(f"{s.folder}: tensor {s.file_key(*left[0])!r} has no place in the model "
                            f"({len(left)} unused); the checkpoint does not match config.json")

    # ---- write, one tensor at a time ----------------------------------------------------
    with stage as tmp:
        ck_dir = os.path.join(tmp, "checkpoints")
        final = os.path.join(stage.out, "checkpoints", "iter_0000000")
        cfg.checkpoint.load = final
        cfg.data.tokenizer = os.path.join(stage.out, "tokenizer")
        cfg.run_dir = os.path.join("runs", os.path.basename(stage.out))
        tok.save_pretrained(os.path.join(tmp, "tokenizer"))
        if extras:
            vs = src["vision"]
            write_safetensors(os.path.join(tmp, EXTRA_FILE),
                              [(n, vs.shape("vision", n), vs.dtype("vision", n)) for n in extras],
                              ((n, vs.get("vision", n)) for n in extras), metadata={"format": "pt"})
        common = {"config": to_dict(cfg), "hf": {"config": hf_cfg_dict, "extra": EXTRA_FILE if extras else None}}
        # weights only (no optimizer, no RNG): loads at any TP/PP, like ckpt.save(ck_dir, 0, model, None, ...)
        stream.save(ck_dir, model, common, lambda key: recipes[key]())
        save_config(cfg, os.path.join(tmp, "config.yaml"))
    return final


def _hf_recipe(s: HFTensors, part: str, kind: str, hf_names, shape, heads, grow: tuple[int, int] | None):
    """() → our tensor made from HF tensors ``hf_names``; ``grow=(a, b)``: rows a..b-1 (tokens added to the
    tokenizer) start as the mean embedding row."""
    def make():
        tensors = [s.get(part, n) for n in hf_names]
        value = M.to_ours(kind, tensors, shape, heads)
        if grow is not None:
            value[grow[0]:grow[1]] = tensors[0].float().mean(0).to(value.dtype)
        return value
    return make


def _fresh_projector(bcfg: Config, rt, seed: int, key: str, cache: dict):
    """() → one tensor of a freshly initialised (seeded, megatron's init) projector, built for real on its own
    (it is small: two hidden × hidden matrices) the first time one of its tensors is asked for."""
    def make():
        import dataclasses

        if "sd" in cache:  # a copy: the writer frees what it is given
            return cache["sd"][key].clone()

        from ..models import specs
        from ..models.projector import build_projector
        from ..models.vlm import model_dtype

        host = dataclasses.replace(rt, device=torch.device("cpu"))
        runtime.set_seed(seed, rt)
        dtype = model_dtype(bcfg, host)
        proj = build_projector(specs.projector_config(bcfg, host, dtype), bcfg.model.projector.type,
                               bcfg.model.vision.hidden_size).to(dtype)
        cache["sd"] = proj.state_dict()
        return cache["sd"][key].clone()
    return make


# --------------------------------------------------------------------------------------
# mcore-to-hf
# --------------------------------------------------------------------------------------


def mcore_to_hf(ckpt_path: str, out: str, tokenizer: str | None = None, hf_extra: str | None = None,
                dtype: str = "auto", seed: int = 1234, max_shard_size: str | int = SHARD_BYTES) -> str:
    """Export and return ``out``. Reads the checkpoint one layer at a time and writes the HF safetensors as it goes
    (shards of at most ``max_shard_size``: ``5GB``, ``500MB``, ``2GiB`` or bytes)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config, SiglipVisionConfig

    from ..models.specs import vision_num_layers

    max_shard_bytes = parse_size(max_shard_size)
    path = ckpt.find_checkpoint(ckpt_path)
    stage = _Staging(out)
    common = ckpt.load_common(path)
    saved = common.get("config")
    _check(isinstance(saved, dict), f"{path}: the checkpoint has no megavlm config in its common state")
    cfg = Config()
    try:
        _apply_mapping(cfg, saved, "", f" (config saved in {path})")
    except ConfigError as e:
        raise UserError(str(e)) from e
    v, lm = cfg.model.vision, cfg.model.language
    _check(cfg.model.projector.type == "mlp2x_gelu", f"{path}: model.projector.type={cfg.model.projector.type!r} "
           "has no LlavaForConditionalGeneration equivalent (mlp2x_gelu only)")
    hf_info = common.get("hf") or {}
    stored = hf_info.get("config")
    if dtype == "auto":
        dtype = (stored or {}).get("dtype") or (stored or {}).get("torch_dtype") or (
            "bfloat16" if cfg.model.dtype == "bf16" else "float32")
        dtype = dtype if dtype in _DTYPES else "float32"
    _check(dtype in _DTYPES, f"--dtype {dtype}: choose auto, float32, bfloat16 or float16")
    out_dtype = _DTYPES[dtype]

    tok, tok_src = find_tokenizer(path, cfg.data.tokenizer, tokenizer)
    vocab = lm.vocab_size or len(tok)
    lm.vocab_size = vocab
    if len(tok) > vocab:
        raise UserError(f"tokenizer {tok_src} has {len(tok)} tokens but the checkpoint's embeddings "
                        f"(language_model.embedding.word_embeddings.weight) have {vocab} rows")
    tid = image_token_id(tok)

    bcfg = _single_layout(cfg)
    bcfg.model.dtype = "bf16" if out_dtype == torch.bfloat16 and cfg.model.dtype == "bf16" else "fp32"
    rt = _runtime(seed)
    model = stream.meta_model(bcfg, rt, vocab, tid)
    shapes = stream.param_shapes(model)
    reader = stream.Reader(path, model)

    # What goes into the HF files, in groups that are read and written together: one layer of a part, or one
    # tensor outside the layers. Shapes come from the meta model, so the shards are planned before any read.
    groups: dict[tuple, list] = {}
    for part, (prefix, table, heads) in _part_maps(cfg).items():
        for ours, (kind, hf_names) in table.items():
            m = re.match(r"decoder\.layers\.(\d+)\.", ours)
            groups.setdefault((part, int(m.group(1))) if m else (part, ours), []).append(
                (prefix + ours, kind, hf_names, part, heads))
    entries_of: dict[tuple, list] = {}
    hf_shapes: dict[str, tuple[int, ...]] = {}
    for g, items in groups.items():
        entries_of[g] = []
        for key, kind, hf_names, part, heads in items:
            shape, dt = shapes[key]
            for name, t in zip(hf_names, M.to_hf(kind, torch.empty(shape, dtype=dt, device="meta"), heads, vocab)):
                entries_of[g].append((M.hf_file_key(part, name), tuple(t.shape), out_dtype))
                hf_shapes[M.hf_file_key(part, name)] = tuple(t.shape)

    def load_group(items):
        loaded = reader.load([key for key, *_ in items])
        out = {}
        for key, kind, hf_names, part, heads in items:
            t = loaded.pop(key)
            for name, h in zip(hf_names, M.to_hf(kind, t.detach().cpu(), heads, vocab)):
                out[M.hf_file_key(part, name)] = h.to(out_dtype).contiguous()
        return out

    files = [(entries_of[g], lambda items=items: load_group(items)) for g, items in groups.items()]

    # Vision layers past the feature layer: from the hf-to-mcore side file when there is one that fits, otherwise a
    # tower truncated at the feature layer (vision_feature_layer=-1) with an identity post-LayerNorm (which LLaVA
    # never reads), so the exported model computes exactly what ours does.
    built = vision_num_layers(v)
    def expect(name: str) -> tuple[int, ...]:  # extra layers are shaped like layer 0; post-LN like ln_pre
        if name.startswith("post_layernorm."):
            return (v.hidden_size,)
        if name.startswith("head."):
            return M.siglip_head_shape(name, v.hidden_size, v.ffn_hidden_size)
        return hf_shapes[M.hf_file_key("vision", re.sub(r"layers\.\d+\.", "layers.0.", name))]

    extra = _load_extras(path, hf_extra, hf_info.get("extra"), M.vision_extra_names(v.num_layers, built), expect,
                         optional=M.SIGLIP_HEAD if v.flavour == "siglip" else ())
    use_head = extra is not None and M.SIGLIP_HEAD[0] in extra[1]  # SigLIP's pooling head only comes from the file
    if extra is not None:
        n_layers, feature_layer = v.num_layers, v.feature_layer
        side, names = extra
        by_layer: dict[str, list[str]] = {}
        for name in names:
            m = re.match(r"encoder\.layers\.\d+\.", name)
            by_layer.setdefault(m.group(0) if m else "", []).append(name)
        for names_ in by_layer.values():
            files.append(([(M.hf_file_key("vision", n), side.shape(n), out_dtype) for n in names_],
                          lambda names_=names_: {M.hf_file_key("vision", n): side.get(n).to(out_dtype).contiguous()
                                                 for n in names_}))
    else:
        n_layers, feature_layer = built, -1
        ln = [M.hf_file_key("vision", "post_layernorm.weight"), M.hf_file_key("vision", "post_layernorm.bias")]
        files.append(([(k, (v.hidden_size,), out_dtype) for k in ln],
                      lambda: {ln[0]: torch.ones(v.hidden_size, dtype=out_dtype),
                               ln[1]: torch.zeros(v.hidden_size, dtype=out_dtype)}))

    vision_cls, act = (CLIPVisionConfig, "quick_gelu") if v.flavour == "clip" else (SiglipVisionConfig,
                                                                                     "gelu_pytorch_tanh")
    text_cls = Qwen2Config if lm.qkv_bias else LlamaConfig

    if stored:
        hcfg = LlavaConfig.from_dict(copy.deepcopy(stored))
        for what, sub, cls in (("vision", hcfg.vision_config, vision_cls), ("text", hcfg.text_config, text_cls)):
            ok = isinstance(sub, cls) or (cls is LlamaConfig and getattr(sub, "model_type", None) == "mistral")
            _check(ok, f"{path}: the stored HF {what}_config ({getattr(sub, 'model_type', None)}) does not fit the "
                       f"megavlm config (model.vision.flavour={v.flavour!r}, model.language.qkv_bias={lm.qkv_bias})")
    else:
        hcfg = LlavaConfig(vision_config=vision_cls(hidden_act=act), text_config=text_cls())
    vc, tc = hcfg.vision_config, hcfg.text_config
    for k, val in dict(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size, num_hidden_layers=n_layers,
                       num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                       num_channels=v.num_channels, layer_norm_eps=v.layernorm_eps, hidden_act=act).items():
        setattr(vc, k, val)
    if v.flavour == "siglip":
        vc.vision_use_head = use_head
    text = dict(hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size, num_hidden_layers=lm.num_layers,
                num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads, rms_norm_eps=lm.norm_eps,
                vocab_size=vocab, hidden_act="silu", tie_word_embeddings=False)
    if lm.qkv_bias:  # Qwen2: q/k/v biases are built in; head_dim is derived (not a Qwen2Config field)
        text.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * lm.num_layers)
    else:
        text.update(head_dim=lm.hidden_size // lm.num_heads, attention_bias=False, mlp_bias=False)
    for k, val in text.items():
        setattr(tc, k, val)
    rp = dict(getattr(tc, "rope_parameters", None) or {})
    rp.update(rope_type="default", rope_theta=float(lm.rope_theta))
    tc.rope_parameters = rp
    if not stored:
        tc.max_position_embeddings = cfg.data.max_seq_len
        tc.bos_token_id, tc.eos_token_id, tc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    hcfg.vision_feature_layer = feature_layer
    # SigLIP has no class token: HF's 'full' keeps every position, which is what our 'default' does
    hcfg.vision_feature_select_strategy = "full" if v.flavour == "siglip" else v.select_strategy
    hcfg.image_token_index = tid
    hcfg.image_seq_length = num_image_tokens(v)
    hcfg.projector_hidden_act = "gelu"
    hcfg.multimodal_projector_bias = True
    hcfg.tie_word_embeddings = False
    hcfg.architectures = ["LlavaForConditionalGeneration"]
    hcfg.dtype = dtype

    with stage as tmp:
        write_sharded(tmp, files, max_shard_bytes)
        hcfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _image_processor(v).save_pretrained(tmp)
    return stage.out


def _image_processor(v):
    """CLIP: resize the shortest edge + center crop; SigLIP: resize to a square (as their HF processors do)."""
    if v.flavour == "siglip":
        from transformers import SiglipImageProcessor

        return SiglipImageProcessor(size={"height": v.image_size, "width": v.image_size}, image_mean=v.image_mean,
                                    image_std=v.image_std)
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size,
                              "width": v.image_size}, image_mean=v.image_mean, image_std=v.image_std)


def _parents(path: str, n: int = 3) -> list[str]:
    out, p = [], os.path.abspath(path)
    for _ in range(n + 1):
        out.append(p)
        p = os.path.dirname(p)
    return out


def _load_extras(path: str, given: str | None, name: str | None, wanted: list[str], expect,
                 optional=()) -> tuple[SafetensorsFile, list[str]] | None:
    """The side file (and the names to take from it) when there is one holding every ``wanted`` name with the shape
    ``expect(name)``; the ``optional`` names come along when the file holds all of them. Only headers are read."""
    if given:
        cands = [given]
        if not os.path.isfile(given):
            raise UserError(f"--hf-extra {given}: no such file")
    else:
        cands = [os.path.join(p, name or EXTRA_FILE) for p in _parents(path)]
    for c in cands:
        if not os.path.isfile(c):
            continue
        f = SafetensorsFile(c)
        keys = set(f.names())
        if not set(wanted) <= keys:
            if given:
                missing = sorted(set(wanted) - keys)[0]
                raise UserError(f"--hf-extra {given}: tensor {missing!r} is missing (the file belongs to "
                                "another model)")
            continue
        names = [*wanted, *(optional if set(optional) <= keys else ())]
        bad = [k for k in names if f.shape(k) != tuple(expect(k))]
        if bad:
            if given:
                raise UserError(f"--hf-extra {given}: tensor {bad[0]!r} has shape {list(f.shape(bad[0]))}, "
                                f"which does not fit the model ({list(expect(bad[0]))})")
            continue
        return f, names
    return None

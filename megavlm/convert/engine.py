"""``megavlm convert hf-to-mcore`` / ``mcore-to-hf``: HF folders ↔ megavlm dist checkpoints, for any model family.

One engine executes the family's parameter mappings (:mod:`megavlm.convert.mapping`, declared by the family) in both
directions. Both describe the VLM at TP=1/PP=1 in this one process, built on the meta device (names, shapes,
dtypes, no storage), and go through its ``state_dict`` names; dist_checkpointing reshards to any TP/PP on load.
Tensors stream (:mod:`megavlm.convert.stream`): hf-to-mcore makes each parameter from the HF files when the
checkpoint writer reaches it, mcore-to-hf reads one layer at a time and writes it straight into the safetensors file,
so memory is about one layer's, not the model's. Outputs are written under ``{out}.tmp-*`` and renamed to ``out``
only when complete.

The family decides (``megavlm/families``): which HF folders it reads and how (``read_hf``: the megavlm config, the
tensor sources, the tokenizer), the mappings (``parts``), which unused HF tensors are kept aside (``keep_aside``), and
on export the tensor names, the side tensors, the HF config and the image processor.

Layout written by hf-to-mcore::

    OUT/checkpoints/iter_0000000/   dist checkpoint, step 0, no optimizer state (``has_optimizer: False``)
    OUT/checkpoints/latest
    OUT/tokenizer/                  HF tokenizer files
    OUT/config.yaml                 megavlm config of the model (checkpoint.load and data.tokenizer point here)
    OUT/hf_extra.safetensors        HF tensors the model does not use (kept aside by the family), re-emitted by
                                    mcore-to-hf; absent when there are none
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile

import torch

from .. import families, runtime
from ..config import DEFAULT_FAMILY, ConfigError, save_config, single_layout, to_dict
from ..data.constants import image_token_id
from ..data.tokenizer import find_tokenizer, load_tokenizer
from ..errors import UserError
from ..models import lora
from ..training import checkpoint as ckpt
from . import stream
from .hf_io import SHARD_BYTES, HFTensors, SafetensorsFile, parse_size, write_safetensors, write_sharded
from .mapping import Ctx, Vocab, expand

EXTRA_FILE = "hf_extra.safetensors"
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


def _converter_layout(cfg):
    """The config the converter builds the model with: TP=1/PP=1, local layers (TE-independent names)."""
    c = single_layout(cfg)
    c.model.spec, c.model.kernels = "local", "reference"
    return c


def _family_of_hf(hf: str | None, family: str | None):
    """The family that converts ``--hf DIR`` (by its config.json's ``model_type``), or ``--family``."""
    if family is not None:
        try:
            return families.get(family, key="--family")
        except ConfigError as e:
            raise UserError(str(e)) from e
    if hf is None:
        return families.get(DEFAULT_FAMILY)
    from ..families.common import read_json

    try:
        hf_cfg = read_json(os.path.join(hf, "config.json"))
    except (OSError, ValueError) as e:
        raise UserError(f"--hf {hf}: cannot read config.json: {e}") from e
    if hf_cfg is None:
        raise UserError(f"--hf {hf}: no config.json (expected a folder written by save_pretrained)")
    mt = hf_cfg.get("model_type")
    fam = families.for_model_type(mt)
    if fam is None:
        known = ", ".join(f"{t!r} (family {f.name})" for f in map(families.get, families.names())
                          for t in f.model_types)
        raise UserError(f"--hf {hf}: model_type={mt!r} is not supported; expected {known}; for separate vision/"
                        "language models use --vision/--language")
    return fam


# --------------------------------------------------------------------------------------
# hf-to-mcore
# --------------------------------------------------------------------------------------


def hf_to_mcore(out: str, hf: str | None = None, vision: str | None = None, language: str | None = None,
                tp: int = 1, pp: int = 1, feature_layer: int = -2, select_strategy: str = "default",
                seed: int = 1234, family: str | None = None, projector: str = "mlp2x_gelu", pool: str = "none") -> str:
    """Convert and return the path of the written checkpoint (``OUT/checkpoints/iter_0000000``). ``hf``: one HF
    folder of the whole VLM (its family found by ``model_type``); ``vision`` + ``language``: separate parts that the
    family (``family``, default llava) assembles, with ``feature_layer`` / ``select_strategy`` for the tower and the
    fresh projector's ``projector`` type and ``pool`` (``model.projector.pool``)."""
    fam = _family_of_hf(hf, family)
    stage = _Staging(out)
    imp = fam.read_hf({"hf": hf, "vision": vision, "language": language},
                      {"feature_layer": feature_layer, "select_strategy": select_strategy, "projector": projector,
                       "pool": pool}, tp, pp)
    cfg = imp.cfg
    for flag, key, given, default in (("--pool", "pool", pool, "none"), ("--projector", "type", projector,
                                                                          "mlp2x_gelu")):
        if given != default and getattr(cfg.model.projector, key, default) != given:
            raise UserError(f"{flag} {given}: model family {fam.name} does not take it on conversion (the fresh "
                            "projector of llava's --vision/--language does)")
    opened: dict = {}  # one reader per (folder, prefixes): the parts of one HF folder share it
    for s in imp.sources.values():
        if s is not None and s not in opened:
            opened[s] = HFTensors(s[0], s[1], what=fam.name)
    src = {part: None if s is None else opened[s] for part, s in imp.sources.items()}

    # ---- tokenizer ----------------------------------------------------------------------
    try:
        tok = load_tokenizer(imp.tokenizer_dir)
    except ValueError as e:
        raise UserError(str(e)) from e
    lm = cfg.model.language
    lang = src["language"]
    emb_key = lang.file_key("language", "embed_tokens.weight") if lang.has("language", "embed_tokens.weight") else (
        "embed_tokens.weight")
    new_rows = 0
    if imp.add_image_token and fam.image_token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [fam.image_token]})
        if len(tok) > lm.vocab_size:  # grow the embeddings by the new token(s), initialised to the mean row
            new_rows = len(tok) - lm.vocab_size
            lm.vocab_size = len(tok)
    tid = image_token_id(tok, fam.image_token)  # UserError when the tokenizer has none
    if imp.image_token_id is not None and tid != imp.image_token_id:
        raise UserError(f"tokenizer in {imp.tokenizer_dir}: {fam.image_token!r} has id {tid} but config.json says "
                        f"image_token_index={imp.image_token_id}")
    if len(tok) > lm.vocab_size:
        raise UserError(f"tokenizer in {imp.tokenizer_dir} has {len(tok)} tokens but the embeddings ({emb_key}) have "
                        f"{lm.vocab_size} rows (text_config.vocab_size); token ids past the embeddings would be "
                        "out of range")

    # ---- the model's shapes and the recipe of each tensor -------------------------------
    bcfg = _converter_layout(cfg)
    rt = _runtime(seed)
    model = stream.meta_model(bcfg, rt, lm.vocab_size, tid)
    shapes = stream.param_shapes(model)
    resolved = expand(fam.parts(cfg), shapes)
    # an HF model with tied embeddings whose output layer the config keeps separate: it starts as their copy
    output = next((r for r in resolved if r.part.name == "language" and r.hf == ("lm_head.weight",)), None)
    embedding = next(r for r in resolved if r.part.name == "language" and r.hf == ("embed_tokens.weight",))
    recipes: dict[str, object] = {}  # state_dict key → () -> tensor, read from the HF files when it is written
    fresh_cache: dict = {}
    for r in resolved:
        s = src[r.part.name]
        if s is None:  # a part that starts fresh (megatron's init, seeded)
            recipes[r.ours] = _fresh(fam, bcfg, rt, seed, r.part, r.ours[len(r.part.prefix):], fresh_cache)
            continue
        if r is output and imp.tied and not s.has("language", "lm_head.weight"):
            continue  # tied embeddings: the output layer starts as a copy (below)
        shape, dtype = shapes[r.ours]
        ctx = Ctx(r.part.heads, lm.vocab_size - new_rows)
        expect = r.mapping.to_hf(torch.empty(shape, dtype=dtype, device="meta"), ctx)
        for name, e in zip(r.hf, expect):
            got = s.shape(r.part.name, name)
            if tuple(got) != tuple(e.shape):
                raise UserError(f"tensor {s.file_key(r.part.name, name)!r} has shape {list(got)} but the "
                                f"config implies {list(e.shape)} (for {r.ours})")
            s.claim(r.part.name, name)
        grow = (lm.vocab_size - new_rows, lm.vocab_size) if isinstance(r.mapping, Vocab) and new_rows else None
        recipes[r.ours] = _hf_recipe(s, r, shape, ctx, grow)
    if output is not None and imp.tied and not lang.has("language", "lm_head.weight"):
        recipes[output.ours] = recipes[embedding.ours]
    # HF tensors the model does not use: the family keeps some aside (for mcore-to-hf), the rest is an error
    extras: list[tuple[str, str]] = []
    for s in {id(x): x for x in src.values() if x is not None}.values():
        for part, name in s.unused():
            if fam.keep_aside(cfg, part, name):
                s.claim(part, name)
                extras.append((part, name))
    if len({name for _, name in extras}) != len(extras):
        raise AssertionError(f"{fam.name}: tensors kept aside from two parts share a name")
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
        cfg.data.template = fam.default_template
        cfg.run_dir = os.path.join("runs", os.path.basename(stage.out))
        tok.save_pretrained(os.path.join(tmp, "tokenizer"))
        if extras:
            write_safetensors(os.path.join(tmp, EXTRA_FILE),
                              [(n, src[p].shape(p, n), src[p].dtype(p, n)) for p, n in extras],
                              ((n, src[p].get(p, n)) for p, n in extras), metadata={"format": "pt"})
        common = {"config": to_dict(cfg), "hf": {"config": imp.hf_config, "extra": EXTRA_FILE if extras else None}}
        # weights only (no optimizer, no RNG): loads at any TP/PP, like ckpt.save(ck_dir, 0, model, None, ...)
        stream.save(ck_dir, model, common, lambda key: recipes[key]())
        save_config(cfg, os.path.join(tmp, "config.yaml"))
    return final


def _hf_recipe(s: HFTensors, r, shape, ctx: Ctx, grow: tuple[int, int] | None):
    """() → our tensor made from the HF tensors of ``r``; ``grow=(a, b)``: rows a..b-1 (tokens added to the
    tokenizer) start as the mean embedding row."""
    def make():
        tensors = [s.get(r.part.name, n) for n in r.hf]
        value = r.mapping.to_ours(tensors, shape, ctx)
        if grow is not None:
            value[grow[0]:grow[1]] = tensors[0].float().mean(0).to(value.dtype)
        return value
    return make


def _fresh(fam, bcfg, rt, seed: int, part, key: str, cache: dict):
    """() → one tensor of a part that starts fresh: today the projector (megatron's init, seeded), built for real on
    its own (it is small: two hidden × hidden matrices) the first time one of its tensors is asked for."""
    if part.name != "projector":
        raise UserError(f"the {part.name} weights are missing and only a projector can start fresh")

    def make():
        if "sd" in cache:  # a copy: the writer frees what it is given
            return cache["sd"][key].clone()

        from ..models import specs
        from ..models.vlm import model_dtype

        host = dataclasses.replace(rt, device=torch.device("cpu"))
        runtime.set_seed(seed, rt)
        dtype = model_dtype(bcfg, host)
        arch = fam.projector_arch(bcfg)
        proj = fam.build_projector(bcfg, specs.projector_config(bcfg, host, dtype), arch).to(dtype)
        cache["sd"] = proj.state_dict()
        return cache["sd"][key].clone()
    return make


# --------------------------------------------------------------------------------------
# mcore-to-hf
# --------------------------------------------------------------------------------------


def mcore_to_hf(ckpt_path: str, out: str, tokenizer: str | None = None, hf_extra: str | None = None,
                dtype: str = "auto", seed: int = 1234, max_shard_size: str | int = SHARD_BYTES,
                merge_lora: bool = True, lora_adapter: str | None = None) -> str:
    """Export and return ``out``. Reads the checkpoint one layer at a time and writes the HF safetensors as it goes
    (shards of at most ``max_shard_size``: ``5GB``, ``500MB``, ``2GiB`` or bytes). A checkpoint with LoRA adapters
    has them merged into the weights (``W + (alpha/rank)·B A``) unless ``merge_lora`` is False (the base weights);
    ``lora_adapter``: a new directory that gets them as a PEFT adapter folder too (:func:`_write_peft_adapter`)."""
    max_shard_bytes = parse_size(max_shard_size)
    path = ckpt.find_checkpoint(ckpt_path)
    stage = _Staging(out)
    common = ckpt.load_common(path)
    cfg = ckpt.saved_config(path, common)
    lora_cfg = cfg.model.lora
    if lora_adapter is not None and not lora_cfg.rank:
        raise UserError(f"--lora-adapter {lora_adapter}: checkpoint {path} has no LoRA adapters (model.lora.rank=0)")
    adapter_stage = _Staging(lora_adapter) if lora_adapter is not None else None
    fam = families.of(cfg)
    lm = cfg.model.language
    hf_info = common.get("hf") or {}
    stored = hf_info.get("config")
    if dtype == "auto":
        dtype = (stored or {}).get("dtype") or (stored or {}).get("torch_dtype") or (
            "bfloat16" if cfg.model.dtype == "bf16" else "float32")
        dtype = dtype if dtype in _DTYPES else "float32"
    if dtype not in _DTYPES:
        raise UserError(f"--dtype {dtype}: choose auto, float32, bfloat16 or float16")
    out_dtype = _DTYPES[dtype]

    tok, tok_src = find_tokenizer(path, cfg.data.tokenizer, tokenizer)
    vocab = lm.vocab_size or len(tok)
    lm.vocab_size = vocab
    if len(tok) > vocab:
        raise UserError(f"tokenizer {tok_src} has {len(tok)} tokens but the checkpoint's embeddings "
                        f"(language_model.embedding.word_embeddings.weight) have {vocab} rows")
    tid = image_token_id(tok, fam.image_token)

    bcfg = _converter_layout(cfg)
    bcfg.model.dtype = "bf16" if out_dtype == torch.bfloat16 and cfg.model.dtype == "bf16" else "fp32"
    rt = _runtime(seed)
    model = stream.meta_model(bcfg, rt, vocab, tid)
    shapes = stream.param_shapes(model)
    reader = stream.Reader(path, model)
    # What goes into the HF files, in groups that are read and written together: one layer of a part, or one
    # tensor outside the layers. Shapes come from the meta model, so the shards are planned before any read.
    groups: dict[tuple, list] = {}
    # LoRA factors are no HF tensors of their own: they are merged into (or exported beside) their base weight
    factors = {k[:-len(lora.A)] + "weight": (k, k[:-len(lora.A)] + lora.B) for k in shapes
               if k.endswith("." + lora.A)}
    peft: dict = {}  # (HF file key of the base weight, "A" | "B") → factor
    for r in expand(fam.parts(cfg), [k for k in shapes if not lora.is_adapter_key(k)]):
        groups.setdefault((r.part.name, r.layer) if r.layer is not None else (r.part.name, r.ours), []).append(r)
    entries_of: dict[tuple, list] = {}
    hf_shapes: dict[tuple[str, str], tuple[int, ...]] = {}
    for g, items in groups.items():
        entries_of[g] = []
        for r in items:
            shape, dt = shapes[r.ours]
            meta = r.mapping.to_hf(torch.empty(shape, dtype=dt, device="meta"), Ctx(r.part.heads, vocab))
            for name, t in zip(r.hf, meta):
                entries_of[g].append((fam.export_key(r.part.name, name), tuple(t.shape), out_dtype))
                hf_shapes[(r.part.name, name)] = tuple(t.shape)

    def load_group(items):
        loaded = reader.load([r.ours for r in items] + [k for r in items for k in factors.get(r.ours, ())])
        tensors = {}
        for r in items:
            t = loaded.pop(r.ours)
            if r.ours in factors:
                a, b = (loaded.pop(k).detach().cpu() for k in factors[r.ours])
                if merge_lora:
                    t = lora.merged(t, a, b, lora_cfg.alpha, lora_cfg.rank)
                if adapter_stage is not None:
                    for name, hb in zip(r.hf, r.mapping.to_hf(b, Ctx(r.part.heads, vocab))):
                        key = fam.export_key(r.part.name, name)
                        peft[(key, "A")] = a.to(out_dtype).contiguous()
                        peft[(key, "B")] = hb.to(out_dtype).contiguous()
            for name, h in zip(r.hf, r.mapping.to_hf(t.detach().cpu(), Ctx(r.part.heads, vocab))):
                tensors[fam.export_key(r.part.name, name)] = h.to(out_dtype).contiguous()
        return tensors

    files = [(entries_of[g], lambda items=items: load_group(items)) for g, items in groups.items()]

    # HF tensors the model does not hold: from the hf-to-mcore side file when there is one that fits, otherwise
    # what the family writes instead.
    spec = fam.export_extras(cfg, lambda part, name: hf_shapes[(part, name)])
    found = None
    if spec is not None:
        extra = _load_extras(path, hf_extra, hf_info.get("extra"), list(spec.wanted), spec.expect,
                             optional=spec.optional, rest=spec.rest)
        if extra is not None:
            side, names = extra
            found = set(names)
            by_layer: dict[str, list[str]] = {}
            for name in names:
                m = re.match(r".*?layers\.\d+\.", name)
                by_layer.setdefault(m.group(0) if m else "", []).append(name)
            for names_ in by_layer.values():
                files.append(([(fam.export_key(spec.part, n), side.shape(n), out_dtype) for n in names_],
                              lambda names_=names_: {fam.export_key(spec.part, n): side.get(n).to(out_dtype)
                                                     .contiguous() for n in names_}))
    if found is None:
        fallback = fam.export_fallback(cfg, out_dtype)
        if fallback:
            keys = list(fallback)
            files.append(([(k, fallback[k][0], out_dtype) for k in keys],
                          lambda: {k: fallback[k][1]() for k in keys}))
    hcfg = fam.export_config(cfg, stored, tok, vocab, tid, dtype, found)

    with stage as tmp:
        write_sharded(tmp, files, max_shard_bytes)
        hcfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        fam.export_processor(cfg, tmp, tok)
        if adapter_stage is not None:
            live = _hf_module_names(tmp, {key for key, _ in peft})
            peft = {f"base_model.model.{live[key].removesuffix('.weight')}.lora_{ab}.weight": t
                    for (key, ab), t in peft.items()}
            with adapter_stage as atmp:
                # the adapter goes onto the base weights: the --no-merge export (a merged one already holds it)
                _write_peft_adapter(atmp, peft, lora_cfg, base=None if merge_lora else stage.out)
    return stage.out


def _hf_module_names(folder: str, keys) -> dict[str, str]:
    """File tensor name → the parameter name in the model transformers builds from ``folder`` (transformers 5
    renames some on load, e.g. LLaVA's ``language_model.model.*`` → ``model.language_model.*``; PEFT addresses
    modules by the live names). Uses the renamings transformers itself applies on load (PEFT uses the same)."""
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    hcfg = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, (hcfg.architectures or [""])[0], None)
    if cls is None:
        raise UserError(f"--lora-adapter: transformers has no class {hcfg.architectures} to name the modules by")
    with torch.device("meta"):
        model = cls._from_config(hcfg)
    conv = get_model_conversion_mapping(model)
    renamings = [c for c in conv if not isinstance(c, WeightConverter)]
    converters = [c for c in conv if isinstance(c, WeightConverter)]
    live = model.state_dict()
    out = {}
    for k in keys:
        name, converted = rename_source_key(k, renamings, converters, model.base_model_prefix, live)
        if converted is not None or name not in live:
            raise UserError(f"--lora-adapter: transformers loads {k} as something other than one module's weight "
                            f"({name}); no PEFT adapter can address it")
        out[k] = name
    return out


def _write_peft_adapter(folder: str, tensors: dict[str, torch.Tensor], lora_cfg, base: str | None) -> None:
    """A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``peft.PeftModel.from_pretrained(<HF model>, folder)`` loads: the factors under the HF module names (a fused
    ``linear_qkv``'s B split into q/k/v rows, ``linear_fc1``'s into gate/up, A shared), ``target_modules`` the exact
    module paths (so a vision tower's layers of the same name stay untouched), scale ``lora_alpha / r`` as ours."""
    import json

    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors})
    config = {
        "peft_type": "LORA", "task_type": None, "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout, "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base, "inference_mode": True,
    }
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    names = sorted(tensors)
    write_safetensors(os.path.join(folder, "adapter_model.safetensors"),
                      [(k, tuple(tensors[k].shape), tensors[k].dtype) for k in names],
                      ((k, tensors[k]) for k in names), metadata={"format": "pt"})


def _parents(path: str, n: int = 3) -> list[str]:
    out, p = [], os.path.abspath(path)
    for _ in range(n + 1):
        out.append(p)
        p = os.path.dirname(p)
    return out


def _load_extras(path: str, given: str | None, name: str | None, wanted: list[str], expect,
                 optional=(), rest=()) -> tuple[SafetensorsFile, list[str]] | None:
    """The side file (and the names to take from it) when there is one holding every ``wanted`` name with the shape
    ``expect(name)``; the ``optional`` names come along when the file holds all of them, and the names starting with
    one of ``rest`` as they are. Only headers are read."""
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
        if rest:
            names += [k for k in f.names() if k.startswith(tuple(rest)) and k not in names]
        return f, names
    return None

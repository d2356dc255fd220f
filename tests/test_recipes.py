"""The LLaVA-1.5 recipes (configs/llava15_{7b,13b}_stage{1,2}.yaml): they load and pass every config check at 8 and
16 GPUs, carry LLaVA's hyperparameters and the real Vicuna / CLIP ViT-L/14-336 shapes, chain stage 2 onto stage 1,
and have the parameter counts of the real models (by a formula that is checked against a tiny model built here)."""

from __future__ import annotations

import math
import os

import pytest

from megavlm import families
from megavlm.config import checkpoint_dir, load_config, to_dict, validate

from helpers import ROOT

SIZES = {  # Vicuna v1.5 = LLaMA-2 shapes: hidden, layers, heads, ffn; parameters with its own 32000-token vocabulary
    "7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, ffn_hidden_size=11008,
               params=6_738_415_616),
    "13b": dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, ffn_hidden_size=13824,
                params=13_015_864_320),
}
STAGES = {  # LLaVA-1.5's scripts/v1_5/pretrain.sh and finetune.sh: one epoch of each data set
    1: dict(samples=558_128, global_batch=256, lr=1e-3, template="plain"),
    2: dict(samples=665_298, global_batch=128, lr=2e-5, template="vicuna_v1"),
}
RECIPES = [(size, stage) for size in SIZES for stage in STAGES]
CLIP_L_336 = dict(flavour="clip", image_size=336, patch_size=14, num_channels=3, hidden_size=1024, num_layers=24,
                  num_heads=16, ffn_hidden_size=4096, feature_layer=-2, select_strategy="default")
#: HF CLIPVisionModel (openai/clip-vit-large-patch14-336): 24 layers + post-LayerNorm.
CLIP_L_336_PARAMS = 303_507_456


def path(size: str, stage: int) -> str:
    return os.path.join(ROOT, "configs", f"llava15_{size}_stage{stage}.yaml")


def recipe(size: str, stage: int, shards: str, *overrides: str):
    """The recipe with its placeholder shard path replaced (config checks need an existing directory)."""
    return load_config(path(size, stage), [f"data.shards={shards}", *overrides])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shards"))


# --------------------------------------------------------------------------------------------------------------
# Loading and checks at 8 and 16 GPUs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,stage", RECIPES)
def test_validates_on_8_and_16_gpus(size, stage, shards):
    cfg = recipe(size, stage, shards)
    p = cfg.parallel
    for world in (8, 16):
        dp = validate(cfg, world)
        assert dp == world // (p.tp * p.pp)
        accumulation = cfg.train.global_batch // (cfg.train.micro_batch * dp)
        assert accumulation >= 1 and accumulation * cfg.train.micro_batch * dp == cfg.train.global_batch
        if p.pp > 1:
            assert accumulation >= p.pp, "fewer micro-batches than pipeline stages leaves the pipeline mostly idle"


def test_big_layouts():
    """13B stage 2 (the LLM trains) is TP=2 x PP=2 with the distributed optimizer; 7B stage 2 shards its optimizer."""
    s13 = load_config(path("13b", 2))
    assert (s13.parallel.tp, s13.parallel.pp, s13.parallel.distributed_optimizer) == (2, 2, True)
    s7 = load_config(path("7b", 2))
    assert s7.parallel.distributed_optimizer and s7.parallel.tp in (1, 2)


@pytest.mark.parametrize("size,stage", RECIPES)
def test_placeholder_paths_are_marked(size, stage):
    """Data, tokenizer and (stage 1) the converted checkpoint are the user's to point at: marked EDIT."""
    lines = open(path(size, stage), encoding="utf-8").read().splitlines()
    cfg = load_config(path(size, stage))
    for key in ("shards:", "tokenizer:"):
        line = next(ln for ln in lines if ln.strip().startswith(key))
        assert "EDIT" in line, line
    assert cfg.data.source == "shards" and os.path.isabs(cfg.data.shards) and os.path.isabs(cfg.data.tokenizer)
    text = "\n".join(lines)
    assert f"configs/llava15_{size}_stage{stage}.yaml" in text  # the header says how to launch it


# --------------------------------------------------------------------------------------------------------------
# LLaVA's hyperparameters and shapes
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,stage", RECIPES)
def test_llava_hyperparameters(size, stage, shards):
    cfg = recipe(size, stage, shards)
    want = STAGES[stage]
    tr, data = cfg.train, cfg.data
    assert tr.stage == stage
    assert tr.lr == want["lr"] and tr.min_lr == 0.0 and tr.lr_schedule == "cosine" and tr.weight_decay == 0.0
    assert tr.global_batch == want["global_batch"]
    assert tr.steps == want["samples"] // want["global_batch"]  # one epoch of full batches: 2180 / 5197
    assert tr.warmup_steps == math.ceil(0.03 * tr.steps)  # warmup_ratio 0.03, rounded up as the HF Trainer does
    assert (tr.adam_beta1, tr.adam_beta2, tr.adam_eps, tr.clip_grad) == (0.9, 0.999, 1e-8, 1.0)  # HF AdamW defaults
    assert cfg.model.dtype == "bf16"
    assert data.template == want["template"] and data.image_mode == "pad" and data.max_seq_len == 2048
    assert data.source == "shards" and data.max_images == 1


@pytest.mark.parametrize("size,stage", RECIPES)
def test_real_shapes(size, stage):
    cfg = load_config(path(size, stage))
    v, lm = cfg.model.vision, cfg.model.language
    assert {k: getattr(v, k) for k in CLIP_L_336} == CLIP_L_336
    assert families.image_tokens(cfg) == 576
    assert cfg.model.projector.type == "mlp2x_gelu"
    shape = {k: w for k, w in SIZES[size].items() if k != "params"}
    assert {k: getattr(lm, k) for k in shape} == shape
    assert (lm.rope_theta, lm.norm_eps, lm.qkv_bias) == (10000.0, 1e-5, False)
    # 0 = from the tokenizer: Vicuna's 32000 tokens + the <image> token `megavlm convert` adds.
    assert lm.vocab_size == 0


@pytest.mark.parametrize("size", SIZES)
def test_stage2_continues_stage1(size, shards):
    s1, s2 = recipe(size, 1, shards), recipe(size, 2, shards)
    assert to_dict(s1.model) == to_dict(s2.model)
    assert s1.data.tokenizer == s2.data.tokenizer
    # Stage 1 starts from the hf-to-mcore output (weights only, step 0) and resumes itself with load=auto.
    assert s1.checkpoint.load.endswith("/checkpoints/iter_0000000") and not s1.checkpoint.finetune
    # Stage 2 takes stage 1's newest checkpoint, weights only, with a fresh optimizer and schedule.
    assert os.path.normpath(s2.checkpoint.load) == os.path.normpath(checkpoint_dir(s1))
    assert s2.checkpoint.finetune
    assert s1.run_dir != s2.run_dir


# --------------------------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------------------------


def param_count(cfg, vocab: int, pad_multiple: int | None = None) -> dict[str, int]:
    """Parameters of megavlm's VLM at TP=1/PP=1, by part. ``pad_multiple`` defaults to the config's (the model pads
    its embedding/output rows to it); pass 1 for the unpadded count of the original model."""
    v, lm = cfg.model.vision, cfg.model.language
    assert v.flavour == "clip"  # class token and pre-LayerNorm, no patch bias
    d, f = v.hidden_size, v.ffn_hidden_size
    built = v.feature_layer if v.feature_layer > 0 else v.num_layers + 1 + v.feature_layer
    n_pos = (v.image_size // v.patch_size) ** 2 + 1
    vit_layer = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
    vision = d * v.num_channels * v.patch_size ** 2 + d + n_pos * d + 2 * d + built * vit_layer
    h = lm.hidden_size
    projector = (d * h + h) + (h * h + h) if cfg.model.projector.type == "mlp2x_gelu" else d * h + h
    hd = h // lm.num_heads
    q, kv = lm.num_heads * hd, lm.num_kv_heads * hd
    layer = h + h * (q + 2 * kv) + (q + 2 * kv if lm.qkv_bias else 0) + q * h + h + h * 2 * lm.ffn_hidden_size \
        + lm.ffn_hidden_size * h
    m = pad_multiple or lm.vocab_pad_multiple
    rows = -(-vocab // m) * m
    language = 2 * rows * h + lm.num_layers * layer + h  # untied embedding and output layer, final RMSNorm
    return dict(vision=vision, projector=projector, language=language)


def test_param_count_formula_matches_a_built_model(rt):
    """The formula against megavlm's real model, on a tiny config with the recipes' features (CLIP, feature layer -2,
    mlp2x_gelu, a vocabulary that needs padding, grouped-query attention)."""
    from megavlm.models.vlm import build_model

    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
                      ["model.vision.num_layers=3", "model.vision.feature_layer=-2", "train.stage=1"])
    assert families.of(cfg).vision_arch(cfg).num_layers == 2
    vocab = 100
    model = build_model(cfg, rt, vocab, image_token_id=vocab - 1)
    got = {part: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
           for part, prefix in (("vision", "vision_model."), ("projector", "projector."),
                                ("language", "language_model."))}
    assert sum(got.values()) == sum(p.numel() for p in model.parameters())
    assert got == param_count(cfg, vocab)
    # Stage 1 trains the projector only.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == got["projector"]


@pytest.mark.parametrize("size", SIZES)
def test_recipe_param_counts(size):
    cfg = load_config(path(size, 1))

    assert families.of(cfg).vision_arch(cfg).num_layers == 23  # CLIP-L stops at its penultimate layer
    n = param_count(cfg, 32000, pad_multiple=1)
    assert n["language"] == SIZES[size]["params"]  # exactly Vicuna/LLaMA-2's count
    # 23 of CLIP-L's 24 layers (12,596,224 parameters each) and no post-LayerNorm (2 x 1024).
    assert n["vision"] == CLIP_L_336_PARAMS - 12_596_224 - 2 * 1024
    h = SIZES[size]["hidden_size"]
    assert n["projector"] == 1024 * h + h + h * h + h  # what stage 1 trains: 21.0M (7B) / 31.5M (13B)
    # As trained: 32001 tokens padded to 32128 rows.
    total = sum(param_count(cfg, 32001).values())
    assert total == sum(n.values()) + 2 * 128 * h


# --------------------------------------------------------------------------------------------------------------
# The VILA-style recipe (configs/vila_7b_stage{1,2,3}.yaml)
# --------------------------------------------------------------------------------------------------------------


def vila(stage: int, shards: str, *overrides: str):
    return load_config(os.path.join(ROOT, "configs", f"vila_7b_stage{stage}.yaml"), [f"data.shards={shards}",
                                                                                      *overrides])


def test_vila_recipe_stages(shards):
    """SigLIP + LLaMA-2 7B with a linear projector; stage 1 trains the projector on captions, stage 2 the projector
    and the LLM on packed interleaved documents with several images, stage 3 the same on instructions; each stage
    loads the previous one's weights; all validate at 8 and 16 GPUs, and pool=avg2x2 cuts the image tokens 4×."""
    from megavlm.shapes import trainable_parts

    cfgs = {s: vila(s, shards) for s in (1, 2, 3)}
    for s, cfg in cfgs.items():
        for world in (8, 16):
            validate(cfg, world)
        assert to_dict(cfg.model) == to_dict(cfgs[1].model)
        assert cfg.data.tokenizer == cfgs[1].data.tokenizer and os.path.isabs(cfg.data.tokenizer)
        assert f"configs/vila_7b_stage{s}.yaml" in open(os.path.join(ROOT, "configs", f"vila_7b_stage{s}.yaml")).read()
    m = cfgs[1].model
    assert (m.vision.flavour, m.projector.type, m.projector.pool) == ("siglip", "linear", "none")
    assert (m.language.hidden_size, m.language.num_layers) == (4096, 32) and families.image_tokens(cfgs[1]) == 256
    assert trainable_parts(cfgs[1].train.stage, cfgs[1].train.trainable) == (False, True, False)
    assert cfgs[1].data.template == "plain" and cfgs[1].checkpoint.load.endswith("/checkpoints/iter_0000000")
    for s in (2, 3):
        assert trainable_parts(cfgs[s].train.stage, cfgs[s].train.trainable) == (False, True, True)
        assert os.path.normpath(cfgs[s].checkpoint.load) == os.path.normpath(checkpoint_dir(cfgs[s - 1]))
        assert cfgs[s].checkpoint.finetune
    d = cfgs[2].data
    assert d.packing and d.max_images > 1 and d.max_images * 256 + 8 <= d.max_seq_len
    assert (cfgs[2].train.lr, cfgs[3].train.lr) == (5e-5, 2e-5)
    pooled = vila(2, shards, "model.projector.pool=avg2x2")
    validate(pooled, 8)
    assert families.image_tokens(pooled) == 64

"""The InternVL family against transformers' InternVLForConditionalGeneration, on tiny random models built here:
conversion both ways (bit-identical), logits and greedy tokens equal transformers' on a several-tile image, the
config and what is refused."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convert"))

from hf_models import randomize  # noqa: E402

TILE, PATCH = 16, 4  # 16 patches per tile → 4 tokens after the 2×2 pixel shuffle
PER_TILE = (TILE // PATCH) ** 2 // 4
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>"]


def make_internvl(folder: str, seed: int = 0, tied: bool = True, qk_norm: bool = True, norm_type: str = "layer_norm",
                  attention_bias: bool = True, feature_layer: int = -1, text: str = "qwen2", **vision_kw):
    """A random InternVLForConditionalGeneration with the synthetic tokenizer plus InternVL's image tokens, its
    processor config (tiles of 16², 1..4 tiles, thumbnail) saved beside it. Returns (model, tokenizer)."""
    from transformers import (GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLVisionConfig)

    from hf_models import qwen2_config, text_config
    from megavlm.data.tokenizer import build_synthetic_tokenizer

    tok = build_synthetic_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIALS}, replace_extra_special_tokens=False)
    tok.save_pretrained(folder)
    vc = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=TILE, patch_size=PATCH, use_qk_norm=qk_norm, norm_type=norm_type,
                              attention_bias=attention_bias, layer_norm_eps=1e-6, **vision_kw)
    tc = {"qwen2": qwen2_config, "llama": text_config}[text](len(tok) + 3)
    cfg = InternVLConfig(vision_config=vc, text_config=tc, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         image_seq_length=PER_TILE, vision_feature_layer=feature_layer, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg)
    randomize(model, seed)
    model.save_pretrained(folder)
    GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                             max_patches=4, image_mean=MEAN, image_std=STD).save_pretrained(folder)
    return model.eval(), tok


def sample_inputs(tok, seed: int = 0):
    """Two prompts: the first with an image of 3 crops (a 2×1 grid + thumbnail), the second with one of 1 crop, as
    InternVLProcessor expands them (``<img>``, 4 context tokens per crop, ``</img>``); float tiles
    ``(4, 3, 16, 16)``."""
    g = torch.Generator().manual_seed(seed)
    ids_of = tok.convert_tokens_to_ids
    start, end, ctx = (ids_of(t) for t in SPECIALS)

    def prompt(crops, before, after):
        text = torch.randint(5, 28, (before + after,), generator=g).tolist()  # the synthetic words
        return text[:before] + [start] + [ctx] * (PER_TILE * crops) + [end] + text[before:]

    a = prompt(3, 2, 5)
    b = prompt(1, 6, len(a) - 6 - PER_TILE - 2)
    assert len(a) == len(b)
    return torch.tensor([a, b]), torch.randn(4, 3, TILE, TILE, generator=g)


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf_internvl"))
    model, tok = make_internvl(d, seed=2)
    return d, model, tok


@pytest.fixture(scope="module")
def converted(rt, internvl, tmp_path_factory):
    from megavlm.convert import engine

    out = str(tmp_path_factory.mktemp("conv") / "mcore")
    engine.hf_to_mcore(out, hf=internvl[0], tp=2, pp=2)
    return out


def _load(rt, out_dir):
    from megavlm import families
    from megavlm.config import load_config
    from megavlm.data.constants import image_token_id
    from megavlm.data.tokenizer import load_tokenizer
    from megavlm.models.vlm import build_model
    from megavlm.training import checkpoint as ckpt

    cfg = load_config(os.path.join(out_dir, "config.yaml"),
                      ["parallel.tp=1", "parallel.pp=1", "model.spec=local", "model.kernels=reference"])
    tok = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, rt, cfg.model.language.vocab_size, image_token_id(tok, families.of(cfg).image_token))
    ckpt.load(cfg.checkpoint.load, model, None, same_layout=False)
    return cfg, model.eval()


def test_config_from_hf(converted, internvl):
    from megavlm import families
    from megavlm.config import load_config, validate

    cfg = load_config(os.path.join(converted, "config.yaml"))
    validate(cfg, 4)
    v, lm = cfg.model.vision, cfg.model.language
    assert cfg.model.family == "internvl" and (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert (v.image_size, v.patch_size, v.num_layers, v.feature_layer) == (TILE, PATCH, 3, -1)
    assert (v.qk_norm, v.norm_type, v.qkv_bias, v.layernorm_eps) == (True, "layer_norm", True, 1e-6)
    assert (v.min_tiles, v.max_tiles, v.thumbnail, v.image_mean, v.image_std) == (1, 4, True, MEAN, STD)
    assert lm.tie_embeddings and lm.qkv_bias and lm.vocab_size == len(internvl[2]) + 3
    fam = families.of(cfg)
    assert fam.image_tokens(cfg) == PER_TILE and fam.max_image_tokens(cfg) == 5 * PER_TILE + 2
    assert cfg.data.template == "chatml"


def test_logits_and_greedy_match_transformers(rt, converted, internvl):
    from megavlm.inference.generate import generate

    _, hf_model, tok = internvl
    cfg, model = _load(rt, converted)
    vocab = cfg.model.language.vocab_size
    ids, tiles = sample_inputs(tok)
    with torch.no_grad():
        want = hf_model(input_ids=ids, pixel_values=tiles).logits
        got = model(input_ids=ids, images=tiles, runtime_gather_output=True)[..., :vocab]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    assert want.abs().max() > 0.5  # not a degenerate comparison
    # greedy: megavlm's KV-cache generate against transformers' generate, on the several-tile prompt
    n = 6
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids[:1], pixel_values=tiles[:3], do_sample=False, max_new_tokens=n,
                                min_new_tokens=n, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    theirs = out.sequences[0, ids.shape[1]:].tolist()
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    assert min(margins) > 1e-3, margins  # a real comparison: no near-tie
    ours = generate(model, [ids[0]], tiles[:3], n, eos_id=None, vocab_size=vocab).tokens[0]
    assert ours == theirs


def test_round_trip_bit_identical(rt, converted, internvl, tmp_path):
    from safetensors.torch import load_file
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from megavlm.convert import engine

    hf_dir, hf_model, tok = internvl
    back = engine.mcore_to_hf(converted, str(tmp_path / "hf"))
    a, b = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert set(a) == set(b) and "language_model.lm_head.weight" not in b  # tied: no separate output layer
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    def cfg_dict(d):
        c = InternVLConfig.from_pretrained(d).to_dict()
        for k in ("transformers_version", "_name_or_path"):
            c.pop(k, None)
        return c

    assert cfg_dict(back) == cfg_dict(hf_dir)
    pre = json.load(open(os.path.join(back, "preprocessor_config.json")))
    assert (pre["crop_to_patches"], pre["max_patches"], pre["image_mean"]) == (True, 4, MEAN)
    reloaded = InternVLForConditionalGeneration.from_pretrained(back).eval()
    ids, tiles = sample_inputs(tok, seed=1)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, pixel_values=tiles).logits,
                           hf_model(input_ids=ids, pixel_values=tiles).logits)


@pytest.mark.parametrize("variant", [
    dict(tied=False, qk_norm=False, norm_type="rms_norm", attention_bias=False, feature_layer=-2, text="llama"),
])
def test_variants_match_transformers(rt, tmp_path, variant):
    """RMSNorm layers, no q/k norm or q/k/v bias, an earlier feature layer (the tower cut there; the rest kept aside
    and written back), a LLaMA decoder with its own output layer."""
    from safetensors.torch import load_file

    from megavlm.convert import engine

    hf_dir = str(tmp_path / "hf")
    hf_model, tok = make_internvl(hf_dir, seed=5, **variant)
    out = str(tmp_path / "mcore")
    engine.hf_to_mcore(out, hf=hf_dir)
    cfg, model = _load(rt, out)
    assert model.vision_model.decoder.num_layers_per_pipeline_rank == 2  # layers past -2 are not built
    ids, tiles = sample_inputs(tok, seed=3)
    with torch.no_grad():
        want = hf_model(input_ids=ids, pixel_values=tiles).logits
        got = model(input_ids=ids, images=tiles, runtime_gather_output=True)[..., :cfg.model.language.vocab_size]
    assert (got - want).abs().max().item() <= 1e-4
    back = engine.mcore_to_hf(out, str(tmp_path / "back"))
    a, b = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_unsupported_options_are_refused_naming_the_key(rt, tmp_path):
    from megavlm.convert import engine
    from megavlm.errors import UserError

    hf_dir = str(tmp_path / "hf")
    make_internvl(hf_dir, seed=1, use_mean_pooling=False)
    with pytest.raises(UserError, match="use_mean_pooling=false with vision_feature_layer=-1"):
        engine.hf_to_mcore(str(tmp_path / "o1"), hf=hf_dir)
    assert not os.path.exists(tmp_path / "o1")
    c = json.load(open(os.path.join(hf_dir, "config.json")))
    c["vision_config"].update(use_mean_pooling=True, hidden_act="quick_gelu")
    json.dump(c, open(os.path.join(hf_dir, "config.json"), "w"))
    with pytest.raises(UserError, match=r"vision_config\.hidden_act='quick_gelu' is not supported"):
        engine.hf_to_mcore(str(tmp_path / "o2"), hf=hf_dir)


def test_worst_case_image_must_fit_the_sequence():
    from megavlm.config import ConfigError, load_config, validate

    cfg = load_config(None, ["model.family=internvl", "model.vision.max_tiles=12", "data.max_seq_len=60"])
    with pytest.raises(ConfigError, match=r"data\.max_seq_len=60 is too short: an image takes 54 tokens \(up to 13 "
                                          r"tiles × \(32/8\)² / 4 \(2×2 merge\) \+ <img> and </img>\)"):
        validate(cfg, 1)
    for bad, needle in (("model.vision.patch_size=32", "patches per side must be even"),
                        ("model.vision.norm_type=batch_norm", "model.vision.norm_type='batch_norm'"),
                        ("model.projector.downsample_ratio=0.25", "downsample_ratio=0.25 is not supported"),
                        ("model.vision.min_tiles=3", "min_tiles=3, model.vision.max_tiles=2")):
        extra = ["model.vision.max_tiles=2"] if "min_tiles" in bad else []
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            validate(load_config(None, ["model.family=internvl", "data.max_seq_len=128", bad, *extra]), 1)


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_logits_match_transformers(converted, internvl, tmp_path):
    """TP=2 (two gloo ranks): the q/k norm's statistics span both ranks' heads, the rest is split as for LLaVA."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from helpers import ROOT, run

    _, hf_model, tok = internvl
    ids, tiles = sample_inputs(tok, seed=4)
    torch.save({"input_ids": ids, "pixel_values": tiles}, tmp_path / "in.pt")
    ckpt = os.path.join(converted, "checkpoints", "iter_0000000")
    run([os.path.join(ROOT, "tests", "convert", "logits_worker.py"), os.path.join(converted, "config.yaml"),
         str(tmp_path / "in.pt"), str(tmp_path / "out.pt"), ckpt, "--", "parallel.tp=2", "parallel.pp=1",
         "model.vision.max_tiles=1"], nproc=2)  # (tiling is not used here: the worst case fits its short sequence)
    got = torch.load(tmp_path / "out.pt")[ckpt]
    with torch.no_grad():
        want = hf_model(input_ids=ids, pixel_values=tiles).logits
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4

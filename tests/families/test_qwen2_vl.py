"""The Qwen2-VL and Qwen2.5-VL families against transformers' Qwen2VLForConditionalGeneration /
Qwen2_5_VLForConditionalGeneration, on tiny random models built here: conversion both ways (bit-identical), logits
with images of different sizes in one sample and in one micro-batch (TP=1 here, TP=2 in two processes), greedy
generate, M-RoPE position ids against get_rope_index, the config and what is refused."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convert"))

from hf_models import randomize  # noqa: E402

PATCH = 4  # merged patches of 8×8 pixels
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
MIN_PIXELS, MAX_PIXELS = 64, 1024
SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
VARIANTS = ("qwen2_vl", "qwen2_5_vl")


def make_qwen(folder: str, variant: str = "qwen2_vl", seed: int = 0, tied: bool = False, **vision_kw):
    """A random Qwen2-VL / Qwen2.5-VL with the synthetic tokenizer plus the vision tokens, its image processor (patch
    4, merge 2, 64..1024 pixels) saved beside it. Qwen2.5-VL: windows of 16 pixels (2×2 merged tokens), layer 1
    attends to the whole image. Returns (model, tokenizer)."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    from megavlm.data.tokenizer import build_synthetic_tokenizer

    tok = build_synthetic_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIALS}, replace_extra_special_tokens=False)
    tok.save_pretrained(folder)
    ids = tok.convert_tokens_to_ids
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=len(tok) + 3, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
    common = dict(depth=3, num_heads=4, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if variant == "qwen2_vl":
        vision = dict(common, embed_dim=32, hidden_size=64, mlp_ratio=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        vision = dict(common, hidden_size=32, intermediate_size=48, out_hidden_size=64, window_size=16,
                      fullatt_block_indexes=[1])
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    vision.update(vision_kw)
    cfg = config_cls(vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"),
                     vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                     video_token_id=0, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    randomize(model, seed)
    model.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, temporal_patch_size=2,
                             merge_size=2, image_mean=MEAN, image_std=STD).save_pretrained(folder)
    return model.eval(), tok


def sample_inputs(tok, seed: int = 0):
    """A micro-batch of two prompts as Qwen2VLProcessor expands them: the first with two images of different sizes
    (grids 4×6 and 6×8 patches: 6 and 12 tokens), the second with one of a third size (8×4: 8 tokens); HF's
    ``pixel_values`` ``(N, 3·2·4·4)``, ``image_grid_thw`` ``(3, 3)`` and ``mm_token_type_ids``."""
    g = torch.Generator().manual_seed(seed)
    start, end, pad = (tok.convert_tokens_to_ids(t) for t in SPECIALS)
    grids = torch.tensor([[1, 4, 6], [1, 6, 8], [1, 8, 4]])
    n = (grids.prod(-1) // 4).tolist()

    def words(k):
        return torch.randint(5, 28, (k,), generator=g).tolist()

    def image(k):
        return [start] + [pad] * k + [end]

    a = words(2) + image(n[0]) + words(3) + image(n[1]) + words(4)
    b = words(7) + image(n[2])
    b += words(len(a) - len(b))
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * PATCH * PATCH, generator=g)
    ids = torch.tensor([a, b])
    return ids, pixels, grids, (ids == pad).int()


@pytest.fixture(scope="module", params=VARIANTS)
def qwen(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
    model, tok = make_qwen(d, request.param, seed=2)
    return request.param, d, model, tok


@pytest.fixture(scope="module")
def converted(rt, qwen, tmp_path_factory):
    from megavlm.convert import engine

    out = str(tmp_path_factory.mktemp("conv") / "mcore")
    engine.hf_to_mcore(out, hf=qwen[1], tp=2, pp=2)
    return out


def _load(rt, out_dir, *overrides):
    from megavlm import families
    from megavlm.config import load_config
    from megavlm.data.constants import image_token_id
    from megavlm.data.tokenizer import load_tokenizer
    from megavlm.models.vlm import build_model
    from megavlm.training import checkpoint as ckpt

    cfg = load_config(os.path.join(out_dir, "config.yaml"),
                      ["parallel.tp=1", "parallel.pp=1", "model.spec=local", "model.kernels=reference", *overrides])
    tok = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, rt, cfg.model.language.vocab_size, image_token_id(tok, families.of(cfg).image_token))
    ckpt.load(cfg.checkpoint.load, model, None, same_layout=False)
    return cfg, model.eval()


def test_config_from_hf(converted, qwen):
    from megavlm import families
    from megavlm.config import load_config, validate

    variant, _, _, tok = qwen
    cfg = load_config(os.path.join(converted, "config.yaml"))
    validate(cfg, 4)
    v, lm = cfg.model.vision, cfg.model.language
    assert cfg.model.family == variant and (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert (v.patch_size, v.temporal_patch_size, v.merge_size, v.num_layers, v.hidden_size) == (PATCH, 2, 2, 3, 32)
    assert (v.min_pixels, v.max_pixels, v.image_mean, v.image_std) == (MIN_PIXELS, MAX_PIXELS, MEAN, STD)
    assert lm.mrope_section == [2, 3, 3] and lm.qkv_bias and not lm.tie_embeddings
    if variant == "qwen2_5_vl":
        assert (v.norm, v.activation, v.window_size, v.full_attention_layers) == ("rms_norm", "silu", 16, [1])
    else:
        assert (v.norm, v.activation, v.ffn_hidden_size) == ("layer_norm", "quick_gelu", 64)
    fam = families.of(cfg)
    assert fam.image_tokens_per_image(cfg, 24) == 6 and fam.max_image_tokens(cfg) == 224 // 4 + 2
    assert cfg.data.template == "chatml" and cfg.data.source == "synthetic_shards"
    assert fam.expand_image(tok)(2) == [tok.convert_tokens_to_ids(t) for t in (SPECIALS[0], SPECIALS[2],
                                                                                SPECIALS[2], SPECIALS[1])]


def _hf_logits(model, ids, pixels, grids, mm):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, image_grid_thw=grids, mm_token_type_ids=mm).logits


def test_logits_and_greedy_match_transformers(rt, converted, qwen):
    """Two images of different sizes in one sample and three in one micro-batch (one packed sequence of patches in
    the encoder), M-RoPE positions from the data layer's rope index; then greedy KV-cache decoding: the tokens and
    every step's logits equal transformers' generate (the decode positions continue past the image grid)."""
    from megavlm.inference.generate import generate

    _, _, hf_model, tok = qwen
    cfg, model = _load(rt, converted)
    vocab = cfg.model.language.vocab_size
    ids, pixels, grids, mm = sample_inputs(tok)
    want = _hf_logits(hf_model, ids, pixels, grids, mm)
    with torch.no_grad():
        pos = model.position_ids(ids, grids)
        got = model(input_ids=ids, images=pixels, image_grid=grids, position_ids=pos,
                    runtime_gather_output=True)[..., :vocab]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    assert want.abs().max() > 0.5  # not a degenerate comparison
    # the positions matter: plain 1D positions give other logits
    with torch.no_grad():
        flat = model(input_ids=ids, images=pixels, image_grid=grids, runtime_gather_output=True,
                     position_ids=torch.arange(ids.shape[1]).expand(3, 2, -1))[..., :vocab]
    assert (flat - want).abs().max().item() > 1e-2
    # greedy: the first prompt (two images), megavlm's KV-cache generate against transformers' generate
    n = 6
    hf_model.generation_config.eos_token_id = None
    n_a = int(grids[:2].prod(-1).sum())
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids[:1], pixel_values=pixels[:n_a], image_grid_thw=grids[:2],
                                mm_token_type_ids=mm[:1], do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    theirs = out.sequences[0, ids.shape[1]:].tolist()
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    assert min(margins) > 1e-3, margins  # a real comparison: no near-tie
    res = generate(model, [ids[0]], pixels[:n_a], n, eos_id=None, vocab_size=vocab, image_grid=grids[:2],
                   return_logits=True)
    assert res.tokens[0] == theirs
    for ours, score in zip(res.logits, out.scores):
        assert (ours[0] - score[0]).abs().max().item() <= 1e-4


def test_rope_index_equals_get_rope_index(qwen):
    """megavlm's M-RoPE positions (data/mrope.py) against transformers' get_rope_index: text only, one image, two
    images, a batch, and a packed sequence (each sample's own positions, the padding tail from 0)."""
    from megavlm.data.mrope import batch_rope_index, packed_rope_index, rope_index

    _, _, hf_model, tok = qwen
    pad = tok.convert_tokens_to_ids(SPECIALS[2])
    ids, _, grids, mm = sample_inputs(tok, seed=5)
    hf_pos, delta = hf_model.model.get_rope_index(ids, mm, grids)
    assert torch.equal(batch_rope_index(ids, grids, pad, 2), hf_pos)
    # one image (the second sample) and two images (the first) on their own
    for row, gs in ((1, grids[2:]), (0, grids[:2])):
        one = hf_model.model.get_rope_index(ids[row:row + 1], mm[row:row + 1], gs)[0][:, 0]
        assert torch.equal(rope_index(ids[row], gs, pad, 2), one)
    # the text continues one past the image grid's largest position: HF's rope delta
    assert int(hf_pos[:, 0].max()) + 1 - ids.shape[1] == int(delta[0])
    # text only: 0, 1, 2, ... on all three axes (what transformers uses without images)
    text = torch.randint(5, 28, (9,))
    assert torch.equal(rope_index(text, [], pad, 2), torch.arange(9).expand(3, 9))
    # packed: the two samples one after the other (the second cut to 20 tokens), then 5 padding positions
    n0, n1 = ids.shape[1], 20
    seq = packed_rope_index([rope_index(ids[0], grids[:2], pad, 2), rope_index(ids[1, :n1], grids[2:], pad, 2)],
                            n0 + n1 + 5)
    assert torch.equal(seq[:, :n0], hf_pos[:, 0])
    second = hf_model.model.get_rope_index(ids[1:, :n1], mm[1:, :n1], grids[2:])[0][:, 0]
    assert torch.equal(seq[:, n0:n0 + n1], second) and torch.equal(seq[:, n0 + n1:], torch.arange(5).expand(3, 5))
    with pytest.raises(ValueError, match="does not fit"):
        rope_index(ids[0], grids[1:], pad, 2)  # the wrong grids for its image tokens


def test_packed_sequence_gives_each_sample_its_own_loss(rt, converted, qwen):
    """Two samples with their images packed into one sequence (megatron's ``thd``: the decoder attends and counts
    M-RoPE positions within each sample, the encoder within each image) give every token the loss it gets alone; the
    pack's grids and positions are what the training data builds (training/data.py, data/packing.py)."""
    from megavlm.data.batch import next_token_targets
    from megavlm.data.constants import IGNORE_INDEX
    from megavlm.data.packing import pack
    from megavlm.training.data import _packed_extras

    _, _, _, tok = qwen
    cfg, model = _load(rt, converted, "model.spec=sdpa")
    pad = tok.convert_tokens_to_ids(SPECIALS[2])
    ids, pixels, grids, _ = sample_inputs(tok, seed=3)
    n_a = int(grids[:2].prod(-1).sum())
    samples = []
    for row, n_tok, pix, gs in ((0, ids.shape[1], pixels[:n_a], grids[:2]), (1, 25, pixels[n_a:], grids[2:])):
        x = ids[row, :n_tok]
        labels = torch.where(x == pad, IGNORE_INDEX, x)
        samples.append({"input_ids": x, "labels": labels, "images": pix, "image_grid": gs,
                        "position_ids": model.position_ids(x[None], gs)[:, 0]})
    (packed,) = pack(samples, ids.shape[1] + 25 + 6, pad_id=0)
    extra = _packed_extras(samples, packed)
    assert extra["position_ids"].shape == (3, 1, packed.input_ids.shape[1]) and torch.equal(extra["image_grid"], grids)
    with torch.no_grad():
        together = model(input_ids=packed.input_ids, images=packed.images, labels=packed.labels,
                         packed_seq_params=packed.packed_seq_params(), **extra)
        at = 0
        for s in samples:
            n = s["input_ids"].numel()
            targets = next_token_targets(s["labels"])[0]
            alone = model(input_ids=s["input_ids"][None], images=s["images"], labels=targets[None],
                          image_grid=s["image_grid"], position_ids=s["position_ids"][:, None])
            keep = targets != IGNORE_INDEX
            assert keep.sum() > 5
            assert (together[0, at:at + n][keep] - alone[0][keep]).abs().max().item() <= 1e-4
            at += n


def test_round_trip_bit_identical(rt, converted, qwen, tmp_path):
    """HF → megatron (TP=2, PP=2) → HF: every tensor and the config equal; the exported folder loads in transformers
    and gives the same logits."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    from megavlm.convert import engine

    variant, hf_dir, hf_model, tok = qwen
    back = engine.mcore_to_hf(converted, str(tmp_path / "hf"))
    a, b = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    def cfg_dict(d):
        c = AutoConfig.from_pretrained(d).to_dict()
        for k in ("transformers_version", "_name_or_path"):
            c.pop(k, None)
        return c

    assert cfg_dict(back) == cfg_dict(hf_dir)
    pre = json.load(open(os.path.join(back, "preprocessor_config.json")))
    assert (pre["patch_size"], pre["merge_size"], pre["image_mean"]) == (PATCH, 2, MEAN)
    assert (pre["size"]["shortest_edge"], pre["size"]["longest_edge"]) == (MIN_PIXELS, MAX_PIXELS)
    reloaded = AutoModelForImageTextToText.from_pretrained(back).eval()
    assert type(reloaded) is type(hf_model)
    ids, pixels, grids, mm = sample_inputs(tok, seed=1)
    assert torch.equal(_hf_logits(reloaded, ids, pixels, grids, mm), _hf_logits(hf_model, ids, pixels, grids, mm))


def test_tied_embeddings_and_export_from_scratch(rt, tmp_path):
    """A tied Qwen2-VL converts (the output layer starts as the embedding) and matches transformers; a checkpoint
    without the stored HF config still exports a config transformers loads with the same logits."""
    from transformers import Qwen2VLForConditionalGeneration

    from megavlm.convert import engine

    hf_dir = str(tmp_path / "hf")
    hf_model, tok = make_qwen(hf_dir, "qwen2_vl", seed=4, tied=True)
    out = str(tmp_path / "mcore")
    engine.hf_to_mcore(out, hf=hf_dir)
    cfg, model = _load(rt, out)
    assert cfg.model.language.tie_embeddings
    ids, pixels, grids, mm = sample_inputs(tok, seed=2)
    with torch.no_grad():
        got = model(input_ids=ids, images=pixels, image_grid=grids, position_ids=model.position_ids(ids, grids),
                    runtime_gather_output=True)[..., :cfg.model.language.vocab_size]
    assert (got - _hf_logits(hf_model, ids, pixels, grids, mm)).abs().max().item() <= 1e-4
    # without the stored HF config (a model trained from scratch), export_config builds one from the megavlm config
    from safetensors.torch import load_file

    from megavlm import families
    from megavlm.data.constants import image_token_id

    back = engine.mcore_to_hf(out, str(tmp_path / "back"))
    fam = families.of(cfg)
    hcfg = fam.export_config(cfg, None, tok, cfg.model.language.vocab_size, image_token_id(tok, fam.image_token),
                             "float32", None)
    hcfg.save_pretrained(back)  # (in place of the one written from the stored config)
    assert "mrope_section" in json.load(open(os.path.join(back, "config.json")))["text_config"]["rope_parameters"]
    fresh = Qwen2VLForConditionalGeneration.from_pretrained(back).eval()
    assert set(load_file(os.path.join(back, "model.safetensors"))) == set(load_file(os.path.join(hf_dir,
                                                                                             "model.safetensors")))
    assert torch.equal(_hf_logits(fresh, ids, pixels, grids, mm), _hf_logits(hf_model, ids, pixels, grids, mm))


def test_unsupported_options_are_refused_naming_the_key(rt, tmp_path):
    from megavlm.config import ConfigError, load_config, validate
    from megavlm.convert import engine
    from megavlm.errors import UserError

    hf_dir = str(tmp_path / "hf")
    make_qwen(hf_dir, "qwen2_vl", seed=1, hidden_act="relu")
    with pytest.raises(UserError, match=r"vision_config\.hidden_act='relu' is not supported"):
        engine.hf_to_mcore(str(tmp_path / "o1"), hf=hf_dir)
    assert not os.path.exists(tmp_path / "o1")
    c = json.load(open(os.path.join(hf_dir, "config.json")))
    c["vision_config"]["hidden_act"] = "quick_gelu"
    c["text_config"]["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6,
                                           "mrope_section": [2, 3, 3]}
    json.dump(c, open(os.path.join(hf_dir, "config.json"), "w"))
    with pytest.raises(UserError, match=r"rope_parameters\.rope_type='yarn' is not supported"):
        engine.hf_to_mcore(str(tmp_path / "o2"), hf=hf_dir)
    c["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    c["vision_config"]["spatial_merge_size"] = 3
    json.dump(c, open(os.path.join(hf_dir, "config.json"), "w"))
    with pytest.raises(UserError, match=r"spatial_merge_size=3 is not supported"):
        engine.hf_to_mcore(str(tmp_path / "o3"), hf=hf_dir)
    base = ["model.family=qwen2_vl", "data.source=synthetic_shards", "data.max_seq_len=256"]
    for bad, needle in (("model.language.mrope_section=[4,6,7]", r"mrope_section=\[4, 6, 7\] must be three positive "
                                                                  r"numbers summing to head_dim/2 = 16"),
                        ("model.vision.merge_size=4", r"model\.vision\.merge_size=4 is not supported"),
                        ("model.vision.max_pixels=100", r"model\.vision\.max_pixels=100 must be >="),
                        ("data.max_seq_len=20", r"data\.max_seq_len=20 is too short: an image takes"),
                        ("data.source=synthetic", r"data\.source=synthetic is not supported by "
                                                  r"model\.family=qwen2_vl")):
        with pytest.raises(ConfigError, match=needle):
            validate(load_config(None, [*base, bad]), 1)
    with pytest.raises(ConfigError, match=r"full_attention_layers=\[5\]: layer 5 is not in 0\.\.1"):
        validate(load_config(None, ["model.family=qwen2_5_vl", *base[1:], "model.vision.full_attention_layers=[5]"]),
                 1)


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_logits_match_transformers(converted, qwen, tmp_path):
    """TP=2 (two gloo ranks): the packed encoder and the merger split over the ranks' heads and columns, M-RoPE in
    the TP-split decoder; two images in one sample and three in the micro-batch."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from helpers import ROOT, run

    from megavlm.data.mrope import batch_rope_index

    _, _, hf_model, tok = qwen
    ids, pixels, grids, mm = sample_inputs(tok, seed=4)
    pos = batch_rope_index(ids, grids, tok.convert_tokens_to_ids(SPECIALS[2]), 2)
    torch.save({"input_ids": ids, "pixel_values": pixels, "image_grid": grids, "position_ids": pos},
               tmp_path / "in.pt")
    ckpt = os.path.join(converted, "checkpoints", "iter_0000000")
    run([os.path.join(ROOT, "tests", "convert", "logits_worker.py"), os.path.join(converted, "config.yaml"),
         str(tmp_path / "in.pt"), str(tmp_path / "out.pt"), ckpt, "--", "parallel.tp=2", "parallel.pp=1",
         "model.vision.max_pixels=64"], nproc=2)  # (the worst case must fit the test's short sequence)
    got = torch.load(tmp_path / "out.pt")[ckpt]
    want = _hf_logits(hf_model, ids, pixels, grids, mm)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4

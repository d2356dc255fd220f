"""The Phi-4-multimodal family against transformers' Phi4MultimodalForCausalLM, on tiny random models built here:
conversion both ways (bit-identical, the audio encoder through the side file), logits and greedy tokens equal
transformers' on a non-square image of several HD crops (a partly padded sub-crop grid), the HD crop layout, the
config and what is refused.

The crop layout is checked against transformers' own layout methods of ``Phi4MultimodalImageProcessor`` (in a child
process that stubs the module's torchvision import, which those methods never call) and against layouts computed by
hand here; the crops' pixels (``HDLayout.reference``) against a plain-PyTorch re-implementation of the processor's
math written here from transformers' source (the processor itself resizes with torchvision, whose wheels need another
torch than the pinned 2.13.0: pip would replace torch, so torchvision is not installed). ``generate --image`` is
checked against transformers' greedy tokens on the same crops, and training from shards against the model's loss on
them."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convert"))

from hf_models import randomize  # noqa: E402

CROP, PATCH = 32, 4  # 8 patches per crop side → 4×4 pooled tokens
P, B = CROP // PATCH, CROP // PATCH // 2
IMAGE_TOKEN = "<|endoftext10|>"


def make_phi4mm(folder: str, seed: int = 0, tied: bool = True, feature_layer: int = -2, rotary: float = 0.75):
    """A random Phi4MultimodalForCausalLM (vision, a 1-block audio encoder, a 2-layer Phi-3 decoder with partial
    rotary) with the synthetic tokenizer plus the image token; eager attention (see test_logits...). Returns
    (model, tokenizer)."""
    from transformers import (Phi4MultimodalAudioConfig, Phi4MultimodalConfig, Phi4MultimodalForCausalLM,
                              Phi4MultimodalVisionConfig)

    from megavlm.data.synthetic import build_synthetic_tokenizer

    tok = build_synthetic_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    tok.save_pretrained(folder)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vc = Phi4MultimodalVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    image_size=CROP, crop_size=CROP, patch_size=PATCH, image_token_id=image_id,
                                    feature_layer=feature_layer)
    ac = Phi4MultimodalAudioConfig(hidden_size=32, intermediate_size=48, num_blocks=1, num_attention_heads=2,
                                   ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=16,
                                   input_size=16, time_reduction=2, bias_max_distance=16)
    cfg = Phi4MultimodalConfig(vocab_size=len(tok) + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vision_config=vc, audio_config=ac,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": rotary},
                               max_position_embeddings=512, original_max_position_embeddings=512,
                               tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = Phi4MultimodalForCausalLM(cfg)
    randomize(model, seed)
    model.save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Phi4MultimodalImageProcessor", "dynamic_hd": 6,
                   "size": {"height": CROP, "width": CROP}, "patch_size": PATCH, "image_mean": [0.5] * 3,
                   "image_std": [0.5] * 3}, f)
    # transformers' SDPA path makes this tower causal when a crop has no padding (the module sets is_causal and the
    # all-ones mask is dropped); the eager path, like the original model, attends both ways
    model = Phi4MultimodalForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return model.eval(), tok


def hf_mask(rows: int, cols: int, pad_w: int, pad_h: int) -> torch.Tensor:
    """The processor's crop attention masks ``(1 + rows·cols, P, P)`` written out by hand: whole patches of padding
    masked on the right and at the bottom of the sub-crop grid, the global view (first) whole."""
    big = torch.ones(rows * P, cols * P)
    if pad_w >= PATCH:
        big[:, -(pad_w // PATCH):] = 0
    if pad_h >= PATCH:
        big[-(pad_h // PATCH):, :] = 0
    subs = big.view(rows, P, cols, P).permute(0, 2, 1, 3).reshape(rows * cols, P, P)
    return torch.cat([torch.ones(1, P, P), subs])


# an image of 70×40 pixels: a 3×2 grid (ceil(70/32) × ceil(40/32)), resized to 96×54, padded by 10 rows at the
# bottom: 2 patch rows masked, so 14 valid patch rows → 7 useful pooled rows of 12 columns
GRID = (2, 3, 14, 24)
TOKENS = 7 * (12 + 1) + 1 + B * (B + 1)


def sample_inputs(tok, seed: int = 0):
    """Two prompts of equal length, each with the 70×40 image (7 crops: global view + 3×2) expanded to its tokens;
    float crops (14, 3, 32, 32) and HF's inputs for the same."""
    g = torch.Generator().manual_seed(seed)
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = torch.randint(5, 28, (2, 9), generator=g)
    a = text[0, :2].tolist() + [img] * TOKENS + text[0, 2:].tolist()
    b = text[1, :6].tolist() + [img] * TOKENS + text[1, 6:].tolist()
    crops = torch.randn(2, 7, 3, CROP, CROP, generator=g)
    hf = dict(image_pixel_values=crops, image_sizes=torch.tensor([[2 * CROP, 3 * CROP]] * 2),
              image_attention_mask=torch.stack([hf_mask(2, 3, 0, 10)] * 2))
    return torch.tensor([a, b]), crops.flatten(0, 1), torch.tensor([GRID, GRID]), hf


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf_phi4mm"))
    model, tok = make_phi4mm(d, seed=2)
    return d, model, tok


@pytest.fixture(scope="module")
def converted(rt, phi, tmp_path_factory):
    from megavlm.convert import engine

    out = str(tmp_path_factory.mktemp("conv") / "mcore")
    engine.hf_to_mcore(out, hf=phi[0], tp=2, pp=2)
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


def test_crop_layout_by_hand():
    """HDLayout against layouts worked out by hand from the processor's rules."""
    from megavlm.families.phi4mm import HDLayout
    from megavlm.shapes import hd_tokens

    lay = HDLayout(crop=448, patch=14, dynamic_hd=36)
    # 1000×500: ceil → 3×2 crops (1344×896); 1344/1000 < 896/500 → resized to 1344×672, 224 px padding at the bottom
    assert lay.layout(1000, 500) == ((3, 2), (1344, 672), (0, 224))
    assert lay.grid(1000, 500) == (2, 3, 64 - 16, 96)
    # 448×448 is one crop, nothing padded: 256 + 16 + 1 + 256 + 16 tokens (the processor's count)
    assert lay.grid(448, 448) == (1, 1, 32, 32) and lay.tokens(448, 448) == 256 + 16 + 1 + 256 + 16
    # 300×1000: 1×3 crops (448×1344); 448/300 > 1344/1000 → resized to int(300·1.344)=403 × 1344, 45 px right
    assert lay.layout(300, 1000) == ((1, 3), (403, 1344), (45, 0))
    assert lay.grid(300, 1000) == (3, 1, 96, 32 - 3)
    # the processor's own count for it: 256 + 1 + (pooled mask sum) + (its first column) + 16
    assert hd_tokens(lay.grid(300, 1000), 32) == 256 + 1 + 48 * 15 + 48 + 16
    # too many crops (4000×500 → 9×2 > 6): the closest aspect ratio among grids of at most 6 crops is 6×1
    small = HDLayout(crop=448, patch=14, dynamic_hd=6)
    assert small.layout(4000, 500)[0] == (6, 1)
    assert small.layout(4000, 500)[1] == (2688, int(500 * 2688 / 4000))


def test_config_from_hf(converted, phi):
    from megavlm import families
    from megavlm.config import load_config, validate

    cfg = load_config(os.path.join(converted, "config.yaml"))
    validate(cfg, 4)
    v, lm = cfg.model.vision, cfg.model.language
    assert cfg.model.family == "phi4mm" and (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert (v.image_size, v.patch_size, v.num_layers, v.feature_layer, v.max_crops) == (CROP, PATCH, 3, -2, 6)
    assert (v.activation, v.layernorm_eps, v.image_mean) == ("gelu_tanh", 1e-6, [0.5] * 3)
    assert lm.tie_embeddings and not lm.qkv_bias and lm.rotary_percent == 0.75
    assert lm.vocab_size == len(phi[2]) + 3
    fam = families.of(cfg)
    assert fam.layout(cfg).tokens(70, 40) == TOKENS
    # the worst case: a 1×6 or 6×1 grid of whole crops: 4 rows × (24 + 1) + 1 + 20 (or 24 × 5 + 21)
    assert fam.max_image_tokens(cfg) == max(4 * 25, 24 * 5) + 1 + B * (B + 1)


def test_logits_and_greedy_match_transformers(rt, converted, phi):
    from megavlm.inference.generate import generate

    _, hf_model, tok = phi
    cfg, model = _load(rt, converted)
    vocab = cfg.model.language.vocab_size
    ids, crops, grid, hf = sample_inputs(tok)
    with torch.no_grad():
        want = hf_model(input_ids=ids, **hf).logits
        got = model(input_ids=ids, images=crops, image_grid=grid, runtime_gather_output=True)[..., :vocab]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    assert want.abs().max() > 0.5
    # the padded patches (the last 2 patch rows of the bottom sub-crops, crops 4-6 of each image) are masked out:
    # new pixels there change nothing, new pixels in a valid patch do
    for rows, same in ((slice(CROP - 2 * PATCH, CROP), True), (slice(0, PATCH), False)):
        other = crops.clone()
        other.view(2, 7, 3, CROP, CROP)[:, 4:, :, rows] = 3.0
        with torch.no_grad():
            moved = model(input_ids=ids, images=other, image_grid=grid, runtime_gather_output=True)[..., :vocab]
        assert ((moved - got).abs().max().item() <= 1e-5) == same
    n = 6
    hf_model.generation_config.eos_token_id = None
    one = {k: v[:1] for k, v in hf.items()}
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids[:1], **one, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    theirs = out.sequences[0, ids.shape[1]:].tolist()
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    assert min(margins) > 1e-3, margins
    ours = generate(model, [ids[0]], crops[:7], n, eos_id=None, vocab_size=vocab, image_grid=grid[:1]).tokens[0]
    assert ours == theirs


def test_round_trip_bit_identical(rt, converted, phi, tmp_path):
    from safetensors.torch import load_file
    from transformers import Phi4MultimodalConfig

    from megavlm.convert import engine

    hf_dir, hf_model, tok = phi
    back = engine.mcore_to_hf(converted, str(tmp_path / "hf"))
    a, b = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert any(k.startswith("model.embed_tokens_extend.audio_embed.") for k in a)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    def cfg_dict(d):
        c = Phi4MultimodalConfig.from_pretrained(d).to_dict()
        for k in ("transformers_version", "_name_or_path"):
            c.pop(k, None)
        return c

    assert cfg_dict(back) == cfg_dict(hf_dir)
    pre = json.load(open(os.path.join(back, "preprocessor_config.json")))
    assert (pre["dynamic_hd"], pre["size"], pre["patch_size"]) == (6, {"height": CROP, "width": CROP}, PATCH)


def test_untied_full_rotary_last_layer_matches_transformers(rt, tmp_path):
    """Its own output layer, full rotary, features after the last layer (nothing of the tower kept aside)."""
    from megavlm.convert import engine

    hf_dir = str(tmp_path / "hf")
    hf_model, tok = make_phi4mm(hf_dir, seed=5, tied=False, feature_layer=-1, rotary=1.0)
    out = str(tmp_path / "mcore")
    engine.hf_to_mcore(out, hf=hf_dir)
    cfg, model = _load(rt, out)
    assert model.vision_model.decoder.num_layers_per_pipeline_rank == 3
    ids, crops, grid, hf = sample_inputs(tok, seed=3)
    with torch.no_grad():
        want = hf_model(input_ids=ids, **hf).logits
        got = model(input_ids=ids, images=crops, image_grid=grid, runtime_gather_output=True)
    assert (got[..., :cfg.model.language.vocab_size] - want).abs().max().item() <= 1e-4


def test_bad_input_is_refused_naming_the_key(tmp_path):
    from megavlm.config import ConfigError, load_config, validate

    for bad, needle in (("model.projector.pool=max2x2", "model.projector.pool='max2x2'"),
                        ("model.vision.activation=relu", "model.vision.activation='relu'"),
                        ("model.language.rotary_percent=0", "model.language.rotary_percent=0"),
                        ("model.vision.min_crops=40", "min_crops=40, model.vision.max_crops=36")):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
            validate(load_config(None, ["model.family=phi4mm", "data.max_seq_len=1024", bad]), 1)
    with pytest.raises(ConfigError, match=r"data\.max_seq_len=64 is too short"):
        validate(load_config(None, ["model.family=phi4mm", "data.max_seq_len=64"]), 1)


def test_shuffle2x2_is_phi3_vision_layout(rt):
    """``pool=shuffle2x2`` (Phi-3-Vision's 2×2 concatenation): the projector takes 4× the vision width, the separators
    are that wide, and the image rows of the embedding equal a reference assembled here token by token from the
    encoder's features (the 2×2 blocks concatenated in (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1) order; the
    sub-crop grid cut to its valid pooled rows, a separator after every row, then a separator and the global view),
    through Linear → GELU → Linear."""
    import torch.nn.functional as F

    from megavlm.config import load_config, validate
    from megavlm.models.hd import crop_masks
    from megavlm.models.vlm import build_model

    cfg = load_config(None, ["model.family=phi4mm", "model.projector.pool=shuffle2x2", "data.max_seq_len=256",
                             f"model.vision.image_size={CROP}", f"model.vision.patch_size={PATCH}",
                             "model.vision.hidden_size=32", "model.vision.num_heads=4", "model.vision.num_layers=2",
                             "model.vision.ffn_hidden_size=64", "model.vision.max_crops=4", "model.spec=local",
                             "model.dtype=fp32", "model.kernels=reference"])
    validate(cfg, 1)
    torch.manual_seed(0)
    model = build_model(cfg, rt, 100, 7).eval()
    proj = model.projector
    assert proj.encoder.linear_fc1.weight.shape == (cfg.model.language.hidden_size, 4 * 32)
    assert proj.sub_separator.shape == proj.global_separator.shape == (4 * 32,)
    with torch.no_grad():
        proj.sub_separator.normal_()
        proj.global_separator.normal_()
    ids = torch.full((1, TOKENS + 4), 9)
    ids[0, 2:2 + TOKENS] = 7
    crops = torch.randn(7, 3, CROP, CROP)
    with torch.no_grad():
        got = model.embed(ids, crops, torch.tensor([GRID]))[2:2 + TOKENS, 0]
        feats = model.vision_model(crops, crop_masks(GRID, P)).view(7, P, P, 32)
        cat = torch.stack([torch.stack([torch.cat([feats[:, 2 * i, 2 * j], feats[:, 2 * i, 2 * j + 1],
                                                   feats[:, 2 * i + 1, 2 * j], feats[:, 2 * i + 1, 2 * j + 1]], -1)
                                        for j in range(B)], 1) for i in range(B)], 1)  # (7, B, B, 128)
        rows = []
        for r in range(7):  # 14 valid patch rows → 7 pooled rows of the 2×3 grid, all 12 pooled columns
            crop_row, i = divmod(r, B)
            rows += [cat[1 + crop_row * 3 + c, i, j] for c in range(3) for j in range(B)] + [proj.sub_separator]
        rows.append(proj.global_separator)
        for i in range(B):
            rows += [cat[0, i, j] for j in range(B)] + [proj.sub_separator]
        x = torch.stack(rows)
        fc1, fc2 = proj.encoder.linear_fc1, proj.encoder.linear_fc2
        want = F.linear(F.gelu(F.linear(x, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    assert got.shape == want.shape == (TOKENS, cfg.model.language.hidden_size)
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("pool", ["avg2x2", "shuffle2x2"])
def test_plan_counts_equal_built_model(rt, pool):
    """``megavlm plan``'s parameter counts (the separators included) equal the HD model's, and the worst case it
    reports is the layout's."""
    from megavlm import families, plan
    from megavlm.config import load_config

    cfg = load_config(None, ["model.family=phi4mm", f"model.projector.pool={pool}", "data.max_seq_len=1024",
                             "model.language.vocab_size=40", "train.stage=3"])
    model = families.of(cfg).build_model(cfg, rt, 40, 5, torch.float32, pre_process=True, post_process=True)
    built = {k: sum(p.numel() for n, p in model.named_parameters() if n.startswith(pre))
             for k, pre in (("vision", "vision_model."), ("projector", "projector."), ("language", "language_model."))}
    got = plan.stage_params(cfg, 40, tp=1, pp=1, rank=0)
    assert (got.vision, got.projector, got.language) == (built["vision"], built["projector"], built["language"])
    assert got.total == sum(p.numel() for p in model.parameters())


def processor_pixels(im, lay):
    """``Phi4MultimodalImageProcessor``'s pixels of a PIL image, re-implemented here in plain PyTorch from transformers'
    source (image_processing_phi4_multimodal.py: ``dynamic_preprocess`` then ``_preprocess``), as its processor
    cannot run here (it needs torchvision, whose wheels need another torch than the pinned one): the uint8 CHW image
    resized with ``tvF.resize``'s defaults (bilinear, antialias; torchvision runs ``interpolate`` on a CPU uint8
    tensor) to the layout's size (``HDLayout.layout``, checked against transformers' own layout code below), padded
    white (``fill=255``) right and bottom, rescaled and normalized to floats, the global view resized from those
    floats (bicubic, ``antialias=False``), the sub-crops cut by its (1, 3, rows, S, cols, S) permute; the global view
    first. → normalized ``(1 + rows·cols, 3, S, S)``."""
    import numpy as np
    import torch.nn.functional as F

    image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    _, (new_w, new_h), (pad_w, pad_h) = lay.layout(*im.size)
    image = F.interpolate(image[None], size=[new_h, new_w], mode="bilinear", align_corners=False, antialias=True)[0]
    image = F.pad(image, [0, pad_w, 0, pad_h], value=255)
    # rescale_and_normalize, fused as transformers does it: (x - 255·mean) / (255·std)
    mean, std = torch.tensor(lay.mean).view(3, 1, 1) * 255, torch.tensor(lay.std).view(3, 1, 1) * 255
    processed = (image.float() - mean) / std
    s = lay.crop
    glob = F.interpolate(processed[None], size=[s, s], mode="bicubic", align_corners=False, antialias=False)[0]
    h, w = processed.shape[-2:]
    subs = processed.reshape(1, 3, h // s, s, w // s, s).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, s, s)
    return torch.cat([glob[None], subs])


def _photo(w: int, h: int, seed: int):
    """A smooth random RGB image with sharp edges (a bright box): the resizes have something to do."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    im = np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    im[h // 4:h // 2, w // 3:w // 2] = 250
    return Image.fromarray(im)


#: (width, height, max sub-crops): a 3×2 grid padded at the bottom, a 2×3 grid padded on the right, one whole crop,
#: and one whose grid is chosen by aspect ratio (13×2 > 6 crops → 6×1, padded at the bottom)
SIZES = ((70, 40, 6), (40, 70, 6), (32, 32, 6), (400, 50, 6))


def test_reference_crops_equal_processor_math():
    """``HDLayout.reference`` (uint8 crops) against :func:`processor_pixels` after normalizing: the sub-crops (the
    padding included) exactly; the global view (bicubic on the processor's floats, here rounded to uint8) within half
    a uint8 step where the processor's value lies in the uint8 range (bicubic overshoots past it at sharp edges, which
    uint8 clamps); the grid's patch masks (``models.hd.crop_masks``) equal the processor's attention mask
    (:func:`hf_mask`, its ``_get_crop_attention_mask`` written out) and the tokens its count."""
    from megavlm.families.phi4mm import HDLayout
    from megavlm.models.hd import crop_masks

    for k, (w, h, hd) in enumerate(SIZES):
        lay = HDLayout(crop=CROP, patch=PATCH, dynamic_hd=hd)
        im = _photo(w, h, k)
        ours = torch.from_numpy(lay.reference(im))
        (cols, rows), _, (pad_w, pad_h) = lay.layout(w, h)
        assert ours.dtype == torch.uint8 and ours.shape == (1 + rows * cols, CROP, CROP, 3) == (lay.crops(w, h),) + \
            ours.shape[1:]
        want = processor_pixels(im, lay)
        got = (ours.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
        assert got.shape == want.shape
        # the sub-crops: the same uint8 values (the model normalizes as (x/255 - mean)/std, the processor fused)
        assert torch.equal(ours[1:].permute(0, 3, 1, 2), (want[1:] * 127.5 + 127.5).round().to(torch.uint8)), (w, h)
        assert (got[1:] - want[1:]).abs().max() <= 1e-6, (w, h)
        if pad_h or pad_w:  # the padding is white
            assert (ours[-1, CROP - pad_h:] == 255).all() and (ours[-1, :, CROP - pad_w:] == 255).all()
        inside = want[0].abs() <= 1
        assert (got[0] - want[0])[inside].abs().max() <= 0.5 / 255 / 0.5 + 1e-6, (w, h)
        assert (got[0] - want[0].clamp(-1, 1)).abs().max() <= 0.5 / 255 / 0.5 + 1e-6, (w, h)
        assert torch.equal(got[0], got[1]) == (rows * cols == 1)  # (one whole crop: the global view is that crop)
        grid = lay.grid(w, h)
        assert torch.equal(crop_masks(grid, P), hf_mask(rows, cols, pad_w, pad_h).bool()), (w, h)
    assert lay.layout(400, 50)[0] == (6, 1)
    assert HDLayout(crop=CROP, patch=PATCH).check(2000, 3) == "image_aspect_ratio"


@pytest.mark.slow
def test_generate_image_matches_transformers(converted, phi, tmp_path):
    """`megavlm generate --image` (crops by ``HDLayout.reference``, the grid, the image expanded to its tokens) gives
    transformers' greedy tokens when transformers gets the same crops (normalized) and the processor's masks; an
    image too extreme to cut is one `error:` line, exit code 2; `eval` runs on the family's images."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from helpers import run

    from megavlm.families.phi4mm import HDLayout

    _, hf_model, tok = phi
    png = str(tmp_path / "a.png")
    _photo(70, 40, 7).save(png)
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    n = 5
    proc = run(["generate", "--ckpt", converted, "--image", png, "--input-ids", f"9,11,{img},13,7",
                "--max-new-tokens", str(n), "--ignore-eos", "--tp", "1", "--output", "json"])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ids = torch.tensor([out["prompt_ids"]])
    assert out["prompt_ids"].count(img) == TOKENS and len(out["generated_ids"]) == n
    from PIL import Image

    lay = HDLayout(crop=CROP, patch=PATCH, dynamic_hd=6)
    crops = torch.from_numpy(lay.reference(Image.open(png)))
    pixels = (crops.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    hf = dict(image_pixel_values=pixels[None], image_sizes=torch.tensor([[2 * CROP, 3 * CROP]]),
              image_attention_mask=hf_mask(2, 3, 0, 10)[None])
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        res = hf_model.generate(input_ids=ids, **hf, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in res.scores]
    assert min(margins) > 1e-3, margins
    assert out["generated_ids"] == res.sequences[0, ids.shape[1]:].tolist()
    Image.new("RGB", (2000, 3), (200, 10, 10)).save(png)
    proc = run(["generate", "--ckpt", converted, "--image", png, "--prompt", "hi", "--tp", "1"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "2000x3 cannot be used (image aspect ratio)" in proc.stderr
    # eval's synthetic square images (one crop's side: the global view and one sub-crop) take the same path
    proc = run(["eval", os.path.join(converted, "config.yaml"), "--limit", "2", "parallel.tp=1", "parallel.pp=1"])
    assert "accuracy " in proc.stdout and "/2 = " in proc.stdout


def test_serve_request_gives_transformers_greedy_tokens(rt, converted, phi):
    """`serve`'s request path (``serve.api.prepare``: the image of a data: URL through ``image_inputs``; the job
    carries its grid) and its batch decoding (``serve.engine.run_batch``) give transformers' greedy tokens on the
    job's prompt and the same crops; an image too extreme to cut is a 400 naming it."""
    import base64
    import io

    from megavlm.families.phi4mm import HDLayout
    from megavlm.serve.api import ApiError, ServeConfig, prepare
    from megavlm.serve.engine import run_batch

    _, hf_model, tok = phi
    cfg, model = _load(rt, converted)

    def body(im, n=4):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "what is it?"}]}],
                "max_tokens": n, "ignore_eos": True, "temperature": 0}

    sc = ServeConfig(cfg, tok, "m", "chatml", max_images=1, max_model_len=cfg.data.max_seq_len)
    im = _photo(40, 70, 9)
    job, _, _ = prepare(sc, body(im))
    lay = HDLayout(crop=CROP, patch=PATCH, dynamic_hd=6)
    assert job.grid.tolist() == [list(lay.grid(40, 70))] == [[3, 2, 24, 14]]
    assert torch.equal(job.crops, torch.from_numpy(lay.reference(im)))
    assert job.prompt.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == lay.tokens(40, 70) == 12 * 8 + 1 + 20
    got = run_batch(model, tok, [job], eos_id=None, streaming=False)[0].tokens
    ids = torch.tensor([job.prompt])
    hf = dict(image_pixel_values=((job.crops.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)[None],
              image_sizes=torch.tensor([[3 * CROP, 2 * CROP]]), image_attention_mask=hf_mask(3, 2, 10, 0)[None])
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        res = hf_model.generate(input_ids=ids, **hf, do_sample=False, max_new_tokens=4, min_new_tokens=4,
                                pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert min(float(x[0].topk(2).values[0] - x[0].topk(2).values[1]) for x in res.scores) > 1e-3
    assert got == res.sequences[0, ids.shape[1]:].tolist()
    from PIL import Image

    with pytest.raises(ApiError, match="image 0: 2000x3 cannot be used"):
        prepare(sc, body(Image.new("RGB", (2000, 3))))


def test_loader_cuts_hd_crops_skips_refused_images_and_resumes(tmp_path):
    """The training loader with ``HDLayout`` (no DALI graph: every image through ``reference``): each sample's crops
    and grid are the reference's of its image, a text-only sample has none (grids ``(0, 4)``), a sample whose image
    is too extreme to cut is skipped and counted (``image_aspect_ratio``), and a saved position resumes with the same
    batches; float output is refused; `data inspect` counts the tokens as training does."""
    import io

    from PIL import Image

    from megavlm.data.pipeline import ImageTextLoader
    from megavlm.data.shards import iter_shards, write_shards
    from megavlm.errors import UserError
    from megavlm.families.phi4mm import HDLayout

    conv = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "a box"}]
    records = []
    for k, size in enumerate(((70, 40), None, (40, 70), (2000, 3), (32, 32), (400, 50))):
        if size is None:
            records.append({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
            continue
        (_photo(*size, k) if size[1] > 3 else Image.new("RGB", size, (9, 9, 9))).save(tmp_path / f"{k}.png")
        records.append({"image": f"{k}.png", "conversations": conv})
    shards = str(tmp_path / "shards")
    write_shards(records, shards, images_root=str(tmp_path), progress=False)
    lay = HDLayout(crop=CROP, patch=PATCH, dynamic_hd=6)
    sizes = {key: Image.open(io.BytesIO(next(iter(files.values())))).convert("RGB") if files else None
             for key, _, files in iter_shards(shards)}
    kw = dict(images=lay, train=True, batch_size=2, device="cpu", seed=3, initial_fill=8)
    loader = ImageTextLoader(shards, **kw)
    seen = []
    for batch in loader:
        for smp in batch:
            im = sizes[smp["key"]]
            if im is None:
                assert smp["images"].shape == (0, CROP, CROP, 3) and smp["grids"].shape == (0, 4)
                assert smp["crops"] == []
            else:
                assert torch.equal(smp["images"], torch.from_numpy(lay.reference(im)))
                assert smp["grids"].tolist() == [list(lay.grid(*im.size))] and smp["crops"] == [lay.crops(*im.size)]
            seen.append(smp["key"])
    assert sorted(seen) == sorted(k for k, im in sizes.items() if im is None or im.size != (2000, 3))
    assert loader.skipped == {"image_aspect_ratio": 1} and loader.fallbacks == 0
    state = loader.state_dict()
    want = [[(x["key"], x["images"].sum().item()) for x in loader.next_batch()] for _ in range(2)]
    again = ImageTextLoader(shards, **kw)
    again.load_state_dict(state)
    assert [[(x["key"], x["images"].sum().item()) for x in again.next_batch()] for _ in range(2)] == want
    with pytest.raises(UserError, match="crops come out as uint8"):
        ImageTextLoader(shards, **{**kw, "output": "float"})
    # `data inspect` counts each image's tokens by its grid, as training does; the refused image is unencodable
    from megavlm.config import load_config
    from megavlm.data.inspect import inspect

    cfg = load_config(None, ["model.family=phi4mm", f"model.vision.image_size={CROP}",
                             f"model.vision.patch_size={PATCH}", "model.vision.max_crops=6", "data.max_seq_len=512"])
    out = io.StringIO()
    stats = inspect(shards, n=0, out=out, color=False, config=cfg)
    usable = [im for im in sizes.values() if im is not None and im.size != (2000, 3)]
    assert sorted(stats["tokens_per_image"]) == sorted(lay.tokens(*im.size) for im in usable)
    assert stats["crops"] == sum(lay.crops(*im.size) for im in usable) and stats["unencodable"] == 1
    assert "tokens per image by its crop grid (HDLayout)" in out.getvalue()


@pytest.mark.slow
def test_trains_from_shards_with_hd_crops(rt, converted, tmp_path):
    """`megavlm train` with data.source=shards (images of three aspect ratios: 3×2, 2×3 and 1×1 crop grids, one
    sample each, all in step 1's global batch): the loader cuts the HD crops (its PIL path: ``HDLayout.reference``)
    and their grids ride along; step 1's loss equals the token-weighted cross entropy of the converted model on the
    same records fed directly here (crops by ``HDLayout.reference`` of the decoded image, grids by ``HDLayout.grid``)
    — the loss before any update; and training moves. data.source=synthetic is refused with a line naming it."""
    import io

    import torch.nn.functional as F
    from PIL import Image

    from megavlm import families
    from megavlm.data.constants import image_token_id
    from megavlm.data.conversation import encode_record
    from megavlm.data.shards import iter_shards, write_shards
    from megavlm.data.tokenizer import load_tokenizer

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from helpers import metrics, run

    records = []
    for k, (w, h) in enumerate(((70, 40), (40, 70), (32, 32))):
        _photo(w, h, 20 + k).save(tmp_path / f"{k}.png")
        records.append({"image": f"{k}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the picture?"},
            {"from": "gpt", "value": f"a box number {k} on a field"}]})
    shards = str(tmp_path / "shards")
    write_shards(records, shards, images_root=str(tmp_path), progress=False)
    config = os.path.join(converted, "config.yaml")
    seq = 160
    common = [config, "parallel.tp=1", "parallel.pp=1", f"data.max_seq_len={seq}", "train.steps=2",
              "train.global_batch=3", "train.micro_batch=1", "train.stage=3", "train.lr=1e-2", "train.warmup_steps=0",
              "logging.tensorboard=false", "checkpoint.save_interval=100"]
    run(["train", *common, f"run_dir={tmp_path / 'run'}", "data.source=shards", f"data.shards={shards}"])
    got = metrics(str(tmp_path / "run"))
    steps = [r for r in got if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and steps[1]["loss"] != steps[0]["loss"]

    cfg, model = _load(rt, converted)
    fam = families.of(cfg)
    lay = fam.layout(cfg)
    tok = load_tokenizer(cfg.data.tokenizer)
    total, count, grids = 0.0, 0, set()
    for _key, record, files in iter_shards(shards):
        with Image.open(io.BytesIO(next(iter(files.values())))) as im:
            im = im.convert("RGB")
        crops, grid = torch.from_numpy(lay.reference(im)), lay.grid(*im.size)
        grids.add(grid)
        enc = encode_record(tok, record, [lay.tokens(*im.size)], seq, template=families.template(cfg),
                            expand=fam.expand_image(tok), image_token=fam.image_token)
        ids, labels = enc["input_ids"][None], enc["labels"][None]
        assert int((ids == image_token_id(tok, fam.image_token)).sum()) == lay.tokens(*im.size)
        with torch.no_grad():
            logits = model(input_ids=ids, images=crops, image_grid=torch.tensor([grid]), runtime_gather_output=True)
        # the encoded labels mark the answer's tokens; each position predicts the next one
        ce = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum")
        total, count = total + float(ce), count + int((labels[0, 1:] != -100).sum())
    assert grids == {(2, 3, 14, 24), (3, 2, 24, 14), (1, 1, P, P)}
    assert steps[0]["supervised_tokens"] == count and steps[0]["loss"] == pytest.approx(total / count, rel=1e-5)
    proc = run(["train", *common, f"run_dir={tmp_path / 'syn'}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: model.family=phi4mm cannot train with data.source=synthetic" in proc.stderr
    assert not os.path.exists(tmp_path / "syn")


_HF_LAYOUTS = r'''
import importlib, json, sys, types
import transformers  # noqa: F401  (before the stub: transformers asks importlib whether torchvision is installed)
# the processor module imports torchvision's functional API at the top; the layout methods never call it
for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2"):
    sys.modules.setdefault(name, types.ModuleType(name))
sys.modules["torchvision.transforms.v2.functional"] = sys.modules["torchvision.transforms.v2"].functional = \
    types.ModuleType("torchvision.transforms.v2.functional")
P = importlib.import_module("transformers.models.phi4_multimodal.image_processing_phi4_multimodal") \
    .Phi4MultimodalImageProcessor
proc = object.__new__(P)
out = []
for w, h, hd in json.loads(sys.argv[1]):
    try:
        ratio, size, pad = proc._get_crop_layout(h, w, 448, max_num=hd)
    except ValueError:  # "the aspect ratio is very extreme"
        out.append(None)
        continue
    mask = proc._get_crop_attention_mask(ratio, pad, 14, 32)
    out.append([list(ratio), list(size), list(pad), int(mask[:, 0].sum()), int(mask[0].sum()),
                proc._get_num_image_tokens(mask, 32)])
print(json.dumps(out))
'''


@pytest.mark.slow
def test_crop_layout_equals_transformers_layout_code():
    """HDLayout against transformers' own layout code (``Phi4MultimodalImageProcessor._get_crop_layout``, its
    attention mask and its token count) over many sizes, run in a child process: the processor module imports
    torchvision (not installable beside the pinned torch) at the top, so the child stubs that one import, which the
    layout methods never use; the pixels themselves (torchvision's resize) are not compared."""
    import subprocess

    from megavlm.families.phi4mm import HDLayout

    cases = [(w, h, hd) for hd in (1, 4, 16, 36) for w, h in ((448, 448), (1000, 500), (500, 1000), (300, 1000),
                                                             (4000, 500), (449, 449), (1920, 1080), (37, 2000),
                                                             (3000, 3000), (2000, 37), (900, 17))]
    proc = subprocess.run([sys.executable, "-c", _HF_LAYOUTS, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < sum(x is None for x in want) < len(want) // 4  # a few too extreme to cut, most not
    for (w, h, hd), got in zip(cases, want):
        lay = HDLayout(crop=448, patch=14, dynamic_hd=hd)
        if got is None:
            with pytest.raises(ValueError, match="too extreme"):
                lay.layout(w, h)
            continue
        ratio, size, pad, valid_rows, valid_cols, tokens = got
        assert lay.layout(w, h) == (tuple(ratio), tuple(size), tuple(pad)), (w, h, hd)
        cols, rows = ratio
        assert lay.grid(w, h) == (rows, cols, valid_rows, valid_cols), (w, h, hd)
        assert lay.tokens(w, h) == tokens, (w, h, hd)

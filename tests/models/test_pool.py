"""``model.projector.pool`` (avg2x2 / shuffle2x2) in one process: the pooling against a plain-PyTorch reference written
here block by block, the projector and the VLM's image features against Linear → GELU → Linear on that reference, the
token counts the families, the config check and ``megavlm plan`` give, and the config errors (each naming the key)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megavlm import families, plan
from megavlm.config import ConfigError, load_config

TINY = "configs/tiny_cpu.yaml"


def pool_reference(x: torch.Tensor, pool: str) -> torch.Tensor:
    """``(n, h·w, c)`` row-major grid → one output token per 2×2 block (row-major over blocks): the mean of the four
    tokens, or the four tokens (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1) concatenated (Phi-3-Vision's order)."""
    n, t, c = x.shape
    side = int(round(t ** 0.5))
    grid = x.reshape(n, side, side, c)
    out = []
    for i in range(side // 2):
        for j in range(side // 2):
            block = [grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j],
                     grid[:, 2 * i + 1, 2 * j + 1]]
            out.append(sum(block) / 4 if pool == "avg2x2" else torch.cat(block, dim=-1))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("pool", ["avg2x2", "shuffle2x2"])
def test_pool_tokens_equal_blockwise_reference(pool):
    from megavlm.models.projector import pool_tokens

    torch.manual_seed(0)
    for side in (2, 4, 6):
        x = torch.randn(3, side * side, 5, dtype=torch.float64, requires_grad=True)
        got = pool_tokens(x, pool)
        want = pool_reference(x, pool)
        assert got.shape == (3, side * side // 4, 5 * (4 if pool == "shuffle2x2" else 1))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        g = torch.randn_like(got)
        (gx,) = torch.autograd.grad(got, x, g)
        (wx,) = torch.autograd.grad(want, x, g)
        torch.testing.assert_close(gx, wx, rtol=0, atol=1e-12)
    # the shuffle is literally the order the brief gives (reshape → permute(0, 1, 3, 2, 4, 5) → reshape)
    x = torch.randn(2, 16, 3)
    ref = x.reshape(2, 2, 2, 2, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, 12)
    if pool == "shuffle2x2":
        torch.testing.assert_close(pool_tokens(x, pool), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="even side"):
        pool_tokens(torch.randn(1, 9, 3), pool)


@pytest.mark.parametrize("pool,projector", [("avg2x2", "mlp2x_gelu"), ("shuffle2x2", "mlp2x_gelu"),
                                            ("shuffle2x2", "linear")])
def test_vlm_pools_image_features_before_the_projector(rt, pool, projector):
    """The VLM's embedding at the image tokens = vision features → reference pool → the projector's own weights as
    plain Linear (→ GELU → Linear); tokens per image = (32/8)²/4 = 4; the projector takes 4× the width for shuffle."""
    from megavlm.models.vlm import VLM

    cfg = load_config(TINY, ["model.language.vocab_size=40", f"model.projector.pool={pool}",
                             f"model.projector.type={projector}"])
    fam = families.of(cfg)
    assert fam.image_tokens(cfg) == 4
    image_id = 5
    torch.manual_seed(0)
    model = VLM(cfg, rt, 40, image_id, torch.float32, pre_process=True, post_process=True).eval()
    enc = model.projector.encoder  # megatron's affine projector is the Linear itself
    fc1 = enc.linear_fc1 if projector == "mlp2x_gelu" else enc
    assert fc1.weight.shape[1] == 64 * (4 if pool == "shuffle2x2" else 1)
    ids = torch.randint(6, 40, (2, 24))
    ids[0, 2:6] = image_id
    ids[1, 1:5] = image_id
    ids[1, 10:14] = image_id
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        emb = model.embed(ids, images).transpose(0, 1)
        feats = pool_reference(model.vision_model(images), pool)  # (3, 4, d)
        want = F.linear(feats, fc1.weight, fc1.bias)
        if projector == "mlp2x_gelu":
            fc2 = enc.linear_fc2
            want = F.linear(F.gelu(want), fc2.weight, fc2.bias)
    torch.testing.assert_close(emb[0, 2:6], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb[1, 1:5], want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb[1, 10:14], want[2], rtol=1e-5, atol=1e-5)
    ids[1, 14] = image_id  # one position too many for 3 images × 4 tokens
    with pytest.raises(ValueError, match="image-token positions"):
        model.embed(ids, images)
    # plan's parameter count equals the built model's (the projector's input width follows the pool)
    got = plan.stage_params(cfg, 40, tp=1, pp=1, rank=0)
    assert got.projector == sum(p.numel() for n, p in model.named_parameters() if n.startswith("projector."))


def test_internvl_pool_comes_before_the_pixel_shuffle(rt):
    """InternVL with pool=avg2x2: 64² tiles of 8² patches → 8×8 grid → 4×4 pooled → 2×2 pixel-shuffled = 4 tokens,
    and its projector equals pool → shuffle → LayerNorm → MLP."""
    from megavlm.models.projector import build_projector
    from megavlm.models import specs
    from megavlm.ops.reference import merge_tokens_ref

    cfg = load_config(None, ["model.family=internvl", "model.vision.image_size=64", "model.projector.pool=avg2x2",
                             "data.max_seq_len=256", "model.language.vocab_size=40"])
    fam = families.of(cfg)
    arch = fam.projector_arch(cfg)
    assert (arch.tokens(64), arch.input_size, fam.image_tokens(cfg)) == (4, 4 * cfg.model.vision.hidden_size, 4)
    assert "avg2x2 pool" in fam.image_tokens_formula(cfg)
    torch.manual_seed(0)
    proj = build_projector(specs.projector_config(cfg, rt, torch.float32), arch).eval()
    x = torch.randn(64, 2, cfg.model.vision.hidden_size)  # (t, n, d)
    with torch.no_grad():
        got = proj(x)
        v = merge_tokens_ref(pool_reference(x.transpose(0, 1), "avg2x2"))
        v = proj.layer_norm(v)
        fc1, fc2 = proj.encoder.linear_fc1, proj.encoder.linear_fc2
        want = F.linear(F.gelu(F.linear(v, fc1.weight, fc1.bias)), fc2.weight, fc2.bias).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_plan_shows_the_pooled_token_count():
    base = plan.make_plan(load_config(TINY, []), gpus=1, gpu_memory_gib=80, vocab_size=40)
    pooled = plan.make_plan(load_config(TINY, ["model.projector.pool=avg2x2"]), gpus=1, gpu_memory_gib=80,
                            vocab_size=40)
    assert base["image_tokens"]["tokens_per_crop"] == 16 and pooled["image_tokens"]["tokens_per_crop"] == 4
    assert pooled["image_tokens"]["unpooled_tokens_per_crop"] == 16
    assert pooled["parameters"]["projector"] == base["parameters"]["projector"]  # avg keeps the width
    text = plan.format_plan(pooled)
    assert "image tokens: 4 per crop" in text and "16 without the pool" in text
    shuffled = plan.make_plan(load_config(TINY, ["model.projector.pool=shuffle2x2"]), gpus=1, gpu_memory_gib=80,
                              vocab_size=40)
    # the first Linear takes 4× the width: 3 more d_vision × h blocks of weights
    lm_h, d = 128, 64
    assert shuffled["parameters"]["projector"] - base["parameters"]["projector"] == 3 * d * lm_h


@pytest.mark.parametrize("overrides,match", [
    (["model.projector.pool=avg"], "model.projector.pool='avg' is not valid"),
    (["model.projector.pool=avg2x2", "model.vision.image_size=24"], "model.projector.pool=avg2x2 needs a token grid "
                                                                    "with an even side.*3 patches per side"),
    (["model.projector.pool=shuffle2x2", "model.vision.select_strategy=full"], "select_strategy=full"),
    (["model.projector.pool=avg2x2", "model.projector.type=resampler", "model.projector.queries=4"],
     "model.projector.pool=avg2x2 does not combine with model.projector.type=resampler"),
    (["model.family=internvl", "model.vision.image_size=48", "model.projector.pool=avg2x2", "data.max_seq_len=256"],
     "model.projector.pool=avg2x2 needs .* even side after the 2×2 pool"),
    (["model.family=qwen2_vl", "data.source=synthetic_shards", "model.projector.pool=avg2x2",
      "data.max_seq_len=128"], "model.projector.pool=avg2x2 is not supported by model.family=qwen2_vl"),
])
def test_pool_config_errors_name_the_key(overrides, match):
    from megavlm.config import validate

    fam_given = any(o.startswith("model.family") for o in overrides)
    with pytest.raises(ConfigError, match=match):
        validate(load_config(None if fam_given else TINY, overrides), 1)


def test_pooled_max_seq_len_check_counts_pooled_tokens():
    """16 tokens need max_seq_len >= 24 unpooled; pooled to 4, 12 is enough."""
    from megavlm.config import validate

    validate(load_config(TINY, ["model.projector.pool=avg2x2", "data.max_seq_len=12"]), 1)
    with pytest.raises(ConfigError, match="an image takes 16 tokens"):
        validate(load_config(TINY, ["data.max_seq_len=12"]), 1)
    p = families.of(load_config(TINY, [])).projector_arch(load_config(TINY, []))
    assert dataclasses.replace(p, pool="shuffle2x2").input_size == 4 * p.input_size

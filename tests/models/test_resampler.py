"""Qwen-VL's cross-attention resampler (``model.projector.type=resampler``): outputs and gradients equal a plain-PyTorch
``torch.nn.MultiheadAttention`` reference (fp32, ≤1e-5) at TP=1 and TP=2; it plugs into the LLaVA family (any image
gives ``queries`` tokens), ``plan`` counts its parameters, and a 3-step run at PP=2 equals PP=1."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from resampler_ref import compare, sincos_2d  # noqa: E402

TOL = 1e-5


def test_sincos_positions_equal_mae():
    from megavlm.models.projector import key_positions
    from megavlm.models.projector import sincos_2d as ours

    for dim, grid in ((32, 4), (64, 6), (4096, 16)):
        assert torch.allclose(ours(dim, grid), sincos_2d(dim, grid), atol=1e-6)
    k = key_positions(32, 17)  # a class token first: no position
    assert torch.equal(k[0], torch.zeros(32)) and torch.allclose(k[1:], sincos_2d(32, 4), atol=1e-6)
    with pytest.raises(ValueError, match="square grid"):
        key_positions(32, 15)


@pytest.mark.parametrize("kw", [dict(), dict(d_vision=32, tokens=16, images=1, heads=2)],
                         ids=["widths-differ", "same-width"])
def test_resampler_equals_the_reference(rt, kw):
    diffs = compare(**kw)
    scale = diffs.pop("scale")
    assert scale > 0.5
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.slow
@pytest.mark.distributed
def test_resampler_tp2_equals_the_reference(tmp_path):
    from helpers import ROOT, run

    out = tmp_path / "diffs.json"
    run([os.path.join(ROOT, "tests", "models", "resampler_worker.py"), str(out)], nproc=2)
    diffs = json.load(open(out))
    diffs.pop("scale")
    assert max(diffs.values()) <= TOL, diffs


def test_llava_with_a_resampler(rt):
    """The LLaVA family with ``model.projector.type=resampler``: every image gives ``queries`` tokens, the VLM runs
    forward and backward, ``plan``'s counts equal the built model's, and the config checks name the keys."""
    from megavlm import families, plan
    from megavlm.config import ConfigError, load_config, validate
    from megavlm.models.vlm import VLM

    cfg = load_config("configs/tiny_cpu.yaml", ["model.language.vocab_size=40", "model.projector.type=resampler",
                                                "model.projector.queries=9", "train.stage=3"])
    validate(cfg, 1)
    fam = families.of(cfg)
    assert fam.image_tokens(cfg) == 9 and "9 resampler queries" in fam.image_tokens_formula(cfg)
    model = VLM(cfg, rt, 40, 4, torch.float32, pre_process=True, post_process=True)
    built = sum(p.numel() for n, p in model.named_parameters() if n.startswith("projector."))
    assert plan.stage_params(cfg, 40, tp=1, pp=1, rank=0).projector == built
    s = cfg.model.vision.image_size
    ids = torch.full((2, 24), 7)
    ids[0, 2:11] = 4
    ids[1, 5:14] = 4
    images = torch.randint(0, 256, (2, s, s, 3), dtype=torch.uint8)
    loss = model(input_ids=ids, images=images, labels=torch.full((2, 24), 8))
    loss.sum().backward()
    assert model.projector.query.grad.abs().sum() > 0
    for bad, needle in (("model.projector.queries=10", r"model\.projector\.queries=10 must be a square number"),
                        ("model.projector.heads=3", r"model\.projector\.heads=3 must divide"),
                        ("parallel.tp=8", "parallel.tp=8 does not divide")):
        with pytest.raises(ConfigError, match=needle):
            validate(load_config("configs/tiny_cpu.yaml", ["model.projector.type=resampler", bad]), 8 if "tp" in bad
                     else 1)


@pytest.mark.slow
@pytest.mark.distributed
def test_resampler_pp2_losses_equal_pp1(tmp_path):
    """From one checkpoint, PP=2 (the resampler on the first stage, its tokens through the pipeline) trains steps 2-3
    with the losses of the one-process run."""
    from helpers import losses, train

    common = ["train.steps=3", "train.warmup_steps=1", "checkpoint.keep=0", "train.stage=3",
              "logging.tensorboard=false", "model.projector.type=resampler", "model.projector.queries=9"]
    ref = tmp_path / "ref"
    train(ref, *common, "checkpoint.save_interval=1")
    want = losses(ref)
    pp2 = tmp_path / "pp2"
    train(pp2, *common, f"checkpoint.load={ref / 'checkpoints' / 'iter_0000001'}", "parallel.pp=2", nproc=2)
    got = losses(pp2)
    assert sorted(got) == [2, 3]
    for step in (2, 3):
        assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step])

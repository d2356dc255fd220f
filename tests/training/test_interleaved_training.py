"""VILA-style interleaved pretraining end to end (conversion and data convert in process, training through the CLI):
a SigLIP tower and a LLaMA decoder (tiny, random, saved by transformers) are converted with a fresh linear projector
(`convert hf-to-mcore --projector linear`) once per `--pool` (a checkpoint holds its pool: shuffle2x2's projector
takes 4× the width), MMC4 documents with 2-3 images each become shards (`data convert --format mmc4 --config`), and
3 steps with the LLM unfrozen and packing give:

- at TP=1 (one process each): pool none, avg2x2 and shuffle2x2 — three different losses (the pool is applied;
  the pooling itself is checked against a plain-PyTorch reference in tests/models/test_pool.py);
- at TP=2 with pool=avg2x2 and at PP=2 with pool=shuffle2x2 (two torchrun launches, 2 gloo ranks each): the TP=1
  losses of the same pool, to 1e-5. (pool=none at TP=2 / PP=2 is what tests/training/test_layouts.py checks on
  conversation shards; DP=2 on interleaved shards is not launched here, to keep to two torchrun launches.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from helpers import losses, train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
COMMON = ["train.steps=3", "train.warmup_steps=1", "checkpoint.keep=0", "checkpoint.save_interval=0",
          "train.stage=2", "train.global_batch=2", "train.micro_batch=1", "train.lr=1e-2", "data.source=shards",
          "data.packing=true", "data.max_images=3", "data.max_seq_len=96", "logging.tensorboard=false"]


def _tower_and_decoder(root):
    import torch
    from transformers import LlamaForCausalLM, SiglipVisionModel

    from convert.hf_models import randomize, save_processor, siglip_config, text_config
    from megavlm.data.tokenizer import build_synthetic_tokenizer

    vision, language = os.path.join(root, "siglip"), os.path.join(root, "llama")
    torch.manual_seed(0)
    tower = SiglipVisionModel(siglip_config())
    randomize(tower, 3)
    tower.save_pretrained(vision)
    save_processor(vision)
    tok = build_synthetic_tokenizer(language)
    llama = LlamaForCausalLM(text_config(len(tok)))
    randomize(llama, 4)
    llama.save_pretrained(language)
    return vision, language


def _documents(root, n=12):
    from PIL import Image

    images = os.path.join(root, "images")
    os.makedirs(images)
    rng = np.random.default_rng(1)
    sentences = ["the red square .", "a blue circle .", "what shape is green ?", "the triangle is red .",
                 "a green square ."]
    path = os.path.join(root, "mmc4.jsonl")
    with open(path, "w") as f:
        for d in range(n):
            k = 2 + d % 2  # 2 or 3 images
            info = []
            for j in range(k):
                w, h = (16 + 8 * ((d + j) % 3), 16 + 4 * (j % 2))
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    os.path.join(images, f"{d}_{j}.png"))
                info.append({"image_name": f"{d}_{j}.png", "matched_text_index": (j + d) % 4})
            texts = [sentences[(d + i) % len(sentences)] for i in range(4)]
            f.write(json.dumps({"url": f"doc{d}", "text_list": texts, "image_info": info}) + "\n")
    return path, images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """{pool: converted dir} (the same tower and decoder weights; the projector fresh from the same seed) and the
    shards."""
    root = str(tmp_path_factory.mktemp("vila"))
    vision, language = _tower_and_decoder(root)
    outs = {}
    from megavlm import cli, runtime
    from megavlm.convert import engine
    from megavlm.runtime import cpu

    try:  # in process: `convert hf-to-mcore --projector linear --pool POOL` and `data convert` without 4 interpreters
        for pool in ("none", "avg2x2", "shuffle2x2"):
            outs[pool] = os.path.join(root, f"mcore_{pool}")
            engine.hf_to_mcore(outs[pool], vision=vision, language=language, feature_layer=-1, projector="linear",
                               pool=pool)
    finally:
        runtime.shutdown()
        cpu.disable()
    docs, images = _documents(root)
    shards = os.path.join(root, "shards")
    assert cli.main(["data", "convert", "--format", "mmc4", "--json", docs, "--images", images, "--out", shards,
                     "--config", os.path.join(outs["none"], "config.yaml"), "data.max_images=3",
                     "data.max_seq_len=96", "--workers", "1"]) == 0
    with open(os.path.join(shards, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["documents"], summary["kept"], summary["max_images"]) == (12, 12, 3), summary
    return outs, shards


def test_interleaved_losses_equal_across_layouts_and_pools(setup, tmp_path):
    outs, shards = setup
    want = {}
    for pool in ("none", "avg2x2", "shuffle2x2"):
        d = str(tmp_path / f"tp1_{pool}")
        train(d, *COMMON, f"data.shards={shards}", config=os.path.join(outs[pool], "config.yaml"))
        want[pool] = losses(d)
        assert sorted(want[pool]) == [1, 2, 3], pool
    assert len({round(w[1], 6) for w in want.values()}) == 3, want  # each pool gives its own loss
    for pool, layout in (("avg2x2", "parallel.tp=2"), ("shuffle2x2", "parallel.pp=2")):
        d = str(tmp_path / f"{layout}_{pool}")
        train(d, *COMMON, f"data.shards={shards}", layout, nproc=2, config=os.path.join(outs[pool], "config.yaml"))
        got = losses(d)
        for step in (1, 2, 3):
            assert abs(got[step] - want[pool][step]) <= 1e-5, (layout, pool, step, got[step], want[pool][step])

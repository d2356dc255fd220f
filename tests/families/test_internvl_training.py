"""InternVL end to end through the CLI (torchrun-spawned gloo ranks on CPU): one converted checkpoint trains on shards
of images of many aspect ratios (1-4 tiles + thumbnail each) with TP=2 and PP=2 losses equal to the TP=1 run's, and
`megavlm generate` tiles an image itself and decodes what transformers' generate decodes from its own processor."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import assert_layouts_resume_equal, losses, run, train, write_image_shards  # noqa: E402
from test_internvl import make_internvl  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
COMMON = ["train.steps=4", "train.warmup_steps=1", "checkpoint.keep=0", "train.stage=3", "train.global_batch=4",
          "train.micro_batch=2", "train.lr=1e-2", "data.source=shards", "logging.tensorboard=false"]
SIZES = [(40, 20), (16, 48), (30, 30), (70, 18), (20, 20), (50, 35), (18, 60), (33, 17)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(converted dir, shards dir, HF dir, a non-square image): shards of 16 records whose images have the sizes
    above (so 1 to 4 tiles, a thumbnail when more than one)."""
    root = tmp_path_factory.mktemp("internvl_train")
    hf = str(root / "hf")
    make_internvl(hf, seed=7)
    out = str(root / "mcore")
    run(["convert", "hf-to-mcore", "--hf", hf, "--out", out])
    shards, png = write_image_shards(str(root), SIZES)
    return out, shards, hf, png


def test_tp2_and_pp2_losses_equal_tp1(setup, tmp_path):
    out, shards, _, _ = setup
    config = os.path.join(out, "config.yaml")
    ref = tmp_path / "ref"
    train(ref, *COMMON, f"data.shards={shards}", "checkpoint.save_interval=2", config=config)
    want = losses(ref)
    assert len(want) == 4 and want[4] != want[1]
    assert_layouts_resume_equal(tmp_path, ref, os.path.join(str(ref), "checkpoints", "iter_0000002"),
                                [*COMMON, f"data.shards={shards}"], config)


def test_generate_tiles_the_image_as_transformers(setup):
    """`--input-ids` with one context token: megavlm tiles the image (2×1 grid + thumbnail for 40×20) and expands
    it to <img>, 3 × 4 context tokens, </img>; transformers gets the same ids and its processor's pixel values."""
    from PIL import Image
    from transformers import AutoImageProcessor, InternVLForConditionalGeneration

    out, _, hf, png = setup
    tokenizer = __import__("megavlm.data.tokenizer", fromlist=["load_tokenizer"]).load_tokenizer(hf)
    ctx, start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<IMG_CONTEXT>", "<img>", "</img>"))
    prompt = [1, 5, 6, ctx, 7, 8, 9]
    n = 6
    proc = run(["generate", "--ckpt", out, "--image", png, "--input-ids", ",".join(map(str, prompt)),
                "--max-new-tokens", str(n), "--ignore-eos", "--output", "json"])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    expanded = [1, 5, 6, start] + [ctx] * 12 + [end, 7, 8, 9]
    assert res["prompt_ids"] == expanded
    processor = AutoImageProcessor.from_pretrained(hf)
    pixels = processor(images=[Image.open(png).convert("RGB")], return_tensors="pt")["pixel_values"]
    assert pixels.shape[0] == 3
    model = InternVLForConditionalGeneration.from_pretrained(hf).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        gen = model.generate(input_ids=torch.tensor([expanded]), pixel_values=pixels, do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in gen.scores]
    assert min(margins) > 1e-3, margins
    assert res["generated_ids"] == gen.sequences[0, len(expanded):].tolist()

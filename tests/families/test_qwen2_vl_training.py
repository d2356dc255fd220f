"""Qwen2.5-VL end to end through the CLI (torchrun-spawned gloo ranks on CPU): one converted checkpoint trains on
shards of images of many sizes (native resolution: each image its own number of patches and tokens, one or two per
sample) with TP=2 and PP=2 losses equal to the TP=1 run's, and `megavlm generate` resizes an image itself and decodes
what transformers' generate decodes from its own processor."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import assert_layouts_resume_equal, losses, run, train, write_image_shards  # noqa: E402
from test_qwen2_vl import SPECIALS, make_qwen  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
COMMON = ["train.steps=4", "train.warmup_steps=1", "checkpoint.keep=0", "train.stage=3", "train.global_batch=4",
          "train.micro_batch=2", "train.lr=1e-2", "data.source=shards", "data.max_images=2", "data.max_seq_len=96",
          "logging.tensorboard=false"]
#: (width, height): wide, tall, square, tiny (scaled up), large (scaled down), odd sizes
SIZES = [(40, 20), (16, 48), (30, 30), (3, 2), (300, 170), (20, 20), (50, 35), (18, 60), (33, 17)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(converted dir, shards dir, HF dir, an image): shards of 16 records, every third with a second image."""
    root = tmp_path_factory.mktemp("qwen_train")
    hf = str(root / "hf")
    make_qwen(hf, "qwen2_5_vl", seed=7)
    out = str(root / "mcore")
    run(["convert", "hf-to-mcore", "--hf", hf, "--out", out])
    shards, png = write_image_shards(str(root), SIZES, second_image_every=3)
    return out, shards, hf, png


def test_tp2_and_pp2_losses_equal_tp1(setup, tmp_path):
    out, shards, _, _ = setup
    config = os.path.join(out, "config.yaml")
    ref = tmp_path / "ref"
    proc = train(ref, *COMMON, f"data.shards={shards}", "checkpoint.save_interval=2", config=config)
    assert "samples read on this data-parallel rank, 0 skipped" in proc.stdout  # every size was usable
    want = losses(ref)
    assert len(want) == 4 and want[4] != want[1]
    # eval answers the synthetic colour questions from the run's checkpoint (square images at native resolution)
    ev = run(["eval", config, f"run_dir={ref}", "--limit", "4"])
    assert "accuracy" in ev.stdout and json.load(open(ref / "eval.json"))["questions"] == 4
    assert_layouts_resume_equal(tmp_path, ref, os.path.join(str(ref), "checkpoints", "iter_0000002"),
                                [*COMMON, f"data.shards={shards}"], config)


def test_generate_resizes_the_image_as_transformers(setup):
    """`--input-ids` with `<|vision_start|><|image_pad|><|vision_end|>`: megavlm resizes the 40×20 image itself (to
    40×16: a grid of 4×10 patches, 10 tokens) and expands the pad token between the two it was given; transformers
    gets the same ids, its processor's pixel values and grid."""
    from PIL import Image
    from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

    from megavlm.data.tokenizer import load_tokenizer

    out, _, hf, png = setup
    tok = load_tokenizer(hf)
    start, end, pad = (tok.convert_tokens_to_ids(t) for t in SPECIALS)
    prompt = [1, 5, 6, start, pad, end, 7, 8, 9]
    n = 6
    proc = run(["generate", "--ckpt", out, "--image", png, "--input-ids", ",".join(map(str, prompt)),
                "--max-new-tokens", str(n), "--ignore-eos", "--output", "json"])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    processor = AutoImageProcessor.from_pretrained(hf)
    inputs = processor(images=[Image.open(png).convert("RGB")], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    tokens = int(grid.prod()) // 4
    expanded = [1, 5, 6, start] + [pad] * tokens + [end, 7, 8, 9]
    assert res["prompt_ids"] == expanded and grid.tolist() == [[1, 4, 10]]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([expanded])
    with torch.no_grad():
        gen = model.generate(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=grid,
                             mm_token_type_ids=(ids == pad).int(), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in gen.scores]
    assert min(margins) > 1e-3, margins
    assert res["generated_ids"] == gen.sequences[0, len(expanded):].tolist()

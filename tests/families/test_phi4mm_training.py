"""Phi-4-multimodal at TP=2 and PP=2 (torchrun-spawned gloo ranks on CPU), from one converted checkpoint: the logits
of a batch with two HD images (7 crops each, partly padded sub-crop grids) equal transformers', and 3 training steps
(everything trains, 2 micro-batches per step, one image each) give the losses of the TP=1 run. The batches come from
the test (crops of random pixels with their grids; test_phi4mm.py trains from shards): tests/families/hd_worker.py
runs them through the trainer's own DDP, optimizer, schedule and loss."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import ROOT, run  # noqa: E402
from test_phi4mm import CROP, IMAGE_TOKEN, hf_mask, make_phi4mm  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "families", "hd_worker.py")
SEQ = 136
#: two images: 70×40 (3×2 crops, 10 px padded at the bottom) and 40×70 (2×3 crops, 10 px padded on the right)
IMAGES = (((2, 3, 14, 24), 2, 3, 0, 10, 7 * 13 + 1 + 20), ((3, 2, 24, 14), 3, 2, 10, 0, 12 * 8 + 1 + 20))
# (max_crops only sizes the worst-case check of data.max_seq_len here: the batches are made by the test)
TRAIN = ["model.vision.max_crops=4", "train.stage=3", "train.lr=1e-2", "train.warmup_steps=1", "train.steps=3",
         "train.global_batch=2", "train.micro_batch=1", "logging.tensorboard=false"]


def _sample(g, tok, which: int):
    """One sample of image ``which``: ids, labels (next token; none at the image), crops, grid, HF's inputs."""
    grid, rows, cols, pad_w, pad_h, tokens = IMAGES[which]
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = torch.randint(5, 28, (SEQ - tokens,), generator=g).tolist()
    ids = torch.tensor([text[:3] + [img] * tokens + text[3:]])
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    labels[(ids == img) | (torch.roll(ids, -1, 1) == img)] = -100
    crops = torch.randn(1 + rows * cols, 3, CROP, CROP, generator=g)
    hf = dict(image_pixel_values=crops[None], image_sizes=torch.tensor([[rows * CROP, cols * CROP]]),
              image_attention_mask=hf_mask(rows, cols, pad_w, pad_h)[None])
    micro = {"input_ids": ids, "labels": labels, "loss_mask": (labels != -100).float(), "images": crops,
             "image_grid": torch.tensor([grid])}
    return micro, hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(converted dir, HF model, the batch file, the TP=1 result computed in this process)."""
    root = tmp_path_factory.mktemp("phi4mm_train")
    hf_dir = str(root / "hf")
    hf_model, tok = make_phi4mm(hf_dir, seed=11)
    out = str(root / "mcore")
    run(["convert", "hf-to-mcore", "--hf", hf_dir, "--out", out])
    g = torch.Generator().manual_seed(0)
    pairs = [_sample(g, tok, i % 2) for i in range(8)]
    logits_in = [m for m, _ in pairs[:2]]
    batch = {"input_ids": torch.cat([m["input_ids"] for m in logits_in]),
             "pixel_values": torch.cat([m["images"] for m in logits_in]),
             "image_grid": torch.cat([m["image_grid"] for m in logits_in]),
             "batches": [[pairs[2 + 2 * s][0], pairs[3 + 2 * s][0]] for s in range(3)]}
    torch.save(batch, root / "in.pt")
    with torch.no_grad():
        want = torch.cat([hf_model(input_ids=m["input_ids"], **h).logits for m, h in pairs[:2]])
    return out, want, str(root / "in.pt"), root


@pytest.fixture(scope="module")
def reference(setup):
    """The TP=1/PP=1 run of the same worker, in a lone process."""
    out, _, inp, root = setup
    run([WORKER, os.path.join(out, "config.yaml"), inp, str(root / "tp1.pt"), "--", *TRAIN])
    return torch.load(root / "tp1.pt")


@pytest.mark.slow
def test_tp1_logits_match_transformers_and_training_moves(setup, reference):
    _, want, _, _ = setup
    assert (reference["logits"] - want).abs().max() <= 1e-4
    losses = reference["losses"]
    assert len(losses) == 3 and losses[2] != losses[0]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [("parallel.tp=2", "parallel.pp=1"), ("parallel.tp=1", "parallel.pp=2")])
def test_layout_logits_and_losses_equal_tp1(setup, reference, layout, tmp_path):
    out, want, inp, _ = setup
    run([WORKER, os.path.join(out, "config.yaml"), inp, str(tmp_path / "o.pt"), "--", *TRAIN, *layout], nproc=2)
    got = torch.load(tmp_path / "o.pt")
    assert got["logits"].shape == want.shape and (got["logits"] - want).abs().max() <= 1e-4
    assert got["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6)

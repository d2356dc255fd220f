"""The converted checkpoint at TP=2 × PP=2 (torchrun, gloo ranks on CPU) against transformers, through the CLI."""

import os
import sys

import pytest
import torch

from hf_models import make_llava, sample_inputs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import ROOT, run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
WORKER = os.path.join(ROOT, "tests", "convert", "logits_worker.py")


def test_tp2_pp2_logits_and_trained_export(tmp_path):
    """HF → megatron (CLI) at TP=2 × PP=2 matches transformers; a run trained from it at TP=2 × PP=2 (stage 3, so
    every part changes) exports (CLI, loaded at TP=1/PP=1) to an HF model with the logits of the sharded run."""
    from transformers import LlavaForConditionalGeneration

    hf_dir = str(tmp_path / "hf")
    hf_model, tok = make_llava(hf_dir, seed=3)
    out = str(tmp_path / "mcore")
    run(["convert", "hf-to-mcore", "--hf", hf_dir, "--out", out, "--tp", "2", "--pp", "2"])
    config = os.path.join(out, "config.yaml")
    run_dir = str(tmp_path / "run")
    run(["train", config, f"run_dir={run_dir}", "train.steps=1", "train.warmup_steps=0", "train.stage=3",
         "train.lr=1e-2", "train.global_batch=2", "train.micro_batch=1", "data.num_samples=4", "data.eval_samples=0",
         "data.max_seq_len=32", "logging.tensorboard=false"], nproc=4)
    trained = os.path.join(run_dir, "checkpoints", "iter_0000001")
    converted = os.path.join(out, "checkpoints", "iter_0000000")

    ids, pixels = sample_inputs(len(tok), 4, seq=24, seed=1)
    torch.save({"input_ids": ids, "pixel_values": pixels}, tmp_path / "in.pt")
    run([WORKER, config, str(tmp_path / "in.pt"), str(tmp_path / "out.pt"), converted, trained], nproc=4)
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        want = hf_model(input_ids=ids, pixel_values=pixels).logits
    assert got[converted].shape == want.shape
    assert (got[converted] - want).abs().max() <= 1e-4
    assert (got[trained] - want).abs().max() > 1e-3  # training changed the model

    export = str(tmp_path / "export")
    run(["convert", "mcore-to-hf", "--ckpt", os.path.join(run_dir, "checkpoints"), "--out", export])
    m = LlavaForConditionalGeneration.from_pretrained(export).eval()
    with torch.no_grad():
        exported = m(input_ids=ids, pixel_values=pixels).logits
    assert (exported - got[trained]).abs().max() <= 1e-4

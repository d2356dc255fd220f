"""A short run of the embedded default on 2 ranks: the loss falls, the run directory holds what DESIGN.md promises,
and `megavlm eval` reads its checkpoint back at TP=1/PP=1."""

import glob
import json
import os

import pytest

from helpers import metrics, run, train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s"}


def test_tiny_run_learns_and_writes_run_dir(tmp_path):
    proc = train(tmp_path, "parallel.pp=2", "train.steps=30", nproc=2)
    assert "step     30/30" in proc.stdout  # the console progress line
    ms = metrics(tmp_path)
    assert [m["step"] for m in ms] == list(range(1, 31))
    for m in ms:
        assert REQUIRED <= set(m), set(m)
        assert m["tokens_per_s"] > 0 and m["step_time_s"] > 0
    first = sum(m["loss"] for m in ms[:5]) / 5
    last = sum(m["loss"] for m in ms[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert os.path.isfile(tmp_path / "config.yaml")
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert open(tmp_path / "checkpoints" / "latest").read().strip() == "iter_0000030"

    ev = run(["eval", "configs/tiny_cpu.yaml", f"run_dir={tmp_path}", "--limit", "20"])
    assert "accuracy" in ev.stdout and "chance 16.7%" in ev.stdout
    result = json.load(open(tmp_path / "eval.json"))
    assert result["questions"] == 20 and 0.0 <= result["accuracy"] <= 1.0
    assert result["checkpoint"].endswith("iter_0000030")

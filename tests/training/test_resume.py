"""Resume: 20 steps straight equal 10 steps, an exit, and a resumed run of 10 more."""

import os

import pytest

from helpers import metrics, train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_resume_continues_exactly(tmp_path):
    common = ["train.steps=20", "train.warmup_steps=3", "checkpoint.keep=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *common)
    first = train(resumed, *common, "train.exit_interval=10")
    assert "stopping at step 10" in first.stdout
    assert open(resumed / "checkpoints" / "latest").read().strip() == "iter_0000010"
    second = train(resumed, *common, "checkpoint.load=auto")
    assert "step 10" in second.stdout
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, 21))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x["step"], x["loss"], y["loss"])
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-9)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    # keep=1: only the newest checkpoint stays, and no temporary directory is left behind.
    assert sorted(os.listdir(resumed / "checkpoints")) == ["iter_0000020", "latest"]

"""The model's fused projector path under tensor parallelism (2 gloo ranks on CPU, where the fused ops run their
torch emulation): fc1 column-split, fc2 row-split, the partial rows summed over TP before b2, as megatron's layers
do. Loss and every local gradient equal those of megatron's own projector layers on the same rank."""

import os

import pytest
import torch

from helpers import ROOT, run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
WORKER = os.path.join(ROOT, "tests", "ops", "fused_tp_worker.py")


def test_fused_projector_at_tp2_equals_megatron_layers(tmp_path):
    out = str(tmp_path / "res")
    run([WORKER, out, "--", "parallel.tp=2"], nproc=2)
    for rank in (0, 1):
        res = torch.load(f"{out}.rank{rank}.pt")
        assert res["tp"] == 2
        ref, got = res["megatron"], res["fused"]
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-5)
        assert set(got["grads"]) == set(ref["grads"])
        assert any(k.startswith("projector.") for k in ref["grads"])  # the projector is trained (stage 3)
        assert any(k.startswith("vision_model.") for k in ref["grads"])  # and its input's gradient reaches the encoder
        for k in ref["grads"]:
            torch.testing.assert_close(got["grads"][k], ref["grads"][k], rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {k}")

"""Sharded runs (torchrun-spawned gloo ranks on CPU) against the TP=1/PP=1 run of the same weights and data."""

import os

import pytest
import torch

from helpers import ROOT, checkpoint_tensors, losses, run, train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

COMMON = ["train.steps=4", "train.warmup_steps=1", "checkpoint.keep=0"]
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2pp2sp": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"]),
}
WORKER = os.path.join(ROOT, "tests", "training", "layouts_worker.py")


def ckpt(run_dir, step):
    return os.path.join(str(run_dir), "checkpoints", f"iter_{step:07d}")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    train(d, *COMMON, "checkpoint.save_interval=2")
    return d


@pytest.fixture(scope="module")
def layout_runs(ref, tmp_path_factory):
    """Each layout resumes the TP=1/PP=1 checkpoint of step 2 (resharding it) and trains steps 3-4."""
    out = {}
    for name, (nproc, overrides) in LAYOUTS.items():
        d = tmp_path_factory.mktemp(name)
        train(d, *COMMON, f"checkpoint.load={ckpt(ref, 2)}", *overrides, nproc=nproc)
        out[name] = d
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_losses_equal_unsharded(ref, layout_runs, name):
    want, got = losses(ref), losses(layout_runs[name])
    assert sorted(got) == [3, 4], "the run must continue at the checkpoint's step"
    for step in (3, 4):
        assert abs(got[step] - want[step]) <= 1e-5, (name, step, got[step], want[step])


@pytest.fixture(scope="module")
def logits(ref, layout_runs, tmp_path_factory):
    """Logits of one fixed batch: per (checkpoint, layout it was computed at)."""
    d = tmp_path_factory.mktemp("logits")
    jobs = {
        "tp1": (1, [], [ckpt(ref, 2), ckpt(layout_runs["tp2"], 4), ckpt(layout_runs["pp2"], 4)]),
        "tp2": (2, ["parallel.tp=2"], [ckpt(ref, 2), ckpt(layout_runs["tp2"], 4)]),
        "pp2": (2, ["parallel.pp=2"], [ckpt(layout_runs["pp2"], 4)]),
    }
    out = {}
    for name, (nproc, overrides, paths) in jobs.items():
        f = str(d / f"{name}.pt")
        run([WORKER, f, *paths, "--", *overrides], nproc=nproc)
        out[name] = torch.load(f)
    return out


def test_tp2_logits_equal_tp1(ref, logits):
    a, b = logits["tp1"][ckpt(ref, 2)], logits["tp2"][ckpt(ref, 2)]
    assert a.shape == b.shape and a.shape[-1] > 10
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_checkpoint_saved_at_tp2_loads_at_tp1(layout_runs, logits):
    p = ckpt(layout_runs["tp2"], 4)
    torch.testing.assert_close(logits["tp1"][p], logits["tp2"][p], rtol=0, atol=1e-5)


def test_checkpoint_saved_at_pp2_loads_at_pp1(layout_runs, logits):
    p = ckpt(layout_runs["pp2"], 4)
    torch.testing.assert_close(logits["tp1"][p], logits["pp2"][p], rtol=0, atol=1e-5)


def test_trained_weights_differ_from_loaded(ref, layout_runs, logits):
    """Guards the tests above against comparing a checkpoint with itself."""
    assert (logits["tp1"][ckpt(ref, 2)] - logits["tp1"][ckpt(layout_runs["tp2"], 4)]).abs().max() > 1e-3


def test_dp2_distributed_optimizer_equals_dp1(tmp_path):
    """DP=2 with the distributed optimizer (2 micro-batches per rank) vs DP=1 with 4 micro-batches, on the in-memory
    synthetic data, whose global sample order does not depend on the DP size (shards are split per DP rank)."""
    ref = tmp_path / "ref"
    train(ref, *COMMON, "data.source=synthetic")
    train(tmp_path, *COMMON, "data.source=synthetic", "parallel.distributed_optimizer=true", nproc=2)
    want, got = losses(ref), losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step])
    a, b = checkpoint_tensors(ckpt(ref, 4)), checkpoint_tensors(ckpt(tmp_path, 4))
    names = [k for k in a if not k.startswith("optimizer") and isinstance(a[k], torch.Tensor)
             and k not in ("rng_blob", "data_blob")]  # RNG and data position: per rank, as uint8 tensors
    assert len(names) > 20
    for k in names:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("stage,trained", [(1, ("projector.",)), (2, ("projector.", "language_model."))])
def test_stage_freezing(ref, tmp_path, stage, trained):
    train(tmp_path, "train.steps=1", "train.warmup_steps=0", f"train.stage={stage}", "checkpoint.finetune=true",
          f"checkpoint.load={ckpt(ref, 2)}")
    before, after = checkpoint_tensors(ckpt(ref, 2)), checkpoint_tensors(ckpt(tmp_path, 1))
    params = [k for k in before if isinstance(before[k], torch.Tensor) and not k.startswith(("optimizer", "rng"))
              and "_extra_state" not in k and k != "data_blob"]
    assert any(k.startswith("vision_model.") for k in params) and any(k.startswith("projector.") for k in params)
    for k in params:
        changed = not torch.equal(before[k], after[k])
        assert changed == k.startswith(trained), (stage, k, changed)


def test_uneven_pipeline_split_equals_unsharded(tmp_path):
    """parallel.first_stage_layers gives the first stage (which also holds the vision encoder) fewer layers."""
    four = ["model.language.num_layers=4", "train.steps=2", "train.warmup_steps=0", "checkpoint.keep=0"]
    ref, split = tmp_path / "ref", tmp_path / "split"
    train(ref, *four, "checkpoint.save_interval=1")
    proc = train(split, *four, "parallel.pp=2", "parallel.first_stage_layers=1",
                 f"checkpoint.load={ckpt(ref, 1)}", nproc=2)
    assert "1 decoder layers" in proc.stdout  # rank 0 (first stage) holds 1 of the 4
    assert abs(losses(split)[2] - losses(ref)[2]) <= 1e-5

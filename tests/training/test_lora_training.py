"""LoRA training (model.lora) from one checkpoint without adapters: TP=2 (with sequence parallelism and the
distributed optimizer) and PP=2 (with full recompute, resuming the TP=1 run's LoRA checkpoint) against the TP=1 run;
only the adapters and what the stage trains change; the start-up line; LoRA on a checkpoint without adapters."""

import os

import pytest
import torch

from helpers import checkpoint_tensors, losses, train

pytestmark = [pytest.mark.slow]

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "train.warmup_steps=1", "checkpoint.keep=0",
        "checkpoint.finetune=true"]


def ckpt(run_dir, step):
    return os.path.join(str(run_dir), "checkpoints", f"iter_{step:07d}")


def params(state):
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith(("optimizer", "rng"))
            and "_extra_state" not in k and k not in ("data_blob", "rng_blob")}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    train(d, "train.steps=1", "train.warmup_steps=0")
    return ckpt(d, 1)


@pytest.fixture(scope="module")
def ref(base, tmp_path_factory):
    """LoRA at TP=1/PP=1 from the base checkpoint, 3 steps (checkpoints at 2 and 3)."""
    d = tmp_path_factory.mktemp("lora_tp1")
    proc = train(d, *LORA, f"checkpoint.load={base}", "train.steps=3", "checkpoint.save_interval=2")
    return d, proc.stdout


def test_only_adapters_and_the_projector_change(base, ref):
    before, after = params(checkpoint_tensors(base)), params(checkpoint_tensors(ckpt(ref[0], 3)))
    adapters = sorted(k for k in after if k.endswith((".lora_a", ".lora_b")))
    # 4 targets × (A, B), each stacked over the 2 decoder layers; none in the vision encoder (model.lora.vision=false)
    assert len(adapters) == 8 and all(k.startswith("language_model.decoder.layers.") for k in adapters)
    assert all(after[k].shape[0] == 2 for k in adapters)
    assert set(after) - set(before) == set(adapters)
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == k.startswith("projector."), (k, changed)  # the LLM's base weights: bit-identical
    for k in adapters:
        if k.endswith(".lora_b"):
            assert after[k].abs().max() > 0  # started at zero, trained
    # the start-up line reports what trains and how many parameters
    line = next(s for s in ref[1].splitlines() if "trains " in s)
    assert "projector+language[LoRA r=4: qkv,proj,fc1,fc2] (train.stage=2)" in line
    n_trained = sum(after[k].numel() for k in adapters) + sum(v.numel() for k, v in after.items()
                                                              if k.startswith("projector."))
    assert f"({n_trained:,} trained" in line


def _merged(state):
    from megavlm.models.lora import merged

    return {k: merged(state[k], state[k[:-6] + "lora_a"], state[k[:-6] + "lora_b"], 8.0, 4)
            for k in state if k.endswith(".weight") and k[:-6] + "lora_a" in state}


@pytest.mark.distributed
def test_tp2_sp_and_pp2_resume_equal_tp1(base, ref, tmp_path):
    """TP=2 + SP + the distributed optimizer from the base checkpoint (fresh adapters: the split of one full-size init)
    and PP=2 + full recompute resuming the TP=1 LoRA checkpoint of step 2 give the TP=1 losses and merged weights."""
    tp2, pp2 = tmp_path / "tp2", tmp_path / "pp2"
    train(tp2, *LORA, f"checkpoint.load={base}", "train.steps=3", "parallel.tp=2",
          "parallel.sequence_parallel=true", "parallel.distributed_optimizer=true", nproc=2)
    train(pp2, *[o for o in LORA if o != "checkpoint.finetune=true"], f"checkpoint.load={ckpt(ref[0], 2)}",
          "train.steps=3", "parallel.pp=2", "train.recompute=full", nproc=2)
    want = losses(ref[0])
    got_tp, got_pp = losses(tp2), losses(pp2)
    assert sorted(got_tp) == [1, 2, 3] and sorted(got_pp) == [3]
    for step in (1, 2, 3):
        assert abs(got_tp[step] - want[step]) <= 1e-5, (step, got_tp[step], want[step])
    assert abs(got_pp[3] - want[3]) <= 1e-5, (got_pp[3], want[3])
    assert len({round(v, 4) for v in want.values()}) == 3  # the adapters learn: not one loss three times
    ref_w = _merged(checkpoint_tensors(ckpt(ref[0], 3)))
    assert len(ref_w) == 4  # qkv, proj, fc1, fc2 (stacked over the layers)
    for run in (tp2, pp2):
        got_w = _merged(checkpoint_tensors(ckpt(run, 3)))
        assert set(got_w) == set(ref_w)
        for k in ref_w:
            torch.testing.assert_close(got_w[k], ref_w[k], rtol=0, atol=1e-5, msg=k)


def test_lora_from_a_checkpoint_without_adapters_needs_finetune(base, tmp_path):
    from helpers import TINY, run

    proc = run(["train", TINY, f"run_dir={tmp_path}", "model.lora.rank=4", f"checkpoint.load={base}"], check=False)
    assert proc.returncode == 2
    assert "has no LoRA adapters" in proc.stderr and "checkpoint.finetune=true" in proc.stderr

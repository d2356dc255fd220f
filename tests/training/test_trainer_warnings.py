"""What a training step prints: megatron-core's harmless read of a non-leaf ``.grad`` stays silent."""

import json
import math
import os
import warnings

from megavlm.config import load_config

NON_LEAF = "is not a leaf Tensor is being accessed"


def _non_leaf(caught) -> list[str]:
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if NON_LEAF in str(w.message)]


def test_stage2_step_with_the_distributed_optimizer_does_not_warn_about_non_leaf_grad(rt, tmp_path):
    """megatron-core's DistributedOptimizer.zero_grad reads ``.grad`` of its fp32 shard views (not leaf tensors), and
    torch warned once per rank on every CPU run with the distributed optimizer (LLaVA stage-2 recipes). The trainer
    ignores exactly that warning around its zero_grad call; nothing else about a step changes."""
    from megavlm.data.tokenizer import image_token_id, load_tokenizer
    from megavlm.training import trainer

    cfg = load_config("configs/tiny_cpu.yaml", [
        f"run_dir={tmp_path}", "train.stage=2", "parallel.distributed_optimizer=true", "train.steps=1",
        "train.warmup_steps=0", "train.global_batch=2", "train.micro_batch=2", "data.source=synthetic",
        "data.num_samples=4", "data.eval_samples=0", "logging.tensorboard=false"])
    tok = load_tokenizer(None)

    # The upstream read is real: megatron-core's own zero_grad, called as it is, warns.
    model, optimizer, _ = trainer.build_training_objects(cfg, rt, len(tok), image_token_id(tok))
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        optimizer.zero_grad()
    assert _non_leaf(raw), "megatron-core no longer reads .grad of a non-leaf: drop trainer.zero_grad's filter"

    # Through the trainer: the same optimizer path, a real stage-2 step, and no such warning.
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        trainer.zero_grad(model, optimizer)
        trainer.train(cfg)
    assert _non_leaf(raw) == []
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    assert [m["step"] for m in steps] == [1] and math.isfinite(steps[0]["loss"]) and steps[0]["grad_norm"] > 0
    # the filter is scoped to the call: the same warning elsewhere still shows
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        optimizer.zero_grad()
    assert _non_leaf(raw)

"""Checks the trainer makes before loading a checkpoint."""

import pytest

from megavlm.config import load_config, to_dict
from megavlm.errors import UserError
from megavlm.training.trainer import _check_same_model


def test_other_architecture_is_named():
    saved = to_dict(load_config("configs/tiny_cpu.yaml"))["model"]
    cur = to_dict(load_config("configs/tiny_cpu.yaml", ["model.language.num_layers=4", "model.vision.patch_size=4"]))
    with pytest.raises(UserError, match=r"model.language.num_layers: checkpoint 2, config 4") as e:
        _check_same_model(saved, cur["model"], "/ckpt")
    assert "model.vision.patch_size" in str(e.value)


def test_backend_settings_may_differ():
    saved = to_dict(load_config("configs/tiny_cpu.yaml"))["model"]
    cur = to_dict(load_config("configs/tiny_cpu.yaml",
                              ["model.spec=sdpa", "model.dtype=bf16", "model.kernels=reference"]))
    _check_same_model(saved, cur["model"], "/ckpt")  # no error
    _check_same_model({}, cur["model"], "/ckpt")  # checkpoints without a config (older) are not checked


def test_keys_added_since_the_checkpoint_take_their_defaults():
    saved = to_dict(load_config("configs/tiny_cpu.yaml"))["model"]
    del saved["language"]["qkv_bias"]  # a checkpoint written before the field existed
    _check_same_model(saved, to_dict(load_config("configs/tiny_cpu.yaml"))["model"], "/ckpt")
    with pytest.raises(UserError, match="qkv_bias: checkpoint False, config True"):
        _check_same_model(saved, to_dict(load_config("configs/tiny_cpu.yaml", ["model.language.qkv_bias=true"]))[
            "model"], "/ckpt")


@pytest.mark.parametrize("pp_rank,decodes", [(0, True), (1, False)])
def test_only_the_first_pipeline_stage_reads_images(tmp_path, pp_rank, decodes):
    """Later pipeline stages get their text from the first stage (a broadcast per step) and run no DALI loader."""
    import torch

    from megavlm import runtime
    from megavlm.data.synthetic import write_synthetic_shards
    from megavlm.data.tokenizer import load_tokenizer
    from megavlm.training.data import ShardTrainData

    write_synthetic_shards(str(tmp_path), 16, image_size=32, shard_size=8)
    cfg = load_config("configs/tiny_cpu.yaml", [f"data.shards={tmp_path}", "data.source=shards", "parallel.pp=2"])
    rt = runtime.Runtime(rank=pp_rank, world_size=2, local_rank=pp_rank, device=torch.device("cpu"), backend="gloo",
                         tp=1, pp=2, dp=1, tp_rank=0, pp_rank=pp_rank, dp_rank=0, cpu_compat=True)
    data = ShardTrainData(cfg, load_tokenizer(None), rt, str(tmp_path))
    assert (data.loader is not None) == decodes
    assert (data.state_dict() != {}) == decodes


def test_packing_settings_are_checked():
    from megavlm.config import ConfigError, validate

    for overrides, msg in [(["data.packing=true", "data.source=synthetic"], "data.source=shards or synthetic_shards"),
                           (["data.packing=true"], "train.micro_batch=1"),
                           (["data.packing=true", "train.micro_batch=1", "model.spec=local"], "model.spec")]:
        with pytest.raises(ConfigError, match=msg):
            validate(load_config("configs/tiny_cpu.yaml", overrides), 1)
    validate(load_config("configs/tiny_cpu.yaml", ["data.packing=true", "train.micro_batch=1"]), 1)


def test_a_running_runtime_is_reused_not_switched(rt):
    """runtime.initialize in a process that already runs TP=1/PP=1 (eval or generate after a test's setup) reuses
    it; asking for another layout is an error instead of a second set of process groups."""
    from megavlm import runtime

    again = runtime.initialize(1, 1, seed=1)
    assert (again.tp, again.pp, again.dp, again.rank, again.device) == (rt.tp, rt.pp, rt.dp, rt.rank, rt.device)
    with pytest.raises(UserError, match="cannot switch to TP=2/PP=1"):
        runtime.initialize(2, 1, seed=1)

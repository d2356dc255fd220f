"""A checkpoint as megavlm wrote it before format 2 (commit 97b198c, ``training/checkpoint.py`` ``save``): RNG state
and data position as pickled megatron ShardedObjects, no checksum manifest. Tests load it with today's code."""

from __future__ import annotations

import os
import shutil

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject


def save_v1(ckpt_dir: str, step: int, model, optimizer, common: dict, data_state=None) -> str:
    while hasattr(model, "module"):
        model = model.module
    ps = parallel_state
    pp, tp, dp = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
                  ps.get_data_parallel_world_size())
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd,
             "optimizer": optimizer.sharded_state_dict(
                 model_sd, is_loading=False, metadata={"distrib_optim_sharding_type": "fully_reshardable"}),
             "rng_state": ShardedObject(
                 "rng_state", {"torch": torch.get_rng_state(),
                               "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(), "cuda": None},
                 (pp, tp, dp), (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                                ps.get_data_parallel_rank()), replica_id=0),
             "common": dict(common, format_version=1, step=step, has_optimizer=True,
                            has_data_state=data_state is not None)}
    if data_state is not None:
        state["data_state"] = ShardedObject(
            "data_state", data_state, (dp,), (ps.get_data_parallel_rank(),),
            replica_id=ps.get_tensor_model_parallel_rank() + tp * ps.get_pipeline_model_parallel_rank())
    final = os.path.join(ckpt_dir, f"iter_{step:07d}")
    shutil.rmtree(final, ignore_errors=True)
    os.makedirs(final)
    from megavlm.training import checkpoint as ckpt

    getattr(ckpt, "_writer_results_in_process", lambda: None)()  # no writer helper process (item 6), as today
    dist_checkpointing.save(state, final)
    with open(os.path.join(ckpt_dir, "latest"), "w") as f:
        f.write(f"iter_{step:07d}\n")
    return final

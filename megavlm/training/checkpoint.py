"""Atomic megatron-core dist checkpoints: ``{dir}/iter_NNNNNNN`` plus a ``latest`` pointer.

A checkpoint is written under ``iter_NNNNNNN.tmp``; only when every rank has finished is it renamed and the
``latest`` file replaced (``os.replace``), so an interrupted save never looks complete. Loading reshards to the
current TP/PP (dist_checkpointing does the work); RNG state is restored only at the layout it was saved at.
"""

from __future__ import annotations

import os
import shutil

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from ..errors import UserError

LATEST = "latest"
FORMAT_VERSION = 1
_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """Path of the newest complete checkpoint under ``ckpt_dir`` (None if there is none)."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    name = open(pointer).read().strip()
    path = os.path.join(ckpt_dir, name)
    return path if os.path.isdir(path) else None


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json")) and not path.rstrip("/").endswith(".tmp")


def find_checkpoint(path: str, what: str = "--ckpt") -> str:
    """An ``iter_*`` dir, a checkpoints dir (its ``latest``), a run dir or a ``megavlm convert`` output → the
    checkpoint dir (what ``generate``, ``eval`` and ``convert mcore-to-hf`` accept)."""
    for cand in (path, os.path.join(path, "checkpoints")):
        if is_checkpoint(cand):
            return cand
        inner = latest_checkpoint(cand) if os.path.isdir(cand) else None
        if inner:
            return inner
    raise UserError(f"{what} {path}: no checkpoint there (expected a directory with metadata.json, a checkpoint "
                    "directory with a 'latest' file, a run directory or a megavlm convert output)")


def resolve_load_path(load: str, ckpt_dir: str) -> str | None:
    """``none`` → None; ``auto`` → latest under ckpt_dir or None; a path → that checkpoint (or the latest inside a
    checkpoint directory). A path that holds no checkpoint raises UserError saying what was looked for."""
    if load == "none":
        return None
    if load == "auto":
        return latest_checkpoint(ckpt_dir)
    if is_checkpoint(load):
        return load
    inner = latest_checkpoint(load) if os.path.isdir(load) else None
    if inner:
        return inner
    raise UserError(
        f"checkpoint.load={load}: no checkpoint there (expected a directory with metadata.json, or a checkpoint "
        f"directory with a '{LATEST}' file)")


def _rng_state() -> ShardedObject:
    pp, tp, dp = (parallel_state.get_pipeline_model_parallel_world_size(),
                  parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_data_parallel_world_size())
    state = {
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    return ShardedObject("rng_state", state, (pp, tp, dp),
                         (parallel_state.get_pipeline_model_parallel_rank(),
                          parallel_state.get_tensor_model_parallel_rank(),
                          parallel_state.get_data_parallel_rank()), replica_id=0)


def _unwrap(model):
    """The VLM inside DDP: checkpoint keys are the model's own, whatever wraps it."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _data_state(obj) -> ShardedObject:
    """The data loader's position, one per data-parallel rank (its TP/PP ranks hold copies: replicas)."""
    tp, pp_rank = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_rank())
    return ShardedObject("data_state", obj, (parallel_state.get_data_parallel_world_size(),),
                         (parallel_state.get_data_parallel_rank(),),
                         replica_id=parallel_state.get_tensor_model_parallel_rank() + tp * pp_rank)


def _sharded_state(model, optimizer, include_optimizer: bool, include_rng: bool, is_loading: bool) -> dict:
    model_sd = _unwrap(model).sharded_state_dict()
    state = {"model": model_sd}
    if include_optimizer and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPT_METADATA)
    if include_rng:
        state["rng_state"] = _rng_state()
    return state


def save(ckpt_dir: str, step: int, model, optimizer, common: dict, keep: int = 0, rng: bool = True,
         data_state=None) -> str:
    """Collective: every rank calls it. ``common`` (scheduler state, counters, layout) is saved once. Without an
    optimizer (and ``rng=False``) it writes a weights-only checkpoint, as ``megavlm convert`` does. ``data_state``:
    the data loader's position on this rank (saved once per data-parallel rank)."""
    rank0 = torch.distributed.get_rank() == 0
    final = os.path.join(ckpt_dir, _iter_name(step))
    tmp = final + ".tmp"
    if rank0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()
    state = _sharded_state(model, optimizer, include_optimizer=True, include_rng=rng, is_loading=False)
    state.update(common=dict(common, format_version=FORMAT_VERSION, step=step, has_optimizer=optimizer is not None,
                             has_data_state=data_state is not None))
    if data_state is not None:
        state["data_state"] = _data_state(data_state)
    dist_checkpointing.save(state, tmp)
    torch.distributed.barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        pointer_tmp = os.path.join(ckpt_dir, LATEST + ".tmp")
        with open(pointer_tmp, "w") as f:
            f.write(_iter_name(step) + "\n")
        os.replace(pointer_tmp, os.path.join(ckpt_dir, LATEST))
        if keep > 0:
            _prune(ckpt_dir, keep)
    torch.distributed.barrier()
    return final


def _prune(ckpt_dir: str, keep: int) -> None:
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("iter_") and not n.endswith(".tmp"))
    for n in names[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, n), ignore_errors=True)


def load_common(path: str) -> dict:
    return dist_checkpointing.load_common_state_dict(path).get("common", {})


def saved_config(path: str, common: dict | None = None):
    """The megavlm config stored in a checkpoint's common state (written by train and convert); ``common``: that
    state when already read."""
    from ..config import ConfigError, from_dict

    common = load_common(path) if common is None else common
    saved = common.get("config")
    if not isinstance(saved, dict):
        raise UserError(f"{path}: the checkpoint has no megavlm config in its common state")
    try:
        return from_dict(saved, f" (config saved in {path})")
    except ConfigError as e:
        raise UserError(str(e)) from e


def load(path: str, model, optimizer=None, same_layout: bool = True, data_state: bool = False) -> dict:
    """Load model (and optimizer when given and saved) from ``path`` into the live objects; restores RNG when
    the layout matches the saved one. Returns the checkpoint's common dict, with ``data_state`` (this rank's data
    loader position) added when asked for and saved. The caller asks only when the data-parallel layout is the
    saved one: TP/PP ranks hold copies of their DP rank's position, so TP and PP may change."""
    common = load_common(path)
    with_opt = optimizer is not None and common.get("has_optimizer", False)
    state = _sharded_state(model, optimizer, include_optimizer=with_opt, include_rng=same_layout, is_loading=True)
    with_data = data_state and common.get("has_data_state", False)
    if with_data:
        state["data_state"] = _data_state(None)
    loaded = dist_checkpointing.load(state, path)
    _unwrap(model).load_state_dict(loaded["model"])
    if with_opt:
        optimizer.load_state_dict(loaded["optimizer"])
    if same_layout and "rng_state" in loaded:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    if with_data:
        common = dict(common, data_state=loaded["data_state"])
    return common

"""Process start-up: torch.distributed from torchrun's environment (or a lone process), megatron's
parallel_state, device choice and seeding."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cpu_compat: bool

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_world_size() -> int:
    """World size as torchrun announces it (1 for a lone process); known before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize(tp: int, pp: int, seed: int, timeout_minutes: int = 10) -> Runtime:
    """Start torch.distributed and megatron's parallel_state (or reuse them when this process already runs the same
    TP/PP), after config checks."""
    from datetime import timedelta

    from megatron.core import parallel_state

    from . import cpu

    if "RANK" not in os.environ:  # a lone process: no torchrun needed
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    compat = cpu.enable_if_needed()

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes)
        )
    if parallel_state.model_parallel_is_initialized():  # already up in this process (tests, eval after train)
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            from ..errors import UserError

            raise UserError(f"this process already runs TP={have[0]}/PP={have[1]}; it cannot switch to TP={tp}/PP={pp}")
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            create_gloo_process_groups=not compat,
        )
    rt = Runtime(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        device=device,
        backend=backend,
        tp=tp,
        pp=pp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        cpu_compat=compat,
    )
    set_seed(seed, rt)
    return rt


def set_seed(seed: int, rt: Runtime) -> None:
    """Megatron-LM's seeding: one seed per pipeline stage; megatron's tracker adds TP-rank offsets."""
    from megatron.core import tensor_parallel

    s = seed + 100 * rt.pp_rank
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    tensor_parallel.model_parallel_cuda_manual_seed(s, force_reset_rng=not rt.cpu_compat)


def shutdown() -> None:
    from megatron.core import parallel_state

    if torch.distributed.is_initialized():
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()

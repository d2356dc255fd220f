"""What makes megatron-core run on CPU with gloo. Enabled only when CUDA is absent.

megatron-core assumes CUDA in places that have no hook (see ../shared/DESIGN.md for the list measured on
0.19.2). Rather than patching each call site, this module keeps every workaround in one place:

1. A ``TorchFunctionMode`` that rewrites CUDA device arguments to CPU: ``torch.zeros(..., device="cuda")`` in
   ``pipeline_parallel/schedules.py`` and ``p2p_communication.py`` (receive buffers),
   ``device=torch.cuda.current_device()`` in ``param_and_grad_buffer.py`` / ``utils.GlobalMemoryBuffer``,
   ``.cuda()`` in ``models/vision/clip_vit_model.py`` and ``rotary_pos_embedding.py``.
   It also answers ``Tensor.type()`` with the CUDA type name for CPU float tensors, because
   ``optimizer/clip_grads.py`` (``param.grad.type() == 'torch.cuda.FloatTensor'``) and
   ``optimizer/distrib_optimizer.py`` (the fp32 shard branch) test for it.
2. No-op stand-ins for ``torch.cuda.current_device/current_stream/synchronize/Stream/stream`` used by
   ``distributed/param_and_grad_buffer.py`` and ``dist_checkpointing/strategies/filesystem_async.py``.
3. A CPU RNG tracker in place of ``tensor_parallel/random.py``'s ``CudaRNGStatesTracker`` (which calls
   ``torch.cuda.get_rng_state``): the "cuda" RNG states become CPU generator states.

Nothing here is imported for its side effects: call :func:`enable` once, after checking that CUDA is absent.

The mode sends every torch call through Python (``__torch_function__``), ~3,700 calls per step of configs/demo.yaml, of
which only megatron's schedule set-up and optimizer need it. The model's forward needs none of it (megatron's forward
code asks ``torch.cuda.current_device()``, which item 2 answers, as in backward and in activation recompute), nor does
the data build, so the trainer runs both inside :func:`suspended`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_STATE = {"enabled": False, "mode": None, "saved": {}}

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, int):  # torch.cuda.current_device() returns an int index
        return True
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments to CPU and makes ``.cuda()`` a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` on CPU: every operation is already ordered."""

    cuda_stream = 0

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return None


def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's RNG tracker with the CPU generator standing in for the CUDA one."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def enable() -> None:
    """Turn the compatibility layer on (idempotent). Refuses when CUDA is available."""
    if _STATE["enabled"]:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megavlm.runtime.cpu must not be enabled when CUDA is available")
    saved = _STATE["saved"]
    for name, repl in {
        # A device, not an index: ``device=torch.cuda.current_device()`` also runs inside autograd backward
        # (``tensor_parallel/layers.py`` sequence-parallel reduce-scatter), where no TorchFunctionMode is active.
        "current_device": lambda: torch.device("cpu"),
        "current_stream": lambda *a, **k: _NullStream(),
        "default_stream": lambda *a, **k: _NullStream(),
        "synchronize": lambda *a, **k: None,
        "Stream": _NullStream,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "set_device": lambda *a, **k: None,
    }.items():
        saved[name] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, repl)

    from megatron.core.tensor_parallel import random as mrandom

    saved["rng_tracker"] = (mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    mrandom._CUDA_RNG_STATE_TRACKER = _make_cpu_rng_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # Activation recompute (train.recompute): megatron's CheckpointFunction saves/restores the CUDA RNG state
    # (tensor_parallel/random.py `_get_cuda_rng_state` / `_set_cuda_rng_state`), and the recomputed core attention
    # builds its causal mask with device="cuda" (fused_softmax.py, `get_default_causal_mask` from
    # transformer/utils.py) inside backward, where the TorchFunctionMode is not active. The CPU generator stands in.
    from megatron.core.fusions import fused_softmax

    saved["megatron_fns"] = [(mrandom, "_get_cuda_rng_state", mrandom._get_cuda_rng_state),
                             (mrandom, "_set_cuda_rng_state", mrandom._set_cuda_rng_state),
                             (fused_softmax, "get_default_causal_mask", fused_softmax.get_default_causal_mask)]
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    fused_softmax.get_default_causal_mask = functools.lru_cache(
        lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool())

    mode = _CudaToCpuMode()
    mode.__enter__()
    _STATE.update(enabled=True, mode=mode)


def disable() -> None:
    """Undo :func:`enable` (used by tests)."""
    if not _STATE["enabled"]:
        return
    _STATE["mode"].__exit__(None, None, None)
    saved = _STATE["saved"]
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = saved.pop("rng_tracker")
    for module, name, orig in saved.pop("megatron_fns"):
        setattr(module, name, orig)
    for name, orig in saved.items():
        setattr(torch.cuda, name, orig)
    saved.clear()
    _STATE.update(enabled=False, mode=None)


@contextlib.contextmanager
def suspended():
    """Run the block without the device-rewriting mode (item 1; the stand-ins of items 2-3 stay), when it is the
    innermost torch-function mode; otherwise, or when the layer is off, change nothing."""
    mode = _STATE["mode"]
    depth = torch._C._len_torch_function_stack()
    if mode is None or depth == 0 or torch._C._get_function_stack_at(depth - 1) is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


def is_enabled() -> bool:
    return _STATE["enabled"]


def enable_if_needed() -> bool:
    """Enable the layer exactly when CUDA is absent; returns whether it is active."""
    if not torch.cuda.is_available():
        enable()
    return is_enabled()

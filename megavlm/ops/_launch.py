"""What every op's CUDA wrapper shares: the extension, device and stream of a launch, raw pointers, dtype names, fp32
parameter copies, and the NaN-poisoned output buffers the GPU tests ask for.

The wrappers call ``megavlm._C`` with raw device addresses on ``torch.cuda.current_stream()`` (see docs/kernels.md);
on CPU tensors they run a torch emulation instead and never reach this module's launch helpers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ext

__all__ = ["dtype_name", "empty", "f32", "launch_ctx", "ptr", "set_poison"]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_POISON = False


def set_poison(on: bool) -> None:
    """Testing hook: fill every buffer that a kernel is expected to fully write with NaN first."""
    global _POISON
    _POISON = bool(on)


def empty(shape, dtype: torch.dtype, device) -> Tensor:
    """A buffer a kernel will fully write (NaN-filled under ``set_poison(True)``)."""
    if _POISON and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dtype_name(dt: torch.dtype) -> str:
    """The kernels' name of a floating dtype ('float32' | 'float16' | 'bfloat16'); ValueError for any other."""
    try:
        return _DTYPE_NAMES[dt]
    except KeyError:
        raise ValueError(f"fused CUDA kernels support float32/float16/bfloat16, got {dt}") from None


def launch_ctx(t: Tensor):
    """(extension, device index, raw stream handle) for a CUDA tensor."""
    ext = _ext.require()
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(t.device).cuda_stream
    return ext, dev, stream


def ptr(t: Tensor | None) -> int:
    """Device address of ``t``, 0 for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def f32(t: Tensor | None, shape=None) -> Tensor | None:
    """Detached contiguous fp32 copy/view (kernel-side parameters are fp32)."""
    if t is None:
        return None
    t = t.detach()
    if shape is not None:
        t = t.reshape(shape)
    return t.to(torch.float32).contiguous()

"""Which implementation a public op (``ops.patch_embed``, ``ops.projector``) runs: the fused CUDA kernels or the
PyTorch reference.

``resolve_kernels(mode)``:
    'reference' -> 'reference'
    'fused'     -> 'fused', or RuntimeError explaining why it cannot run
                   (no CUDA device / CPU-only torch, megavlm._C not built, ...)
    'auto'      -> 'fused' iff CUDA is available and megavlm._C is built and
                   sees a device, else 'reference'
    None        -> $MEGAVLM_KERNELS or 'auto'

``route`` applies it to one call: with 'auto', inputs that live on the CPU always take the reference path. A choice
already resolved (the model resolves ``model.kernels`` once, when it is built) is passed with ``resolved=True``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import _ext

__all__ = ["fused_unavailable_reason", "resolve_kernels", "route"]

_MODES = ("auto", "fused", "reference")
_UNSET = object()
_reason_cache = _UNSET


def fused_unavailable_reason() -> str | None:
    """None when the fused kernels can run, else a human-readable reason (cached)."""
    global _reason_cache
    if _reason_cache is not _UNSET:
        return _reason_cache
    if not torch.cuda.is_available():
        reason = "torch.cuda.is_available() is False (no CUDA device, or a CPU-only torch build)"
    else:
        ext = _ext.load()
        if ext is None:
            reason = (f"megavlm._C is not built or not importable ({_ext.error()}); build it with "
                      "`python -m megavlm._build`")
        elif not ext.cuda_available():
            reason = f"megavlm._C cannot use CUDA: {ext.cuda_status()}"
        else:
            reason = None
    _reason_cache = reason
    return reason


def _reset_cache() -> None:
    """Testing hook: forget the cached availability check."""
    global _reason_cache
    _reason_cache = _UNSET


def resolve_kernels(mode: str | None = "auto") -> str:
    """'auto' | 'fused' | 'reference' (or None -> $MEGAVLM_KERNELS) -> 'fused' | 'reference'."""
    if mode is None:
        mode = os.environ.get("MEGAVLM_KERNELS", "auto")
    mode = str(mode).strip().lower()
    if mode not in _MODES:
        raise ValueError(f"kernels must be one of {_MODES}, got {mode!r}")
    if mode == "reference":
        return "reference"
    reason = fused_unavailable_reason()
    if mode == "fused":
        if reason is not None:
            raise RuntimeError(f"fused megavlm kernels were requested but cannot run: {reason}")
        return "fused"
    return "fused" if reason is None else "reference"


def route(kernels: str | None, *tensors: Tensor | None, resolved: bool = False) -> str:
    """'fused' or 'reference' for one call of a public op over ``tensors``.

    resolved=False: ``kernels`` is a request ('auto' | 'fused' | 'reference' | None), resolved by ``resolve_kernels``
        (an unavailable 'fused' raises RuntimeError); 'auto' gives CPU inputs the reference path, an explicit 'fused'
        with inputs off CUDA is a ValueError.
    resolved=True: ``kernels`` is a choice ``resolve_kernels`` already made ('fused' | 'reference'), taken as it is:
        'fused' runs the fused implementation wherever the inputs are (on CPU tensors the torch emulation of its
        kernels, which is how the CPU tests check the model's fused wiring).
    """
    if resolved:
        if kernels not in ("fused", "reference"):
            raise ValueError(f"a resolved kernels choice is 'fused' or 'reference', got {kernels!r}")
        return kernels
    impl = resolve_kernels(kernels)
    if impl == "fused":
        devs = [t.device for t in tensors if t is not None]
        if any(d.type != "cuda" for d in devs):
            if kernels is not None and str(kernels).strip().lower() == "fused":
                raise ValueError(f"fused kernels need CUDA tensors; got devices {sorted({str(d) for d in devs})}")
            return "reference"
    return impl

"""Multi-tensor (``torch._foreach_*``) paths for megatron-core's optimizer where it would otherwise loop per tensor.

Without Transformer Engine and apex (every CPU run, and GPU images without them), megatron-core 0.19.2 falls back to
``megatron/core/utils.py`` ``local_multi_tensor_l2_norm`` / ``local_multi_tensor_scale`` for the gradient norm and
clipping: one ``torch.norm`` per tensor and then ``torch.tensor(list_of_0d_tensors)``, which reads every norm back to
the host (one device sync per parameter on a GPU), and one ``copy_(src * scale)`` per tensor. Those are replaced here,
in one place, by the same math on ``torch._foreach_*`` lists; TE's or apex's kernels, when megatron found them, are
kept. And megatron builds torch's ``AdamW`` with neither ``foreach`` nor ``fused``: :func:`use_fused_adam` turns on
torch's fused kernel (one pass over each parameter, on CPU and CUDA; 4.8x faster than ``foreach`` on 2 CPU cores,
docs/perf.md), ``foreach`` where the fused kernel does not take the parameters.
"""

from __future__ import annotations

import torch


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm`` (megatron's ``local_multi_tensor_l2_norm``): the l2 norm of all
    tensors of ``tensor_lists[0]`` together, as a float32 ``(1,)`` tensor on their device, without a host sync."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float), None
    norms = torch._foreach_norm(tensors, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale`` (megatron's ``local_multi_tensor_scale``): ``dst = src * scale``."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install_foreach_fallbacks() -> bool:
    """Point megatron's clip_grads and optimizer modules at the foreach versions where they hold the local per-tensor
    fallbacks (megatron/core/optimizer/clip_grads.py lines 36-46, optimizer.py lines 33-38 in 0.19.2). Returns
    whether it did. Idempotent."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mopt

    done = False
    if getattr(clip_grads, "l2_norm_impl", None) in (utils.local_multi_tensor_l2_norm, foreach_l2_norm):
        clip_grads.l2_norm_impl = foreach_l2_norm
        clip_grads.multi_tensor_scale_impl = foreach_scale
        done = True
    if getattr(mopt, "multi_tensor_scale_impl", None) in (utils.local_multi_tensor_scale, foreach_scale):
        mopt.multi_tensor_scale_impl = foreach_scale
    return done


def use_fused_adam(optimizer) -> str | None:
    """Run the torch Adam(W) inside megatron's wrapper(s) (chained or not) with torch's fused kernel, or ``foreach``
    where the fused one does not support the parameters' device or dtype. The update is elementwise either way, so a
    parameter's new value does not depend on how the parameters are split over TP/PP or the distributed optimizer's
    shards. Returns which path runs ("fused" / "foreach"; None: no torch Adam inside)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # (a torch without the helper: the multi-tensor path)
        devices = []
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    path = None
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        params = [p for g in torch_opt.param_groups for p in g["params"]]
        fused = bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)
        path = "fused" if fused else "foreach"
        torch_opt.defaults.update(fused=fused, foreach=not fused)
        for group in torch_opt.param_groups:
            group.update(fused=fused, foreach=not fused)
    return path

"""training/optim.py: megatron's torch AdamW switched to torch's fused kernel (the foreach path where the kernel does
not take the parameters), with the same updates as torch's reference AdamW."""

from __future__ import annotations

import types

import torch

from megavlm.training.optim import use_fused_adam


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (7, 300, 33)]


def test_fused_adamw_updates_equal_the_reference():
    ours, ref, start = _params(0), _params(0), _params(0)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    wrapper = types.SimpleNamespace(optimizer=torch.optim.AdamW(ours, **kw))  # megatron's wrappers hold .optimizer
    assert use_fused_adam(wrapper) == "fused"
    assert all(g["fused"] and not g["foreach"] for g in wrapper.optimizer.param_groups)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **kw)
    for step in range(3):
        for a, b in zip(ours, ref):
            grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step + a.numel()))
            a.grad, b.grad = grad.clone(), grad.clone()
        wrapper.optimizer.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all((a - s).abs().max() > 1e-3 for a, s in zip(ours, start))  # the steps moved every parameter


def test_chained_and_unsupported_fall_back_to_foreach():
    meta = torch.nn.Parameter(torch.empty(4, device="meta"))
    chained = types.SimpleNamespace(chained_optimizers=[
        types.SimpleNamespace(optimizer=torch.optim.AdamW(_params(1))),
        types.SimpleNamespace(optimizer=torch.optim.AdamW([meta]))])
    assert use_fused_adam(chained) == "foreach"  # the last one: meta tensors have no fused kernel
    first, second = (o.optimizer.param_groups[0] for o in chained.chained_optimizers)
    assert first["fused"] and not first["foreach"]
    assert second["foreach"] and not second["fused"]
    assert use_fused_adam(types.SimpleNamespace(optimizer=None)) is None

"""megavlm's local layers in models/specs.py against what they stand in for: the SwiGLU activation module against
plain-PyTorch autograd of megatron's unfused ``glu`` (``silu(gate) * (up + 0.0)`` on ``chunk(x, 2)``, forward and
gradients bit-identical); ColumnLinear / RowLinear against megatron's own ColumnParallelLinear / RowParallelLinear
(TP=1: outputs bit-identical, gradients to float rounding); and the built layers really use them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megavlm.models import specs


def test_swiglu_equals_megatron_glu_bitwise():
    torch.manual_seed(0)
    for shape in [(7, 3, 2 * 48), (5, 2 * 33)]:  # [s, b, 2F] and an odd F
        x = torch.randn(*shape, dtype=torch.float64 if shape[-1] == 66 else torch.float32, requires_grad=True)
        g = torch.randn(*shape[:-1], shape[-1] // 2, dtype=x.dtype)
        gate, up = torch.chunk(x, 2, dim=-1)
        ref = F.silu(gate) * (up + 0.0)
        (ref_dx,) = torch.autograd.grad(ref, x, g)
        x2 = x.detach().clone().requires_grad_(True)
        out = specs._SwiGLUFunction.apply(x2)
        (dx,) = torch.autograd.grad(out, x2, g)
        assert torch.equal(out, ref)
        assert torch.equal(dx, ref_dx)
        assert dx.abs().sum() > 0


def test_decoder_layers_use_swiglu(rt):
    """The LLaVA decoder's MLPs call the SwiGLU module (megatron's switch is set by block_spec); the TE spec and
    non-gated encoders keep megatron's own path."""
    from megavlm.config import load_config
    from megavlm.models.vlm import build_model

    cfg = load_config("configs/tiny_cpu.yaml", ["parallel.pp=1", "parallel.tp=1"])
    model = build_model(cfg, rt, 300, 4)
    mlps = [layer.mlp for layer in model.language_model.decoder.layers]
    assert mlps and all(isinstance(m.activation_func, specs.SwiGLU) for m in mlps)
    assert all(isinstance(m.linear_fc1, specs.ColumnLinear) and isinstance(m.linear_fc2, specs.RowLinear)
               for m in mlps)
    assert model.language_model.config.use_te_activation_func
    vit = [layer.mlp for layer in model.vision_model.decoder.layers]
    assert vit and all(not isinstance(m.activation_func, specs.SwiGLU) for m in vit)


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("bias", [True, False])
def test_autograd_linear_equals_megatron_linear(rt, kind, bias):
    import megatron.core.tensor_parallel.layers as layers
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megavlm.config import load_config

    cfg = load_config("configs/tiny_cpu.yaml", ["parallel.pp=1"])
    config = specs.language_config(cfg, rt, torch.float32)
    ours_cls, ref_cls = (specs.ColumnLinear, ColumnParallelLinear) if kind == "column" else (
        specs.RowLinear, RowParallelLinear)
    kw = dict(config=config, init_method=torch.nn.init.normal_, bias=bias, skip_bias_add=False)
    kw.update(gather_output=False) if kind == "column" else kw.update(input_is_parallel=True)
    torch.manual_seed(0)
    ref = ref_cls(24, 40, **kw)
    ours = ours_cls(24, 40, **kw)
    ours.load_state_dict(ref.state_dict())
    calls = []
    orig = layers.LinearWithGradAccumulationAndAsyncCommunication.apply
    layers.LinearWithGradAccumulationAndAsyncCommunication.apply = lambda *a: (calls.append(1), orig(*a))[1]
    try:
        x = torch.randn(6, 3, 24)
        g = torch.randn(6, 3, 40)
        outs = []
        for m in (ref, ours):
            xi = x.clone().requires_grad_(True)
            y, _ = m(xi)
            y.backward(g)
            outs.append((y, xi.grad, m.weight.grad, m.bias.grad if bias else None))
    finally:
        layers.LinearWithGradAccumulationAndAsyncCommunication.apply = orig
    assert len(calls) == 1  # megatron's Function ran for the reference only
    (y0, dx0, dw0, db0), (y1, dx1, dw1, db1) = outs
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    torch.testing.assert_close(dw1, dw0, rtol=1e-6, atol=1e-6)
    assert dw0.abs().sum() > 0
    if bias:
        torch.testing.assert_close(db1, db0, rtol=1e-6, atol=1e-6)
